/**
 * The host's certificates: its server identity (generated once, kept 0600 in
 * the state directory) and the generator of each instance's agent and client
 * key pairs. Used by the daemon and by the CLI when it registers instances
 * without a daemon. Needs read/write on the state directory.
 * @module
 */

import { generateKeyPair, readKeyPair, writeKeyPair } from "../shared/tls/key_pair.ts";
import type { KeyPairGenerator } from "./instance_service.ts";
import type { StatePaths } from "./state_dir.ts";

/**
 * The curve of the certificates the host makes: its server identity and each
 * instance's agent and client pairs. P-256 rather than LXD's P-384: a mutual
 * handshake costs ≈ 40 % less CPU on both ends (tests/bench/tls.ts: 1,448 →
 * 891 µs per request), and peers only pin the exact certificate, so LXD, Go and
 * a stock `lxd-agent` accept it as they accept any ECDSA certificate. Existing
 * P-384 certificates in a state directory or the registry are kept and used.
 */
export const HOST_KEY_CURVE = "P-256";

/** The host's TLS identity: generated once ({@linkcode HOST_KEY_CURVE}), 0600 in the state directory. */
export async function ensureServerCertificate(
  paths: StatePaths,
): Promise<{ cert: string; key: string }> {
  try {
    return await readKeyPair(paths.dir, "server");
  } catch (error) {
    const missing = error instanceof Deno.errors.NotFound ||
      (error as Error)?.cause instanceof Deno.errors.NotFound;
    if (!missing) throw error;
  }
  const pair = await generateKeyPair({
    commonName: "lxd-vsock-host",
    curve: HOST_KEY_CURVE,
    days: 3650,
  });
  await writeKeyPair(paths.dir, "server", pair);
  return pair;
}

/** Agent and per-instance client pairs: ECDSA {@linkcode HOST_KEY_CURVE}, 10 years. */
export const generateInstanceKeyPair: KeyPairGenerator = ({ commonName }) =>
  generateKeyPair({ commonName, curve: HOST_KEY_CURVE, days: 3650 });

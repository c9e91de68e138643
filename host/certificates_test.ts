import assert from "node:assert/strict";
import * as crypto from "node:crypto";
import { generateKeyPair, writeKeyPair } from "../shared/tls/key_pair.ts";
import {
  ensureServerCertificate,
  generateInstanceKeyPair,
  HOST_KEY_CURVE,
} from "./certificates.ts";
import { prepareStateDir } from "./state_dir.ts";

function curveOf(pem: string): string | undefined {
  return new crypto.X509Certificate(pem).publicKey.asymmetricKeyDetails?.namedCurve;
}

Deno.test("generateInstanceKeyPair() makes ECDSA P-256 certificates", async () => {
  assert.equal(HOST_KEY_CURVE, "P-256");
  const pair = await generateInstanceKeyPair({ commonName: "vm1" });
  assert.equal(curveOf(pair.cert), "prime256v1");
});

Deno.test("ensureServerCertificate() makes a P-256 identity once and keeps an existing P-384 one", async () => {
  const dir = await Deno.makeTempDir({ prefix: "lxd-vsock-certificates-test-" });
  try {
    const fresh = await prepareStateDir(`${dir}/fresh`);
    const made = await ensureServerCertificate(fresh);
    assert.equal(curveOf(made.cert), "prime256v1");
    assert.deepEqual(await ensureServerCertificate(fresh), made);

    const old = await prepareStateDir(`${dir}/old`);
    const p384 = await generateKeyPair({ commonName: "lxd-vsock-host", curve: "P-384" });
    await writeKeyPair(old.dir, "server", p384);
    const kept = await ensureServerCertificate(old);
    assert.equal(kept.cert, p384.cert);
    assert.equal(curveOf(kept.cert), "secp384r1");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

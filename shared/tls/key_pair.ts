/**
 * Self-signed ECDSA key pairs (WebCrypto + `@peculiar/x509`, imported on first use) and their files.
 *
 * Certificates follow what LXD's Go code expects when it pins a peer by
 * turning its certificate into a one-element root pool: a SAN DNS name equal
 * to the common name (Go uses `DNSNames[0]` as the TLS server name), both the
 * serverAuth and clientAuth extended key usages, and no CA flag. Keys are
 * written as PKCS#8 `PRIVATE KEY` PEM, which Go's `tls.X509KeyPair` and
 * rustls both read.
 *
 * Permissions: `--allow-read`/`--allow-write` on the directory for
 * {@linkcode readKeyPair}/{@linkcode writeKeyPair}; generation needs none.
 *
 * @module
 */

import { writeFileAtomic } from "../write_file_atomic.ts";

// `@peculiar/x509` (with `reflect-metadata`) costs ≈ 45 ms to compile and ≈ 12 MB of
// memory: it is loaded on the first generateKeyPair(), never by a process that only
// reads its key pairs (the agent, a host restarting with its certificates in place).
let x509Module: Promise<typeof import("@peculiar/x509")> | undefined;

function loadX509(): Promise<typeof import("@peculiar/x509")> {
  x509Module ??= import("reflect-metadata").then(() => import("@peculiar/x509"));
  return x509Module;
}

/** A PEM certificate and its PEM private key. */
export interface KeyPair {
  cert: string;
  key: string;
}

/** Options for {@linkcode generateKeyPair}. */
export interface GenerateKeyPairOptions {
  /**
   * Subject common name, also written as the SAN DNS name (Go clients such as
   * LXD's verify against it). A name that is not a valid DNS name goes into
   * the SAN made valid: lowercased, other characters as `-`, labels cut to 63.
   * @default "lxd-vsock"
   */
  commonName?: string;
  /**
   * Validity in days from `notBefore`; ignored when `notAfter` is given.
   * @default 3650
   */
  days?: number;
  /**
   * ECDSA curve; the signature hash follows it (SHA-384 for P-384, SHA-256 for P-256).
   * @default "P-384" (as LXD; the host daemon asks for P-256, a cheaper handshake)
   */
  curve?: "P-256" | "P-384";
  /**
   * Start of validity.
   * @default one minute ago (tolerates small clock skew between host and guest)
   */
  notBefore?: Date;
  /** End of validity. @default `notBefore` + `days` */
  notAfter?: Date;
}

const DAY_MS = 86_400_000;

/** Generates a self-signed ECDSA certificate and private key. */
export async function generateKeyPair(options: GenerateKeyPairOptions = {}): Promise<KeyPair> {
  const { commonName = "lxd-vsock", days = 3650, curve = "P-384" } = options;
  if (curve !== "P-256" && curve !== "P-384") {
    throw new TypeError(`Cannot generate key pair: unsupported curve ${JSON.stringify(curve)}`);
  }
  if (!Number.isFinite(days) || days <= 0) {
    throw new RangeError(`Cannot generate key pair: days must be positive, got ${days}`);
  }
  const notBefore = options.notBefore ?? new Date(Date.now() - 60_000);
  const notAfter = options.notAfter ?? new Date(notBefore.getTime() + days * DAY_MS);
  if (notAfter.getTime() <= notBefore.getTime()) {
    throw new RangeError("Cannot generate key pair: notAfter must be after notBefore");
  }
  const algorithm = {
    name: "ECDSA",
    namedCurve: curve,
    hash: curve === "P-384" ? "SHA-384" : "SHA-256",
  };
  const x509 = await loadX509();
  const keys = await crypto.subtle.generateKey(algorithm, true, ["sign", "verify"]);
  const serial = crypto.getRandomValues(new Uint8Array(16));
  serial[0] = (serial[0] & 0x7f) | 0x01; // positive, 16 bytes, as Go's 128-bit serials
  const certificate = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: Array.from(serial, (byte) => byte.toString(16).padStart(2, "0")).join(""),
    name: [{ CN: [commonName] }, { O: ["lxd-vsock"] }],
    notBefore,
    notAfter,
    keys,
    signingAlgorithm: algorithm,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(
        x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment,
        true,
      ),
      new x509.ExtendedKeyUsageExtension([
        x509.ExtendedKeyUsage.serverAuth,
        x509.ExtendedKeyUsage.clientAuth,
      ]),
      new x509.SubjectAlternativeNameExtension([{ type: "dns", value: dnsName(commonName) }]),
    ],
  });
  const pkcs8 = await crypto.subtle.exportKey("pkcs8", keys.privateKey);
  return {
    cert: certificate.toString("pem") + "\n",
    key: x509.PemConverter.encode(pkcs8, "PRIVATE KEY") + "\n",
  };
}

/** `name` as a valid DNS name (RFC 1123 labels), for the SAN. */
export function dnsName(name: string): string {
  const labels = name.toLowerCase().split(".").map((label) =>
    label.replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 63).replace(/-+$/, "")
  ).filter((label) => label !== "");
  const joined = labels.join(".").slice(0, 253).replace(/[.-]+$/, "");
  return joined === "" ? "lxd-vsock" : joined;
}

/**
 * Writes `${dir}/${name}.crt` and `${dir}/${name}.key`, each atomically
 * (a temporary file in `dir`, mode 0600, then a rename).
 */
export async function writeKeyPair(dir: string, name: string, pair: KeyPair): Promise<void> {
  await writeAtomic(`${dir}/${name}.crt`, pair.cert);
  await writeAtomic(`${dir}/${name}.key`, pair.key);
}

async function writeAtomic(path: string, text: string): Promise<void> {
  try {
    await writeFileAtomic(path, text, { mode: 0o600 });
  } catch (error) {
    throw new Error(`Cannot write ${path}: ${(error as Error).message}`, { cause: error });
  }
}

/**
 * Reads `${dir}/${name}.crt` and `${dir}/${name}.key`.
 *
 * @throws {Error} naming the file when one is missing, unreadable or not PEM.
 */
export async function readKeyPair(dir: string, name: string): Promise<KeyPair> {
  const cert = await readPem(`${dir}/${name}.crt`, "CERTIFICATE");
  const key = await readPem(`${dir}/${name}.key`, "PRIVATE KEY");
  return { cert, key };
}

async function readPem(path: string, label: string): Promise<string> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    throw new Error(`Cannot read ${path}: ${(error as Error).message}`, { cause: error });
  }
  if (!text.includes(`-----BEGIN `) || !text.includes(`${label}-----`)) {
    throw new Error(`Cannot read ${path}: no PEM ${label} block`);
  }
  return text;
}

/**
 * Helpers for the agent's tests (not shipped behaviour): bounded waits.
 * Needs no permissions.
 * @module
 */

/** Resolves with `promise`, or rejects after `ms` naming `what`. */
export async function within<T>(promise: Promise<T>, what: string, ms = 5000): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`Timed out waiting for ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` every 10 ms until it returns a value other than undefined/false, at most `ms`. */
export async function until<T>(
  check: () => T | undefined | false | Promise<T | undefined | false>,
  what: string,
  ms = 5000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A PEM certificate and its PKCS#8 PEM key. */
export interface TestPair {
  cert: string;
  key: string;
}

function pem(label: string, der: ArrayBuffer): string {
  const b64 = btoa(String.fromCharCode(...new Uint8Array(der)));
  return `-----BEGIN ${label}-----\n${b64.match(/.{1,64}/g)!.join("\n")}\n-----END ${label}-----\n`;
}

/** A self-signed ECDSA P-256 certificate, valid from a minute ago for a day unless told. */
export async function makeTestPair(
  commonName: string,
  validity: { notBefore?: Date; notAfter?: Date } = {},
): Promise<TestPair> {
  await import("reflect-metadata");
  const x509 = await import("@peculiar/x509");
  const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" };
  const keys = await crypto.subtle.generateKey(alg, true, ["sign", "verify"]) as CryptoKeyPair;
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: "01",
    name: `CN=${commonName}`,
    notBefore: validity.notBefore ?? new Date(Date.now() - 60_000),
    notAfter: validity.notAfter ?? new Date(Date.now() + 86_400_000),
    keys,
    signingAlgorithm: alg,
  });
  return {
    cert: cert.toString("pem") + "\n",
    key: pem("PRIVATE KEY", await crypto.subtle.exportKey("pkcs8", keys.privateKey)),
  };
}

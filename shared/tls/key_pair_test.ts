import "reflect-metadata";
import * as x509 from "@peculiar/x509";
import assert from "node:assert/strict";
import { dnsName, generateKeyPair, readKeyPair, writeKeyPair } from "./key_pair.ts";
import {
  certificateDer,
  certificateFingerprint,
  certificateValidity,
  sameCertificate,
} from "./certificate.ts";

Deno.test("generateKeyPair() makes a P-384 self-signed certificate valid 10 years by default", async () => {
  const before = Date.now();
  const pair = await generateKeyPair({ commonName: "agent" });
  const cert = new x509.X509Certificate(pair.cert);
  const key = cert.publicKey.algorithm as EcKeyAlgorithm;
  assert.equal(key.name, "ECDSA");
  assert.equal(key.namedCurve, "P-384");
  assert.equal(cert.subject, "CN=agent, O=lxd-vsock");
  assert.equal(cert.issuer, cert.subject);
  assert.ok(await cert.verify({ signatureOnly: true }));
  const san = cert.getExtension(x509.SubjectAlternativeNameExtension);
  assert.deepEqual(san?.names.items.map((name) => name.value), ["agent"]);
  const days = (cert.notAfter.getTime() - cert.notBefore.getTime()) / 86_400_000;
  assert.ok(Math.abs(days - 3650) < 1, `validity ${days} days`);
  assert.ok(cert.notBefore.getTime() <= before);
  assert.match(pair.key, /^-----BEGIN PRIVATE KEY-----\n/);
});

Deno.test("generateKeyPair() honours curve, notBefore and notAfter", async () => {
  const notBefore = new Date("2020-01-02T03:04:05Z");
  const notAfter = new Date("2060-06-07T08:09:10Z");
  const pair = await generateKeyPair({ curve: "P-256", notBefore, notAfter });
  const cert = new x509.X509Certificate(pair.cert);
  assert.equal((cert.publicKey.algorithm as EcKeyAlgorithm).namedCurve, "P-256");
  assert.deepEqual(certificateValidity(pair.cert), { notBefore, notAfter });
});

Deno.test("generateKeyPair() rejects an end before the start", async () => {
  await assert.rejects(
    generateKeyPair({ notBefore: new Date(2030, 0), notAfter: new Date(2029, 0) }),
    RangeError,
  );
});

Deno.test("writeKeyPair() writes .crt and .key with mode 0600 that readKeyPair() reads back", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const pair = await generateKeyPair({ curve: "P-256" });
    await writeKeyPair(dir, "agent", pair);
    for (const file of ["agent.crt", "agent.key"]) {
      assert.equal((await Deno.stat(`${dir}/${file}`)).mode! & 0o777, 0o600, file);
    }
    assert.deepEqual(await readKeyPair(dir, "agent"), pair);
    assert.deepEqual((await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort(), [
      "agent.crt",
      "agent.key",
    ]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("writeKeyPair() replaces an existing pair", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await writeKeyPair(dir, "server", await generateKeyPair({ curve: "P-256" }));
    const second = await generateKeyPair({ curve: "P-256" });
    await writeKeyPair(dir, "server", second);
    assert.deepEqual(await readKeyPair(dir, "server"), second);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readKeyPair() names the missing file", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await assert.rejects(readKeyPair(dir, "agent"), (error: Error) => {
      assert.ok(error.message.includes(`${dir}/agent.crt`), error.message);
      return true;
    });
    const pair = await generateKeyPair({ curve: "P-256" });
    await Deno.writeTextFile(`${dir}/agent.crt`, pair.cert);
    await assert.rejects(readKeyPair(dir, "agent"), (error: Error) => {
      assert.ok(error.message.includes(`${dir}/agent.key`), error.message);
      return true;
    });
    await Deno.writeTextFile(`${dir}/agent.key`, "not a key");
    await assert.rejects(readKeyPair(dir, "agent"), /agent\.key: no PEM PRIVATE KEY block/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("certificateDer() decodes PEM and throws SyntaxError on anything else", async () => {
  const pair = await generateKeyPair({ curve: "P-256" });
  const der = certificateDer(pair.cert);
  assert.deepEqual(der, new Uint8Array(new x509.X509Certificate(pair.cert).rawData));
  assert.throws(() => certificateDer("hello"), SyntaxError);
  assert.throws(() => certificateDer(pair.key), SyntaxError);
});

Deno.test("certificateFingerprint() is the lowercase SHA-256 hex of the DER, from PEM or DER", async () => {
  const pair = await generateKeyPair({ curve: "P-256" });
  const der = certificateDer(pair.cert);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", der));
  const hex = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  assert.equal(certificateFingerprint(pair.cert), hex);
  assert.equal(certificateFingerprint(der), hex);
});

Deno.test("certificateValidity() throws SyntaxError on truncated DER", async () => {
  const der = certificateDer((await generateKeyPair({ curve: "P-256" })).cert);
  assert.throws(() => certificateValidity(der.subarray(0, 40)), SyntaxError);
  assert.throws(() => certificateValidity(new Uint8Array([0x30, 0x84, 0xff])), SyntaxError);
});

Deno.test("sameCertificate() compares bytes, including different lengths", async () => {
  const a = certificateDer((await generateKeyPair({ curve: "P-256" })).cert);
  const b = certificateDer((await generateKeyPair({ curve: "P-256" })).cert);
  assert.equal(sameCertificate(a, a.slice()), true);
  assert.equal(sameCertificate(a, b), false);
  assert.equal(sameCertificate(a, a.subarray(1)), false);
});

Deno.test("dnsName() keeps valid DNS names and makes others valid", () => {
  assert.equal(dnsName("vm1.agent.lxd-vsock"), "vm1.agent.lxd-vsock");
  assert.equal(dnsName("lxd-vsock-agent My_VM"), "lxd-vsock-agent-my-vm");
  assert.equal(dnsName("a".repeat(70) + ".x"), "a".repeat(63) + ".x");
  assert.equal(dnsName("..--.."), "lxd-vsock");
});

Deno.test("generateKeyPair() writes a valid DNS name into the SAN when the common name is not one", async () => {
  const cert = new x509.X509Certificate((await generateKeyPair({ commonName: "agent vm 1" })).cert);
  assert.equal(cert.subject, "CN=agent vm 1, O=lxd-vsock");
  const san = cert.getExtension(x509.SubjectAlternativeNameExtension);
  assert.deepEqual(san?.names.items.map((name) => name.value), ["agent-vm-1"]);
});

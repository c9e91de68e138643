import assert from "node:assert/strict";
import { IdentityError, readIdentity } from "./identity.ts";

const CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";

async function identityDir(files: Record<string, string>): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "agent-identity-" });
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${dir}/${name}`, text);
  }
  return dir;
}

Deno.test("readIdentity() reads the pair, the pinned host cert and agent.conf", async () => {
  const conf = { cid: 2, port: 1234, certificate: CERT, devlxd: false };
  const dir = await identityDir({
    "agent.crt": CERT,
    "agent.key": KEY,
    "server.crt": CERT,
    "agent.conf": JSON.stringify(conf),
  });
  try {
    const identity = await readIdentity(dir);
    assert.equal(identity.cert, CERT);
    assert.equal(identity.key, KEY);
    assert.equal(identity.serverCert, CERT);
    assert.deepEqual(identity.connection, conf);
    assert.equal(identity.connectionError, undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readIdentity() treats a missing agent.conf as no connection info", async () => {
  const dir = await identityDir({ "agent.crt": CERT, "agent.key": KEY, "server.crt": CERT });
  try {
    const identity = await readIdentity(dir);
    assert.equal(identity.connection, undefined);
    assert.equal(identity.connectionError, undefined);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readIdentity() reports an invalid agent.conf without failing", async () => {
  const dir = await identityDir({
    "agent.crt": CERT,
    "agent.key": KEY,
    "server.crt": CERT,
    "agent.conf": JSON.stringify({ cid: 2, port: 70000, certificate: CERT }),
  });
  try {
    const identity = await readIdentity(dir);
    assert.equal(identity.connection, undefined);
    assert.match(identity.connectionError ?? "", /agent\.conf.*port/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("readIdentity() names each missing or malformed identity file", async () => {
  const cases: [Record<string, string>, string, RegExp][] = [
    [{ "agent.key": KEY, "server.crt": CERT }, "agent.crt", /no such file/],
    [{ "agent.crt": CERT, "server.crt": CERT }, "agent.key", /no such file/],
    [{ "agent.crt": CERT, "agent.key": KEY }, "server.crt", /no such file/],
    [{ "agent.crt": "junk", "agent.key": KEY, "server.crt": CERT }, "agent.crt", /not a PEM/],
    [{ "agent.crt": CERT, "agent.key": CERT, "server.crt": CERT }, "agent.key", /not a PEM/],
  ];
  for (const [files, name, why] of cases) {
    const dir = await identityDir(files);
    try {
      await assert.rejects(readIdentity(dir), (e: unknown) => {
        assert.ok(e instanceof IdentityError);
        assert.equal(e.path, `${dir}/${name}`);
        assert.ok(e.message.includes(`${dir}/${name}`), e.message);
        assert.match(e.message, why);
        return true;
      });
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  }
});

Deno.test("readIdentity() keeps the certificate of an agent.conf written before the host ran (port 0)", async () => {
  const dir = await identityDir({
    "agent.crt": CERT,
    "agent.key": KEY,
    "server.crt": CERT,
    "agent.conf": JSON.stringify({ cid: 2, port: 0, certificate: CERT, devlxd: true }),
  });
  try {
    const identity = await readIdentity(dir);
    assert.equal(identity.connection, undefined);
    assert.equal(identity.connectionError, undefined);
    assert.deepEqual(identity.pendingHost, { certificate: CERT, devlxd: true });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

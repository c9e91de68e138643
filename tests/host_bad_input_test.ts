/**
 * Hostile and broken agents against a daemon process, over the unix
 * ("hybrid vsock") transport with real TLS: each gets a clear refusal and
 * leaves the daemon serving the others.
 */

import "reflect-metadata";
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import { join } from "node:path";
import tls from "node:tls";
import type { Duplex } from "node:stream";
import { httpRequest } from "../shared/http/mod.ts";
import { generateKeyPair } from "../shared/tls/key_pair.ts";
import {
  agentConnection,
  type AgentIdentity,
  agentIdentity,
  agentRequest,
  bounded,
  cliOk,
  connectHybridListener,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

interface Setup extends AsyncDisposable {
  daemon: DaemonProcess;
  stateDir: string;
  hybrid: Record<string, string>;
  id: Record<string, AgentIdentity>;
}

async function setup(
  extra: string[] = [],
  before?: (stateDir: string) => Promise<void>,
): Promise<Setup> {
  const dir = await tempDir("host-bad-");
  const hybrid: Record<string, string> = {};
  for (const [name, cid] of [["vm1", 10], ["vm2", 11]] as const) {
    hybrid[name] = join(dir.path, `${name}.vsock`);
    await cliOk([
      "instance",
      "add",
      name,
      "--cid",
      String(cid),
      "--hybrid",
      hybrid[name],
      "--state-dir",
      dir.path,
      "-c",
      "user.foo=bar",
      "-c",
      "security.devlxd.images=true",
    ]);
  }
  await before?.(dir.path);
  const daemon = await DaemonProcess.start(dir.path, extra);
  const id = {
    vm1: await agentIdentity(dir.path, "vm1"),
    vm2: await agentIdentity(dir.path, "vm2"),
  };
  return {
    daemon,
    stateDir: dir.path,
    hybrid,
    id,
    [Symbol.asyncDispose]: async () => {
      await daemon[Symbol.asyncDispose]();
      await dir[Symbol.asyncDispose]();
    },
  };
}

/** Resolves when `socket` ends or errors, with what was read before. */
function drained(socket: Duplex): Promise<string> {
  return new Promise((resolve) => {
    let text = "";
    socket.on("data", (chunk) => text += chunk);
    socket.once("end", () => resolve(text));
    socket.once("error", () => resolve(text));
    socket.once("close", () => resolve(text));
  });
}

async function stillServes(t: Setup): Promise<void> {
  const ok = await agentRequest(t.hybrid.vm1, t.daemon.port, t.id.vm1, "/1.0/config/user.foo");
  assert.equal(ok.body.metadata, "bar");
}

function rawTls(socket: Duplex, options: tls.ConnectionOptions): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const secure = tls.connect({
      socket: socket as never,
      rejectUnauthorized: false,
      checkServerIdentity: () => undefined,
      ...options,
    });
    secure.once("secureConnect", () => resolve(secure));
    secure.once("error", reject);
  });
}

Deno.test("an unknown client certificate gets 401 in the LXD envelope and the connection closes", async () => {
  await using t = await setup();
  const stranger = await generateKeyPair({ commonName: "stranger" });
  using connection = await agentConnection(t.hybrid.vm1, t.daemon.port, {
    ...stranger,
    serverCert: t.id.vm1.serverCert,
  });
  const closed = drained(connection);
  const response = await httpRequest(connection, new Request("http://devlxd/1.0"), {
    timeout: 5000,
  });
  assert.equal(response.status, 401);
  const body = await response.json();
  assert.deepEqual([body.type, body.error, body.error_code, body.metadata], [
    "error",
    "Unauthorized",
    401,
    null,
  ]);
  await bounded(closed, 5000, "the connection to close");
  await t.daemon.waitFor(/msg="unauthorized agent connection"/);
  await stillServes(t);
});

Deno.test("instance vm1's certificate presented on vm2's path (the wrong CID) gets 401", async () => {
  await using t = await setup();
  const r = await agentRequest(t.hybrid.vm2, t.daemon.port, t.id.vm1, "/1.0/config/user.foo");
  assert.equal(r.status, 401);
  assert.equal(r.body.error, "Unauthorized");
  assert.equal(r.body.metadata, null);
  await stillServes(t);
});

Deno.test("a client without a certificate is refused during the handshake", async () => {
  await using t = await setup();
  const raw = await connectHybridListener(t.hybrid.vm1, t.daemon.port);
  const outcome = await bounded(
    rawTls(raw, { minVersion: "TLSv1.3" }).then(async (secure) => {
      const ended = drained(secure);
      secure.write("GET /1.0 HTTP/1.1\r\nhost: x\r\n\r\n");
      return await ended;
    }, (error) => `error: ${error.message}`),
    10_000,
    "the refusal",
  );
  raw.destroy();
  assert.doesNotMatch(outcome, /HTTP\/1\.1 200/);
  await stillServes(t);
});

Deno.test("an expired agent certificate is refused even though it is the registered one", async () => {
  const expired = await generateKeyPair({
    commonName: "expired",
    notBefore: new Date("2020-01-01T00:00:00Z"),
    notAfter: new Date("2021-01-01T00:00:00Z"),
  });
  await using t = await setup([], (stateDir) => {
    using db = new DatabaseSync(join(stateDir, "registry.db"));
    db.prepare("UPDATE instances SET agent_cert = ? WHERE name = 'vm2'").run(expired.cert);
    return Promise.resolve();
  });
  const identity = { ...expired, serverCert: t.id.vm2.serverCert };
  const outcome = await bounded(
    agentRequest(t.hybrid.vm2, t.daemon.port, identity, "/1.0").then(
      (r) => `status ${r.status}`,
      (e) => `error ${e}`,
    ),
    10_000,
    "the refusal",
  );
  assert.match(outcome, /^error/);
  await stillServes(t);
});

Deno.test("a TLS 1.2 client is refused", async () => {
  await using t = await setup();
  const raw = await connectHybridListener(t.hybrid.vm1, t.daemon.port);
  await assert.rejects(
    bounded(
      rawTls(raw, { ...t.id.vm1, maxVersion: "TLSv1.2", minVersion: "TLSv1.2" }),
      10_000,
      "the refusal",
    ),
  );
  raw.destroy();
  await stillServes(t);
});

Deno.test("garbage before the TLS hello closes the connection without an answer", async () => {
  await using t = await setup();
  using raw = await connectHybridListener(t.hybrid.vm1, t.daemon.port);
  const ended = drained(raw);
  raw.write("GET /1.0 HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage");
  const text = await bounded(ended, 10_000, "the connection to close");
  assert.doesNotMatch(text, /HTTP\/1\.1 200/);
  await stillServes(t);
});

Deno.test("request headers over the bound get 431 and a body over the bound 413", async () => {
  await using t = await setup();
  {
    using c = await agentConnection(t.hybrid.vm1, t.daemon.port, t.id.vm1);
    const request = new Request("http://devlxd/1.0", {
      headers: { "x-big": "a".repeat(64 * 1024) },
    });
    const status = await httpRequest(c, request, { timeout: 5000 }).then(
      (r) => r.status,
      () => "closed",
    );
    assert.equal(status, 431);
  }
  {
    using c = await agentConnection(t.hybrid.vm1, t.daemon.port, t.id.vm1);
    const request = new Request("http://devlxd/1.0", {
      method: "PATCH",
      body: "x".repeat(4 << 20),
    });
    const status = await httpRequest(c, request, { timeout: 5000 }).then(
      (r) => r.status,
      () => "closed",
    );
    assert.equal(status, 413);
  }
  await stillServes(t);
});

Deno.test("a slowloris client is cut off after the header timeout", async () => {
  await using t = await setup();
  using c = await agentConnection(t.hybrid.vm1, t.daemon.port, t.id.vm1);
  const ended = drained(c);
  c.write("GET /1.0 HTTP/1.1\r\n");
  let dribble = 0;
  const timer = setInterval(() => {
    if (!c.destroyed && c.writable) c.write(`x-slow-${dribble++}: 1\r\n`);
  }, 200);
  try {
    const text = await bounded(ended, 15_000, "the slow connection to be closed");
    assert.doesNotMatch(text, /HTTP\/1\.1 200/);
  } finally {
    clearInterval(timer);
  }
  await stillServes(t);
});

Deno.test("unknown paths get 404, wrong methods 405, bad PATCH bodies 400, traversal 400 — over the wire", async () => {
  await using t = await setup();
  const req = (path: string, init?: RequestInit) =>
    agentRequest(t.hybrid.vm1, t.daemon.port, t.id.vm1, path, init);
  assert.equal((await req("/1.0/nope")).status, 404);
  assert.equal((await req("/1.0/devices", { method: "DELETE" })).status, 405);
  const invalidBody = await req("/1.0", { method: "PATCH", body: "{" });
  assert.deepEqual([invalidBody.status, invalidBody.body.error], [400, "Invalid request body"]);
  const invalidState = await req("/1.0", { method: "PATCH", body: '{"state":"Asleep"}' });
  assert.deepEqual([invalidState.status, invalidState.body.error], [400, "Invalid state"]);
  const key = await req("/1.0/config/..%2F..%2Fregistry.db");
  assert.deepEqual([key.status, key.body.error], [400, "Invalid config key"]);
  const fp = await req("/1.0/images/..%2F..%2Fregistry.db/export");
  assert.deepEqual([fp.status, fp.body.error], [400, "Invalid fingerprint"]);
  const outside = await req("/1.0/config/security.devlxd.images");
  assert.deepEqual([outside.status, outside.body.error], [403, "Forbidden"]);
  const list = JSON.parse(
    await cliOk(["instance", "list", "--format", "json", "--state-dir", t.stateDir]),
  );
  assert.equal(list[0].runtime.ready, false);
});

Deno.test("one VM over its connection cap is refused while another VM is still served", async () => {
  await using t = await setup(["--max-connections-per-instance", "2"]);
  using a = await agentConnection(t.hybrid.vm1, t.daemon.port, t.id.vm1);
  using b = await agentConnection(t.hybrid.vm1, t.daemon.port, t.id.vm1);
  // Counted once authenticated: the third agent connection is closed after its handshake.
  using extra = await agentConnection(t.hybrid.vm1, t.daemon.port, t.id.vm1);
  await bounded(drained(extra), 10_000, "the connection over the cap to be closed");
  await t.daemon.waitFor(/too many connections/);
  const other = await agentRequest(t.hybrid.vm2, t.daemon.port, t.id.vm2, "/1.0");
  assert.equal(other.status, 200);
  assert.ok(a.writable && b.writable);
});

Deno.test("a client that stalls in the TLS handshake is cut off after the handshake timeout", async () => {
  await using t = await setup();
  using raw = await connectHybridListener(t.hybrid.vm1, t.daemon.port);
  const ended = drained(raw);
  // The start of a TLS record header, then nothing.
  raw.write(new Uint8Array([0x16, 0x03, 0x01]));
  const text = await bounded(ended, 15_000, "the stalled handshake to be closed");
  assert.equal(text, "");
  await stillServes(t);
});

import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import { announce, probeAgent, pushEvent, retryable } from "./announcer.ts";
import { MtlsError } from "../../shared/http/mod.ts";
import { FakeAgent, makeIdentity, makeTarget, unixConnect } from "../../tests/fakes/agent.ts";
import { tempDir } from "./_test_util.ts";
import type { ConnectionInfo, DevlxdEvent } from "../../shared/api.ts";

const host = await makeIdentity("lxd-vsock-host");
const INFO: ConnectionInfo = { cid: 2, port: 40123, certificate: host.cert, devlxd: true };
const EVENT: DevlxdEvent = {
  timestamp: "2026-11-24T00:00:00Z",
  type: "config",
  metadata: { key: "user.foo", old_value: "", value: "bar" },
};

function refusing() {
  let calls = 0;
  const connect = () => {
    calls++;
    return Promise.reject(Object.assign(new Error("connection refused"), { code: "ECONNREFUSED" }));
  };
  return Object.assign(connect, { calls: () => calls });
}

Deno.test("announce() PUTs the connection info to the agent over mutual TLS", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  await using fake = new FakeAgent(`${dir.path}/agent`, { agent, clientCert: target.clientCert });
  await fake.ready;
  const result = await announce(target, INFO, { connect: unixConnect(fake.path) });
  assert.deepEqual(result, { attempts: 1 });
  assert.deepEqual(fake.puts, [INFO]);
});

Deno.test("announce() fails fast when the agent refuses the connection", async () => {
  const { target } = await makeTarget("vm1");
  const connect = refusing();
  await assert.rejects(
    announce(target, INFO, { connect, attempts: 5, retryDelay: 1 }),
    (e: unknown) => e instanceof MtlsError && e.reason === "refused" && !retryable(e),
  );
  assert.equal(connect.calls(), 1);
});

Deno.test("announce() retries a connect that times out, a bounded number of times", async () => {
  const { target } = await makeTarget("vm1");
  let calls = 0;
  const hanging = (signal: AbortSignal) => {
    calls++;
    return new Promise<Duplex>((_, reject) =>
      signal.addEventListener("abort", () => reject(signal.reason))
    );
  };
  await assert.rejects(
    announce(target, INFO, { connect: hanging, connectTimeout: 20, attempts: 3, retryDelay: 1 }),
    (e: unknown) => e instanceof MtlsError && e.reason === "timeout",
  );
  assert.equal(calls, 3);
});

Deno.test("announce() retries an agent that accepts but never completes the handshake", async () => {
  await using dir = await tempDir();
  const { target } = await makeTarget("vm1");
  const path = `${dir.path}/silent`;
  using listener = Deno.listen({ transport: "unix", path });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) held.push(conn);
  })();
  try {
    await assert.rejects(
      announce(target, INFO, {
        connect: unixConnect(path),
        timeout: 100,
        attempts: 2,
        retryDelay: 1,
      }),
      (e: unknown) => e instanceof MtlsError && e.reason === "timeout",
    );
    assert.equal(held.length, 2);
  } finally {
    listener.close();
    await accepting.catch(() => {});
    for (const conn of held) conn.close();
  }
});

Deno.test("announce() reports a 500 as rejected: the agent could not reach the host", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  await using fake = new FakeAgent(`${dir.path}/agent`, {
    agent,
    clientCert: target.clientCert,
    onPut: () => 500,
  });
  await fake.ready;
  await assert.rejects(
    announce(target, INFO, { connect: unixConnect(fake.path), attempts: 3 }),
    (e: unknown) =>
      e instanceof MtlsError && e.reason === "status" && e.status === 500 &&
      /failed to connect to host/.test(e.message),
  );
  assert.equal(fake.requests.length, 1);
});

Deno.test("announce() refuses an agent presenting another certificate than agent.crt", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  const impostor = await makeIdentity("impostor");
  await using fake = new FakeAgent(`${dir.path}/agent`, {
    agent: impostor,
    clientCert: target.clientCert,
  });
  await fake.ready;
  await assert.rejects(
    announce(target, INFO, { connect: unixConnect(fake.path) }),
    (e: unknown) => e instanceof MtlsError && e.reason === "tls",
  );
  assert.deepEqual(fake.puts, []);
  assert.notEqual(agent.cert, impostor.cert);
});

Deno.test("pushEvent() POSTs the event JSON to /1.0/events", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  await using fake = new FakeAgent(`${dir.path}/agent`, { agent, clientCert: target.clientCert });
  await fake.ready;
  await pushEvent(target, EVENT, { connect: unixConnect(fake.path) });
  assert.deepEqual(fake.events, [EVENT]);
});

Deno.test("probeAgent() returns the agent's pid from GET /1.0", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  await using fake = new FakeAgent(`${dir.path}/agent`, {
    agent,
    clientCert: target.clientCert,
    pid: 77,
  });
  await fake.ready;
  const probe = await probeAgent(target, { connect: unixConnect(fake.path) });
  assert.equal(probe.pid, 77);
  assert.equal(probe.connection, undefined);
});

Deno.test("probeAgent() returns the host address the agent reports, or null when it has none", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  await using withInfo = new FakeAgent(`${dir.path}/a`, {
    agent,
    clientCert: target.clientCert,
    connection: { cid: 2, port: 1234 },
  });
  await using without = new FakeAgent(`${dir.path}/b`, {
    agent,
    clientCert: target.clientCert,
    connection: null,
  });
  await Promise.all([withInfo.ready, without.ready]);
  const a = await probeAgent(target, { connect: unixConnect(withInfo.path) });
  const b = await probeAgent(target, { connect: unixConnect(without.path) });
  assert.deepEqual(a.connection, { cid: 2, port: 1234 });
  assert.equal(b.connection, null);
});

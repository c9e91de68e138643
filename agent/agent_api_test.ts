import assert from "node:assert/strict";
import type { ConnectionInfo } from "../shared/api.ts";
import { GuestAgentStatus } from "./agent_state.ts";
import { createAgentApi } from "./agent_api.ts";
import { makeTestPair } from "./_testing.ts";

const hostPair = await makeTestPair("host");

function api(apply: (info: ConnectionInfo) => Promise<void> = () => Promise.resolve()) {
  const status = new GuestAgentStatus();
  const applied: ConnectionInfo[] = [];
  const published: unknown[] = [];
  const app = createAgentApi({
    status: () => status.snapshot(),
    applyConnection: (info) => {
      applied.push(info);
      return apply(info);
    },
    publish: (event) => published.push(event),
    version: "9.9",
  });
  return { app, status, applied, published };
}

function put(body: unknown): RequestInit {
  return { method: "PUT", body: typeof body === "string" ? body : JSON.stringify(body) };
}

Deno.test("agent API GET /1.0 reports the agent's pid, state, connection, devlxd and ready", async () => {
  const { app, status } = api();
  status.setHost({ cid: 2, port: 4000 }, "PUT /1.0");
  status.hostAnnounced();
  status.connected();
  status.setDevlxd(true, true);
  const res = await app.request("/1.0");
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.type, "sync");
  assert.equal(body.metadata.api_version, "1.0");
  assert.equal(body.metadata.environment.server_pid, Deno.pid);
  assert.equal(body.metadata.environment.server_version, "9.9");
  assert.equal(body.metadata.state, "CONNECTED");
  assert.deepEqual(body.metadata.connection, { cid: 2, port: 4000 });
  assert.equal(body.metadata.devlxd, true);
  assert.equal(body.metadata.ready, false);
});

Deno.test("agent API PUT /1.0 applies valid connection info and answers 200", async () => {
  const { app, applied } = api();
  const info = { cid: 2, port: 51000, certificate: hostPair.cert, devlxd: true };
  const res = await app.request("/1.0", put(info));
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.type, "sync");
  assert.equal(body.metadata.environment.server_pid, Deno.pid);
  assert.deepEqual(applied, [info]);
});

Deno.test("agent API PUT /1.0 answers 500 with the reason when the host is not reachable", async () => {
  const { app } = api(() =>
    Promise.reject(new Error("The host at vsock 2:51000 refused the connection."))
  );
  const res = await app.request("/1.0", put({ cid: 2, port: 51000, certificate: hostPair.cert }));
  assert.equal(res.status, 500);
  const body = await res.json();
  assert.equal(body.type, "error");
  assert.equal(body.error_code, 500);
  assert.match(body.error, /refused the connection/);
});

Deno.test("agent API PUT /1.0 refuses bad bodies with 400 and applies nothing", async () => {
  const expired = await makeTestPair("old", {
    notBefore: new Date(Date.now() - 2 * 86_400_000),
    notAfter: new Date(Date.now() - 86_400_000),
  });
  const garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
  const cases: [unknown, RegExp][] = [
    ["not json", /not JSON/],
    [[], /JSON object/],
    [{ cid: 2, port: 0, certificate: hostPair.cert }, /port/],
    [{ cid: "2", port: 1, certificate: hostPair.cert }, /cid/],
    [{ cid: 2, port: 1, certificate: "nope" }, /certificate/],
    [{ cid: 2, port: 1, certificate: garbled }, /Invalid certificate/],
    [{ cid: 2, port: 1, certificate: expired.cert }, /expired/],
    [{ cid: 2, port: 1, certificate: hostPair.cert, devlxd: "yes" }, /devlxd/],
  ];
  const { app, applied } = api();
  for (const [body, message] of cases) {
    const res = await app.request("/1.0", put(body));
    assert.equal(res.status, 400, JSON.stringify(body));
    assert.match((await res.json()).error, message);
  }
  const huge = await app.request("/1.0", put("x".repeat(100_000)));
  assert.equal(huge.status, 413);
  await huge.body?.cancel();
  assert.equal(applied.length, 0);
});

Deno.test("agent API POST /1.0/events hands the event to local subscribers", async () => {
  const { app, published } = api();
  const event = {
    type: "config",
    timestamp: "t",
    metadata: { key: "user.a", old_value: "", value: "1" },
  };
  const res = await app.request("/1.0/events", { method: "POST", body: JSON.stringify(event) });
  assert.equal(res.status, 200);
  assert.deepEqual(published, [event]);
  for (const bad of ["nope", "[]", '{"metadata":{}}']) {
    const r = await app.request("/1.0/events", { method: "POST", body: bad });
    assert.equal(r.status, 400, bad);
    await r.body?.cancel();
  }
  assert.equal(published.length, 1);
});

Deno.test("agent API answers unknown paths with a 404 envelope", async () => {
  const { app } = api();
  const res = await app.request("/1.0/exec", { method: "POST" });
  assert.equal(res.status, 404);
  assert.equal((await res.json()).type, "error");
});

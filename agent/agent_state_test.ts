import assert from "node:assert/strict";
import { GuestAgentStatus, type StatusSnapshot } from "./agent_state.ts";

async function stateDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "agent-state-" });
}

function readSnapshot(path: string): StatusSnapshot {
  return JSON.parse(Deno.readTextFileSync(path));
}

Deno.test("GuestAgentStatus starts STARTED and writes the state file", async () => {
  const dir = await stateDir();
  try {
    const status = new GuestAgentStatus({ stateFile: `${dir}/run/state.json`, version: "1.2.3" });
    assert.equal(status.state, "STARTED");
    const file = readSnapshot(`${dir}/run/state.json`);
    assert.equal(file.state, "STARTED");
    assert.equal(file.pid, Deno.pid);
    assert.equal(file.version, "1.2.3");
    assert.equal(file.ready, false);
    assert.equal(file.host, null);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("GuestAgentStatus records connections, failures with their reason, and transitions", async () => {
  const dir = await stateDir();
  try {
    let t = Date.parse("2026-01-01T00:00:00Z");
    const status = new GuestAgentStatus({
      stateFile: `${dir}/state.json`,
      now: () => new Date(t += 1000),
    });
    const transitions: string[] = [];
    status.onTransition((state, previous) => transitions.push(`${previous}->${state}`));
    status.setHost({ cid: 2, port: 1234 }, "PUT /1.0");
    status.hostAnnounced();
    status.connected();
    status.connected();
    status.failed("connection refused");
    status.stopped();
    status.connected();
    assert.deepEqual(transitions, ["STARTED->CONNECTED", "CONNECTED->STARTED", "STARTED->STOPPED"]);
    const file = readSnapshot(`${dir}/state.json`);
    assert.equal(file.state, "STOPPED");
    assert.deepEqual(file.host, { cid: 2, port: 1234 });
    assert.equal(file.hostSource, "PUT /1.0");
    assert.equal(file.lastFailure?.reason, "connection refused");
    assert.ok(file.lastConnected !== null && file.lastConnected.startsWith("2026-01-01T"));
    assert.ok(file.lastConnected < file.lastFailure!.at, "failure recorded after the connection");
    const leftovers = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
    assert.deepEqual(leftovers, ["state.json"], "no temp file left behind");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("GuestAgentStatus stays STARTED while the host answers but has not announced itself since the start (LXD 5.0.2 acts only on STARTED)", () => {
  const status = new GuestAgentStatus();
  const transitions: string[] = [];
  status.onTransition((state, previous) => transitions.push(`${previous}->${state}`));
  status.setHost({ cid: 2, port: 1234 }, "agent.conf");
  status.connected();
  status.connected();
  assert.equal(status.state, "STARTED");
  assert.equal(status.announced, false);
  assert.ok(status.snapshot().lastConnected !== null, "the answer is recorded");
  status.hostAnnounced();
  status.connected();
  assert.equal(status.state, "CONNECTED");
  status.failed("connection refused");
  status.connected();
  assert.equal(status.state, "CONNECTED", "one announce per start is enough");
  assert.deepEqual(transitions, ["STARTED->CONNECTED", "CONNECTED->STARTED", "STARTED->CONNECTED"]);
});

Deno.test("GuestAgentStatus keeps the Ready flag across restarts of the agent", async () => {
  const dir = await stateDir();
  try {
    const first = new GuestAgentStatus({ stateFile: `${dir}/state.json` });
    first.setReady(true);
    assert.equal(Deno.readTextFileSync(`${dir}/ready`), "Ready\n");
    const second = new GuestAgentStatus({ stateFile: `${dir}/state.json` });
    assert.equal(second.ready, true);
    assert.equal(readSnapshot(`${dir}/state.json`).ready, true);
    second.setReady(false);
    assert.equal(new GuestAgentStatus({ stateFile: `${dir}/state.json` }).ready, false);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("GuestAgentStatus without a state file keeps working in memory", () => {
  const status = new GuestAgentStatus();
  status.setDevlxd(true, true);
  status.setReady(true);
  assert.equal(status.ready, true);
  assert.deepEqual(status.snapshot().devlxd, {
    enabled: true,
    serving: true,
    socket: "/dev/lxd/sock",
    error: undefined,
  });
});

Deno.test("GuestAgentStatus writes a repeated connection only on flush()", async () => {
  const dir = await stateDir();
  try {
    let t = Date.parse("2026-01-01T00:00:00Z");
    const status = new GuestAgentStatus({
      stateFile: `${dir}/state.json`,
      now: () => new Date(t += 1000),
    });
    status.hostAnnounced();
    status.connected();
    const first = readSnapshot(`${dir}/state.json`).lastConnected;
    status.connected();
    assert.equal(readSnapshot(`${dir}/state.json`).lastConnected, first, "not rewritten yet");
    status.flush();
    assert.ok(readSnapshot(`${dir}/state.json`).lastConnected! > first!);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

import assert from "node:assert/strict";
import type { StatusSnapshot } from "./agent_state.ts";
import { formatStatus, readStatus, statusExitCode } from "./status_command.ts";
import { isAgentAlive, livenessPath, LivenessSocket } from "./liveness.ts";

const SNAPSHOT: StatusSnapshot = {
  pid: 4242,
  version: "0.1.0",
  state: "CONNECTED",
  host: { cid: 2, port: 51234 },
  hostSource: "PUT /1.0",
  lastConnected: "2026-01-01T00:00:05.000Z",
  lastFailure: { at: "2026-01-01T00:00:01.000Z", reason: "The host refused the connection." },
  devlxd: { enabled: true, serving: true, socket: "/dev/lxd/sock" },
  ready: true,
  serialPort: "/dev/virtio-ports/org.linuxcontainers.lxd",
  startedAt: "2026-01-01T00:00:00.000Z",
  updatedAt: "2026-01-01T00:00:06.000Z",
};

async function withStateFile(
  content: string | undefined,
  f: (path: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    if (content !== undefined) await Deno.writeTextFile(`${dir}/state.json`, content);
    await f(`${dir}/state.json`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("--status of a connected agent prints its state, host, times, devlxd and ready; exit 0", async () => {
  await withStateFile(JSON.stringify(SNAPSHOT), async (path) => {
    const report = await readStatus(path, () => Promise.resolve(true));
    assert.equal(statusExitCode(report), 0);
    const text = formatStatus(report, "text");
    assert.match(text, /State: +CONNECTED \(pid 4242/);
    assert.match(text, /Host: +vsock 2:51234 from PUT \/1\.0/);
    assert.match(text, /Connected: +2026-01-01T00:00:05/);
    assert.match(text, /Last error: .*refused/);
    assert.match(text, /devlxd: +serving \/dev\/lxd\/sock/);
    assert.match(text, /Ready: +yes/);
    const json = JSON.parse(formatStatus(report, "json"));
    assert.equal(json.running, true);
    assert.equal(json.state, "CONNECTED");
    assert.deepEqual(json.host, { cid: 2, port: 51234 });
  });
});

Deno.test("--status of a STARTED agent exits 1", async () => {
  await withStateFile(JSON.stringify({ ...SNAPSHOT, state: "STARTED" }), async (path) => {
    const report = await readStatus(path, () => Promise.resolve(true));
    assert.equal(statusExitCode(report), 1);
    assert.match(formatStatus(report, "text"), /State: +STARTED/);
  });
});

Deno.test("--status says clearly when no agent is running", async () => {
  await withStateFile(undefined, async (path) => {
    const report = await readStatus(path);
    assert.equal(statusExitCode(report), 1);
    assert.match(formatStatus(report, "text"), /^No agent is running \(no state file at /);
    assert.equal(JSON.parse(formatStatus(report, "json")).running, false);
  });
  await withStateFile(JSON.stringify(SNAPSHOT), async (path) => {
    const report = await readStatus(path, () => Promise.resolve(false));
    assert.equal(statusExitCode(report), 1);
    assert.match(formatStatus(report, "text"), /No agent is running \(pid 4242.*is gone\)/);
  });
  await withStateFile(JSON.stringify({ ...SNAPSHOT, state: "STOPPED" }), async (path) => {
    assert.match(
      formatStatus(await readStatus(path, () => Promise.resolve(true)), "text"),
      /pid 4242 stopped/,
    );
  });
  await withStateFile("{garbage", async (path) => {
    assert.match(formatStatus(await readStatus(path), "text"), /not a state file/);
  });
});

Deno.test("--status sees a running agent through its liveness socket, and a dead one's leftover file as gone", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const stateFile = `${dir}/state.json`;
    await Deno.writeTextFile(stateFile, JSON.stringify(SNAPSHOT));
    assert.equal(livenessPath(stateFile), `${dir}/agent.sock`);
    const socket = new LivenessSocket(livenessPath(stateFile));
    assert.equal((await readStatus(stateFile)).running, true);
    await socket.close();
    assert.equal(await isAgentAlive(livenessPath(stateFile)), false);
    assert.equal((await readStatus(stateFile)).running, false);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * The host daemon as a separate process, reached as an agent would reach it
 * over the unix ("hybrid vsock") transport with real mutual TLS, and driven
 * by the CLI through its admin socket.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { httpRequest } from "../shared/http/mod.ts";
import {
  agentConnection,
  agentIdentity,
  agentRequest,
  bounded,
  cli,
  cliOk,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

async function addHybrid(
  stateDir: string,
  name: string,
  cid: number,
  extra: string[] = [],
): Promise<string> {
  const hybrid = join(stateDir, `${name}.vsock`);
  await cliOk([
    "instance",
    "add",
    name,
    "--cid",
    String(cid),
    "--hybrid",
    hybrid,
    "--state-dir",
    stateDir,
    ...extra,
  ]);
  return hybrid;
}

Deno.test("daemon serves devlxd GET /1.0 and /1.0/config to a registered agent over TLS on its hybrid path", async () => {
  await using dir = await tempDir("host-daemon-");
  const hybrid = await addHybrid(dir.path, "vm1", 10, ["-c", "user.foo=bar", "-c", "limits.cpu=2"]);
  await using daemon = await DaemonProcess.start(dir.path);
  const id = await agentIdentity(dir.path, "vm1");
  const info = await agentRequest(hybrid, daemon.port, id, "/1.0");
  assert.equal(info.status, 200);
  assert.equal(info.body.type, "sync");
  assert.deepEqual(
    { ...(info.body.metadata as Record<string, unknown>), location: "-" },
    { api_version: "1.0", location: "-", instance_type: "virtual-machine", state: "Started" },
  );
  const config = await agentRequest(hybrid, daemon.port, id, "/1.0/config");
  assert.deepEqual(config.body.metadata, ["/1.0/config/user.foo"]);
  const value = await agentRequest(hybrid, daemon.port, id, "/1.0/config/user.foo");
  assert.equal(value.body.metadata, "bar");
  const forbidden = await agentRequest(hybrid, daemon.port, id, "/1.0/config/limits.cpu");
  assert.equal(forbidden.status, 403);
  assert.equal(forbidden.body.error_code, 403);
  assert.equal((await daemon.stop()).code, 0);
});

Deno.test("PATCH /1.0 Ready is stored durably: instance list shows it, also after a kill -9 and restart", async () => {
  await using dir = await tempDir("host-daemon-");
  const hybrid = await addHybrid(dir.path, "vm1", 10);
  const id = await agentIdentity(dir.path, "vm1");
  let firstPort = 0;
  {
    await using daemon = await DaemonProcess.start(dir.path);
    firstPort = daemon.port;
    const patched = await agentRequest(hybrid, daemon.port, id, "/1.0", {
      method: "PATCH",
      body: JSON.stringify({ state: "Ready" }),
    });
    assert.equal(patched.status, 200);
    const list = JSON.parse(
      await cliOk(["instance", "list", "--format", "json", "--state-dir", dir.path]),
    );
    assert.equal(list[0].runtime.ready, true);
    assert.match(
      await cliOk(["instance", "list", "--state-dir", dir.path]),
      /vm1\s+10\s+\S+\s+\S+\s+yes/,
    );
    assert.equal((await daemon.stop("SIGKILL")).signal, "SIGKILL");
  }
  const list = JSON.parse(
    await cliOk(["instance", "list", "--format", "json", "--state-dir", dir.path]),
  );
  assert.equal(list[0].runtime.ready, true);
  await using daemon = await DaemonProcess.start(dir.path);
  assert.equal(daemon.port, firstPort, "a restarted daemon reuses its last port");
  const info = await agentRequest(hybrid, daemon.port, id, "/1.0");
  assert.equal((info.body.metadata as { state: string }).state, "Ready");
});

Deno.test("a config change and a device added with the CLI reach the agent's open /1.0/events stream", async () => {
  await using dir = await tempDir("host-daemon-");
  const hybrid = await addHybrid(dir.path, "vm1", 10);
  await using daemon = await DaemonProcess.start(dir.path);
  using connection = await agentConnection(
    hybrid,
    daemon.port,
    await agentIdentity(dir.path, "vm1"),
  );
  const response = await bounded(
    httpRequest(connection, new Request("http://devlxd/1.0/events"), { timeout: 10_000 }),
    10_000,
    "the events response",
  );
  assert.equal(response.status, 200);
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  await daemon.waitFor(/msg="agent connected"/);
  await cliOk(["config", "set", "vm1", "user.greeting", "hello", "--state-dir", dir.path]);
  await cliOk(["device", "add", "vm1", "eth1", "type=nic", "network=br0", "--state-dir", dir.path]);
  let text = "";
  while (text.split("\n").length < 3) {
    const { value, done } = await bounded(reader.read(), 10_000, "two events");
    assert.equal(done, false);
    text += value;
  }
  const [config, device] = text.trim().split("\n").map((l) => JSON.parse(l));
  assert.equal(config.type, "config");
  assert.deepEqual(config.metadata, { key: "user.greeting", old_value: "", value: "hello" });
  assert.equal(device.type, "device");
  assert.deepEqual(device.metadata, {
    name: "eth1",
    action: "added",
    config: { type: "nic", network: "br0" },
  });
  await reader.cancel();
});

Deno.test("a second daemon on the same state directory refuses to start with a clear message", async () => {
  await using dir = await tempDir("host-daemon-");
  await using daemon = await DaemonProcess.start(dir.path);
  const second = await cli(["daemon", "--state-dir", dir.path, "--transport", "unix"]);
  assert.equal(second.code, 1);
  assert.match(second.stderr, /cannot start: .* in use by another lxd-vsock-host process/);
  const status = await cliOk(["status", "--state-dir", dir.path]);
  assert.match(status, new RegExp(`daemon: running \\(pid ${daemon.process.pid}`));
});

Deno.test("status shows the port and hybrid listeners; instances added while running get a listener", async () => {
  await using dir = await tempDir("host-daemon-");
  await using daemon = await DaemonProcess.start(dir.path);
  const hybrid = await addHybrid(dir.path, "late", 11);
  const status = JSON.parse(await cliOk(["status", "--format", "json", "--state-dir", dir.path]));
  assert.equal(status.port, daemon.port);
  assert.deepEqual(status.hybridListeners, { late: `${hybrid}_${daemon.port}` });
  const info = await agentRequest(hybrid, daemon.port, await agentIdentity(dir.path, "late"), "/");
  assert.deepEqual(info.body.metadata, ["/1.0"]);
  await cliOk(["instance", "remove", "late", "--state-dir", dir.path]);
  await assert.rejects(Deno.lstat(`${hybrid}_${daemon.port}`), Deno.errors.NotFound);
});

Deno.test("CLI registry errors exit 1 (or 2 for usage) and leave the store unchanged", async () => {
  await using dir = await tempDir("host-daemon-");
  await addHybrid(dir.path, "vm1", 10);
  const before = await cliOk(["instance", "list", "--format", "json", "--state-dir", dir.path]);
  const dup = await cli(["instance", "add", "vm1", "--cid", "12", "--state-dir", dir.path]);
  assert.equal(dup.code, 1);
  assert.match(dup.stderr, /Instance "vm1" already exists/);
  const dupCid = await cli(["instance", "add", "vm2", "--cid", "10", "--state-dir", dir.path]);
  assert.equal(dupCid.code, 1);
  assert.match(dupCid.stderr, /CID 10 is already used by instance "vm1"/);
  const low = await cli(["instance", "add", "vm2", "--cid", "2", "--state-dir", dir.path]);
  assert.equal(low.code, 2);
  assert.match(low.stderr, /Invalid CID 2/);
  const high = await cli([
    "instance",
    "add",
    "vm2",
    "--cid",
    "4294967295",
    "--state-dir",
    dir.path,
  ]);
  assert.equal(high.code, 2);
  const bad = await cli(["instance", "add", "VM_2", "--cid", "20", "--state-dir", dir.path]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Invalid instance name/);
  const key = await cli(["config", "set", "vm1", "../../etc", "x", "--state-dir", dir.path]);
  assert.equal(key.code, 1);
  assert.match(key.stderr, /Invalid config key/);
  assert.equal(
    await cliOk(["instance", "list", "--format", "json", "--state-dir", dir.path]),
    before,
  );
});

Deno.test("the events command follows lifecycle events of the running daemon", async () => {
  await using dir = await tempDir("host-daemon-");
  await addHybrid(dir.path, "vm1", 10);
  await using daemon = await DaemonProcess.start(dir.path);
  const follower = new Deno.Command(Deno.execPath(), {
    args: ["run", "-P=host", "host/main.ts", "events", "--state-dir", dir.path],
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "null",
  }).spawn();
  try {
    const reader = follower.stdout.pipeThrough(new TextDecoderStream()).getReader();
    await daemon.waitFor(/msg="lifecycle stream opened"/);
    await cliOk(["config", "set", "vm1", "user.n", "1", "--state-dir", dir.path]);
    let text = "";
    while (!text.includes("\n")) {
      const { value, done } = await bounded(reader.read(), 15_000, "a lifecycle event");
      assert.equal(done, false);
      text += value;
    }
    const event = JSON.parse(text.split("\n")[0]);
    assert.deepEqual([event.type, event.instance, event.action, event.metadata.key], [
      "lifecycle",
      "vm1",
      "config-changed",
      "user.n",
    ]);
    await reader.cancel();
  } finally {
    follower.kill("SIGTERM");
    assert.equal((await follower.status).code, 0);
  }
  assert.equal(daemon.lines.some((l) => l.includes("level=error")), false);
});

Deno.test("status NAME reads the status channel once without a daemon, and shows the monitor's view with one", async () => {
  await using dir = await tempDir("host-daemon-");
  const statusFile = join(dir.path, "vm1.status");
  await Deno.writeTextFile(statusFile, "STARTED\nCONNECTED\n");
  await cliOk([
    "instance",
    "add",
    "vm1",
    "--cid",
    "10",
    "--status-file",
    statusFile,
    "--state-dir",
    dir.path,
  ]);
  const offline = JSON.parse(
    await cliOk(["status", "vm1", "--format", "json", "--state-dir", dir.path]),
  );
  assert.equal(offline.running, false);
  assert.deepEqual([offline.reading.kind, offline.reading.state], ["file", "CONNECTED"]);
  assert.match(
    await cliOk(["status", "vm1", "--state-dir", dir.path]),
    /channel: file, read once: CONNECTED/,
  );
  await using _daemon = await DaemonProcess.start(dir.path);
  const online = JSON.parse(
    await cliOk(["status", "vm1", "--format", "json", "--state-dir", dir.path]),
  );
  assert.equal(online.running, true);
  assert.equal(online.monitor.name, "vm1");
  assert.equal(online.monitor.channel, "file");
  const missing = await cli(["status", "nope", "--state-dir", dir.path]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /Instance "nope" not found/);
});

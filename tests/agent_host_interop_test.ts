/**
 * Our agent against our host daemon, both as processes: the host's
 * `instance add` writes the config drive the agent reads, the host watches a
 * socket-backed serial port (a relay stands in for QEMU's chardev between the
 * two), announces itself, and the guest reaches the host's devlxd API through
 * /dev/lxd/sock over the hybrid transport with real mutual TLS.
 */

import assert from "node:assert/strict";
import { cliOk, DaemonProcess } from "./host_harness.ts";
import { agentPaths, AgentProcess, devlxd, runAgentCommand, within } from "./agent_harness.ts";
import { SerialRelay } from "./serial_relay.ts";

async function devlxdWhenUp(socket: string, path: string, agent: AgentProcess): Promise<Response> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    try {
      const res = await devlxd(socket, path);
      if (res.status === 200) return res;
      await res.body?.cancel();
    } catch {
      // the socket is not there yet
    }
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${path}\n${agent.stderr}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

Deno.test("agent + host daemon: config drive, announce, devlxd config and events, Ready kept across a host restart", async () => {
  const paths = await agentPaths();
  const state = `${paths.dir}/host-state`;
  const relay = new SerialRelay(`${paths.dir}/serial-host.sock`, paths.serial);
  let daemon: DaemonProcess | undefined;
  let agent: AgentProcess | undefined;
  try {
    await cliOk([
      "instance",
      "add",
      "vm1",
      "--state-dir",
      state,
      "--cid",
      "3",
      "--serial",
      relay.hostPath,
      "--hybrid",
      paths.uds,
      "--config-drive",
      paths.configDir,
      "-c",
      "user.foo=bar",
    ]);
    daemon = await DaemonProcess.start(state);
    agent = AgentProcess.start(paths);

    const value = await devlxdWhenUp(paths.devlxdSocket, "/1.0/config/user.foo", agent);
    assert.equal(await value.text(), "bar");
    const status = await runAgentCommand(["--status", `--state-file=${paths.stateFile}`]);
    assert.equal(status.code, 0, status.stdout + agent.stderr);
    assert.match(status.stdout, new RegExp(`Host: +vsock 2:${daemon.port}`));

    const client = Deno.createHttpClient({
      proxy: { transport: "unix", path: paths.devlxdSocket },
    });
    try {
      const events = await fetch("http://lxd/1.0/events?type=config", { client });
      const reader = events.body!.pipeThrough(new TextDecoderStream()).getReader();
      await cliOk(["config", "set", "vm1", "user.foo", "baz", "--state-dir", state]);
      let text = "";
      while (!text.includes("\n")) text += (await within(reader.read(), "a config event")).value;
      const event = JSON.parse(text.slice(0, text.indexOf("\n")));
      assert.equal(event.type, "config");
      assert.equal(event.metadata.key, "user.foo");
      assert.equal(event.metadata.value, "baz");
      await reader.cancel();
    } finally {
      client.close();
    }

    const ready = await devlxd(paths.devlxdSocket, "/1.0", {
      method: "PATCH",
      body: JSON.stringify({ state: "Ready" }),
    });
    assert.equal(ready.status, 200, await ready.clone().text());
    assert.equal((await (await devlxd(paths.devlxdSocket, "/1.0")).json()).state, "Ready");

    assert.equal((await daemon.stop("SIGTERM")).code, 0);
    daemon = await DaemonProcess.start(state);
    const deadline = Date.now() + 30_000;
    for (;;) {
      const res = await devlxd(paths.devlxdSocket, "/1.0");
      if (res.status === 200 && (await res.json()).state === "Ready") break;
      if (Date.now() > deadline) {
        throw new Error(`The restarted host never learnt Ready\n${agent.stderr}`);
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(await agent.stop(), 0);
  } finally {
    await agent?.[Symbol.asyncDispose]();
    await daemon?.[Symbol.asyncDispose]();
    await relay.close();
    await Deno.remove(paths.dir, { recursive: true });
  }
});

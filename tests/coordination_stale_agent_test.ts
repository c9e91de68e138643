/**
 * Our agent killed without writing STOPPED and restarted with stale
 * connection info, against our host daemon, both as processes: the daemon's
 * coordinator reads the restarted agent's STARTED on the socket-backed serial
 * port, finds with `GET /1.0` that it holds another host address, and
 * announces itself again, so the agent is back without waiting for the next
 * STOPPED/STARTED cycle (which a kill -9 never produces).
 * @module
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { bounded, cliOk, DaemonProcess } from "./host_harness.ts";
import { agentPaths, AgentProcess, runAgentCommand } from "./agent_harness.ts";
import { SerialRelay } from "./serial_relay.ts";

Deno.test("an agent killed -9 and restarted with a stale host port is announced to again at its first STARTED", async () => {
  const paths = await agentPaths();
  const state = join(paths.dir, "host-state");
  const relay = new SerialRelay(join(paths.dir, "serial-host.sock"), paths.serial);
  let daemon: DaemonProcess | undefined;
  let agent: AgentProcess | undefined;
  try {
    await cliOk([
      ...["instance", "add", "vm1", "--state-dir", state, "--cid", "3"],
      ...["--serial", relay.hostPath, "--hybrid", paths.uds, "--config-drive", paths.configDir],
    ]);
    daemon = await DaemonProcess.start(state);
    agent = AgentProcess.start(paths);
    await daemon.waitFor(/msg="agent state" .*instance=vm1 state=CONNECTED/, 30_000);

    // The config drive the agent reads at start now names a port nobody listens on.
    const confPath = join(paths.configDir, "agent.conf");
    const conf = JSON.parse(await Deno.readTextFile(confPath));
    const stalePort = daemon.port === 65000 ? 65001 : 65000;
    await Deno.writeTextFile(confPath, JSON.stringify({ ...conf, port: stalePort }) + "\n");

    await agent.stop("SIGKILL"); // no STOPPED line
    const linesBefore = daemon.lines.length;
    const restartedAt = performance.now();
    agent = AgentProcess.start(paths);
    // Depending on whether its API is up when its first STARTED arrives, the
    // check finds the stale address (GET /1.0) or no API yet; either way the
    // host announces again (PUT /1.0 and the CONNECT line).
    const line = await daemon.waitFor(
      /msg="re-announcing to a connected agent" .*instance=vm1/,
      20_000,
    ).catch((error) => {
      throw new Error(
        `${error.message}\n--- daemon\n${daemon!.lines.join("\n")}\n--- agent\n${agent!.stderr}`,
      );
    });
    const noticedMs = performance.now() - restartedAt;
    assert.match(line, /reason="agent (holds another host address|API check failed)/);
    assert.ok(daemon.lines.indexOf(line) >= linesBefore, "the re-announce follows the restart");

    // The agent took the new address and reached the host with it.
    await bounded(
      (async () => {
        for (;;) {
          const status = await runAgentCommand(["--status", `--state-file=${paths.stateFile}`]);
          if (new RegExp(`Host: +vsock 2:${daemon!.port}`).test(status.stdout)) return;
          await new Promise((r) => setTimeout(r, 100));
        }
      })(),
      20_000,
      "the agent to hold the host's port again",
    );
    console.log(`re-announced ${noticedMs.toFixed(0)} ms after the agent process started`);
    assert.equal(await agent.stop(), 0);
  } finally {
    await agent?.[Symbol.asyncDispose]();
    await daemon?.[Symbol.asyncDispose]();
    await relay.close();
    await Deno.remove(paths.dir, { recursive: true });
  }
});

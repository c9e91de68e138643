/**
 * The agent over real AF_VSOCK and a real virtio-serial port, for the VM
 * harness (tests/vm). Skipped unless LXD_VSOCK_LOOPBACK=1: the test host and
 * the agent then meet over vsock loopback (CID 1, `vsock_loopback` module),
 * the host dialled by the agent at CID 1 instead of 2. With
 * LXD_VSOCK_SERIAL_PORT=/dev/virtio-ports/<name> the agent also writes its
 * states to that real port (the host side reads them over QMP).
 */

import assert from "node:assert/strict";
import { connectVsock, listenVsock } from "../shared/vsock/mod.ts";
import { SerialChannel } from "../agent/serial_channel.ts";
import { requires } from "../shared/_requires.ts";
import {
  agentPaths,
  AgentProcess,
  callAgent,
  devlxd,
  envelope,
  makePairs,
  TestHost,
  writeConfigDir,
} from "./agent_harness.ts";

const LOOPBACK = Deno.env.get("LXD_VSOCK_LOOPBACK") === "1";
const SERIAL = Deno.env.get("LXD_VSOCK_SERIAL_PORT");
const LOCAL_CID = 1;

const noLoopback = LOOPBACK
  ? undefined
  : "needs vsock loopback (run in the VM harness with LXD_VSOCK_LOOPBACK=1)";
const noSerial = SERIAL !== undefined
  ? undefined
  : "needs LXD_VSOCK_SERIAL_PORT=/dev/virtio-ports/<name> (set in the VM harness)";

Deno.test(
  requires(noLoopback, {
    name: "agent over vsock: PUT /1.0 on the agent API, then devlxd through a vsock host",
  }),
  async () => {
    const paths = await agentPaths();
    const pairs = await makePairs();
    await writeConfigDir(paths.configDir, pairs);
    const host = new TestHost(listenVsock({ port: 0 }), pairs);
    const agentPort = 20000 + Math.floor(Math.random() * 20000);
    const agent = AgentProcess.start(paths, [
      "--transport=vsock",
      `--agent-port=${agentPort}`,
      ...(SERIAL === undefined ? [] : [`--serial-port=${SERIAL}`]),
    ]);
    try {
      await agent.waitForLog(/agent started/);
      const address = host.address;
      assert.equal(address.family, "vsock");
      const port = address.family === "vsock" ? address.port : 0;
      const put = await callAgent(
        () => connectVsock(LOCAL_CID, agentPort, { timeout: 3000 }),
        pairs.hostClient,
        pairs.agent.cert,
        new Request("http://agent/1.0", {
          method: "PUT",
          body: JSON.stringify({
            cid: LOCAL_CID,
            port,
            certificate: pairs.hostServer.cert,
            devlxd: true,
          }),
        }),
      );
      assert.equal(put.status, 200, JSON.stringify(await envelope(put.clone())));
      await put.body?.cancel();
      const value = await devlxd(paths.devlxdSocket, "/1.0/config/user.foo");
      assert.equal(await value.text(), "bar");
      const state = JSON.parse(await Deno.readTextFile(paths.stateFile));
      assert.equal(state.state, "CONNECTED");
      if (SERIAL !== undefined) assert.equal(state.serialPort, SERIAL, agent.stderr);
      assert.equal(await agent.stop(), 0);
    } finally {
      await agent[Symbol.asyncDispose]();
      await host.close();
      await Deno.remove(paths.dir, { recursive: true });
    }
  },
);

Deno.test(
  requires(noSerial, {
    name: "SerialChannel on a real virtio-serial port: holds it open and writes a state line",
  }),
  async () => {
    const channel = new SerialChannel({ paths: [SERIAL!] });
    try {
      // With a ringbuf (or connected socket) backend the host end is open: the write lands.
      assert.equal(await channel.write("STARTED"), true);
      assert.equal(channel.path, SERIAL, "the port is held open for reading CONNECT lines");
    } finally {
      await channel.close();
    }
  },
);

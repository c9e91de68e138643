/**
 * The agent as a process under hostile or broken callers (issue 13), over the
 * hybrid (unix) transport with real mutual TLS and a simulated serial port.
 */

import assert from "node:assert/strict";
import {
  type AgentPaths,
  agentPaths,
  AgentProcess,
  makePairs,
  type Pairs,
  SerialPeer,
  TestHost,
  writeConfigDir,
} from "./agent_harness.ts";
import { connectUnix } from "../shared/vsock/mod.ts";
import { trickleBody } from "./host_harness.ts";

const HOST_PORT = 40011;

interface World extends AsyncDisposable {
  paths: AgentPaths;
  pairs: Pairs;
  serial: SerialPeer;
  host?: TestHost;
  agent: AgentProcess;
}

/** An agent whose agent.conf names a test host on HOST_PORT (started unless `host: false`). */
async function world(
  options: { host?: boolean; devlxd?: boolean; extra?: string[] } = {},
): Promise<World> {
  const paths = await agentPaths();
  const pairs = await makePairs();
  await writeConfigDir(paths.configDir, pairs, {
    cid: 2,
    port: HOST_PORT,
    devlxd: options.devlxd ?? true,
  });
  const serial = new SerialPeer(paths.serial);
  const host = options.host === false ? undefined : TestHost.hybrid(paths.uds, HOST_PORT, pairs);
  const agent = AgentProcess.start(paths, options.extra ?? []);
  return {
    paths,
    pairs,
    serial,
    host,
    agent,
    async [Symbol.asyncDispose]() {
      await agent[Symbol.asyncDispose]();
      await host?.close();
      await serial.close();
      await Deno.remove(paths.dir, { recursive: true });
    },
  };
}

Deno.test("agent: a request body trickled at one byte a second on /dev/lxd/sock is cut off by the body deadline", async () => {
  await using w = await world();
  await w.serial.waitFor("CONNECTED");
  using socket = await connectUnix(w.paths.devlxdSocket);
  const start = performance.now();
  const text = await trickleBody(socket, "the agent");
  assert.match(text, /^HTTP\/1\.1 408 /);
  assert.ok(performance.now() - start < 15_000);
});

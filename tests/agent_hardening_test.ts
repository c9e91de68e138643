/**
 * The agent as a process under hostile or broken callers (issue 13), over the
 * hybrid (unix) transport with real mutual TLS and a simulated serial port.
 */

import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import {
  type AgentPaths,
  agentPaths,
  AgentProcess,
  announceTo,
  callAgent,
  devlxd,
  hybridAgent,
  makePairs,
  type Pairs,
  runAgentCommand,
  SerialPeer,
  TestHost,
  within,
  writeConfigDir,
} from "./agent_harness.ts";
import { connectHybrid, connectUnix } from "../shared/vsock/mod.ts";
import { trickleBody } from "./host_harness.ts";

const HOST_PORT = 40011;

interface World extends AsyncDisposable {
  paths: AgentPaths;
  pairs: Pairs;
  serial: SerialPeer;
  host?: TestHost;
  agent: AgentProcess;
}

/** The host announces itself with agent.conf's address; resolves once CONNECTED. */
function announced(w: World): Promise<void> {
  return announceTo(w.serial, () =>
    callAgent(
      hybridAgent(w.paths.uds),
      w.pairs.hostClient,
      w.pairs.agent.cert,
      new Request("http://agent/1.0", {
        method: "PUT",
        body: JSON.stringify({
          cid: 2,
          port: HOST_PORT,
          certificate: w.pairs.hostServer.cert,
          devlxd: true,
        }),
      }),
    ));
}

/** An agent whose agent.conf names a test host on HOST_PORT (started unless `host: false`). */
async function world(
  options: { host?: boolean; devlxd?: boolean; extra?: string[]; prefix?: string[] } = {},
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
  const agent = AgentProcess.start(paths, options.extra ?? [], options.prefix ?? []);
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
  await announced(w);
  using socket = await connectUnix(w.paths.devlxdSocket);
  const start = performance.now();
  const text = await trickleBody(socket, "the agent");
  assert.match(text, /^HTTP\/1\.1 408 /);
  assert.ok(performance.now() - start < 15_000);
});

/** Opens up to `count` connections with `open`, until one fails. */
async function hold(count: number, open: () => Promise<Duplex>): Promise<Duplex[]> {
  const sockets: Duplex[] = [];
  for (let i = 0; i < count; i++) {
    try {
      const socket = await open();
      socket.on("error", () => {});
      sockets.push(socket);
    } catch {
      break; // refused or timed out: the agent is out of fds or its backlog is full
    }
  }
  return sockets;
}

Deno.test("agent: running out of file descriptors (128) does not stop the agent API or /dev/lxd/sock from accepting", async () => {
  await using w = await world({ prefix: ["prlimit", "--nofile=128:128"] });
  await announced(w);
  const held = [
    ...await hold(150, () => connectUnix(w.paths.devlxdSocket, { timeout: 1000 })),
    ...await hold(150, () => connectHybrid(w.paths.uds, 8443, { timeout: 1000 })),
  ];
  try {
    await w.agent.waitForLog(/Too many open files|EMFILE/);
  } finally {
    for (const socket of held) socket.destroy();
  }
  const info = await within(
    devlxd(w.paths.devlxdSocket, "/1.0"),
    "GET /1.0 on /dev/lxd/sock after the fds came back",
    15_000,
  );
  assert.equal(info.status, 200);
  const api = await within(
    callAgent(
      hybridAgent(w.paths.uds),
      w.pairs.hostClient,
      w.pairs.agent.cert,
      new Request("http://agent/1.0"),
    ),
    "GET /1.0 on the agent API after the fds came back",
    15_000,
  );
  assert.equal(api.status, 200);
  await api.body?.cancel();
});

Deno.test("agent: the agent API holds at most 32 connections; more are closed at once and logged", async () => {
  await using w = await world();
  await announced(w);
  const held = await hold(40, () => connectHybrid(w.paths.uds, 8443, { timeout: 3000 }));
  try {
    assert.equal(held.length, 40);
    await w.agent.waitForLog(/agent API connection refused: too many connections/, 5000);
  } finally {
    for (const socket of held) socket.destroy();
  }
});

Deno.test("agent: a PUT /1.0 naming a port nobody listens on answers 500 and keeps the last good connection info", async () => {
  await using w = await world();
  await announced(w);
  const put = await callAgent(
    hybridAgent(w.paths.uds),
    w.pairs.hostClient,
    w.pairs.agent.cert,
    new Request("http://agent/1.0", {
      method: "PUT",
      body: JSON.stringify({
        cid: 2,
        port: HOST_PORT + 7,
        certificate: w.pairs.hostServer.cert,
        devlxd: true,
      }),
    }),
  );
  assert.equal(put.status, 500);
  await put.body?.cancel();
  const read = await devlxd(w.paths.devlxdSocket, "/1.0/config/user.foo");
  assert.equal(read.status, 200, await read.clone().text());
  assert.equal(await read.text(), "bar");
  const status = await runAgentCommand(["--status", `--state-file=${w.paths.stateFile}`]);
  assert.match(status.stdout, new RegExp(`Host: +vsock 2:${HOST_PORT} `));
});

Deno.test("agent: a devlxd request before the host is known waits for the connection info, then answers", async () => {
  const paths = await agentPaths();
  const pairs = await makePairs();
  // agent.conf as `instance add` writes it before the daemon ever ran: no port yet.
  await writeConfigDir(paths.configDir, pairs, { cid: 2, port: 0, devlxd: true });
  const serial = new SerialPeer(paths.serial);
  const agent = AgentProcess.start(paths);
  let host: TestHost | undefined;
  try {
    await agent.waitForLog(/serving devlxd/);
    const early = devlxd(paths.devlxdSocket, "/1.0/config/user.foo");
    // The host comes up and announces itself after the guest asked.
    await agent.waitForLog(/waiting for the host's address/);
    host = TestHost.hybrid(paths.uds, HOST_PORT, pairs);
    const put = await callAgent(
      hybridAgent(paths.uds),
      pairs.hostClient,
      pairs.agent.cert,
      new Request("http://agent/1.0", {
        method: "PUT",
        body: JSON.stringify({
          cid: 2,
          port: HOST_PORT,
          certificate: pairs.hostServer.cert,
          devlxd: true,
        }),
      }),
    );
    assert.equal(put.status, 200);
    await put.body?.cancel();
    const answer = await within(early, "the early devlxd request", 15_000);
    assert.equal(answer.status, 200, await answer.clone().text());
    assert.equal(await answer.text(), "bar");
  } finally {
    await agent[Symbol.asyncDispose]();
    await host?.close();
    await serial.close();
    await Deno.remove(paths.dir, { recursive: true });
  }
});

Deno.test("agent: --host-wait bounds the wait for the host's address: then a 503 says it is not known", async () => {
  const paths = await agentPaths();
  const pairs = await makePairs();
  await writeConfigDir(paths.configDir, pairs, { cid: 2, port: 0, devlxd: true });
  const serial = new SerialPeer(paths.serial);
  const agent = AgentProcess.start(paths, ["--host-wait=300ms"]);
  try {
    await agent.waitForLog(/serving devlxd/);
    const answer = await within(devlxd(paths.devlxdSocket, "/1.0"), "the devlxd answer", 15_000);
    assert.equal(answer.status, 503);
    assert.match(await answer.text(), /not known yet.*waited 300 ms/);
  } finally {
    await agent[Symbol.asyncDispose]();
    await serial.close();
    await Deno.remove(paths.dir, { recursive: true });
  }
});

/**
 * The agent as a process against a test host over the hybrid (unix)
 * transport with real mutual TLS, and a simulated socket-backed serial port.
 */

import assert from "node:assert/strict";
import * as tls from "node:tls";
import {
  type AgentPaths,
  agentPaths,
  AgentProcess,
  announceTo,
  callAgent,
  devlxd,
  envelope,
  hybridAgent,
  makePairs,
  makeTestPair,
  type Pairs,
  runAgentCommand,
  SerialPeer,
  TestHost,
  within,
  writeConfigDir,
} from "./agent_harness.ts";
import { httpRequest } from "../shared/http/mod.ts";
import { connectHybrid, connectUnix } from "../shared/vsock/mod.ts";
import { readToEnd } from "../shared/vsock/_testing.ts";
import { requires } from "../shared/_requires.ts";

const HOST_PORT = 40001;

/** One test's world: paths, certificates, the serial peer; cleaned up by dispose. */
async function world(conf?: { port: number; devlxd: boolean }) {
  const paths = await agentPaths();
  const pairs = await makePairs();
  await writeConfigDir(
    paths.configDir,
    pairs,
    conf && { cid: 2, port: conf.port, devlxd: conf.devlxd },
  );
  let serial = new SerialPeer(paths.serial);
  const hosts: TestHost[] = [];
  const agents: AgentProcess[] = [];
  return {
    paths,
    pairs,
    get serial() {
      return serial;
    },
    /** The serial port disappears, then a new one appears at the same path. */
    async replugSerial(): Promise<SerialPeer> {
      await serial.close();
      serial = new SerialPeer(paths.serial);
      return serial;
    },
    host(port = HOST_PORT): TestHost {
      const host = TestHost.hybrid(paths.uds, port, pairs);
      hosts.push(host);
      return host;
    },
    agent(extra: string[] = []): AgentProcess {
      const agent = AgentProcess.start(paths, extra);
      agents.push(agent);
      return agent;
    },
    /** The host announces itself (PUT /1.0, agent.conf's values); resolves once CONNECTED. */
    announce(port: number, devlxd = conf?.devlxd ?? true): Promise<void> {
      return announceTo(serial, () => this.put(port, { devlxd }));
    },
    put(port: number, options: { devlxd?: boolean; certificate?: string } = {}) {
      return callAgent(
        hybridAgent(paths.uds),
        pairs.hostClient,
        pairs.agent.cert,
        new Request("http://agent/1.0", {
          method: "PUT",
          body: JSON.stringify({
            cid: 2,
            port,
            certificate: options.certificate ?? pairs.hostServer.cert,
            devlxd: options.devlxd ?? true,
          }),
        }),
      );
    },
    async [Symbol.asyncDispose]() {
      for (const agent of agents) await agent[Symbol.asyncDispose]();
      for (const host of hosts) await host.close();
      await serial.close();
      await Deno.remove(paths.dir, { recursive: true });
    },
  };
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

async function untilExists(path: string, agent: AgentProcess): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (!(await exists(path))) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${path}\n${agent.stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

Deno.test("agent: STARTED, then PUT /1.0 → CONNECTED and /dev/lxd/sock serves the host's devlxd API; --host-idle-timeout 0 dials once per request", async () => {
  await using w = await world();
  const host = w.host();
  const agent = w.agent(["--host-idle-timeout", "0"]);
  await w.serial.waitFor("STARTED");
  await agent.waitForLog(/agent started/);
  assert.equal(await exists(w.paths.devlxdSocket), false, "no devlxd before connection info");

  const put = await w.put(HOST_PORT);
  assert.equal(put.status, 200, JSON.stringify(await put.clone().json()));
  assert.equal((await envelope(put)).type, "sync");
  await w.serial.waitFor("CONNECTED");
  assert.ok(await exists(w.paths.devlxdSocket), "devlxd served once the PUT answered");
  assert.equal((await Deno.stat(w.paths.devlxdSocket)).mode! & 0o777, 0o600);

  const before = host.tlsConnections;
  const value = await devlxd(w.paths.devlxdSocket, "/1.0/config/user.foo");
  assert.equal(value.status, 200);
  assert.equal(await value.text(), "bar");
  assert.equal(host.tlsConnections - before, 1, "one dial per request");

  const list = await devlxd(w.paths.devlxdSocket, "/1.0/config");
  assert.deepEqual(await list.json(), ["/1.0/config/user.foo"]);
  const forbidden = await devlxd(w.paths.devlxdSocket, "/1.0/config/security.secret");
  assert.equal(forbidden.status, 403);
  assert.equal(await forbidden.text(), "not authorized\n");
  const info = await devlxd(w.paths.devlxdSocket, "/1.0");
  assert.equal((await info.json()).location, "testhost");

  const status = await runAgentCommand(["--status", `--state-file=${w.paths.stateFile}`]);
  assert.equal(status.code, 0, status.stdout + status.stderr);
  assert.match(status.stdout, /State: +CONNECTED/);
  assert.match(status.stdout, new RegExp(`Host: +vsock 2:${HOST_PORT} from PUT /1.0`));
  assert.match(status.stdout, /devlxd: +serving/);

  assert.equal(await agent.stop("SIGTERM"), 0);
  assert.equal(w.serial.last, "STOPPED");
  assert.equal(await exists(w.paths.devlxdSocket), false, "the devlxd socket is removed");
  const after = await runAgentCommand(["--status", `--state-file=${w.paths.stateFile}`]);
  assert.equal(after.code, 1);
  assert.match(after.stdout, /No agent is running/);
});

Deno.test("agent: a burst of guest requests rides on the validating request's kept-alive connection; an idle agent then holds none", async () => {
  await using w = await world();
  const host = w.host();
  // A long window for the burst, so that a slow machine cannot close it in between.
  const agent = w.agent(["--host-idle-timeout", "30s"]);
  await agent.waitForLog(/agent started/);
  assert.equal((await w.put(HOST_PORT)).status, 200);
  await w.serial.waitFor("CONNECTED");
  assert.equal(host.tlsConnections, 1, "the validating GET /1.0");
  for (const path of ["/1.0", "/1.0/config", "/1.0/config/user.foo", "/1.0/meta-data"]) {
    const response = await devlxd(w.paths.devlxdSocket, path);
    assert.equal(response.status, 200, path);
    await response.arrayBuffer();
  }
  assert.equal(host.tlsConnections, 1, "one handshake for the validation and the whole burst");
  assert.equal(host.requests.filter((r) => r.method === "GET").length, 5);
  await agent.stop("SIGTERM");

  // With the default window (2 s), the connection stays open, then the agent closes it.
  const again = w.agent();
  await again.waitForLog(/agent started/);
  assert.equal((await w.put(HOST_PORT)).status, 200);
  await w.serial.waitFor("CONNECTED");
  await (await devlxd(w.paths.devlxdSocket, "/1.0")).arrayBuffer();
  assert.equal(host.openTlsConnections, 1, "kept for the next request");
  await host.changed.until(() => host.openTlsConnections === 0, "idle connections closed");
});

Deno.test("agent: agent.conf makes /dev/lxd/sock serve before any PUT, and the agent keeps writing STARTED until the host announces itself (LXD 5.0.2 acts only on STARTED)", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  const host = w.host();
  const agent = w.agent();
  await untilExists(w.paths.devlxdSocket, agent);
  const meta = await devlxd(w.paths.devlxdSocket, "/1.0/meta-data");
  assert.equal(await meta.text(), "instance-id: t1\nlocal-hostname: t1\n");
  assert.ok(host.requests.some((r) => r.path === "/1.0/meta-data"));
  // The host answered (agent.conf's address works), yet every rewrite says STARTED.
  const from = w.serial.lines.length;
  await w.serial.changed.until(
    () => w.serial.lines.slice(from).filter((l) => l === "STARTED").length >= 3,
    "three rewrites of STARTED after the host answered",
  );
  assert.ok(!w.serial.lines.includes("CONNECTED"), w.serial.lines.join(","));
  const put = await w.put(HOST_PORT);
  assert.equal(put.status, 200);
  await put.body?.cancel();
  await w.serial.waitForAfter(from, "CONNECTED");
});

Deno.test("agent: the host unreachable gives a 503 sentence quickly and STARTED; a CONNECT line on the serial port brings it back", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  const host = w.host();
  const agent = w.agent();
  await w.announce(HOST_PORT);
  await untilExists(w.paths.devlxdSocket, agent);

  await host.close(); // the host goes away (restarts on a new port)
  await w.serial.waitFor("STARTED"); // noticed by the cheap probe, no guest request needed
  const started = Date.now();
  const res = await devlxd(w.paths.devlxdSocket, "/1.0/config/user.foo");
  assert.equal(res.status, 503);
  assert.match(await res.text(), /^The host at vsock 2:40001 refused the connection.*\.\n$/);
  assert.ok(Date.now() - started < 5000, "bounded");

  const moved = w.host(HOST_PORT + 1);
  const from = w.serial.lines.length;
  await w.serial.send("garbage\nCONNECT 0:1\nCONNECT 2:99999\n" + "x".repeat(300) + "\n");
  await w.serial.send(`CONNECT 2:${HOST_PORT + 1}\n`);
  await w.serial.waitForAfter(from, "CONNECTED");
  const again = await devlxd(w.paths.devlxdSocket, "/1.0/config/user.foo");
  assert.equal(await again.text(), "bar");
  assert.ok(moved.requests.length >= 2);
  await agent.waitForLog(/host announced itself on the serial port/);
});

Deno.test("agent: Ready PATCHed by a guest is re-sent to a restarted host after new connection info", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  const first = w.host();
  const agent = w.agent();
  await w.announce(HOST_PORT);
  await untilExists(w.paths.devlxdSocket, agent);
  const patched = await devlxd(w.paths.devlxdSocket, "/1.0", {
    method: "PATCH",
    body: JSON.stringify({ state: "Ready" }),
  });
  assert.equal(patched.status, 200);
  assert.equal(first.state, "Ready");

  await first.close();
  const second = w.host(HOST_PORT + 2);
  assert.equal(second.state, "Started", "the restarted host forgot");
  const put = await w.put(HOST_PORT + 2);
  assert.equal(put.status, 200);
  await put.body?.cancel();
  await second.changed.until(() => second.state === "Ready", "the Ready state re-sent");
  const ready = JSON.parse(await Deno.readTextFile(w.paths.stateFile)).ready;
  assert.equal(ready, true);
  assert.equal(await agent.stop("SIGINT"), 0, "SIGINT stops it like SIGTERM");
  assert.equal(w.serial.last, "STOPPED");
});

Deno.test("agent: PUT /1.0 to an unreachable host answers 500, a bad body 400", async () => {
  await using w = await world();
  const agent = w.agent();
  await agent.waitForLog(/agent started/);
  const unreachable = await w.put(HOST_PORT + 3);
  assert.equal(unreachable.status, 500);
  assert.match(String((await envelope(unreachable)).error), /refused the connection/);
  const bad = await callAgent(
    hybridAgent(w.paths.uds),
    w.pairs.hostClient,
    w.pairs.agent.cert,
    new Request("http://agent/1.0", { method: "PUT", body: '{"cid":2,"port":0}' }),
  );
  assert.equal(bad.status, 400);
  await bad.body?.cancel();
  const badCert = await w.put(HOST_PORT, {
    certificate: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
  });
  assert.equal(badCert.status, 400);
  assert.match(String((await envelope(badCert)).error), /Invalid certificate/);
  assert.equal(w.serial.last, "STARTED");
});

Deno.test("agent: a client without the pinned certificate is refused by the agent API", async () => {
  await using w = await world();
  const agent = w.agent();
  await agent.waitForLog(/agent started/);
  const stranger = await makeTestPair("stranger");
  await assert.rejects(
    callAgent(
      hybridAgent(w.paths.uds),
      stranger,
      w.pairs.agent.cert,
      new Request("http://agent/1.0", {
        method: "PUT",
        body: JSON.stringify({ cid: 2, port: HOST_PORT, certificate: w.pairs.hostServer.cert }),
      }),
    ),
  );
  const status = JSON.parse(await Deno.readTextFile(w.paths.stateFile));
  assert.equal(status.host, null, "nothing was applied");
});

/**
 * The agent logged the refused connection without an uncaught exception
 * (main.ts would log one and go on), and its API still answers over mutual TLS.
 */
async function refusedCleanly(
  agent: AgentProcess,
  w: { paths: AgentPaths; pairs: Pairs },
): Promise<void> {
  // Written synchronously after anything thrown during the handshake.
  await agent.waitForLog(/agent API connection refused or failed/);
  assert.doesNotMatch(agent.stderr, /uncaught exception|unhandled rejection/);
  const response = await callAgent(
    hybridAgent(w.paths.uds),
    w.pairs.hostClient,
    w.pairs.agent.cert,
    new Request("http://agent/1.0"),
  );
  assert.equal(response.status, 200);
  await response.body?.cancel();
}

Deno.test("agent: garbage already buffered when the agent API starts its TLS handshake closes that connection without an uncaught exception", async () => {
  await using w = await world();
  const agent = w.agent();
  await agent.waitForLog(/agent started/);
  // One write: the mux hands the agent the connection with the garbage already read.
  const raw = await connectUnix(w.paths.uds, { timeout: 5000 });
  raw.write("CONNECT 8443\nGET /1.0 HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01garbage");
  const text = String(await readToEnd(raw));
  raw.destroy();
  assert.match(text, /^OK \d+\n/);
  assert.doesNotMatch(text, /HTTP\//);
  await refusedCleanly(agent, w);
});

Deno.test("agent: a TLS 1.2 client is refused by the agent API without an uncaught exception; it goes on serving", async () => {
  await using w = await world();
  const agent = w.agent();
  await agent.waitForLog(/agent started/);
  const raw = await connectHybrid(w.paths.uds, 8443, { timeout: 5000 });
  const old = tls.connect({
    socket: raw as never,
    ...w.pairs.hostClient,
    rejectUnauthorized: false,
    maxVersion: "TLSv1.2",
  });
  await assert.rejects(
    within(
      new Promise((resolve, reject) => {
        old.once("secureConnect", resolve);
        old.once("error", reject);
        old.once("close", () => reject(new Error("closed")));
      }),
      "the refusal",
      10_000,
    ),
  );
  old.destroy();
  raw.destroy();
  await refusedCleanly(agent, w);
});

Deno.test("agent: events pushed by the host and pulled from it reach a guest subscriber once each", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  const host = w.host();
  const agent = w.agent();
  await untilExists(w.paths.devlxdSocket, agent);
  const client = Deno.createHttpClient({
    proxy: { transport: "unix", path: w.paths.devlxdSocket },
  });
  try {
    const res = await fetch("http://lxd/1.0/events", { client });
    assert.equal(res.status, 200);
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    await host.changed.until(() => host.eventStreams > 0, "the agent to pull the host's events");
    const pushed = {
      timestamp: "1",
      type: "config",
      metadata: { key: "user.a", old_value: "", value: "1" },
    };
    const pulled = {
      timestamp: "2",
      type: "config",
      metadata: { key: "user.b", old_value: "", value: "2" },
    };
    const push = await callAgent(
      hybridAgent(w.paths.uds),
      w.pairs.hostClient,
      w.pairs.agent.cert,
      new Request("http://agent/1.0/events", { method: "POST", body: JSON.stringify(pushed) }),
    );
    assert.equal(push.status, 200);
    await push.body?.cancel();
    host.streamEvent(pushed); // the same event both ways
    host.streamEvent(pulled);
    let text = "";
    while (text.split("\n").length < 3) text += (await within(reader.read(), "events")).value;
    assert.deepEqual(text.trim().split("\n").map((l) => JSON.parse(l)), [pushed, pulled]);
    await reader.cancel();
    await host.changed.until(() => host.eventStreams === 0, "the pull to stop without subscribers");
  } finally {
    client.close();
  }
});

Deno.test("agent: a host's /1.0/events whose head comes only with the first event (LXD 5.0.2) keeps the agent CONNECTED, and the event arrives", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  const host = w.host();
  host.lateEventHead = true;
  const agent = w.agent(["--response-timeout=300ms"]);
  await w.announce(HOST_PORT);
  await untilExists(w.paths.devlxdSocket, agent);
  const client = Deno.createHttpClient({
    proxy: { transport: "unix", path: w.paths.devlxdSocket },
  });
  try {
    const res = await fetch("http://lxd/1.0/events", { client });
    assert.equal(res.status, 200);
    const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
    await host.changed.until(
      () => host.pendingEventHeads > 0,
      "the agent to ask for the host's events",
    );
    // 15 rewrites at 200 ms: 3 s, ten times the response timeout, without an answer head.
    const from = w.serial.lines.length;
    await w.serial.changed.until(() => w.serial.lines.length >= from + 15, "15 rewrites", 15_000);
    assert.deepEqual(
      [...new Set(w.serial.lines.slice(from))],
      ["CONNECTED"],
      `no flip while the head is late: ${w.serial.lines.slice(from).join(",")}`,
    );
    assert.equal(host.pendingEventHeads, 1, "one request, still waiting (not retried)");
    assert.doesNotMatch(agent.stderr, /state=STARTED/);
    const event = {
      type: "config",
      timestamp: "2026-12-05T00:00:00Z",
      metadata: { key: "user.late", old_value: "", value: "1" },
    };
    host.streamEvent(event);
    let text = "";
    while (!text.includes("\n")) text += (await within(reader.read(), "the event")).value;
    assert.deepEqual(JSON.parse(text.trim()), event);
    await reader.cancel();
  } finally {
    client.close();
  }
});

Deno.test("agent: image export streams through; a host closing mid-response gives a 503", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  w.host();
  const agent = w.agent();
  await untilExists(w.paths.devlxdSocket, agent);
  const image = await devlxd(w.paths.devlxdSocket, "/1.0/images/abcdef/export");
  assert.equal(image.status, 200);
  assert.equal((await image.arrayBuffer()).byteLength, 64 * 16 * 1024);
  const half = await devlxd(w.paths.devlxdSocket, "/1.0/config/user.halfway");
  assert.equal(half.status, 503);
  assert.match(await half.text(), /closed the connection/);
});

Deno.test("agent: huge bodies, bad methods and path traversal on /dev/lxd/sock", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: true });
  const host = w.host();
  const agent = w.agent();
  await untilExists(w.paths.devlxdSocket, agent);
  const huge = await devlxd(w.paths.devlxdSocket, "/1.0", {
    method: "PATCH",
    body: "x".repeat(1 << 20),
  });
  assert.equal(huge.status, 413);
  const bad = await devlxd(w.paths.devlxdSocket, "/1.0/devices", { method: "DELETE" });
  assert.equal(bad.status, 405);
  const traversal = await devlxd(w.paths.devlxdSocket, "/1.0/config/user.x%2F..%2F..%2Fmeta-data");
  assert.equal(traversal.status, 404);
  assert.ok(host.requests.every((r) => r.path !== "/1.0/meta-data"));
});

Deno.test("agent: a missing identity file is one clear error naming it, exit 1", async () => {
  const paths: AgentPaths = await agentPaths();
  try {
    const pairs: Pairs = await makePairs();
    await writeConfigDir(paths.configDir, pairs);
    await Deno.remove(`${paths.configDir}/server.crt`);
    const result = await runAgentCommand([
      `--config-dir=${paths.configDir}`,
      `--transport=hybrid:${paths.uds}`,
      `--state-file=${paths.stateFile}`,
    ]);
    assert.equal(result.code, 1);
    assert.equal(
      result.stderr.trim(),
      `lxd-vsock-agent: Cannot read certificate ${paths.configDir}/server.crt: no such file`,
    );
  } finally {
    await Deno.remove(paths.dir, { recursive: true });
  }
});

Deno.test("agent: usage errors exit 2, --help and --version exit 0", async () => {
  const bad = await runAgentCommand(["--agent-port=0"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--agent-port/);
  assert.match(bad.stderr, /Usage:/);
  const help = await runAgentCommand(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /^Usage: lxd-vsock-agent/);
  const version = await runAgentCommand(["--version"]);
  assert.equal(version.code, 0);
  assert.match(version.stdout, /^lxd-vsock-agent \d+\.\d+\.\d+/);
});

Deno.test("agent: rewrites its state periodically, and again on a serial port that disappears and reappears", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: false });
  w.host();
  w.agent();
  await w.announce(HOST_PORT);
  await w.serial.changed.until(
    () => w.serial.lines.filter((l) => l === "CONNECTED").length >= 3,
    "three rewrites of CONNECTED",
  );
  const replugged = await w.replugSerial();
  await replugged.waitFor("CONNECTED");
  assert.ok(replugged.lines.every((l) => l === "CONNECTED"), replugged.lines.join(","));
});

Deno.test("agent: devlxd follows the connection info: off removes /dev/lxd/sock, on serves it again", async () => {
  await using w = await world({ port: HOST_PORT, devlxd: false });
  w.host();
  const agent = w.agent();
  await w.announce(HOST_PORT);
  assert.equal(await exists(w.paths.devlxdSocket), false, "agent.conf says devlxd off");
  const on = await w.put(HOST_PORT, { devlxd: true });
  assert.equal(on.status, 200);
  await on.body?.cancel();
  assert.ok(await exists(w.paths.devlxdSocket));
  const off = await w.put(HOST_PORT, { devlxd: false });
  assert.equal(off.status, 200);
  await off.body?.cancel();
  assert.equal(await exists(w.paths.devlxdSocket), false);
  const status = await runAgentCommand([
    "--status",
    "--format=json",
    `--state-file=${w.paths.stateFile}`,
  ]);
  assert.equal(status.code, 0);
  const json = JSON.parse(status.stdout);
  assert.equal(json.devlxd.serving, false);
  assert.equal(json.state, "CONNECTED");
  await agent.waitForLog(/stopped serving devlxd/);
});

/** Runs a command (the test's own permissions cannot look under /dev either): code and stdout. */
async function sh(script: string): Promise<{ code: number; stdout: string }> {
  const out = await new Deno.Command("sh", { args: ["-c", script], stderr: "null" }).output();
  return { code: out.code, stdout: new TextDecoder().decode(out.stdout).trim() };
}

const notRootWithDev = (await sh('test "$(id -u)" = 0 && test -w /dev')).code === 0
  ? undefined
  : "needs root and a writable /dev (it creates a directory under /dev)";

Deno.test(
  requires(notRootWithDev, {
    name:
      "agent: with exactly -P=agent it serves /dev/lxd-…/sock (0600, directory created), answers GET /1.0 and WebSocket events, and removes both on stop",
  }),
  async () => {
    const dir = `/dev/lxd-vsock-test-${crypto.randomUUID().slice(0, 8)}`;
    const socket = `${dir}/sock`;
    try {
      await using w = await world({ port: HOST_PORT, devlxd: true });
      const host = w.host();
      const agent = w.agent([`--devlxd-socket=${socket}`]);
      await w.announce(HOST_PORT);
      await agent.waitForLog(new RegExp(`msg="serving devlxd".*${dir}/sock`));
      assert.equal(await sh(`stat -c '%F %a' ${socket}`).then((r) => r.stdout), "socket 600");
      assert.equal(await sh(`stat -c '%F' ${dir}`).then((r) => r.stdout), "directory");

      // Deno's fetch cannot reach a socket under /dev without --allow-all either: FFI + own HTTP.
      const connection = await connectUnix(socket);
      const answer = await httpRequest(
        connection,
        new Request("http://lxd/1.0", { headers: { connection: "close" } }),
        { timeout: 10_000 },
      );
      assert.equal(answer.status, 200);
      assert.equal((await answer.json()).location, "testhost");
      connection.destroy();

      // /1.0/events as a WebSocket: an event from the host arrives as one text frame.
      const ws = await connectUnix(socket);
      let got = new Uint8Array(0);
      const arrived = { notify: () => {} };
      ws.on("data", (chunk: Uint8Array) => {
        got = new Uint8Array([...got, ...chunk]);
        arrived.notify();
      });
      const ended = new Promise<void>((resolve) => ws.once("end", () => resolve()));
      const receive = (check: () => boolean, what: string) =>
        within(
          (async () => {
            while (!check()) await new Promise<void>((resolve) => arrived.notify = resolve);
          })(),
          what,
        );
      ws.write(
        "GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
      );
      const headEnd = () => new TextDecoder().decode(got).indexOf("\r\n\r\n");
      await receive(() => headEnd() !== -1, "the 101");
      assert.match(new TextDecoder().decode(got), /^HTTP\/1\.1 101 Switching Protocols\r\n/);
      got = got.subarray(headEnd() + 4);
      await host.changed.until(() => host.eventStreams > 0, "the agent to pull the host's events");
      const event = { timestamp: "1", type: "config", metadata: { key: "user.a" } };
      host.streamEvent(event);
      await receive(() => got.length >= 2 && got.length >= 2 + (got[1] & 0x7f), "an event frame");
      assert.equal(got[0], 0x81, "one final text frame");
      assert.deepEqual(JSON.parse(new TextDecoder().decode(got.subarray(2, 2 + got[1]))), event);
      got = got.subarray(2 + got[1]);

      const status = await runAgentCommand(["--status", `--state-file=${w.paths.stateFile}`]);
      assert.match(status.stdout, new RegExp(`devlxd: +serving ${socket}`));
      assert.doesNotMatch(agent.stderr, /cannot serve devlxd/);
      const stopping = agent.stop();
      await receive(() => got.length >= 4, "the close frame");
      assert.deepEqual([...got.subarray(0, 4)], [0x88, 2, 0x03, 0xe9], "close 1001 on stop");
      await within(ended, "the WebSocket connection to end");
      ws.destroy();
      assert.equal(await stopping, 0);
      assert.equal(
        (await sh(`test -e ${socket} || test -e ${dir}`)).code,
        1,
        "socket and dir removed",
      );
    } finally {
      await sh(`rm -rf ${dir}`);
    }
  },
);

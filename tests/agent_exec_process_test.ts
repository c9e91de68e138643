/**
 * The agent as a process, its agent API reached over the hybrid (unix)
 * transport with real mutual TLS: GET /1.0 facts, /1.0/state, /1.0/metrics,
 * and exec (non-interactive and on a PTY) through the exec client the host
 * uses, one TLS connection per request and stream as LXD makes them.
 */

import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import { runExec } from "../shared/exec_client.ts";
import { openSftp } from "../shared/sftp/client.ts";
import { connectWebSocket } from "../shared/http/mod.ts";
import { connectTls } from "../shared/tls/mod.ts";
import {
  agentPaths,
  AgentProcess,
  callAgent,
  envelope,
  hybridAgent,
  makePairs,
  within,
  writeConfigDir,
} from "./agent_harness.ts";

async function world() {
  const paths = await agentPaths();
  const pairs = await makePairs();
  await writeConfigDir(paths.configDir, pairs);
  const agent = AgentProcess.start(paths, []);
  await agent.waitForLog(/agent API listening/);
  const connect = hybridAgent(paths.uds);
  const dial = async (): Promise<Duplex> => {
    const socket = await connect();
    try {
      return await connectTls(socket, {
        cert: pairs.hostClient.cert,
        key: pairs.hostClient.key,
        pinned: pairs.agent.cert,
        handshakeTimeout: 3000,
      });
    } catch (error) {
      socket.destroy();
      throw error;
    }
  };
  return {
    agent,
    dial,
    post: async (path: string, body: unknown) =>
      await callAgent(
        connect,
        pairs.hostClient,
        pairs.agent.cert,
        new Request(`http://agent${path}`, { method: "POST", body: JSON.stringify(body) }),
      ),
    get: async (path: string) =>
      await envelope(
        await callAgent(
          connect,
          pairs.hostClient,
          pairs.agent.cert,
          new Request(`http://agent${path}`),
        ),
      ),
    async [Symbol.asyncDispose]() {
      await agent[Symbol.asyncDispose]();
      await Deno.remove(paths.dir, { recursive: true });
    },
  };
}

Deno.test("agent process: GET /1.0 reports this machine's kernel, /1.0/state and /1.0/metrics answer", async () => {
  await using w = await world();
  const info = (await w.get("/1.0")).metadata as Record<string, Record<string, unknown>>;
  const uname = new TextDecoder().decode(
    (await new Deno.Command("uname", { args: ["-r"], stdout: "piped" }).output()).stdout,
  ).trim();
  assert.equal(info.environment.kernel_version, uname);
  assert.equal(info.environment.kernel, "Linux");
  const state = (await w.get("/1.0/state")).metadata as Record<string, unknown>;
  assert.ok((state.processes as number) > 1);
  assert.ok("lo" in (state.network as Record<string, unknown>));
  const metrics = (await w.get("/1.0/metrics")).metadata as Record<string, unknown>;
  assert.ok((metrics.procs_total as number) > 0);
});

Deno.test("agent process: exec over TLS passes output and a non-zero exit status through", async () => {
  await using w = await world();
  let out = "";
  const result = await within(
    runExec({ command: ["sh", "-c", "uname -s; exit 42"], cwd: "/" }, {
      dial: w.dial,
      stdout: (chunk) => void (out += new TextDecoder().decode(chunk)),
    }),
    "the exec",
    15_000,
  );
  assert.equal(out, "Linux\n");
  assert.equal(result.status, 42);
});

Deno.test("agent process: interactive exec over TLS runs a shell on a PTY and sees a window resize", async () => {
  await using w = await world();
  let out = "";
  const stdin = new TransformStream<Uint8Array, Uint8Array>();
  const writer = stdin.writable.getWriter();
  const controls: ((m: { command: string; args?: Record<string, string> }) => Promise<boolean>)[] =
    [];
  const running = runExec(
    {
      command: ["sh"],
      interactive: true,
      width: 80,
      height: 24,
      environment: { TERM: "dumb" },
      cwd: "/",
    },
    {
      dial: w.dial,
      stdin: stdin.readable,
      stdout: (chunk) => void (out += new TextDecoder().decode(chunk)),
      onControl: (send) => controls.push(send),
    },
  );
  const waitFor = async (pattern: RegExp, resend?: string) => {
    const deadline = Date.now() + 10_000;
    while (!pattern.test(out)) {
      if (Date.now() > deadline) throw new Error(`no ${pattern} in ${JSON.stringify(out)}`);
      if (resend !== undefined) await writer.write(new TextEncoder().encode(resend));
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  };
  await writer.write(new TextEncoder().encode("stty size\n"));
  await waitFor(/24 80\r?\n/);
  assert.equal(controls.length, 1);
  await controls[0]({ command: "window-resize", args: { width: "90", height: "33" } });
  await waitFor(/33 90\r?\n/, "stty size\n");
  await writer.write(new TextEncoder().encode("exit 0\n"));
  assert.equal((await within(running, "the interactive exec", 15_000)).status, 0);
  await writer.close().catch(() => {});
});

Deno.test("agent process: a client that drops its connections gets its command and what it started killed", async () => {
  await using w = await world();
  // A unique duration names the sleep (and the shell waiting for it) for pgrep.
  const marker = `sleep ${600_000 + Math.floor(Math.random() * 1_000_000)}`;
  const abort = new AbortController();
  let out = "";
  const running = runExec(
    { command: ["sh", "-c", `echo started; ${marker}; echo never`], cwd: "/" },
    {
      dial: w.dial,
      stdout: (chunk) => void (out += new TextDecoder().decode(chunk)),
      signal: abort.signal,
    },
  ).catch((error) => error);
  const alive = async () =>
    (await new Deno.Command("pgrep", { args: ["-f", marker], stdout: "null" }).output()).success;
  const deadline = Date.now() + 10_000;
  while (!out.includes("started")) {
    if (Date.now() > deadline) throw new Error("the command did not start");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const running2 = Date.now() + 10_000;
  while (!await alive()) {
    if (Date.now() > running2) throw new Error("the sleep did not start");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  abort.abort();
  await running;
  const gone = Date.now() + 10_000;
  while (await alive()) {
    if (Date.now() > gone) throw new Error("the command outlived its client");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
});

Deno.test("agent process: lxc file's SFTP upgrade over TLS round-trips a file with its mode", async () => {
  await using w = await world();
  const dir = await Deno.makeTempDir({ prefix: "lxd-vsock-sftp-process-" });
  try {
    using client = await within(openSftp(await w.dial()), "the SFTP upgrade", 15_000);
    const data = new TextEncoder().encode("pushed through the agent\n".repeat(5000));
    await client.writeFile(`${dir}/pushed`, data, 0o600);
    await client.chmod(`${dir}/pushed`, 0o751);
    assert.equal((await Deno.stat(`${dir}/pushed`)).mode! & 0o7777, 0o751);
    assert.deepEqual(await client.readFile(`${dir}/pushed`), data);
    assert.deepEqual(await Deno.readFile(`${dir}/pushed`), data);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("agent process: an event the host pushes reaches GET /1.0/events subscribers of its type", async () => {
  await using w = await world();
  const events = await connectWebSocket(await w.dial(), "http://agent/1.0/events?type=config");
  try {
    const pushed = {
      type: "config",
      timestamp: new Date().toISOString(),
      metadata: { key: "user.foo" },
    };
    // The agent subscribes before it answers the upgrade, so one push is enough.
    const received = within(events.receive(), "the pushed event", 10_000);
    assert.equal((await w.post("/1.0/events", pushed)).status, 200);
    const message = await received;
    assert.deepEqual(JSON.parse(new TextDecoder().decode(message!.data)), pushed);
  } finally {
    events.close();
  }
});

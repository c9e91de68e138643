/**
 * POST /1.0/exec end to end inside one process: the agent API app served by
 * serveHttp on a unix socket (FFI sockets), driven by the exec client the
 * host uses (shared/exec_client.ts): one connection per request and stream.
 */
import assert from "node:assert/strict";
import { connectWebSocket, serveHttp } from "../shared/http/mod.ts";
import { runExec } from "../shared/exec_client.ts";
import { connectUnix, listenUnix } from "../shared/vsock/mod.ts";
import { GuestAgentStatus } from "./agent_state.ts";
import { createAgentApi } from "./agent_api.ts";
import { Operations } from "./operations.ts";
import { within } from "./_testing.ts";
import { requires } from "../shared/_requires.ts";
import { getuid } from "../shared/vsock/_libc.ts";

async function agentApi(
  options: { maxRunning?: number; connectTimeout?: number; closeTimeout?: number } = {},
) {
  const dir = await Deno.makeTempDir({ prefix: "lxd-vsock-exec-" });
  const path = `${dir}/agent.sock`;
  const operations = new Operations({ maxRunning: options.maxRunning, retention: 200 });
  const status = new GuestAgentStatus();
  const app = createAgentApi({
    status: () => status.snapshot(),
    applyConnection: () => Promise.resolve(),
    publish: () => {},
    version: "test",
    guest: {
      operations,
      execConnectTimeout: options.connectTimeout,
      execCloseTimeout: options.closeTimeout,
    },
  });
  const listener = listenUnix(path);
  const served: Promise<void>[] = [];
  const loop = (async () => {
    for await (const socket of listener) served.push(serveHttp(socket, app.fetch));
  })().catch(() => {});
  return {
    path,
    operations,
    dial: () => connectUnix(path),
    async [Symbol.asyncDispose]() {
      await operations.close();
      listener.close();
      await loop;
      await Promise.all(served);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

function collector() {
  const chunks: Uint8Array[] = [];
  return {
    sink: (chunk: Uint8Array) => void chunks.push(chunk.slice()),
    text: () => new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c]))),
  };
}

async function* input(text: string): AsyncIterable<Uint8Array> {
  yield new TextEncoder().encode(text);
}

Deno.test("exec: non-interactive command gets stdin, returns stdout, stderr and its exit status", async () => {
  await using agent = await agentApi();
  const out = collector();
  const err = collector();
  const result = await within(
    runExec(
      {
        command: ["sh", "-c", 'cat; echo "to stderr $FOO" >&2; pwd; exit 3'],
        environment: { FOO: "bar" },
        cwd: "/tmp",
      },
      { dial: agent.dial, stdin: input("line one\n"), stdout: out.sink, stderr: err.sink },
    ),
    "the exec",
  );
  assert.equal(result.status, 3);
  assert.equal(out.text(), "line one\n/tmp\n");
  assert.equal(err.text(), "to stderr bar\n");
  assert.equal(result.operation.status, "Success");
  assert.deepEqual(result.operation.metadata, { return: 3 });
});

Deno.test(requires(getuid() === 0 ? undefined : "not root (the default cwd is /root)", {
  name: "exec: lxd-agent's defaults for HOME, USER, LANG, PATH and the working directory",
  fn: async () => {
    await using agent = await agentApi();
    const out = collector();
    const result = await runExec(
      { command: ["sh", "-c", 'echo "$HOME|$USER|$LANG|$PATH"; pwd'] },
      { dial: agent.dial, stdout: out.sink },
    );
    assert.equal(result.status, 0);
    const [env, cwd] = out.text().trim().split("\n");
    assert.match(
      env,
      /^\/root\|root\|C\.UTF-8\|\/usr\/local\/sbin:\/usr\/local\/bin:\/usr\/sbin:\/usr\/bin:\/sbin:\/bin/,
    );
    assert.equal(cwd, "/root");
  },
}));

Deno.test("exec: a missing command ends with status 127, a non-executable one 126", async () => {
  await using agent = await agentApi();
  const missing = await runExec({ command: ["no-such-command-xyz"] }, {
    dial: agent.dial,
    stdout: () => {},
  });
  assert.equal(missing.status, 127);
  assert.equal(missing.operation.status, "Failure");
  const plain = await Deno.makeTempFile();
  try {
    const denied = await runExec({ command: [plain] }, { dial: agent.dial, stdout: () => {} });
    assert.equal(denied.status, 126);
  } finally {
    await Deno.remove(plain);
  }
});

Deno.test("exec: interactive command runs on a PTY of the requested size and follows window-resize", async () => {
  await using agent = await agentApi();
  const out = collector();
  const stdin = new TransformStream<Uint8Array, Uint8Array>();
  const writer = stdin.writable.getWriter();
  let sendControl:
    | ((m: { command: string; args?: Record<string, string> }) => Promise<boolean>)
    | undefined;
  const running = runExec(
    {
      command: ["sh"],
      interactive: true,
      width: 100,
      height: 30,
      environment: { TERM: "dumb" },
      cwd: "/",
    },
    {
      dial: agent.dial,
      stdin: stdin.readable,
      stdout: out.sink,
      onControl: (send) => sendControl = send,
    },
  );
  const until = async (pattern: RegExp) => {
    const deadline = Date.now() + 5000;
    while (!pattern.test(out.text())) {
      if (Date.now() > deadline) throw new Error(`no ${pattern} in ${JSON.stringify(out.text())}`);
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  };
  await writer.write(new TextEncoder().encode("stty size\n"));
  await until(/30 100\r?\n/);
  assert.ok(sendControl !== undefined);
  await sendControl!({ command: "window-resize", args: { width: "120", height: "40" } });
  // The resize and the next line travel on different streams: retry until it shows.
  const deadline = Date.now() + 5000;
  while (!/40 120\r?\n/.test(out.text()) && Date.now() < deadline) {
    await writer.write(new TextEncoder().encode("stty size\n"));
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.match(out.text(), /40 120\r?\n/);
  await writer.write(new TextEncoder().encode("exit 5\n"));
  const result = await within(running, "the interactive exec");
  assert.equal(result.status, 5);
  await writer.close().catch(() => {});
});

Deno.test("exec: a client that goes away gets its command killed (nothing left running)", async () => {
  await using agent = await agentApi();
  const abort = new AbortController();
  const out = collector();
  const running = runExec(
    { command: ["sh", "-c", "echo started; exec sleep 300"], cwd: "/tmp" },
    { dial: agent.dial, stdout: out.sink, signal: abort.signal },
  ).catch((error) => error);
  const deadline = Date.now() + 5000;
  while (!out.text().includes("started")) {
    if (Date.now() > deadline) throw new Error("the command did not start");
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  const [operation] = agent.operations.list();
  abort.abort();
  await running;
  await within(operation.done, "the operation to end after the client left");
  assert.deepEqual(operation.render().metadata, { return: 137 }, "SIGKILL: 128 + 9");
});

Deno.test("exec: a wrong secret is refused with 403, and streams not connected in time fail the operation", async () => {
  await using agent = await agentApi({ connectTimeout: 300 });
  const socket = await agent.dial();
  const { httpRequest } = await import("../shared/http/mod.ts");
  const response = await httpRequest(
    socket,
    new Request("http://a/1.0/exec", {
      method: "POST",
      body: JSON.stringify({ command: ["true"], "wait-for-websocket": true }),
    }),
  );
  assert.equal(response.status, 202);
  const body = await response.json();
  assert.equal(response.headers.get("location"), body.operation);
  const id = body.metadata.id;
  await assert.rejects(
    connectWebSocket(await agent.dial(), `http://a/1.0/operations/${id}/websocket?secret=nope`),
    (e: Error & { status?: number }) => e.status === 403,
  );
  const operation = agent.operations.get(id)!;
  await within(operation.done, "the timeout");
  assert.equal(operation.render().status, "Failure");
  assert.equal(operation.render().err, "Timed out waiting for websockets to connect");
});

Deno.test("exec: more than maxRunning operations at once are refused with 503", async () => {
  await using agent = await agentApi({ maxRunning: 1, connectTimeout: 300 });
  const { httpRequest } = await import("../shared/http/mod.ts");
  const post = async () =>
    await httpRequest(
      await agent.dial(),
      new Request("http://a/1.0/exec", {
        method: "POST",
        body: JSON.stringify({ command: ["true"], "wait-for-websocket": true }),
      }),
    );
  const first = await post();
  assert.equal(first.status, 202);
  await first.body?.cancel();
  const second = await post();
  assert.equal(second.status, 503);
  assert.match((await second.json()).error, /at most 1/);
  await within(agent.operations.list()[0].done, "the first operation's timeout");
});

Deno.test("exec: without wait-for-websocket the agent answers 400 as lxd-agent does", async () => {
  await using agent = await agentApi();
  const { httpRequest } = await import("../shared/http/mod.ts");
  const response = await httpRequest(
    await agent.dial(),
    new Request("http://a/1.0/exec", {
      method: "POST",
      body: JSON.stringify({ command: ["true"] }),
    }),
  );
  assert.equal(response.status, 400);
  assert.equal((await response.json()).error, "Websockets are required for VM exec");
});

Deno.test("exec: on a PTY the end of the client's input is the terminal's EOF, so cat ends normally", async () => {
  await using agent = await agentApi();
  const out = collector();
  const result = await within(
    runExec({ command: ["cat"], interactive: true, cwd: "/" }, {
      dial: agent.dial,
      stdin: input("hello\n"),
      stdout: out.sink,
    }),
    "cat to end",
  );
  assert.equal(result.status, 0);
  assert.match(out.text(), /hello\r\n/);
});

Deno.test("exec: the status does not wait for a client that never reads its control stream (LXD's)", async () => {
  // A close timeout far beyond the bound below: waiting for the client's close frame would show.
  await using agent = await agentApi({ closeTimeout: 60_000 });
  const { httpRequest } = await import("../shared/http/mod.ts");
  const response = await httpRequest(
    await agent.dial(),
    new Request("http://a/1.0/exec", {
      method: "POST",
      body: JSON.stringify({ command: ["true"], "wait-for-websocket": true, cwd: "/" }),
    }),
  );
  const body = await response.json();
  const id = body.metadata.id as string;
  const fds = body.metadata.metadata.fds as Record<string, string>;
  const url = (name: string) => `http://a/1.0/operations/${id}/websocket?secret=${fds[name]}`;
  // The control stream by hand: handshake written, nothing ever read (as LXD's Go client).
  const control = await agent.dial();
  control.write(
    `GET ${new URL(url("control")).pathname}${new URL(url("control")).search} HTTP/1.1\r\n` +
      "Host: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
  );
  control.pause();
  const streams = await Promise.all(
    ["0", "1", "2"].map(async (name) => await connectWebSocket(await agent.dial(), url(name))),
  );
  try {
    const operation = agent.operations.get(id)!;
    await within(operation.done, "the exec to end without the control close handshake", 10_000);
    assert.deepEqual(operation.render().metadata, { return: 0 });
  } finally {
    control.destroy();
    for (const ws of streams) ws.close();
  }
});

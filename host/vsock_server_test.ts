import "reflect-metadata";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { httpRequest, syncResponse } from "../shared/http/mod.ts";
import { createLogger } from "../shared/log.ts";
import { connectTls } from "../shared/tls/mod.ts";
import { generateKeyPair, type KeyPair } from "../shared/tls/key_pair.ts";
import { connectUnix, listenUnix } from "../shared/vsock/mod.ts";
import type { Instance } from "./instance.ts";
import { HostVsockServer, type HostVsockServerOptions } from "./vsock_server.ts";
import { EventHub } from "./event_hub.ts";

interface Fixture extends AsyncDisposable {
  server: HostVsockServer;
  path: string;
  agent: KeyPair;
  host: KeyPair;
  seen: string[];
  connect(pair?: KeyPair): Promise<Duplex & Disposable>;
}

async function fixture(options: Partial<HostVsockServerOptions> = {}): Promise<Fixture> {
  const dir = await Deno.makeTempDir({ prefix: "vsock-server-" });
  const [host, agent] = await Promise.all([generateKeyPair(), generateKeyPair()]);
  const instance: Instance = {
    name: "vm1",
    cid: 10,
    status: { kind: "none" },
    hybrid: join(dir, "vm1.vsock"),
    agentCert: agent.cert,
    clientCert: "",
    clientKey: "",
    config: {},
    devices: {},
    runtime: { agentState: "STOPPED", ready: false },
  };
  const seen: string[] = [];
  const server = new HostVsockServer({
    cert: host.cert,
    key: host.key,
    byCid: () => undefined,
    byName: (name) => name === "vm1" ? instance : undefined,
    handler: (request, inst) =>
      syncResponse({ path: new URL(request.url).pathname, instance: inst.name }),
    onAgentRequest: (name) => seen.push(name),
    ...options,
  });
  const path = join(dir, "vm1.vsock_1024");
  server.serve(listenUnix(path), { kind: "hybrid", instance: "vm1" });
  return {
    server,
    path,
    agent,
    host,
    seen,
    async connect(pair = agent) {
      const raw = await connectUnix(path);
      const secure = await connectTls(raw, { ...pair, pinned: host.cert });
      return Object.assign(secure, { [Symbol.dispose]: () => raw.destroy() });
    },
    async [Symbol.asyncDispose]() {
      await server.close(1000);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Resolves when the server ends or closes the connection. */
function closed(socket: Duplex): Promise<void> {
  return new Promise((resolve) => {
    if (socket.destroyed) return resolve();
    socket.once("end", () => resolve());
    socket.once("close", () => resolve());
    socket.resume();
  });
}

Deno.test("HostVsockServer serves the listener's instance to its agent and reports each request", async () => {
  await using t = await fixture();
  using c = await t.connect();
  const response = await httpRequest(c, new Request("http://devlxd/1.0/config"));
  assert.deepEqual((await response.json()).metadata, { path: "/1.0/config", instance: "vm1" });
  assert.deepEqual(t.seen, ["vm1"]);
});

Deno.test("HostVsockServer re-checks every request on a kept connection: after a re-key or a removal, 401 without the handler", async () => {
  let current: Instance | undefined;
  await using t = await fixture({ byName: (name) => name === "vm1" ? current : undefined });
  const other = await generateKeyPair();
  current = {
    name: "vm1",
    cid: 10,
    status: { kind: "none" },
    hybrid: t.path,
    agentCert: t.agent.cert,
    clientCert: "",
    clientKey: "",
    config: {},
    devices: {},
    runtime: { agentState: "STOPPED", ready: false },
  };
  const original = current;
  const ask = async (c: Duplex) => {
    let kept = false;
    const response = await httpRequest(c, new Request("http://devlxd/1.0"), {
      reuse: () => kept = true,
    });
    await response.text();
    return { status: response.status, kept };
  };
  {
    using c = await t.connect();
    assert.deepEqual(await ask(c), { status: 200, kept: true });
    // Re-keyed: the same name now has another agent certificate.
    current = { ...original, agentCert: other.cert };
    assert.deepEqual(await ask(c), { status: 401, kept: false });
  }
  {
    current = original;
    using c = await t.connect();
    assert.deepEqual(await ask(c), { status: 200, kept: true });
    current = undefined; // removed
    assert.deepEqual(await ask(c), { status: 401, kept: false });
  }
  assert.deepEqual(t.seen, ["vm1", "vm1"]);
});

Deno.test("HostVsockServer answers 401 to a stranger's certificate, without calling the handler, then closes", async () => {
  await using t = await fixture();
  using c = await t.connect(await generateKeyPair());
  const ended = closed(c);
  const response = await httpRequest(c, new Request("http://devlxd/1.0"));
  assert.equal(response.status, 401);
  assert.equal((await response.json()).error, "Unauthorized");
  await ended;
  assert.deepEqual(t.seen, []);
});

Deno.test("HostVsockServer keeps a streaming response open past the idle timeout; the client leaving aborts it", async () => {
  const { promise: aborted, resolve } = Promise.withResolvers<void>();
  let tick: ReturnType<typeof setTimeout> | undefined;
  await using t = await fixture({
    idleTimeout: 100,
    headersTimeout: 100,
    handler: (request) => {
      request.signal.addEventListener("abort", () => resolve(), { once: true });
      return new Response(
        new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(new TextEncoder().encode("first\n"));
            // The second chunk comes well after several idle periods.
            tick = setTimeout(() => controller.enqueue(new TextEncoder().encode("second\n")), 500);
          },
        }),
      );
    },
  });
  using c = await t.connect();
  const response = await httpRequest(c, new Request("http://devlxd/1.0/events"));
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("second\n")) {
    const { value, done } = await reader.read();
    assert.equal(done, false, `stream ended early after ${JSON.stringify(text)}`);
    text += value;
  }
  assert.equal(text, "first\nsecond\n");
  await reader.cancel();
  c.destroy();
  await aborted;
  clearTimeout(tick);
});

Deno.test("HostVsockServer.close() ends idle connections at once and waits for an in-flight response", async () => {
  const { promise: release, resolve: go } = Promise.withResolvers<void>();
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  await using t = await fixture({
    handler: async () => {
      enter();
      await release;
      return syncResponse("done");
    },
  });
  using idle = await t.connect();
  const idleClosed = closed(idle);
  using busy = await t.connect();
  const pending = httpRequest(busy, new Request("http://devlxd/1.0"));
  await entered;
  const closing = t.server.close(10_000);
  await idleClosed;
  go();
  const response = await pending;
  assert.equal((await response.json()).metadata, "done");
  await closing;
  assert.deepEqual(t.server.connections, {});
});

Deno.test("HostVsockServer counts a connection against the instance's cap once authenticated and closes one over the cap", async () => {
  await using t = await fixture({ maxConnectionsPerInstance: 1 });
  using first = await t.connect();
  // Unauthenticated connections do not count against the cap.
  using raw = await connectUnix(t.path);
  using second = await t.connect();
  await closed(second);
  assert.deepEqual(t.server.connections, { "hybrid:vm1": 1 });
  assert.ok(!first.destroyed && !raw.destroyed);
});

Deno.test("HostVsockServer keeps at most maxPendingPerPeer unauthenticated connections, evicting the oldest", async () => {
  await using t = await fixture({ maxPendingPerPeer: 2 });
  const a = await connectUnix(t.path);
  const aClosed = closed(a);
  using b = await connectUnix(t.path);
  const bClosed = closed(b);
  using c = await connectUnix(t.path);
  await aClosed;
  using agent = await t.connect();
  await bClosed; // the agent's connection evicted the oldest pending one
  const response = await httpRequest(agent, new Request("http://devlxd/1.0"));
  assert.equal(response.status, 200);
  await response.body?.cancel();
  assert.ok(!c.destroyed);
});

Deno.test("HostVsockServer closes a connection that ends before sending a byte without starting TLS, and goes on serving", async () => {
  const lines: string[] = [];
  await using t = await fixture({
    logger: createLogger({ level: "debug", write: (line) => lines.push(line) }),
  });
  for (let i = 0; i < 3; i++) {
    const probe = await connectUnix(t.path); // an agent's liveness probe
    probe.end();
    await closed(probe);
  }
  using c = await t.connect();
  const response = await httpRequest(c, new Request("http://devlxd/1.0"));
  assert.equal(response.status, 200);
  await response.body?.cancel();
  assert.deepEqual(lines.filter((line) => /TLS|ended with an error/.test(line)), []);
});

Deno.test("HostVsockServer cuts a connection whose streamed body fails while the peer does not read", async () => {
  const { promise: dropped, resolve: drop } = Promise.withResolvers<void>();
  const { promise: subscribed, resolve: subscribe } = Promise.withResolvers<void>();
  const hub = new EventHub<{ s: string }>({ maxQueueBytes: 1 << 20, onDrop: () => drop() });
  await using t = await fixture({
    handler: () => {
      const stream = hub.stream("vm1");
      subscribe();
      return new Response(stream);
    },
  });
  const raw = await connectUnix(t.path);
  const secure = await connectTls(raw, { ...t.agent, pinned: t.host.cert });
  secure.on("error", () => {});
  secure.write("GET /1.0/events HTTP/1.1\r\nHost: x\r\n\r\n");
  raw.pause(); // reads nothing while the events come
  await subscribed;
  for (let i = 0; i < 4; i++) hub.publish("vm1", { s: String(i).repeat(900_000) });
  await dropped;
  // Now read: what was sent, then the end of the connection (not a stream left open).
  raw.resume();
  await closed(secure);
  raw.destroy();
});

import assert from "node:assert/strict";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { createLogger } from "../log.ts";
import { connectUnix, type FdSocket, type Listener, listenUnix } from "../vsock/mod.ts";
import { within } from "../vsock/_testing.ts";
import { httpRequest } from "./http_request.ts";
import { HttpServer, type HttpServerOptions } from "./http_server.ts";

interface Fixture<I> extends AsyncDisposable {
  server: HttpServer<I>;
  path: string;
  lines: string[];
  connect(): Promise<FdSocket>;
}

/** An HttpServer on a fresh unix socket, logging into `lines`. */
async function fixture<I = undefined>(
  options: Omit<HttpServerOptions<I, undefined>, "logger">,
  wrap: (listener: Listener) => Listener = (listener) => listener,
): Promise<Fixture<I>> {
  const dir = await Deno.makeTempDir({ prefix: "http-server-" });
  const path = join(dir, "sock");
  const lines: string[] = [];
  const server = new HttpServer<I>({
    ...options,
    logger: createLogger({ level: "debug", write: (line) => lines.push(line) }),
  });
  server.serve(wrap(listenUnix(path)));
  const sockets: FdSocket[] = [];
  return {
    server,
    path,
    lines,
    async connect() {
      const socket = await connectUnix(path);
      socket.on("error", () => {});
      sockets.push(socket);
      return socket;
    },
    async [Symbol.asyncDispose]() {
      for (const socket of sockets) socket.destroy();
      await server.shutdown(1000);
      await Deno.remove(dir, { recursive: true });
    },
  };
}

/** Resolves when the server ends or closes the connection. */
function ended(socket: Duplex): Promise<void> {
  return new Promise((resolve) => {
    if (socket.destroyed || socket.readableEnded) return resolve();
    socket.once("end", () => resolve());
    socket.once("close", () => resolve());
    socket.resume();
  });
}

const ok = () => new Response("ok");
/** Keeps the connection open after the response (no `Connection: close`). */
const keepAlive = { reuse: () => {} };

Deno.test("HttpServer pauses after a failed accept (EMFILE) and goes on accepting, logging the run once", async () => {
  let failures = 3;
  await using t = await fixture({ handler: ok, label: "test" }, (listener) => ({
    address: listener.address,
    accept: () =>
      failures-- > 0
        ? Promise.reject(new Error("Cannot accept: Too many open files (EMFILE)"))
        : listener.accept(),
    close: () => listener.close(),
    [Symbol.dispose]: () => listener.close(),
    [Symbol.asyncIterator]: () => listener[Symbol.asyncIterator](),
  }));
  const socket = await t.connect();
  const response = await within(
    httpRequest(socket, new Request("http://x/")),
    5000,
    "an answer after the failed accepts",
  );
  assert.equal(await response.text(), "ok");
  assert.equal(t.lines.filter((line) => line.includes("test accept failed; retrying")).length, 1);
  assert.ok(
    t.lines.some((line) => /test accepts again.*failedAccepts=3/.test(line)),
    t.lines.join("\n"),
  );
});

Deno.test("HttpServer runs the authentication hook before reading a request; a refused peer never reaches the handler", async () => {
  const seen: string[] = [];
  const authenticated: number[] = [];
  await using t = await fixture<string>({
    handler: (_request, identity) => {
      seen.push(identity);
      return ok();
    },
    authenticate: (socket) => {
      // Nothing has been read yet: the request is still in the socket.
      authenticated.push(socket.readableLength);
      return Promise.resolve(authenticated.length === 1 ? undefined : { socket, identity: "peer" });
    },
    waitForData: true,
  });
  const refused = await t.connect();
  const gone = ended(refused);
  refused.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  await gone;
  assert.deepEqual(seen, []);
  const accepted = await t.connect();
  const response = await httpRequest(accepted, new Request("http://x/"));
  assert.equal(await response.text(), "ok");
  assert.deepEqual(seen, ["peer"]);
  assert.ok(authenticated.every((length) => length > 0), "the hook saw the unread request");
});

Deno.test("HttpServer serves a refusal to an unknown peer without calling the handler or counting it", async () => {
  let calls = 0;
  await using t = await fixture<string>({
    handler: () => {
      calls++;
      return ok();
    },
    authenticate: (socket) =>
      Promise.resolve({ socket, refuse: () => new Response("no", { status: 401 }) }),
  });
  const socket = await t.connect();
  const response = await httpRequest(socket, new Request("http://x/"));
  assert.equal(response.status, 401);
  assert.equal(await response.text(), "no");
  assert.equal(calls, 0);
  assert.deepEqual(t.server.connectionsByPeer, {});
});

Deno.test("HttpServer closes a connection whose authentication misses the deadline, and logs why", async () => {
  await using t = await fixture({
    handler: ok,
    authenticate: (_socket, { signal }) =>
      new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason))),
    authTimeout: 50,
    label: "test",
  });
  const socket = await t.connect();
  await within(ended(socket), 5000, "the connection to close at the deadline");
  assert.ok(
    t.lines.some((line) => /test connection ended with an error.*timed out/.test(line)),
    t.lines.join("\n"),
  );
});

Deno.test("HttpServer refuses connections over maxConnections at once and logs it", async () => {
  await using t = await fixture({ handler: ok, maxConnections: 1, label: "test" });
  const first = await t.connect();
  const second = await t.connect();
  await ended(second);
  assert.ok(t.lines.some((line) => line.includes("test connection refused: too many connections")));
  const response = await httpRequest(first, new Request("http://x/"));
  assert.equal(await response.text(), "ok");
});

Deno.test("HttpServer evicts the oldest unauthenticated connection of a peer over maxPendingPerPeer", async () => {
  await using t = await fixture({ handler: ok, maxPendingPerPeer: 2, waitForData: true });
  const a = await t.connect();
  const aEnded = ended(a);
  await t.connect();
  const c = await t.connect();
  await within(aEnded, 5000, "the oldest pending connection to be evicted");
  assert.ok(!c.destroyed);
});

Deno.test("HttpServer: at maxConnectionsPerPeer an idle kept-alive connection makes room, a busy one does not", async () => {
  const { promise: release, resolve: go } = Promise.withResolvers<void>();
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  await using t = await fixture({
    handler: async (request) => {
      if (new URL(request.url).pathname === "/slow") {
        enter();
        await release;
      }
      return ok();
    },
    maxConnectionsPerPeer: 1,
  });
  const first = await t.connect();
  const firstEnded = ended(first);
  await (await httpRequest(first, new Request("http://x/"), keepAlive)).text(); // idle, kept alive
  const second = await t.connect();
  await within(firstEnded, 5000, "the idle connection to make room");
  const pending = httpRequest(second, new Request("http://x/slow"), keepAlive);
  await entered;
  const third = await t.connect();
  await within(ended(third), 5000, "the connection over the cap to be closed");
  go();
  assert.equal(await (await pending).text(), "ok");
  assert.deepEqual(t.server.connectionsByPeer, { "": 1 });
});
Deno.test("HttpServer.shutdown(grace) closes idle connections at once, waits for an in-flight answer, then closes", async () => {
  const { promise: release, resolve: go } = Promise.withResolvers<void>();
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  await using t = await fixture({
    handler: async () => {
      enter();
      await release;
      return new Response("done");
    },
  });
  const idle = await t.connect();
  const idleEnded = ended(idle);
  const busy = await t.connect();
  const pending = httpRequest(busy, new Request("http://x/"), keepAlive);
  await entered;
  let finished = false;
  const shutdown = t.server.shutdown(10_000).then(() => finished = true);
  await within(idleEnded, 5000, "the idle connection to close");
  assert.equal(finished, false, "shutdown waits for the in-flight answer");
  go();
  const response = await pending;
  assert.equal(response.headers.get("connection"), "close");
  assert.equal(await response.text(), "done");
  await within(shutdown, 5000, "shutdown after the answer");
  assert.ok(t.server.signal.aborted, "handlers were told to end their streams");
  assert.ok(await within(ended(busy).then(() => true), 5000, "the busy connection to close"));
});

Deno.test("HttpServer.shutdown(grace) cuts an answer still running when the grace period ends", async () => {
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  await using t = await fixture({
    handler: () => {
      enter();
      return new Promise<Response>(() => {});
    },
    label: "test",
  });
  const socket = await t.connect();
  httpRequest(socket, new Request("http://x/")).catch(() => {});
  await entered;
  await within(t.server.shutdown(100), 5000, "shutdown to give up waiting");
  await within(ended(socket), 5000, "the connection to be cut");
  assert.ok(t.lines.some((line) => line.includes("test shutdown timeout")));
});

Deno.test("HttpServer.closeWhere() closes an identity's idle connections at once and its busy ones after their answer", async () => {
  const { promise: release, resolve: go } = Promise.withResolvers<void>();
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  let next = 0;
  await using t = await fixture<string>({
    handler: async (request) => {
      if (new URL(request.url).pathname === "/slow") {
        enter();
        await release;
      }
      return ok();
    },
    authenticate: (socket) => Promise.resolve({ socket, identity: next++ === 2 ? "b" : "a" }),
  });
  const idle = await t.connect();
  await (await httpRequest(idle, new Request("http://x/"), keepAlive)).text();
  const idleEnded = ended(idle);
  const busy = await t.connect();
  const pending = httpRequest(busy, new Request("http://x/slow"), keepAlive);
  const other = await t.connect();
  await (await httpRequest(other, new Request("http://x/"), keepAlive)).text();
  await entered;
  assert.equal(t.server.closeWhere((identity) => identity === "a"), 2);
  await idleEnded;
  go();
  const response = await pending;
  assert.equal(response.headers.get("connection"), "close");
  assert.equal(await response.text(), "ok");
  const still = await httpRequest(other, new Request("http://x/"));
  assert.equal(await still.text(), "ok", "another identity's connection stays");
});

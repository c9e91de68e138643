import assert from "node:assert/strict";
import { QmpClient, QmpError, readRingBuffer } from "./qmp_client.ts";
import { FakeQmpServer, FakeRingBuffer } from "../../tests/fakes/qmp.ts";

async function tempSocket(): Promise<{ path: string } & AsyncDisposable> {
  const dir = await Deno.makeTempDir({ prefix: "qmp-test-" });
  return {
    path: `${dir}/qmp.sock`,
    [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }),
  };
}

Deno.test("readRingBuffer() returns the last complete line and consumes the buffer", async () => {
  await using sock = await tempSocket();
  const ring = new FakeRingBuffer(16);
  await using server = new FakeQmpServer(sock.path, { rings: { vserial: ring } });
  ring.write("STARTED\nCONNECTED\n");
  const first = await readRingBuffer(sock.path, "vserial");
  assert.equal(first.text, "STARTED\nCONNECTED\n".slice(-16));
  assert.equal(first.state, "CONNECTED");
  const second = await readRingBuffer(sock.path, "vserial");
  assert.deepEqual(second, { text: "", state: undefined });
  assert.deepEqual(server.commands, [
    "qmp_capabilities",
    "ringbuf-read",
    "qmp_capabilities",
    "ringbuf-read",
  ]);
});

Deno.test("readRingBuffer() ignores a partial last line", async () => {
  await using sock = await tempSocket();
  const ring = new FakeRingBuffer(16);
  await using _server = new FakeQmpServer(sock.path, { rings: { vserial: ring } });
  ring.write("STOPPED\nSTAR");
  assert.equal((await readRingBuffer(sock.path, "vserial")).state, "STOPPED");
});

Deno.test("QmpClient.connect() times out when QEMU never sends the greeting", async () => {
  await using sock = await tempSocket();
  await using server = new FakeQmpServer(sock.path, { greeting: false });
  const started = performance.now();
  await assert.rejects(
    QmpClient.connect(sock.path, { greetingTimeout: 150 }),
    (e: Error) => e instanceof Deno.errors.TimedOut && /greeting/.test(e.message),
  );
  assert.ok(performance.now() - started < 2000);
  assert.deepEqual(server.commands, []);
});

Deno.test("QmpClient.connect() fails with NotFound when no socket exists", async () => {
  await using sock = await tempSocket();
  await assert.rejects(QmpClient.connect(sock.path), Deno.errors.NotFound);
});

Deno.test("QmpClient skips garbage lines and still matches the reply", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path, {
    onCommand: async (command, c) => {
      if (command.execute !== "query-status") return false;
      await c.send('not json\n[1,2]\n{"broken": \n');
      await c.sendJson({ return: { status: "running" }, id: command.id });
      return true;
    },
  });
  await using client = await QmpClient.connect(sock.path);
  assert.deepEqual(await client.execute("query-status"), { status: "running" });
  assert.equal(client.garbageLines, 3);
});

Deno.test("QmpClient reassembles a reply split across reads", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path, {
    onCommand: async (command, c) => {
      if (command.execute !== "query-name") return false;
      const text = JSON.stringify({ return: { name: "vm1" }, id: command.id }) + "\n";
      for (const ch of text) await c.send(ch);
      return true;
    },
  });
  await using client = await QmpClient.connect(sock.path);
  assert.deepEqual(await client.execute("query-name"), { name: "vm1" });
});

Deno.test("QmpClient.execute() rejects when QEMU disconnects mid-reply", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path, {
    onCommand: async (command, c) => {
      if (command.execute !== "ringbuf-read") return false;
      await c.send(`{"return": "STAR`);
      c.close();
      return true;
    },
  });
  const client = await QmpClient.connect(sock.path);
  await assert.rejects(
    client.execute("ringbuf-read", { device: "vserial", size: 16, format: "utf8" }),
    Deno.errors.UnexpectedEof,
  );
  assert.ok((await client.closed) instanceof Deno.errors.UnexpectedEof);
  await client.close();
});

Deno.test("QmpClient.execute() turns an error reply into QmpError", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path);
  await using client = await QmpClient.connect(sock.path);
  await assert.rejects(
    client.execute("ringbuf-read", { device: "nope", size: 16, format: "utf8" }),
    (e: unknown) =>
      e instanceof QmpError && e.class === "GenericError" && e.desc === "Device 'nope' not found",
  );
  // The connection stays usable after a command error.
  assert.equal(await client.execute("ringbuf-read", { device: "vserial", size: 16 }), "");
});

Deno.test("QmpClient.execute() times out when the reply never comes", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path, {
    onCommand: (command) => command.execute === "query-status",
  });
  await using client = await QmpClient.connect(sock.path);
  await assert.rejects(
    client.execute("query-status", undefined, { timeout: 100 }),
    Deno.errors.TimedOut,
  );
});

Deno.test("QmpClient delivers events to onEvent in order", async () => {
  await using sock = await tempSocket();
  await using server = new FakeQmpServer(sock.path);
  const seen: string[] = [];
  const { promise: two, resolve } = Promise.withResolvers<void>();
  await using _client = await QmpClient.connect(sock.path, {
    onEvent: (event) => {
      seen.push(event.event);
      if (seen.length === 2) resolve();
    },
  });
  const conn = await server.waitConnections(1);
  await conn.event("STOP");
  await conn.event("RESUME");
  await two;
  assert.deepEqual(seen, ["STOP", "RESUME"]);
});

Deno.test("QmpClient closes the connection on an over-long line", async () => {
  await using sock = await tempSocket();
  await using server = new FakeQmpServer(sock.path);
  const client = await QmpClient.connect(sock.path, { maxLineLength: 1024 });
  const conn = await server.waitConnections(1);
  await conn.send("x".repeat(4096));
  const reason = await client.closed;
  assert.ok(reason instanceof SyntaxError, String(reason));
  await client.close();
});

Deno.test("QmpClient.close() is idempotent and fails pending commands", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path, {
    onCommand: (command) => command.execute === "query-status",
  });
  const client = await QmpClient.connect(sock.path);
  const pending = client.execute("query-status");
  await client.close();
  await client.close();
  await assert.rejects(pending, Deno.errors.BadResource);
  await assert.rejects(client.execute("query-status"), Deno.errors.BadResource);
  assert.equal(await client.closed, undefined);
});

Deno.test("QmpClient.connect() honours an aborted signal", async () => {
  await using sock = await tempSocket();
  await using _server = new FakeQmpServer(sock.path, { greeting: false });
  const controller = new AbortController();
  const connecting = QmpClient.connect(sock.path, { signal: controller.signal });
  controller.abort(new Error("shutdown"));
  await assert.rejects(connecting, /shutdown/);
});

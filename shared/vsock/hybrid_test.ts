import assert from "node:assert/strict";
import type { Buffer } from "node:buffer";
import { nextEvent, readToEnd, TempDir, within } from "./_testing.ts";
import type { FdSocket } from "./fd_socket.ts";
import { connectHybrid, HYBRID_FIRST_LOCAL_PORT, listenHybridMux } from "./hybrid.ts";
import { SocketError } from "./socket_error.ts";
import { hybridGuestTransport } from "./transport.ts";
import { connectUnix, listenUnix } from "./unix.ts";
import { RANDOM_PORT_MAX, RANDOM_PORT_MIN } from "./vsock.ts";

/** Reads from `socket` until `count` bytes arrived (bounded), then pauses it. */
function readBytes(socket: FdSocket, count: number): Promise<string> {
  let text = "";
  let onData: (chunk: Buffer) => void = () => {};
  const done = new Promise<string>((resolve) => {
    onData = (chunk) => {
      text += String(chunk);
      if (text.length >= count) resolve(text);
    };
    socket.on("data", onData);
  });
  return within(done, 5000, `${count} bytes`).finally(() => {
    socket.removeListener("data", onData);
    socket.pause();
  });
}

Deno.test("connectHybrid() reaches a listenHybridMux() port and carries the stream", async () => {
  using dir = new TempDir();
  using mux = listenHybridMux(dir.join("v.sock"), [1024, 8443]);
  const [client, server] = await within(
    Promise.all([connectHybrid(dir.join("v.sock"), 8443, { cid: 7 }), mux.accept()]),
    5000,
    "hybrid connect and accept",
  );
  try {
    assert.deepEqual(server.localAddress, { family: "vsock", cid: 0xFFFFFFFF, port: 8443 });
    assert.equal(server.remoteAddress.family, "vsock");
    assert.deepEqual(client.remoteAddress, { family: "vsock", cid: 7, port: 8443 });
    assert.deepEqual(client.localAddress, server.remoteAddress);
    assert.deepEqual(client.localAddress, {
      family: "vsock",
      cid: 2,
      port: HYBRID_FIRST_LOCAL_PORT,
    });
    const echoed = readToEnd(client);
    server.on("data", (chunk: Buffer) => server.write(chunk));
    server.on("end", () => server.end());
    client.end("ping through the mux");
    assert.equal(String(await echoed), "ping through the mux");
    assert.deepEqual(mux.address, { family: "unix", path: dir.join("v.sock") });
  } finally {
    client.destroy();
    server.destroy();
  }
});

Deno.test("listenHybridMux() keeps the bytes sent right after the CONNECT line", async () => {
  using dir = new TempDir();
  using mux = listenHybridMux(dir.join("v.sock"), [5000]);
  const accepted = mux.accept();
  using raw = await connectUnix(dir.join("v.sock"));
  raw.write("CONNECT 5000\nfirst bytes of the stream");
  const ok = await readBytes(raw, `OK ${HYBRID_FIRST_LOCAL_PORT}\n`.length);
  assert.equal(ok, `OK ${HYBRID_FIRST_LOCAL_PORT}\n`);
  using server = await within(accepted, 5000, "accept");
  assert.equal(await readBytes(server, 24), "first bytes of the stream");
});

Deno.test("connectHybrid() keeps the bytes that arrive with the OK line", async () => {
  using dir = new TempDir();
  using vmm = listenUnix(dir.join("fake.sock"));
  const serving = (async () => {
    using peer = await vmm.accept();
    assert.equal(await readBytes(peer, 10), "CONNECT 9\n");
    peer.write("OK 77\nhello from the guest");
    await readToEnd(peer);
  })();
  using client = await connectHybrid(dir.join("fake.sock"), 9);
  assert.deepEqual(client.localAddress, { family: "vsock", cid: 2, port: 77 });
  assert.equal(await readBytes(client, 20), "hello from the guest");
  client.end();
  await within(serving, 5000, "fake VMM");
});

Deno.test("connectHybrid() to a port the mux does not serve fails with ECONNREFUSED", async () => {
  using dir = new TempDir();
  using _mux = listenHybridMux(dir.join("v.sock"), [1024]);
  const error = await connectHybrid(dir.join("v.sock"), 1025).catch((e) => e);
  assert.ok(error instanceof SocketError, String(error));
  assert.equal(error.code, "ECONNREFUSED");
  assert.match(
    error.message,
    /^Cannot connect to hybrid vsock port 1025 via .*: connection refused/,
  );
});

Deno.test("connectHybrid() without a VMM socket fails with ENOENT", async () => {
  using dir = new TempDir();
  await assert.rejects(connectHybrid(dir.join("none.sock"), 1), { code: "ENOENT" });
});

Deno.test("connectHybrid() fails with EPROTO on a garbage answer", async () => {
  using dir = new TempDir();
  using vmm = listenUnix(dir.join("fake.sock"));
  const serving = (async () => {
    using peer = await vmm.accept();
    const closed = readToEnd(peer).catch((error) => error);
    peer.write("HTTP/1.1 400 Bad Request\r\n\r\n");
    await closed; // the client hangs up on the bad answer
  })();
  const error = await connectHybrid(dir.join("fake.sock"), 9).catch((e) => e);
  assert.ok(error instanceof SocketError, String(error));
  assert.equal(error.code, "EPROTO");
  assert.ok(error.cause instanceof SyntaxError);
  await within(serving, 5000, "fake VMM");
});

Deno.test("connectHybrid() times out with ETIMEDOUT when the VMM never answers", async () => {
  using dir = new TempDir();
  using vmm = listenUnix(dir.join("mute.sock"));
  const accepted = vmm.accept();
  const started = performance.now();
  const error = await connectHybrid(dir.join("mute.sock"), 9, { timeout: 100 }).catch((e) => e);
  assert.ok(error instanceof SocketError, String(error));
  assert.equal(error.code, "ETIMEDOUT");
  assert.ok(performance.now() - started >= 90);
  (await accepted).destroy();
});

Deno.test("connectHybrid() stops when its signal aborts", async () => {
  using dir = new TempDir();
  using vmm = listenUnix(dir.join("mute.sock"));
  const accepted = vmm.accept();
  const controller = new AbortController();
  const pending = connectHybrid(dir.join("mute.sock"), 9, { signal: controller.signal });
  const peer = await accepted;
  controller.abort(new Error("stop"));
  await assert.rejects(pending, { message: "stop" });
  peer.destroy();
});

/**
 * Sends `bytes` to the mux, then resolves with what came back before it
 * closed the connection (a close with unread bytes arrives as a reset).
 */
async function probe(path: string, bytes: string, end = false): Promise<string> {
  using raw = await connectUnix(path);
  const answer = readToEnd(raw).then(String, (error) => {
    if (error?.code === "ECONNRESET") return "";
    throw error;
  });
  if (end) raw.end(bytes);
  else raw.write(bytes);
  return await answer;
}

Deno.test("listenHybridMux() closes garbage, oversized, partial and slow clients, serving others", async () => {
  using dir = new TempDir();
  const path = dir.join("v.sock");
  using mux = listenHybridMux(path, [1024], { handshakeTimeout: 200 });
  const accepted = mux.accept();
  accepted.catch(() => {}); // awaited below; do not report it twice if a step fails first
  assert.equal(await probe(path, "GET / HTTP/1.1\r\n"), "");
  assert.equal(await probe(path, "CONNECT " + "9".repeat(64)), "");
  assert.equal(await probe(path, "CONNECT 10", true), "");
  const started = performance.now();
  assert.equal(await probe(path, ""), "", "a silent client");
  assert.ok(performance.now() - started >= 150, "closed before the handshake timeout");
  // A good client still gets through, and is the first one accepted.
  using good = await connectHybrid(path, 1024);
  using server = await within(accepted, 5000, "accept");
  assert.deepEqual(server.remoteAddress, good.localAddress);
});

Deno.test("listenHybridMux() handshakes 50 connections concurrently", async () => {
  using dir = new TempDir();
  const path = dir.join("v.sock");
  using mux = listenHybridMux(path, [1024]);
  // A client that never finishes its line must not hold up the others.
  using stalled = await connectUnix(path);
  stalled.write("CONN");
  const servers: FdSocket[] = [];
  const clients: FdSocket[] = [];
  try {
    const serving = (async () => {
      for await (const server of mux) {
        servers.push(server);
        server.on("data", (chunk: Buffer) => server.write(chunk));
        server.on("end", () => server.end());
        if (servers.length === 50) return;
      }
    })();
    const echoes = await within(
      Promise.all(Array.from({ length: 50 }, async (_, i) => {
        const client = await connectHybrid(path, 1024);
        clients.push(client);
        const echoed = readToEnd(client);
        client.end(`n${i}`);
        return String(await echoed);
      })),
      10000,
      "50 hybrid echoes",
    );
    await serving;
    assert.deepEqual(echoes, Array.from({ length: 50 }, (_, i) => `n${i}`));
    const ports = new Set(
      clients.map((c) => c.localAddress.family === "vsock" && c.localAddress.port),
    );
    assert.equal(ports.size, 50, "each connection gets its own OK port");
  } finally {
    for (const socket of [...servers, ...clients]) socket.destroy();
  }
});

Deno.test("listenHybridMux() close() rejects accept() and drops handshaking clients", async () => {
  using dir = new TempDir();
  const path = dir.join("v.sock");
  const mux = listenHybridMux(path, [1024]);
  const pending = mux.accept();
  using raw = await connectUnix(path);
  // A partial line keeps the connection in its handshake (or in the backlog):
  // either way close() ends it, as an EOF or a reset.
  const ended = readToEnd(raw).then(String, (error) => error.code);
  raw.write("CONNECT 10");
  mux.close();
  mux.close();
  await assert.rejects(within(pending, 5000, "accept rejection"), { name: "AbortError" });
  assert.ok(["", "ECONNRESET"].includes(await ended));
  assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
});

Deno.test("hybridGuestTransport() connects to <uds>_<port> and serves CONNECT on <uds>", async () => {
  using dir = new TempDir();
  const uds = dir.join("guest.vsock");
  const transport = hybridGuestTransport(uds);
  // Guest → host: the VMM forwards CID 2:PORT to "<uds>_PORT".
  using host = listenUnix(`${uds}_1025`);
  const hostSide = host.accept();
  using guestClient = await transport.connect(2, 1025);
  using hostServer = await hostSide;
  assert.deepEqual(guestClient.remoteAddress, { family: "unix", path: `${uds}_1025` });
  assert.ok(hostServer.fd >= 0);
  // Host → guest: CONNECT through "<uds>".
  using listener = transport.listen(8443);
  assert.deepEqual(listener.address, { family: "vsock", cid: 0xFFFFFFFF, port: 8443 });
  const guestSide = listener.accept();
  using hostClient = await connectHybrid(uds, 8443);
  using guestServer = await guestSide;
  const got = nextEvent<Buffer>(guestServer, "data");
  hostClient.write("to the agent");
  assert.equal(String(await got), "to the agent");
});

Deno.test("hybridGuestTransport().listen(0) serves a random port in 1024-65534", () => {
  using dir = new TempDir();
  using listener = hybridGuestTransport(dir.join("g.vsock")).listen(0);
  assert.equal(listener.address.family, "vsock");
  const port = listener.address.family === "vsock" ? listener.address.port : -1;
  assert.ok(port >= RANDOM_PORT_MIN && port <= RANDOM_PORT_MAX, String(port));
});

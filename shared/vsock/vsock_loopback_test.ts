/**
 * Full AF_VSOCK connect/accept tests over the loopback CID 1
 * (VMADDR_CID_LOCAL). They need the `vsock_loopback` transport, so they run
 * only when `LXD_VSOCK_LOOPBACK=1` — the VM harness sets it inside a guest
 * that has the module loaded. They never dial CID 2 or this machine's CID.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { nextEvent, pattern, readToEnd, within } from "./_testing.ts";
import type { FdSocket } from "./fd_socket.ts";
import type { Listener } from "./listener.ts";
import { VMADDR_CID_LOCAL } from "./sockaddr.ts";
import { SocketError } from "./socket_error.ts";
import { vsockTransport } from "./transport.ts";
import { connectVsock, listenVsock } from "./vsock.ts";
import { requires } from "../_requires.ts";

function loopbackEnabled(): boolean {
  try {
    return Deno.env.get("LXD_VSOCK_LOOPBACK") === "1";
  } catch {
    return false;
  }
}

const noLoopback = loopbackEnabled() ? undefined : "needs LXD_VSOCK_LOOPBACK=1 (inside a VM " +
  "with the vsock_loopback module, as in make e2e's L1; it connects to CID 1)";

function portOf(listener: Listener): number {
  assert.equal(listener.address.family, "vsock");
  return listener.address.family === "vsock" ? listener.address.port : -1;
}

async function loopbackPair(): Promise<{ listener: Listener; client: FdSocket; server: FdSocket }> {
  const listener = listenVsock({ port: 0 });
  const [client, server] = await within(
    Promise.all([connectVsock(VMADDR_CID_LOCAL, portOf(listener)), listener.accept()]),
    5000,
    "vsock loopback connect and accept",
  );
  return { listener, client, server };
}

Deno.test(requires(noLoopback, {
  name: "vsock loopback: echo, with the peer's CID and port from the kernel",
  async fn() {
    const { listener, client, server } = await loopbackPair();
    try {
      assert.deepEqual(client.remoteAddress, {
        family: "vsock",
        cid: VMADDR_CID_LOCAL,
        port: portOf(listener),
      });
      assert.equal(server.remoteAddress.family, "vsock");
      assert.equal(client.localAddress.family, "vsock");
      if (server.remoteAddress.family === "vsock" && client.localAddress.family === "vsock") {
        assert.equal(server.remoteAddress.cid, VMADDR_CID_LOCAL);
        assert.equal(server.remoteAddress.port, client.localAddress.port);
      }
      server.on("data", (chunk: Buffer) => server.write(chunk));
      const reply = nextEvent<Buffer>(client, "data");
      client.write("hello over vsock");
      assert.equal(String(await reply), "hello over vsock");
    } finally {
      client.destroy();
      server.destroy();
      listener.close();
    }
  },
}));

Deno.test(requires(noLoopback, {
  name: "vsock loopback: 16 MiB arrive intact through backpressure",
  async fn() {
    const { listener, client, server } = await loopbackPair();
    try {
      const data = pattern(16 * 1024 * 1024, 11);
      const received = readToEnd(server, 60000);
      let sawBackpressure = false;
      for (let off = 0; off < data.byteLength; off += 256 * 1024) {
        if (!client.write(data.subarray(off, off + 256 * 1024))) {
          sawBackpressure = true;
          await nextEvent(client, "drain", 30000);
        }
      }
      client.end();
      const got = await received;
      assert.ok(sawBackpressure);
      assert.ok(Buffer.from(data).equals(got));
    } finally {
      client.destroy();
      server.destroy();
      listener.close();
    }
  },
}));

Deno.test(requires(noLoopback, {
  name: "vsock loopback: half-close both ways",
  async fn() {
    const { listener, client, server } = await loopbackPair();
    try {
      const request = readToEnd(server);
      client.end("question");
      assert.equal(String(await request), "question");
      const answer = readToEnd(client);
      server.end("answer");
      assert.equal(String(await answer), "answer");
    } finally {
      client.destroy();
      server.destroy();
      listener.close();
    }
  },
}));

Deno.test(requires(noLoopback, {
  name: "vsock loopback: 50 concurrent connections echo",
  async fn() {
    using listener = vsockTransport.listen(0);
    const served: FdSocket[] = [];
    const serving = (async () => {
      for await (const socket of listener) {
        served.push(socket);
        socket.on("data", (chunk: Buffer) => socket.write(chunk));
        socket.on("end", () => socket.end());
      }
    })();
    const clients: FdSocket[] = [];
    try {
      const echoes = await within(
        Promise.all(Array.from({ length: 50 }, async (_, i) => {
          const client = await vsockTransport.connect(VMADDR_CID_LOCAL, portOf(listener));
          clients.push(client);
          const echoed = readToEnd(client);
          client.end(`vsock ${i}`);
          return String(await echoed);
        })),
        30000,
        "50 vsock echoes",
      );
      assert.deepEqual(echoes, Array.from({ length: 50 }, (_, i) => `vsock ${i}`));
    } finally {
      listener.close();
      await serving;
      for (const socket of [...clients, ...served]) socket.destroy();
    }
  },
}));

Deno.test(requires(noLoopback, {
  name: "vsock loopback: connecting to a port nobody listens on fails with ECONNREFUSED",
  async fn() {
    const listener = listenVsock({ port: 0 });
    const port = portOf(listener);
    listener.close();
    const error = await connectVsock(VMADDR_CID_LOCAL, port).catch((e) => e);
    assert.ok(error instanceof SocketError, String(error));
    assert.equal(error.code, "ECONNREFUSED");
    assert.match(
      error.message,
      new RegExp(`^Cannot connect to vsock 1:${port}: connection refused`),
    );
  },
}));

Deno.test(requires(noLoopback, {
  name: "vsock loopback: closing the listener rejects a pending accept()",
  async fn() {
    const listener = listenVsock({ cid: VMADDR_CID_LOCAL, port: 0 });
    const pending = listener.accept();
    listener.close();
    await assert.rejects(pending, { name: "AbortError" });
  },
}));

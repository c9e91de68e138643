import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import { serveHttp } from "../shared/http/mod.ts";
import { acceptTls } from "../shared/tls/mod.ts";
import { hybridGuestTransport, type Listener, listenUnix } from "../shared/vsock/mod.ts";
import { classifyFailure, hostRequest, probeHost } from "./host_client.ts";
import { HostUnreachableError } from "./host_fetch.ts";
import { Slots } from "../shared/slots.ts";
import { makeTestPair, until, within } from "./_testing.ts";

const agent = await makeTestPair("agent");
const host = await makeTestPair("host");
const other = await makeTestPair("impostor");

/** A unix "host" at `${uds}_${port}` running `serve` on each connection. */
async function withHost(
  serve: ((socket: Duplex) => Promise<void>) | undefined,
  f: (uds: string, port: number) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir();
  const uds = `${dir}/v.sock`;
  const port = 5000;
  let listener: Listener | undefined;
  const sockets: Duplex[] = [];
  let loop: Promise<void> | undefined;
  if (serve !== undefined) {
    listener = listenUnix(`${uds}_${port}`);
    loop = (async () => {
      try {
        for await (const socket of listener!) {
          sockets.push(socket);
          serve(socket).catch(() => {}).finally(() => socket.destroy());
        }
      } catch {
        // closed
      }
    })();
  }
  try {
    await f(uds, port);
  } finally {
    listener?.close();
    sockets.forEach((s) => s.destroy());
    await loop;
    await Deno.remove(dir, { recursive: true });
  }
}

function info(port: number) {
  return { cid: 2, port, certificate: host.cert, devlxd: true };
}

async function expectUnreachable(
  promise: Promise<unknown>,
  reason: string,
  message: RegExp,
): Promise<void> {
  await assert.rejects(within(promise, "the failure"), (error: unknown) => {
    assert.ok(error instanceof HostUnreachableError, String(error));
    assert.equal(error.reason, reason, error.message);
    assert.match(error.message, message);
    assert.match(error.message, /\.$/, "one sentence");
    return true;
  });
}

function serveTls(cert = host) {
  return async (socket: Duplex) => {
    const { socket: tlsSocket } = await acceptTls(socket, {
      cert: cert.cert,
      key: cert.key,
      pinned: agent.cert,
    });
    await serveHttp(
      tlsSocket,
      (request) => Response.json({ type: "sync", metadata: new URL(request.url).pathname }),
    );
  };
}

Deno.test("hostRequest() sends one request over one TLS connection pinning the host", async () => {
  let connections = 0;
  const serve = serveTls();
  await withHost((socket) => {
    connections++;
    return serve(socket);
  }, async (uds, port) => {
    const res = await hostRequest(info(port), new Request("http://lxd/1.0/devices"), {
      transport: hybridGuestTransport(uds),
      ...agent,
    });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), { type: "sync", metadata: "/1.0/devices" });
    assert.equal(connections, 1);
  });
});

/** A host serving over TLS that holds each answer until the test calls its entry in `held`. */
function holdingHost(held: Array<() => void>) {
  return async (socket: Duplex) => {
    const { socket: tlsSocket } = await acceptTls(socket, {
      cert: host.cert,
      key: host.key,
      pinned: agent.cert,
    });
    await serveHttp(tlsSocket, async () => {
      await new Promise<void>((resolve) => held.push(resolve));
      return Response.json({ type: "sync", metadata: {} });
    });
  };
}

Deno.test("hostRequest() with slots keeps at most that many connections open, the rest queue", async () => {
  // The host holds every answer until the test lets one go: without the bound,
  // all six requests would be connected at once.
  let open = 0;
  let maxOpen = 0;
  const held: Array<() => void> = [];
  const serve = holdingHost(held);
  await withHost((socket) => {
    open++;
    maxOpen = Math.max(maxOpen, open);
    socket.once("close", () => open--);
    return serve(socket);
  }, async (uds, port) => {
    const slots = new Slots(2);
    const requests = Array.from(
      { length: 6 },
      () =>
        hostRequest(info(port), new Request("http://lxd/1.0"), {
          transport: hybridGuestTransport(uds),
          ...agent,
          slots,
        }).then(async (res) => {
          await res.body?.cancel();
          return res.status;
        }),
    );
    for (let answered = 0; answered < 6; answered++) {
      await until(() => held.length > 0, "a request held by the host");
      assert.ok(open <= 2, `${open} connections open at once`);
      held.shift()!();
    }
    assert.deepEqual(await within(Promise.all(requests), "all six answers"), [
      200,
      200,
      200,
      200,
      200,
      200,
    ]);
    assert.equal(maxOpen, 2, "the host saw exactly two connections open at once");
    assert.equal(slots.waiting, 0);
  });
});

Deno.test("hostRequest() gives up waiting for a slot after queueTimeout, as 'busy'", async () => {
  const held: Array<() => void> = [];
  await withHost(holdingHost(held), async (uds, port) => {
    const slots = new Slots(1);
    const options = { transport: hybridGuestTransport(uds), ...agent, slots, queueTimeout: 100 };
    const first = hostRequest(info(port), new Request("http://lxd/1.0"), options);
    await until(() => held.length > 0, "the first request held by the host");
    await expectUnreachable(
      hostRequest(info(port), new Request("http://lxd/1.0"), options),
      "busy",
      /^Too many requests to the host at vsock 2:5000 are in flight: this one waited 0.1 s/,
    );
    assert.equal(slots.waiting, 0, "the timed-out request left the queue");
    held.shift()!();
    const res = await within(first, "the first answer");
    await res.body?.cancel();
    assert.equal(res.status, 200);
  });
});

Deno.test("hostRequest() reports a refused connection in one sentence", async () => {
  await withHost(undefined, async (uds, port) => {
    await expectUnreachable(
      hostRequest(info(port), new Request("http://lxd/1.0"), {
        transport: hybridGuestTransport(uds),
        ...agent,
      }),
      "refused",
      /^The host at vsock 2:5000 refused the connection/,
    );
  });
});

Deno.test("hostRequest() refuses a host presenting another certificate than the pinned one", async () => {
  await withHost(serveTls(other), async (uds, port) => {
    await expectUnreachable(
      hostRequest(info(port), new Request("http://lxd/1.0"), {
        transport: hybridGuestTransport(uds),
        ...agent,
      }),
      "tls",
      /certificate other than the pinned one|TLS handshake/,
    );
  });
});

Deno.test("hostRequest() gives up on a host that never completes the handshake", async () => {
  await withHost(
    (socket) => new Promise((resolve) => socket.once("close", resolve)),
    async (uds, port) => {
      const started = Date.now();
      await expectUnreachable(
        hostRequest(info(port), new Request("http://lxd/1.0"), {
          transport: hybridGuestTransport(uds),
          ...agent,
          handshakeTimeout: 200,
        }),
        "timeout",
        /TLS handshake with the host at vsock 2:5000 failed/,
      );
      assert.ok(Date.now() - started < 3000, "bounded by the handshake timeout");
    },
  );
});

Deno.test("hostRequest() reports a host that closes before answering", async () => {
  await withHost(async (socket) => {
    const { socket: tlsSocket } = await acceptTls(socket, { ...host, pinned: agent.cert });
    tlsSocket.once("data", () => tlsSocket.destroy());
    await new Promise((resolve) => tlsSocket.once("close", resolve));
  }, async (uds, port) => {
    await expectUnreachable(
      hostRequest(info(port), new Request("http://lxd/1.0"), {
        transport: hybridGuestTransport(uds),
        ...agent,
      }),
      "closed",
      /closed the connection before answering/,
    );
  });
});

Deno.test("probeHost() resolves while something listens and rejects once nothing does", async () => {
  await withHost(async () => {}, async (uds, port) => {
    await probeHost({ cid: 2, port }, hybridGuestTransport(uds));
  });
  await withHost(undefined, async (uds, port) => {
    await expectUnreachable(
      probeHost({ cid: 2, port }, hybridGuestTransport(uds)),
      "refused",
      /refused/,
    );
  });
});

Deno.test("classifyFailure() keeps an existing HostUnreachableError", () => {
  const error = new HostUnreachableError("x.", "timeout");
  assert.equal(classifyFailure(error, "request", { cid: 2, port: 1 }), error);
});

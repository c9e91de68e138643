import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import {
  ConnectionPool,
  MtlsError,
  mtlsRequest,
  type MtlsRequestOptions,
  probePeer,
  serveHttp,
} from "../shared/http/mod.ts";
import { acceptTls } from "../shared/tls/mod.ts";
import {
  hybridGuestTransport,
  type Listener,
  listenUnix,
  type Transport,
} from "../shared/vsock/mod.ts";
import type { ConnectionInfo } from "../shared/api.ts";
import { hostPeer } from "./host_link.ts";
import { Slots } from "../shared/slots.ts";
import { makeTestPair, until, within } from "./_testing.ts";

/** What `HostLink` sends to the host of `info`, without the state transitions. */
function hostRequest(
  info: ConnectionInfo,
  request: Request,
  options: MtlsRequestOptions & { transport: Transport; cert: string; key: string },
): Promise<Response> {
  const { transport, cert, key, ...rest } = options;
  return mtlsRequest(hostPeer(info, transport, { cert, key }, rest.connectTimeout), request, rest);
}

/** `HostLink`'s liveness probe of the host at (cid, port). */
function probeHost(at: { cid: number; port: number }, transport: Transport): Promise<void> {
  const info = { ...at, certificate: host.cert, devlxd: true };
  return probePeer(hostPeer(info, transport, agent), { timeout: 2000 });
}

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
    assert.ok(error instanceof MtlsError, String(error));
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

Deno.test("HostLink request sends one request over one TLS connection pinning the host", async () => {
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

Deno.test("HostLink request with slots keeps at most that many connections open, the rest queue", async () => {
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

Deno.test("HostLink request gives up waiting for a slot after queueTimeout, as 'busy'", async () => {
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

Deno.test("HostLink request reports a refused connection in one sentence", async () => {
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

Deno.test("HostLink request refuses a host presenting another certificate than the pinned one", async () => {
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

Deno.test("HostLink request gives up on a host that never completes the handshake", async () => {
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

Deno.test("HostLink request reports a host that closes before answering", async () => {
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

Deno.test("HostLink probe resolves while something listens and rejects once nothing does", async () => {
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

Deno.test("HostLink request with a pool sends a burst of requests over one kept-alive connection", async () => {
  let connections = 0;
  let requests = 0;
  const serve = serveTls();
  await withHost((socket) => {
    connections++;
    return serve(socket);
  }, async (uds, port) => {
    using pool = new ConnectionPool({ idleTimeout: 10_000 });
    const options = { transport: hybridGuestTransport(uds), ...agent, pool };
    for (const path of ["/1.0", "/1.0/config", "/1.0/meta-data", "/1.0/devices"]) {
      const res = await hostRequest(info(port), new Request(`http://lxd${path}`), options);
      assert.deepEqual(await res.json(), { type: "sync", metadata: path });
      requests++;
    }
    // A PUT with a body rides on the same connection too.
    const put = await hostRequest(
      info(port),
      new Request("http://lxd/1.0", { method: "PATCH", body: '{"state":"Ready"}' }),
      options,
    );
    assert.equal(put.status, 200);
    await put.arrayBuffer();
    assert.equal(requests, 4);
    assert.equal(connections, 1, "one handshake for the whole burst");
    assert.equal(pool.size, 1);
  });
});

Deno.test("HostLink request with a pool holds no connection after the idle window", async () => {
  const closed: Promise<void>[] = [];
  const serve = serveTls();
  await withHost((socket) => {
    closed.push(new Promise((resolve) => socket.once("close", () => resolve())));
    return serve(socket);
  }, async (uds, port) => {
    using pool = new ConnectionPool({ idleTimeout: 200 });
    const res = await hostRequest(info(port), new Request("http://lxd/1.0"), {
      transport: hybridGuestTransport(uds),
      ...agent,
      pool,
    });
    await res.arrayBuffer();
    assert.equal(pool.size, 1);
    // The host sees the agent close the connection once the idle window has passed.
    await within(closed[0], "the idle connection closed by the agent", 5000);
    assert.equal(pool.size, 0);
  });
});

Deno.test("HostLink request with a pool sends a request again on a new connection when the host closed the idle one unanswered, never after an answer", async () => {
  const held: Array<() => void> = [];
  let connections = 0;
  const seen: string[] = [];
  const serveOnce = async (socket: Duplex) => {
    connections++;
    const { socket: tlsSocket } = await acceptTls(socket, {
      cert: host.cert,
      key: host.key,
      pinned: agent.cert,
    });
    let served = 0;
    await serveHttp(tlsSocket, async (request) => {
      seen.push(`${connections}:${request.method} ${new URL(request.url).pathname}`);
      served++;
      if (served === 2) {
        // The second request on a connection: drop it without a byte of answer.
        await new Promise<void>((resolve) => held.push(resolve));
        tlsSocket.destroy();
      }
      return Response.json({ type: "sync", metadata: {} });
    });
  };
  await withHost(serveOnce, async (uds, port) => {
    using pool = new ConnectionPool({ idleTimeout: 10_000 });
    const options = { transport: hybridGuestTransport(uds), ...agent, pool };
    await (await hostRequest(info(port), new Request("http://lxd/1.0"), options)).arrayBuffer();
    const second = hostRequest(
      info(port),
      new Request("http://lxd/1.0", { method: "PATCH", body: '{"state":"Ready"}' }),
      options,
    );
    await until(() => held.length === 1, "the second request at the host");
    held.shift()!();
    const res = await within(second, "the retried request");
    assert.equal(res.status, 200);
    await res.arrayBuffer();
    // Once on the pooled connection (unanswered), once on a new one: never more.
    assert.deepEqual(seen, ["1:GET /1.0", "1:PATCH /1.0", "2:PATCH /1.0"]);
    assert.equal(connections, 2);
  });
});

Deno.test("HostLink request with a pool does not send again when the host answered part of a response", async () => {
  let connections = 0;
  const serve = async (socket: Duplex) => {
    connections++;
    const { socket: tlsSocket } = await acceptTls(socket, {
      cert: host.cert,
      key: host.key,
      pinned: agent.cert,
    });
    let served = 0;
    tlsSocket.on("data", () => {
      served++;
      if (served === 1) {
        tlsSocket.write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}");
      } else {
        tlsSocket.end("HTTP/1.1 200 OK\r\nContent-Le"); // half a head, then gone
      }
    });
    await new Promise((resolve) => tlsSocket.once("close", resolve));
  };
  await withHost(serve, async (uds, port) => {
    using pool = new ConnectionPool({ idleTimeout: 10_000 });
    const options = { transport: hybridGuestTransport(uds), ...agent, pool };
    await (await hostRequest(info(port), new Request("http://lxd/1.0"), options)).arrayBuffer();
    await expectUnreachable(
      hostRequest(info(port), new Request("http://lxd/1.0"), options),
      "closed",
      /closed the connection before answering/,
    );
    assert.equal(connections, 1);
  });
});

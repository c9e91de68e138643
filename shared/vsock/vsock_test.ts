/**
 * AF_VSOCK tests that never connect: create, bind, listen, getsockname, the
 * local CID and bind errors. (Connect/accept over vsock lives in
 * `vsock_loopback_test.ts`, run inside a VM with vsock_loopback.)
 */
import assert from "node:assert/strict";
import { requires } from "../_requires.ts";
import * as libc from "./_libc.ts";
import { FdListener } from "./listener.ts";
import { VMADDR_CID_ANY } from "./sockaddr.ts";
import { SocketError } from "./socket_error.ts";
import { vsockTransport } from "./transport.ts";
import { connectVsock, listenVsock, localCid, RANDOM_PORT_MAX, RANDOM_PORT_MIN } from "./vsock.ts";

/** Whether this kernel has AF_VSOCK (a socket can be created; nothing is dialled). */
function hasVsock(): boolean {
  const fd = libc.socket(libc.AF_VSOCK, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  if (fd < 0) return false;
  libc.close(fd);
  return true;
}

const noVsock = hasVsock() ? undefined : "this kernel has no AF_VSOCK (vsock module)";

function portOf(listener: { address: { family: string } }): number {
  const address = listener.address as { family: "vsock"; cid: number; port: number };
  assert.equal(address.family, "vsock");
  return address.port;
}

Deno.test(requires(noVsock, {
  name: "listenVsock() binds CID any on a random port in 1024-65534",
  fn() {
    using listener = listenVsock();
    assert.equal(listener.address.family, "vsock");
    if (listener.address.family !== "vsock") return;
    assert.equal(listener.address.cid, VMADDR_CID_ANY);
    assert.ok(listener.address.port >= RANDOM_PORT_MIN && listener.address.port <= RANDOM_PORT_MAX);
  },
}));

Deno.test(requires(noVsock, {
  name: "listenVsock({ port: 0 }) picks different ports for different listeners",
  fn() {
    const listeners = Array.from({ length: 20 }, () => listenVsock({ port: 0 }));
    try {
      const ports = new Set(listeners.map(portOf));
      assert.equal(ports.size, 20);
    } finally {
      for (const listener of listeners) listener.close();
    }
  },
}));

Deno.test(requires(noVsock, {
  name: "listenVsock() binds the port it is given, reported by getsockname",
  fn() {
    using first = listenVsock();
    const port = portOf(first);
    first.close();
    using again = listenVsock({ port });
    assert.equal(portOf(again), port);
  },
}));

Deno.test(requires(noVsock, {
  name: "a second bind of the same vsock port fails with EADDRINUSE, named",
  fn() {
    using listener = listenVsock();
    const port = portOf(listener);
    assert.throws(() => listenVsock({ port }), (error: unknown) => {
      assert.ok(error instanceof SocketError);
      assert.equal(error.code, "EADDRINUSE");
      assert.equal(error.syscall, "bind");
      assert.equal(error.message, `Cannot bind vsock port ${port}: address in use`);
      return true;
    });
    // The port is free again once the listener is closed.
    listener.close();
    listenVsock({ port }).close();
  },
}));

Deno.test(requires(noVsock, {
  name: "localCid() reads this machine's CID, which listenVsock() can bind and others cannot",
  fn() {
    const cid = localCid();
    console.log(`local CID: ${cid}`);
    // A guest CID (>= 3), 2 on a host (vhost_vsock), 1 with only vsock_loopback.
    assert.ok(Number.isInteger(cid) && cid >= 1 && cid < VMADDR_CID_ANY, String(cid));
    using own = listenVsock({ cid });
    assert.deepEqual({ ...own.address, port: 0 }, { family: "vsock", cid, port: 0 });
    assert.throws(() => listenVsock({ cid: cid + 1000 }), { code: "EADDRNOTAVAIL" });
  },
}));

Deno.test(requires(noVsock, {
  name: "vsock listening sockets are non-blocking and close-on-exec",
  fn() {
    using listener = listenVsock();
    assert.ok(listener instanceof FdListener);
    const fd = listener.fd;
    assert.ok(libc.fcntl(fd, libc.F_GETFL) & libc.O_NONBLOCK);
    assert.ok(libc.fcntl(fd, libc.F_GETFD) & libc.FD_CLOEXEC);
  },
}));

Deno.test(requires(noVsock, {
  name: "closing a vsock listener rejects a pending accept() with an AbortError",
  async fn() {
    const listener = vsockTransport.listen(0);
    const pending = listener.accept();
    listener.close();
    listener.close();
    await assert.rejects(pending, { name: "AbortError" });
    const seen = [];
    for await (const socket of listener) seen.push(socket);
    assert.equal(seen.length, 0);
  },
}));

Deno.test(requires(noVsock, {
  name: "listenVsock() and connectVsock() reject out-of-range CIDs and ports with a RangeError",
  async fn() {
    assert.throws(() => listenVsock({ port: -1 }), RangeError);
    assert.throws(() => listenVsock({ cid: 2 ** 32 }), RangeError);
    assert.throws(() => listenVsock({ backlog: 1.5 }), RangeError);
    // Rejected before any socket exists: nothing is dialled.
    await assert.rejects(connectVsock(-1, 1024), RangeError);
    await assert.rejects(connectVsock(3, 2 ** 32), RangeError);
    await assert.rejects(connectVsock(3, 1024, { signal: AbortSignal.abort() }), {
      name: "AbortError",
    });
  },
}));

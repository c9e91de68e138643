import assert from "node:assert/strict";
import {
  ERRNO,
  errnoName,
  errnoNumber,
  errnoReason,
  isVsockUnavailable,
  SocketError,
  socketError,
  VSOCK_UNAVAILABLE,
} from "./socket_error.ts";
import { connectError } from "./_fd.ts";

Deno.test("errnoName() maps the Linux socket errnos to their names", () => {
  assert.equal(errnoName(111), "ECONNREFUSED");
  assert.equal(errnoName(110), "ETIMEDOUT");
  assert.equal(errnoName(98), "EADDRINUSE");
  assert.equal(errnoName(97), "EAFNOSUPPORT");
  assert.equal(errnoName(19), "ENODEV");
  assert.equal(errnoName(2), "ENOENT");
  assert.equal(errnoName(11), "EAGAIN");
  assert.equal(errnoName(115), "EINPROGRESS");
  assert.equal(errnoName(104), "ECONNRESET");
});

Deno.test("errnoName() names unknown errnos by number", () => {
  assert.equal(errnoName(4242), "E4242");
});

Deno.test("errnoNumber() is the inverse of errnoName()", () => {
  for (const [name, value] of Object.entries(ERRNO)) {
    assert.equal(errnoName(value), name);
    assert.equal(errnoNumber(name), value);
  }
  assert.equal(errnoNumber("toString"), undefined);
  assert.equal(errnoNumber("ENOPE"), undefined);
});

Deno.test("errnoReason() gives a short readable reason", () => {
  assert.equal(errnoReason(98), "address in use");
  assert.equal(errnoReason(111), "connection refused");
  assert.equal(errnoReason(110), "timed out");
  assert.equal(errnoReason(4242), "error E4242");
});

Deno.test("socketError() builds '<what>: <reason>' with code, syscall and errno", () => {
  const error = socketError("bind", 98, "Cannot bind vsock port 1024");
  assert.ok(error instanceof SocketError);
  assert.ok(error instanceof Error);
  assert.equal(error.name, "SocketError");
  assert.equal(error.message, "Cannot bind vsock port 1024: address in use");
  assert.equal(error.code, "EADDRINUSE");
  assert.equal(error.syscall, "bind");
  assert.equal(error.errno, 98);
});

Deno.test("socketError() says AF_VSOCK is unavailable for EAFNOSUPPORT and ENODEV on vsock", () => {
  for (const errno of [97, 19]) {
    const error = socketError("socket", errno, "Cannot create a vsock socket", { vsock: true });
    assert.equal(error.message, VSOCK_UNAVAILABLE);
    assert.equal(error.code, errnoName(errno));
    assert.ok(isVsockUnavailable(errno));
  }
  assert.equal(
    VSOCK_UNAVAILABLE,
    "AF_VSOCK is not available: load the vsock (host: vhost_vsock) kernel module",
  );
});

Deno.test("socketError() keeps the plain reason for EAFNOSUPPORT outside vsock", () => {
  const error = socketError("socket", 97, "Cannot create a socket");
  assert.equal(error.message, "Cannot create a socket: address family not supported");
  assert.ok(!isVsockUnavailable(111));
});

Deno.test("socketError() carries a cause", () => {
  const cause = new Error("inner");
  assert.equal(socketError("recv", 71, "x", { cause }).cause, cause);
});

Deno.test("connectError() reports a vsock reset on connect as ECONNREFUSED, keeping the cause", () => {
  const error = connectError(104, "Cannot connect to vsock 1:5000", true);
  assert.equal(error.code, "ECONNREFUSED");
  assert.equal(error.errno, 111);
  assert.match(error.message, /^Cannot connect to vsock 1:5000: connection refused/);
  assert.ok(error.cause instanceof SocketError);
  assert.equal((error.cause as SocketError).code, "ECONNRESET");
  // Elsewhere a reset stays a reset, and vsock's "unavailable" errnos get their message.
  assert.equal(connectError(104, "Cannot connect to unix socket /s").code, "ECONNRESET");
  assert.equal(connectError(19, "Cannot connect to vsock 5:1", true).message, VSOCK_UNAVAILABLE);
});

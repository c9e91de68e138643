import assert from "node:assert/strict";
import * as libc from "./_libc.ts";
import { TempDir } from "./_testing.ts";
import { sendUnixDatagram } from "./datagram.ts";
import { encodeSockaddrUn } from "./sockaddr.ts";
import { SocketError } from "./socket_error.ts";

const SOCK_DGRAM = 2;

/** A non-blocking unix datagram socket bound at `path`, closed on dispose. */
class Receiver implements Disposable {
  #fd: number;
  constructor(path: string) {
    this.#fd = libc.socket(libc.AF_UNIX, SOCK_DGRAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
    assert.ok(this.#fd >= 0, `socket() failed: ${-this.#fd}`);
    const r = libc.bind(this.#fd, encodeSockaddrUn(path));
    if (r < 0) {
      libc.close(this.#fd);
      assert.fail(`bind() failed: ${-r}`);
    }
  }
  /** The next queued datagram, or `undefined` when none is queued. */
  receive(): string | undefined {
    const buf = new Uint8Array(256);
    const n = libc.recv(this.#fd, buf);
    if (n === -libc.EAGAIN) return undefined;
    assert.ok(n >= 0, `recv() failed: ${-n}`);
    return new TextDecoder().decode(buf.subarray(0, n));
  }
  [Symbol.dispose](): void {
    libc.close(this.#fd);
  }
}

Deno.test("sendUnixDatagram() delivers one datagram to a bound socket file", () => {
  using dir = new TempDir();
  using receiver = new Receiver(dir.join("notify"));
  sendUnixDatagram(dir.join("notify"), new TextEncoder().encode("READY=1"));
  sendUnixDatagram(dir.join("notify"), new TextEncoder().encode("STOPPING=1"));
  // A unix datagram is queued at the receiver by the time send() returns.
  assert.equal(receiver.receive(), "READY=1");
  assert.equal(receiver.receive(), "STOPPING=1");
  assert.equal(receiver.receive(), undefined);
});

Deno.test("sendUnixDatagram() delivers to an abstract name", () => {
  const name = `\0lxd-vsock-test-${crypto.randomUUID()}`;
  using receiver = new Receiver(name);
  sendUnixDatagram(name, new TextEncoder().encode("READY=1"));
  assert.equal(receiver.receive(), "READY=1");
});

Deno.test("sendUnixDatagram() to a path nobody is bound at throws a SocketError from connect", () => {
  using dir = new TempDir();
  const path = dir.join("none");
  assert.throws(
    () => sendUnixDatagram(path, new Uint8Array([1])),
    (error: unknown) => {
      assert.ok(error instanceof SocketError);
      assert.equal(error.syscall, "connect");
      assert.equal(error.code, "ENOENT");
      assert.equal(
        error.message,
        `Cannot connect to datagram socket ${path}: no such file or directory`,
      );
      return true;
    },
  );
});

Deno.test("sendUnixDatagram() names an abstract socket as @name", () => {
  const name = `lxd-vsock-test-${crypto.randomUUID()}`;
  assert.throws(
    () => sendUnixDatagram(`\0${name}`, new Uint8Array([1])),
    (error: unknown) =>
      error instanceof SocketError && error.code === "ECONNREFUSED" &&
      error.message.startsWith(`Cannot connect to datagram socket @${name}:`),
  );
});

Deno.test("sendUnixDatagram() rejects an empty path with a TypeError", () => {
  assert.throws(() => sendUnixDatagram("", new Uint8Array([1])), TypeError);
});

/**
 * Socket-fd steps shared by the vsock, unix and hybrid transports: open a
 * non-blocking socket, bind and listen, the non-blocking connect (EINPROGRESS →
 * wait writable → SO_ERROR, bounded by a timeout and an abort signal),
 * reading a socket's addresses, waiting with a deadline and closing an fd once.
 *
 * Owns nothing past each call (a failing step closes the fd it opened).
 * Permissions: `--allow-ffi`.
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { forget, waitReadable, waitWritable } from "./_reactor.ts";
import { decodeSockaddr, SOCKADDR_MAX_SIZE, type SocketAddress } from "./sockaddr.ts";
import { ERRNO, SocketError, socketError } from "./socket_error.ts";

/** Removes `fd` from the waiter (waking its waiters) and closes it. */
export function closeFd(fd: number): void {
  if (fd < 0) return;
  forget(fd);
  libc.close(fd);
}

/** A new non-blocking, close-on-exec stream socket; throws a `SocketError`. */
export function openSocket(family: number, what: string): number {
  const fd = libc.socket(family, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
  if (fd < 0) throw socketError("socket", -fd, what, { vsock: family === libc.AF_VSOCK });
  return fd;
}

/** The local (`peer: false`) or remote address of a socket; throws a `SocketError`. */
export function socketAddress(fd: number, peer: boolean): SocketAddress {
  const buf = new Uint8Array(SOCKADDR_MAX_SIZE);
  const len = peer ? libc.getpeername(fd, buf) : libc.getsockname(fd, buf);
  if (len < 0) {
    const syscall = peer ? "getpeername" : "getsockname";
    throw socketError(syscall, -len, `Cannot read the ${peer ? "peer" : "local"} address`);
  }
  return decodeSockaddr(buf, len);
}

/** A `SocketError` with code ETIMEDOUT. */
export function timeoutError(what: string, syscall = "connect"): SocketError {
  return socketError(syscall, ERRNO.ETIMEDOUT, what);
}

/** Options of the waits that take a deadline. */
export interface DeadlineOptions {
  /** Give up after this many milliseconds (0 or Infinity: never). */
  timeout?: number;
  /** Give up when this signal aborts (rejecting with its reason). */
  signal?: AbortSignal;
}

/**
 * Runs `body` until it settles, `timeout` ms pass (rejects with a `SocketError`
 * ETIMEDOUT naming `what`) or `signal` aborts (rejects with its reason). On
 * timeout or abort, `onCancel` runs first (it should close the fd `body`
 * waits on, which wakes it).
 */
export async function withDeadline<T>(
  body: () => Promise<T>,
  what: string,
  onCancel: () => void,
  options: DeadlineOptions & { syscall?: string } = {},
): Promise<T> {
  const { timeout = 0, signal } = options;
  signal?.throwIfAborted();
  let timer: ReturnType<typeof setTimeout> | undefined;
  let onAbort: (() => void) | undefined;
  const cancelled = new Promise<never>((_, reject) => {
    if (timeout > 0 && Number.isFinite(timeout)) {
      timer = setTimeout(() => {
        onCancel();
        reject(timeoutError(what, options.syscall));
      }, timeout);
    }
    if (signal) {
      onAbort = () => {
        onCancel();
        reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
    }
  });
  const work = body();
  try {
    return await Promise.race([work, cancelled]);
  } catch (error) {
    // body() rejects once the fd is closed under it; its error is not the news.
    work.catch(() => {});
    throw error;
  } finally {
    clearTimeout(timer);
    if (onAbort) signal?.removeEventListener("abort", onAbort);
  }
}

/**
 * Non-blocking connect of `fd` to `addr`: EINPROGRESS → wait writable →
 * SO_ERROR → connect() again (0 or EISCONN: connected; EALREADY: a wake-up
 * too early, wait again). A unix socket whose listener's backlog is full
 * answers EAGAIN: the connect is retried after a short, growing pause.
 * Closes `fd` on any failure.
 */
export async function connectFd(
  fd: number,
  addr: Uint8Array,
  what: string,
  options: DeadlineOptions & { vsock?: boolean } = {},
): Promise<void> {
  let closed = false;
  let pauseTimer: ReturnType<typeof setTimeout> | undefined;
  let endPause: (() => void) | undefined;
  const close = () => {
    if (closed) return;
    closed = true;
    clearTimeout(pauseTimer);
    endPause?.();
    closeFd(fd);
  };
  const attempt = async (): Promise<void> => {
    let pause = 1;
    let started = false;
    while (!closed) {
      const r = libc.connect(fd, addr);
      if (r === 0 || (started && r === -ERRNO.EISCONN)) return;
      if (r === -libc.EAGAIN) {
        // AF_UNIX, listener backlog full: nothing to wait on but time.
        await new Promise<void>((resolve) => {
          endPause = resolve;
          pauseTimer = setTimeout(resolve, pause);
        });
        pause = Math.min(pause * 2, 50);
        continue;
      }
      if (r !== -libc.EINPROGRESS && r !== -ERRNO.EALREADY && r !== -libc.EINTR) {
        throw connectError(-r, what, options.vsock);
      }
      started = true;
      await waitWritable(fd);
      if (closed) return;
      const error = libc.getsockoptInt(fd, libc.SOL_SOCKET, libc.SO_ERROR);
      if (error < 0) throw socketError("getsockopt", -error, what, { vsock: options.vsock });
      if (error !== 0) throw connectError(error, what, options.vsock);
    }
  };
  try {
    await withDeadline(attempt, what, close, options);
  } catch (error) {
    close();
    throw error;
  }
}

/**
 * Reads from a non-blocking fd into `buf`, waiting while it has nothing:
 * bytes read (0 at EOF). Throws a `SocketError`, or a closed-fd error when
 * `isClosed()` turns true while waiting.
 */
export async function readSome(
  fd: number,
  buf: Uint8Array,
  what: string,
  isClosed: () => boolean,
): Promise<number> {
  for (;;) {
    if (isClosed()) throw closedError(what);
    const n = libc.recv(fd, buf);
    if (n >= 0) return n;
    if (n === -libc.EINTR) continue;
    if (n !== -libc.EAGAIN) throw socketError("recv", -n, what);
    await waitReadable(fd);
  }
}

/** Writes all of `buf` to a non-blocking fd, waiting while it is full. */
export async function writeAll(
  fd: number,
  buf: Uint8Array,
  what: string,
  isClosed: () => boolean,
): Promise<void> {
  let off = 0;
  while (off < buf.byteLength) {
    if (isClosed()) throw closedError(what);
    const n = libc.send(fd, off === 0 ? buf : buf.subarray(off));
    if (n >= 0) {
      off += n;
      continue;
    }
    if (n === -libc.EINTR) continue;
    if (n !== -libc.EAGAIN) throw socketError("send", -n, what);
    await waitWritable(fd);
  }
}

/** The error of an operation on a socket closed under it (code ECANCELED). */
export function closedError(what: string): SocketError {
  return new SocketError(`${what}: the socket was closed`, {
    code: "ECANCELED",
    syscall: "close",
    errno: ERRNO.ECANCELED,
  });
}

/**
 * The error of a failed connect. A vsock peer answers a connect to a port
 * nobody listens on with a reset: that is reported as ECONNREFUSED (the
 * kernel's ECONNRESET kept as the cause).
 */
export function connectError(errno: number, what: string, vsock = false): SocketError {
  if (vsock && errno === ERRNO.ECONNRESET) {
    return new SocketError(
      `${what}: connection refused (reset by the peer: nothing listens on that port)`,
      { code: "ECONNREFUSED", syscall: "connect", errno: ERRNO.ECONNREFUSED },
      { cause: socketError("connect", errno, what) },
    );
  }
  return socketError("connect", errno, what, { vsock });
}

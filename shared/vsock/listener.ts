/**
 * `Listener`, the accepting side of every transport, and `FdListener`, its
 * implementation over a listening non-blocking socket fd: `accept4` is a
 * synchronous call, retried after the epoll waiter reports the fd readable.
 *
 * Owns: the listening fd (closed once by `close()`/`[Symbol.dispose]`, which
 * also rejects pending `accept()` calls with an `AbortError` and ends
 * iteration). Permissions: `--allow-ffi`.
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { closeFd, socketAddress } from "./_fd.ts";
import { waitReadable } from "./_reactor.ts";
import { FdSocket } from "./fd_socket.ts";
import { decodeSockaddr, SOCKADDR_MAX_SIZE, type SocketAddress } from "./sockaddr.ts";
import { socketError } from "./socket_error.ts";
import { sleep } from "../wait.ts";

/** Accepts connections until closed; iteration ends on `close()`. */
export interface Listener extends AsyncIterable<FdSocket>, Disposable {
  /** The address the listener is bound to. */
  readonly address: SocketAddress;
  /** The next connection; rejects with an `AbortError` once the listener is closed. */
  accept(): Promise<FdSocket>;
  /** Stops listening; idempotent. */
  close(): void;
}

/** The error pending and later `accept()` calls reject with once a listener is closed. */
export function listenerClosedError(address: string): DOMException {
  return new DOMException(`The listener on ${address} is closed`, "AbortError");
}

/** Options of {@linkcode FdListener}. */
/**
 * Yields `listener.accept()` results until `closed()` says the listener was
 * closed (then ends quietly); any other accept error is thrown.
 */
export async function* acceptUntilClosed(
  listener: { accept(): Promise<FdSocket> },
  closed: () => boolean,
): AsyncGenerator<FdSocket> {
  while (!closed()) {
    let socket: FdSocket;
    try {
      socket = await listener.accept();
    } catch (error) {
      if (closed()) return;
      throw error;
    }
    yield socket;
  }
}

/** Options of {@linkcode acceptLoop}. */
export interface AcceptLoopOptions {
  /** Whether the loop should end (the listener was closed on purpose). */
  stopped: () => boolean;
  /** Told of each failed accept before the pause, with the pause in ms. */
  onError?: (error: unknown, retryMs: number) => void;
  /** First pause after a failed accept, doubled up to `maxPause`, in ms. @default 50 */
  minPause?: number;
  /** @default 2000 */
  maxPause?: number;
  /** Ends a pause early (then `stopped()` decides). */
  signal?: AbortSignal;
}

/**
 * Accepts on `listener` and hands each socket to `onSocket` until
 * `stopped()`; a failed accept (EMFILE, ENFILE, ENOBUFS, a hybrid handshake
 * gone wrong) pauses the loop — 50 ms, doubling to 2 s, reset by a success —
 * and it goes on: one error never ends it. Resolves once stopped.
 */
export async function acceptLoop(
  listener: { accept(): Promise<FdSocket> },
  onSocket: (socket: FdSocket) => void,
  options: AcceptLoopOptions,
): Promise<void> {
  const min = options.minPause ?? 50;
  let pause = min;
  while (!options.stopped()) {
    let socket: FdSocket;
    try {
      socket = await listener.accept();
    } catch (error) {
      if (options.stopped()) return;
      options.onError?.(error, pause);
      await sleep(pause, options.signal);
      pause = Math.min(pause * 2, options.maxPause ?? 2000);
      continue;
    }
    pause = min;
    onSocket(socket);
  }
}

export interface FdListenerOptions {
  /** The bound address (as getsockname reported it). */
  address: SocketAddress;
  /** How messages name the listener, e.g. `"vsock port 1024"`. */
  description: string;
  /** Runs once after the fd is closed (a unix listener removes its socket file). */
  onClose?: () => void;
}

/** An accepted connection before it becomes an `FdSocket`. */
export interface AcceptedFd {
  fd: number;
  localAddress: SocketAddress;
  remoteAddress: SocketAddress;
}

/** A `Listener` over a listening, non-blocking socket fd. */
export class FdListener implements Listener {
  #fd: number;
  #closed = false;
  #description: string;
  #onClose: (() => void) | undefined;
  #addr = new Uint8Array(SOCKADDR_MAX_SIZE);
  #addrLen = new Uint32Array(1);
  /** The address the listener is bound to. */
  readonly address: SocketAddress;

  /** Takes ownership of `fd`, a bound, listening, non-blocking socket. */
  constructor(fd: number, options: FdListenerOptions) {
    this.#fd = fd;
    this.address = options.address;
    this.#description = options.description;
    this.#onClose = options.onClose;
  }

  /** The listening fd, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** The next connection as a raw fd with its addresses (the caller owns the fd). */
  async acceptFd(): Promise<AcceptedFd> {
    for (;;) {
      if (this.#closed) throw listenerClosedError(this.#description);
      const fd = libc.accept4(this.#fd, this.#addr, this.#addrLen);
      if (fd >= 0) {
        try {
          const remoteAddress = decodeSockaddr(this.#addr, this.#addrLen[0]);
          const localAddress = this.address.family === "unix"
            ? this.address
            : socketAddress(fd, false);
          return { fd, localAddress, remoteAddress };
        } catch (error) {
          closeFd(fd);
          throw error;
        }
      }
      const errno = -fd;
      if (errno === libc.EINTR || errno === libc.ECONNABORTED || errno === libc.EPROTO) continue;
      if (errno === libc.EAGAIN) {
        await waitReadable(this.#fd);
        continue;
      }
      throw socketError("accept4", errno, `Cannot accept on ${this.#description}`);
    }
  }

  /** The next connection; rejects with an `AbortError` once the listener is closed. */
  async accept(): Promise<FdSocket> {
    const { fd, localAddress, remoteAddress } = await this.acceptFd();
    return new FdSocket(fd, { localAddress, remoteAddress });
  }

  /** Stops listening (pending `accept()` calls reject with an `AbortError`); idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeFd(this.#fd);
    this.#fd = -1;
    this.#onClose?.();
  }

  /** Same as `close()`. */
  [Symbol.dispose](): void {
    this.close();
  }

  /** Yields accepted connections until the listener is closed. */
  [Symbol.asyncIterator](): AsyncIterator<FdSocket> {
    return acceptUntilClosed(this, () => this.#closed);
  }
}

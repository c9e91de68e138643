/**
 * A buffered byte reader over a `node:stream` Duplex: the one place where the
 * HTTP codec touches socket events. Keeps the pending bytes in one Buffer,
 * lets the parser wait for more, and pauses the socket while enough is
 * buffered and nobody is waiting (backpressure). Internal to shared/http.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";

/** Pause the socket when this much is buffered and nobody waits for more. */
const HIGH_WATER = 64 * 1024;

const EMPTY = Buffer.alloc(0);

/** Callbacks of {@linkcode SocketReader}. */
export interface SocketReaderCallbacks {
  /** No more bytes can arrive: the peer ended, the socket errored or closed. Runs once. */
  onGone?: (reason: Error) => void;
  /** The socket closed. */
  onClose?: () => void;
}

export class SocketReader {
  readonly socket: Duplex;
  /** Bytes received and not yet consumed. */
  buffer: Buffer = EMPTY;
  /** The peer has ended its side (no more bytes will come). */
  ended = false;
  /** The socket is closed (destroyed or fully shut down). */
  closed = false;
  /** The socket's error, if any. */
  error: Error | undefined;
  #wake: (() => void) | undefined;
  #onGone: ((reason: Error) => void) | undefined;
  #onClose: (() => void) | undefined;

  /**
   * `onGone` runs once, when no more bytes can arrive (the peer ended its
   * side, the socket errored or closed); `onClose` when the socket closes.
   */
  constructor(socket: Duplex, callbacks: SocketReaderCallbacks = {}) {
    this.socket = socket;
    this.#onGone = callbacks.onGone;
    this.#onClose = callbacks.onClose;
    socket.on("data", this.#onData);
    socket.on("end", this.#onEnd);
    socket.on("error", this.#onError);
    socket.on("close", this.#onCloseEvent);
    if (socket.destroyed) this.#onCloseEvent();
  }

  #onData = (chunk: Buffer | string) => {
    const bytes = typeof chunk === "string" ? Buffer.from(chunk, "latin1") : chunk;
    this.buffer = this.buffer.length === 0 ? bytes : Buffer.concat([this.buffer, bytes]);
    if (this.#wake === undefined && this.buffer.length >= HIGH_WATER) this.socket.pause();
    this.#notify();
  };

  #onEnd = () => {
    this.ended = true;
    this.#notify();
    this.#gone(new Error("Connection closed by the peer"));
  };

  #onError = (error: Error) => {
    this.error ??= error;
    this.#notify();
    this.#gone(error);
  };

  #onCloseEvent = () => {
    if (this.closed) return;
    this.closed = true;
    this.ended = true;
    this.#notify();
    this.#gone(new Error("Connection closed"));
    this.#onClose?.();
  };

  #gone(reason: Error): void {
    const onGone = this.#onGone;
    this.#onGone = undefined;
    onGone?.(reason);
  }

  #notify(): void {
    const wake = this.#wake;
    if (wake !== undefined) {
      this.#wake = undefined;
      wake();
    }
  }

  /** No more bytes can arrive. */
  get done(): boolean {
    return this.ended || this.closed || this.error !== undefined;
  }

  /**
   * Resolves when more bytes arrived, the peer ended, the socket closed or
   * errored. Only one waiter at a time.
   */
  wait(): Promise<void> {
    if (this.done) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.#wake = resolve;
      this.socket.resume();
    });
  }

  /** Drops the first `n` buffered bytes. */
  consume(n: number): void {
    this.buffer = n >= this.buffer.length ? EMPTY : this.buffer.subarray(n);
  }

  /** Takes up to `n` buffered bytes (without copying). */
  take(n: number): Buffer {
    const taken = this.buffer.length <= n ? this.buffer : this.buffer.subarray(0, n);
    this.consume(taken.length);
    return taken;
  }

  /** Removes the listeners; the socket is left as it is. */
  detach(): void {
    this.socket.off("data", this.#onData);
    this.socket.off("end", this.#onEnd);
    this.socket.off("error", this.#onError);
    this.socket.off("close", this.#onCloseEvent);
    this.#notify();
  }
}

/**
 * `FdSocket`: a connected non-blocking stream socket fd (AF_VSOCK or AF_UNIX)
 * as a `node:stream` `Duplex`, so `node:tls` and `node:http` can wrap it like
 * a `net.Socket`.
 *
 * Reads and writes are synchronous `recv`/`send` calls; when the kernel has
 * nothing to read or no room to write, the socket waits on the single epoll
 * waiter (`_reactor.ts`). Writes honour backpressure (`write()` returns false
 * while bytes wait for the kernel, then `'drain'`) and partial sends; `end()`
 * half-closes with `shutdown(SHUT_WR)` once pending writes are sent; EOF from
 * the peer pushes `null`. A socket only registers with the waiter while it
 * reads (flowing or asked to) or has writes pending, so an idle socket keeps
 * nothing alive — `ref()`/`unref()` are accepted and do nothing.
 *
 * Owns: its fd, closed exactly once by `destroy()`/`close()`/`[Symbol.dispose]`.
 * Permissions: `--allow-ffi`.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import * as libc from "./_libc.ts";
import { closedError, closeFd } from "./_fd.ts";
import { waitReadable, waitWritable } from "./_reactor.ts";
import { formatAddress, type SocketAddress } from "./sockaddr.ts";
import { socketError } from "./socket_error.ts";

/** Options of {@linkcode FdSocket}. */
export interface FdSocketOptions {
  /** The socket's own address. */
  localAddress: SocketAddress;
  /** The peer's address. */
  remoteAddress: SocketAddress;
  /** Bytes already read from the fd (past a handshake line), delivered first. */
  head?: Uint8Array;
  /**
   * Keep the write side open when the peer ends its side.
   * @default {true}
   */
  allowHalfOpen?: boolean;
}

/** The most one `recv` asks for. */
const READ_CHUNK = 64 * 1024;
/**
 * Reads land in a shared slab and are pushed as views of it, so a read costs
 * no allocation or copy; a new slab is taken when less than `SLAB_MIN_READ`
 * is left. (A chunk kept by a consumer keeps its slab alive, as with Node's
 * buffer pool.)
 */
const SLAB_SIZE = 256 * 1024;
const SLAB_MIN_READ = 16 * 1024;
let slab = new Uint8Array(0);
let slabOffset = 0;

function readBuffer(): Uint8Array {
  if (slab.byteLength - slabOffset < SLAB_MIN_READ) {
    slab = new Uint8Array(SLAB_SIZE);
    slabOffset = 0;
  }
  return slab.subarray(slabOffset, slabOffset + Math.min(READ_CHUNK, slab.byteLength - slabOffset));
}

/** Takes the first `n` bytes of the last `readBuffer()` as a Buffer view. */
function takeRead(n: number): Buffer {
  const chunk = Buffer.from(slab.buffer, slabOffset, n);
  slabOffset += (n + 7) & ~7;
  return chunk;
}
/** Full reads in a row before the read loop yields to the event loop. */
const READS_BEFORE_YIELD = 16;
/** `_writev` joins chunks up to this many bytes into one `send`. */
const WRITEV_JOIN_LIMIT = 256 * 1024;

/** A macrotask turn (`setTimeout(0)` is clamped to milliseconds when nested). */
function yieldToEventLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/** A connected socket fd as a `Duplex` stream. */
export class FdSocket extends Duplex {
  #fd: number;
  #reading = false;
  #timeoutMs = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #lastActive = 0;
  #bytesRead = 0;
  #bytesWritten = 0;
  /** The socket's own address. */
  readonly localAddress: SocketAddress;
  /** The peer's address. */
  readonly remoteAddress: SocketAddress;

  /**
   * Takes ownership of `fd`, a connected, non-blocking stream socket. Use the
   * transport functions (`connectUnix`, `listenVsock`, …) rather than this.
   */
  constructor(fd: number, options: FdSocketOptions) {
    super({ allowHalfOpen: options.allowHalfOpen ?? true, decodeStrings: true });
    if (!Number.isInteger(fd) || fd < 0) throw new TypeError(`Invalid fd ${fd}`);
    this.#fd = fd;
    this.localAddress = options.localAddress;
    this.remoteAddress = options.remoteAddress;
    if (options.head && options.head.byteLength > 0) {
      this.#bytesRead += options.head.byteLength;
      this.push(Buffer.from(options.head));
    }
  }

  /** The fd, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  /** Bytes received so far. */
  get bytesRead(): number {
    return this.#bytesRead;
  }

  /** Bytes handed to the kernel so far. */
  get bytesWritten(): number {
    return this.#bytesWritten;
  }

  /** Always false: an `FdSocket` is connected from the start (as `net.Socket.connecting`). */
  get connecting(): boolean {
    return false;
  }

  /** Always false (as `net.Socket.pending` once connected). */
  get pending(): boolean {
    return false;
  }

  /** `"open"`, `"readOnly"`, `"writeOnly"` or `"closed"`, as `net.Socket.readyState`. */
  get readyState(): string {
    if (this.#fd < 0) return "closed";
    if (this.readable && this.writable) return "open";
    if (this.readable) return "readOnly";
    if (this.writable) return "writeOnly";
    return "closed";
  }

  /** The local address (`net.Socket.address()` counterpart). */
  address(): SocketAddress {
    return this.localAddress;
  }

  /** Accepted for `net.Socket` compatibility: vsock and unix sockets have no Nagle. */
  setNoDelay(_noDelay?: boolean): this {
    return this;
  }

  /** Accepted for `net.Socket` compatibility: no keep-alive probes on these families. */
  setKeepAlive(_enable?: boolean, _initialDelay?: number): this {
    return this;
  }

  /**
   * Emits `'timeout'` after `ms` milliseconds without reads or writes (0
   * disables); the socket stays open, as with `net.Socket`. `callback` is
   * added as a `'timeout'` listener (removed again when `ms` is 0).
   */
  setTimeout(ms: number, callback?: () => void): this {
    if (!Number.isFinite(ms) || ms < 0) {
      throw new RangeError(`Invalid socket timeout ${ms}: expected a finite number >= 0`);
    }
    this.#timeoutMs = ms;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (ms === 0) {
      if (callback) this.removeListener("timeout", callback);
      return this;
    }
    if (callback) this.once("timeout", callback);
    this.#lastActive = performance.now();
    if (!this.destroyed) this.#armTimer(ms);
    return this;
  }

  /** Accepted for `net.Socket` compatibility; does nothing (see the module doc). */
  ref(): this {
    return this;
  }

  /** Accepted for `net.Socket` compatibility; does nothing (see the module doc). */
  unref(): this {
    return this;
  }

  /** Ends the write side, then destroys once it is flushed (as `net.Socket.destroySoon`). */
  destroySoon(): void {
    if (this.writable) this.end();
    if (this.writableFinished) this.destroy();
    else this.once("finish", () => this.destroy());
  }

  /** Closes the socket now (same as `destroy()`); idempotent. */
  close(): void {
    this.destroy();
  }

  /** Closes the socket now; idempotent. */
  [Symbol.dispose](): void {
    this.destroy();
  }

  #armTimer(delay: number): void {
    this.#timer = setTimeout(() => this.#onTimer(), delay);
    Deno.unrefTimer(this.#timer);
  }

  #onTimer(): void {
    this.#timer = undefined;
    if (this.#timeoutMs === 0 || this.destroyed) return;
    const idle = performance.now() - this.#lastActive;
    if (idle + 1 >= this.#timeoutMs) this.emit("timeout");
    else this.#armTimer(this.#timeoutMs - idle);
  }

  #touch(): void {
    if (this.#timeoutMs === 0) return;
    this.#lastActive = performance.now();
    if (this.#timer === undefined && !this.destroyed) this.#armTimer(this.#timeoutMs);
  }

  #describe(): string {
    return `${formatAddress(this.remoteAddress)}`;
  }

  override _read(_size: number): void {
    if (this.#reading || this.#fd < 0) return;
    this.#reading = true;
    this.#readLoop().catch((error) => this.destroy(error));
  }

  async #readLoop(): Promise<void> {
    let fullReads = 0;
    try {
      while (this.#fd >= 0) {
        const buf = readBuffer();
        const n = libc.recv(this.#fd, buf);
        if (n > 0) {
          const chunk = takeRead(n);
          this.#bytesRead += n;
          this.#touch();
          if (!this.push(chunk)) return;
          if (n === buf.byteLength && ++fullReads >= READS_BEFORE_YIELD) {
            fullReads = 0;
            await yieldToEventLoop();
          }
          continue;
        }
        if (n === 0) {
          this.push(null);
          return;
        }
        if (n === -libc.EINTR) continue;
        if (n === -libc.EAGAIN) {
          fullReads = 0;
          await waitReadable(this.#fd);
          continue;
        }
        this.destroy(socketError("recv", -n, `Cannot read from ${this.#describe()}`));
        return;
      }
    } finally {
      this.#reading = false;
    }
  }

  override _write(
    chunk: Buffer,
    _encoding: string,
    callback: (error?: Error | null) => void,
  ): void {
    const fd = this.#fd;
    if (fd < 0) return callback(closedError(`Cannot write to ${this.#describe()}`));
    let off = 0;
    while (off < chunk.byteLength) {
      const n = libc.send(fd, off === 0 ? chunk : chunk.subarray(off));
      if (n >= 0) {
        off += n;
        continue;
      }
      if (n === -libc.EINTR) continue;
      if (n === -libc.EAGAIN) {
        this.#bytesWritten += off;
        this.#writeSlow(chunk, off).then(() => callback(), callback);
        return;
      }
      return callback(socketError("send", -n, `Cannot write to ${this.#describe()}`));
    }
    this.#bytesWritten += off;
    this.#touch();
    callback();
  }

  async #writeSlow(chunk: Uint8Array, off: number): Promise<void> {
    for (;;) {
      if (this.#fd < 0) throw closedError(`Cannot write to ${this.#describe()}`);
      await waitWritable(this.#fd);
      const fd = this.#fd;
      if (fd < 0) throw closedError(`Cannot write to ${this.#describe()}`);
      for (;;) {
        const n = libc.send(fd, off === 0 ? chunk : chunk.subarray(off));
        if (n >= 0) {
          off += n;
          this.#bytesWritten += n;
          this.#touch();
          if (off === chunk.byteLength) return;
          continue;
        }
        if (n === -libc.EINTR) continue;
        if (n === -libc.EAGAIN) break;
        throw socketError("send", -n, `Cannot write to ${this.#describe()}`);
      }
    }
  }

  override _writev(
    chunks: Array<{ chunk: Buffer; encoding: string }>,
    callback: (error?: Error | null) => void,
  ): void {
    let total = 0;
    for (const { chunk } of chunks) total += chunk.byteLength;
    if (total <= WRITEV_JOIN_LIMIT) {
      this._write(Buffer.concat(chunks.map((c) => c.chunk), total), "buffer", callback);
      return;
    }
    let i = 0;
    const next = (error?: Error | null): void => {
      if (error || i === chunks.length) return callback(error);
      this._write(chunks[i++].chunk, "buffer", next);
    };
    next();
  }

  override _final(callback: (error?: Error | null) => void): void {
    const fd = this.#fd;
    if (fd < 0) return callback();
    const r = libc.shutdown(fd, libc.SHUT_WR);
    if (r < 0 && r !== -libc.ENOTCONN) {
      return callback(socketError("shutdown", -r, `Cannot end the stream to ${this.#describe()}`));
    }
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#timeoutMs = 0;
    const fd = this.#fd;
    this.#fd = -1;
    closeFd(fd);
    callback(error);
  }
}

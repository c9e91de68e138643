/**
 * `FdStream`: a non-blocking pipe or PTY master fd with async `read` and
 * `write` woken by the single epoll waiter of `shared/vsock/_reactor.ts`
 * (no thread-pool hop per call). A PTY master whose other side is gone
 * reads EIO: that is reported as end of file, as for a pipe.
 *
 * Owns: its fd, closed once by `close()` (which first wakes any waiter).
 * Permissions: `--allow-ffi`.
 * @module
 */

import * as libc from "../vsock/_libc.ts";
import { forget, waitReadable, waitWritable } from "../vsock/_reactor.ts";
import { ERRNO, socketError } from "../vsock/socket_error.ts";

/** A non-blocking fd (pipe end or PTY master) read and written asynchronously. */
export class FdStream implements Disposable {
  #fd: number;
  readonly what: string;

  /** Takes ownership of `fd` and makes it non-blocking; `what` names it in errors. */
  constructor(fd: number, what: string) {
    this.#fd = fd;
    this.what = what;
    const flags = libc.fcntl(fd, libc.F_GETFL);
    if (flags >= 0) libc.fcntl(fd, libc.F_SETFL, flags | libc.O_NONBLOCK);
  }

  /** The fd, or -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  /**
   * Reads what is there into `buf`, waiting while nothing is: the number of
   * bytes, or `null` at end of file (EIO on a PTY master) or once closed.
   */
  async read(buf: Uint8Array): Promise<number | null> {
    for (;;) {
      const n = this.readNow(buf);
      if (n !== undefined) return n;
      await waitReadable(this.#fd);
    }
  }

  /** One non-blocking read: bytes, `null` at end of file, `undefined` when nothing is there now. */
  readNow(buf: Uint8Array): number | null | undefined {
    if (this.#fd < 0) return null;
    const n = libc.read(this.#fd, buf);
    if (n > 0) return n;
    if (n === 0 || n === -ERRNO.EIO) return null;
    if (n === -ERRNO.EAGAIN || n === -ERRNO.EINTR) return undefined;
    throw socketError("read", -n, `Cannot read ${this.what}`);
  }

  /** Resolves when the fd has something to read (or hung up), or is closed. */
  readable(): Promise<void> {
    return this.#fd < 0 ? Promise.resolve() : waitReadable(this.#fd);
  }

  /** Writes all of `bytes`, waiting while the kernel's buffer is full. Throws EPIPE/EIO when the reader is gone. */
  async write(bytes: Uint8Array): Promise<void> {
    let offset = 0;
    while (offset < bytes.byteLength) {
      if (this.#fd < 0) throw socketError("write", ERRNO.EBADF, `${this.what} is closed`);
      const n = libc.write(this.#fd, offset === 0 ? bytes : bytes.subarray(offset));
      if (n >= 0) {
        offset += n;
        continue;
      }
      if (n === -ERRNO.EINTR) continue;
      if (n !== -ERRNO.EAGAIN) throw socketError("write", -n, `Cannot write ${this.what}`);
      await waitWritable(this.#fd);
    }
  }

  /** Wakes waiters and closes the fd. Idempotent. */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    forget(fd);
    libc.close(fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

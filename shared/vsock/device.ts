/**
 * `DeviceFd`: a character device (or FIFO) opened read/write and
 * non-blocking through libc, with synchronous `read`/`write` that report
 * "nothing now" apart from errors — what the agent needs for a virtio-serial
 * port, which must never block the event loop.
 *
 * The path is opened through FFI without a `stat` first: Deno 2.9 refuses its
 * own file APIs on paths under `/dev` unless run with `--allow-all`.
 *
 * Owns: the fd of each open `DeviceFd` (closed once, by `close()`).
 * Permissions: `--allow-ffi`; `--allow-read` for {@linkcode DeviceFd.stillThere}
 * (an inode check, skipped where refused).
 *
 * @example
 * ```ts
 * import { DeviceFd } from "./device.ts";
 * using port = DeviceFd.open("/dev/virtio-ports/org.linuxcontainers.lxd");
 * port?.write(new TextEncoder().encode("STARTED\n"));
 * ```
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { ERRNO, socketError } from "./socket_error.ts";

const O_RDWR = 2;

/** The inode `path` names now (following symlinks), or `undefined` when unknown. */
function inode(path: string): number | null | undefined {
  try {
    return Deno.statSync(path).ino;
  } catch {
    return undefined;
  }
}

/**
 * An open character device or FIFO (`O_RDWR | O_NONBLOCK | O_CLOEXEC`).
 * `read` and `write` are synchronous and never block: they return
 * `undefined` when the call would block (EAGAIN) or was interrupted (EINTR),
 * and throw a `SocketError` (`syscall`, `code`, `errno`) for any other error.
 */
export class DeviceFd implements Disposable {
  /** The path the device was opened at. */
  readonly path: string;
  #fd: number;
  #ino: number | null | undefined;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.#fd = fd;
    this.#ino = inode(path);
  }

  /**
   * Opens `path` read/write and non-blocking. Returns `undefined` when the
   * path does not exist (ENOENT); throws a `SocketError` with
   * `syscall: "open"`, naming the path and errno, otherwise — `code: "ENXIO"`
   * when the path is a unix socket (which cannot be opened, only connected
   * to) or a device with nothing behind it.
   */
  static open(path: string): DeviceFd | undefined {
    const fd = libc.openPath(path, O_RDWR | libc.O_NONBLOCK | libc.O_CLOEXEC);
    if (fd >= 0) return new DeviceFd(path, fd);
    if (fd === -ERRNO.ENOENT) return undefined;
    throw socketError("open", -fd, `Cannot open ${path}`);
  }

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#fd < 0;
  }

  /**
   * Reads what is there into `buf`: the bytes read (0 at end of file, or on a
   * virtio-serial port whose host end is not connected), or `undefined` when
   * nothing is there now (EAGAIN) or the call was interrupted (EINTR).
   * Throws a `SocketError` (`syscall: "read"`) on any other error, EBADF once closed.
   */
  read(buf: Uint8Array): number | undefined {
    const n = libc.read(this.#checkOpen("read"), buf);
    if (n >= 0) return n;
    if (n === -ERRNO.EAGAIN || n === -ERRNO.EINTR) return undefined;
    throw socketError("read", -n, `Cannot read ${this.path}`);
  }

  /**
   * Writes `bytes` in one call: the number of bytes written (possibly fewer
   * than given), or `undefined` when the device cannot take them now
   * (EAGAIN) or the call was interrupted (EINTR). Throws a `SocketError`
   * (`syscall: "write"`) on any other error, EBADF once closed.
   */
  write(bytes: Uint8Array): number | undefined {
    const n = libc.write(this.#checkOpen("write"), bytes);
    if (n >= 0) return n;
    if (n === -ERRNO.EAGAIN || n === -ERRNO.EINTR) return undefined;
    throw socketError("write", -n, `Cannot write ${this.path}`);
  }

  /**
   * Whether the device is open and its path still names the file that was
   * opened (false after a hot-unplug or when the path now names another
   * file). Where the path cannot be inspected (no read permission), an open
   * device counts as still there.
   */
  stillThere(): boolean {
    return this.#fd >= 0 && inode(this.path) === this.#ino;
  }

  /** Closes the fd. Idempotent. */
  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    libc.close(fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #checkOpen(syscall: string): number {
    if (this.#fd < 0) throw socketError(syscall, ERRNO.EBADF, `${this.path} is closed`);
    return this.#fd;
  }
}

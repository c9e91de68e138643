/**
 * The unix-socket transport over the FFI layer: `listenUnix` and
 * `connectUnix`, the same non-blocking data path as vsock with a
 * `sockaddr_un` (it lets machines without vsock exercise all of it, and it
 * carries Firecracker / Cloud Hypervisor "hybrid vsock").
 *
 * Owns: the listening socket file it created (removed on `close()` when it is
 * still the same file). Permissions: `--allow-ffi`, plus `--allow-read` and
 * `--allow-write` on the socket path for `replace`, `mode` and the removal.
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { closeFd, connectFd, openSocket, socketAddress } from "./_fd.ts";
import { FdSocket } from "./fd_socket.ts";
import { FdListener, type Listener } from "./listener.ts";
import { encodeSockaddrUn } from "./sockaddr.ts";
import { socketError } from "./socket_error.ts";

/** The default listen backlog (as Node's). */
export const DEFAULT_BACKLOG = 511;
/** The default connect timeout, in milliseconds. */
export const DEFAULT_CONNECT_TIMEOUT = 3000;

/** Options of {@linkcode listenUnix}. */
export interface ListenUnixOptions {
  /** chmod the socket file to this mode before listening, e.g. `0o660`. */
  mode?: number;
  /**
   * The listen backlog.
   * @default {511}
   */
  backlog?: number;
  /**
   * Remove a stale socket file at `path` first (one nobody listens on). A
   * socket with a live listener is left alone (the bind then fails EADDRINUSE);
   * a path that is not a socket is never removed.
   * @default {false}
   */
  replace?: boolean;
}

/** Options of the connect functions. */
export interface ConnectOptions {
  /**
   * Give up after this many milliseconds.
   * @default {3000}
   */
  timeout?: number;
  /** Give up when this signal aborts (rejecting with its reason). */
  signal?: AbortSignal;
}

/** Throws a `RangeError` unless `backlog` is a non-negative integer. */
export function checkBacklog(backlog: number): number {
  if (!Number.isInteger(backlog) || backlog < 0) {
    throw new RangeError(`Invalid listen backlog ${backlog}: expected an integer >= 0`);
  }
  return backlog;
}

/** Whether something listens on the unix socket `path` (a synchronous probe). */
function isLiveSocket(path: string): boolean {
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
  if (fd < 0) return false;
  try {
    const r = libc.connect(fd, encodeSockaddrUn(path));
    return r === 0 || r === -libc.EAGAIN || r === -libc.EINPROGRESS;
  } finally {
    libc.close(fd);
  }
}

function removeStaleSocket(path: string): void {
  let info: Deno.FileInfo;
  try {
    info = Deno.lstatSync(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  if (!info.isSocket || isLiveSocket(path)) return;
  try {
    Deno.removeSync(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
}

/**
 * Listens on the unix socket `path`. Errors are thrown synchronously, e.g.
 * `SocketError: Cannot listen on unix socket /run/x.sock: address in use`.
 */
export function listenUnix(path: string, options: ListenUnixOptions = {}): Listener {
  const { mode, backlog = DEFAULT_BACKLOG, replace = false } = options;
  const addr = encodeSockaddrUn(path);
  checkBacklog(backlog);
  if (mode !== undefined && (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)) {
    throw new RangeError(`Invalid socket file mode ${mode}: expected an integer in 0..0o7777`);
  }
  const abstract = path.startsWith("\0");
  if (replace && !abstract) removeStaleSocket(path);
  const what = `Cannot listen on unix socket ${path}`;
  const fd = openSocket(libc.AF_UNIX, what);
  try {
    let r = libc.bind(fd, addr);
    if (r < 0) throw socketError("bind", -r, what);
    if (mode !== undefined && !abstract) Deno.chmodSync(path, mode);
    r = libc.listen(fd, backlog);
    if (r < 0) throw socketError("listen", -r, what);
  } catch (error) {
    closeFd(fd);
    throw error;
  }
  let ino: number | null = null;
  if (!abstract) {
    try {
      ino = Deno.lstatSync(path).ino;
    } catch {
      // Unreadable: the file will not be removed on close.
    }
  }
  return new FdListener(fd, {
    address: { family: "unix", path },
    description: `unix socket ${path}`,
    onClose: () => {
      if (ino === null) return;
      try {
        if (Deno.lstatSync(path).ino === ino) Deno.removeSync(path);
      } catch {
        // Already gone or not ours to remove.
      }
    },
  });
}

/**
 * Connects to the unix socket `path`, e.g. failing with
 * `SocketError: Cannot connect to unix socket /run/x.sock: connection refused`
 * (code `ECONNREFUSED`; `ENOENT` when there is no such file).
 */
export async function connectUnix(path: string, options: ConnectOptions = {}): Promise<FdSocket> {
  const { timeout = DEFAULT_CONNECT_TIMEOUT, signal } = options;
  const addr = encodeSockaddrUn(path);
  signal?.throwIfAborted();
  const what = `Cannot connect to unix socket ${path}`;
  const fd = openSocket(libc.AF_UNIX, what);
  await connectFd(fd, addr, what, { timeout, signal });
  try {
    const localAddress = socketAddress(fd, false);
    return new FdSocket(fd, { localAddress, remoteAddress: { family: "unix", path } });
  } catch (error) {
    closeFd(fd);
    throw error;
  }
}

/**
 * The unix-socket transport over the FFI layer: `listenUnix` and
 * `connectUnix`, the same non-blocking data path as vsock with a
 * `sockaddr_un` (it lets machines without vsock exercise all of it, and it
 * carries Firecracker / Cloud Hypervisor "hybrid vsock").
 *
 * Owns: the listening socket file it created (removed on `close()` when it is
 * still the same file) and the parent directories it created (removed on
 * `close()` when empty). Permissions: `--allow-ffi` only: `replace`, `mode`,
 * `createParent` and the removal use libc through FFI, because Deno 2.9's file
 * system API refuses paths under `/dev` (such as `/dev/lxd/sock`) without
 * `--allow-all`.
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
  /** chmod the socket file to this mode after bind, before listen, e.g. `0o660`. */
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
  /**
   * Create the missing parent directories of `path` first (mode 0755, like
   * `mkdir -p`); those created are removed again on `close()` when empty.
   * @default {false}
   */
  createParent?: boolean;
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

/** The parent directory of `path` ("" when it has none), e.g. "/dev/lxd" for "/dev/lxd/sock". */
function parentOf(path: string): string {
  const slash = path.replace(/\/+$/, "").lastIndexOf("/");
  return slash <= 0 ? (slash === 0 ? "/" : "") : path.slice(0, slash);
}

/**
 * Creates the directory `path` and any missing parents (`mkdir -p`) through
 * FFI, so it works under `/dev` with `--allow-ffi` alone. Returns the
 * directories it created, outermost first (empty when `path` existed).
 * Throws a `SocketError` naming the directory, e.g.
 * `Cannot create directory /dev/lxd: permission denied` (code `EACCES`).
 */
export function makeDirectories(path: string, mode = 0o755): string[] {
  if (!Number.isInteger(mode) || mode < 0 || mode > 0o7777) {
    throw new RangeError(`Invalid directory mode ${mode}: expected an integer in 0..0o7777`);
  }
  const created: string[] = [];
  const parts = path.split("/");
  let prefix = path.startsWith("/") ? "" : ".";
  for (const part of parts) {
    if (part === "" || part === ".") continue;
    prefix = prefix === "." ? part : `${prefix}/${part}`;
    const r = libc.mkdir(prefix, mode);
    if (r === 0) created.push(prefix);
    else if (r !== -libc.EEXIST) {
      throw socketError("mkdir", -r, `Cannot create directory ${prefix}`);
    }
  }
  return created;
}

/**
 * With `replace`: removes `path` when it is a socket file nobody listens on
 * (a connect is refused). A live socket, and anything that is not a socket,
 * is left alone (the bind then fails with EADDRINUSE).
 */
function removeStaleSocket(path: string, what: string): void {
  const stat = libc.lstat(path);
  if (typeof stat === "number") {
    if (stat === -libc.ENOENT || stat === -libc.ENOTDIR) return;
    throw socketError("statx", -stat, what);
  }
  if ((stat.mode & libc.S_IFMT) !== libc.S_IFSOCK) return;
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
  if (fd < 0) throw socketError("socket", -fd, what);
  let refused: boolean;
  try {
    refused = libc.connect(fd, encodeSockaddrUn(path)) === -libc.ECONNREFUSED;
  } finally {
    libc.close(fd);
  }
  if (!refused) return;
  const r = libc.unlink(path);
  if (r < 0 && r !== -libc.ENOENT) throw socketError("unlink", -r, what);
}

/** Removes the directories `makeDirectories` created, innermost first, while they are empty. */
function removeDirectories(created: string[]): void {
  for (let i = created.length - 1; i >= 0; i--) {
    if (libc.rmdir(created[i]) < 0) return;
  }
}

/**
 * Listens on the unix socket `path`. Errors are thrown synchronously, e.g.
 * `SocketError: Cannot listen on unix socket /run/x.sock: address in use`.
 * Every file system step goes through FFI, so a path under `/dev` works
 * with `--allow-ffi` alone.
 */
export function listenUnix(path: string, options: ListenUnixOptions = {}): Listener {
  const { mode, backlog = DEFAULT_BACKLOG, replace = false, createParent = false } = options;
  const addr = encodeSockaddrUn(path);
  checkBacklog(backlog);
  if (mode !== undefined && (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)) {
    throw new RangeError(`Invalid socket file mode ${mode}: expected an integer in 0..0o7777`);
  }
  const abstract = path.startsWith("\0");
  const what = `Cannot listen on unix socket ${path}`;
  const parent = abstract ? "" : parentOf(path);
  const created = createParent && parent !== "" ? makeDirectories(parent) : [];
  let bound = false;
  let fd = -1;
  try {
    if (replace && !abstract) removeStaleSocket(path, what);
    fd = openSocket(libc.AF_UNIX, what);
    let r = libc.bind(fd, addr);
    if (r < 0) throw socketError("bind", -r, what);
    bound = !abstract;
    if (mode !== undefined && bound) {
      r = libc.chmod(path, mode);
      if (r < 0) throw socketError("chmod", -r, what);
    }
    r = libc.listen(fd, backlog);
    if (r < 0) throw socketError("listen", -r, what);
  } catch (error) {
    if (fd >= 0) closeFd(fd);
    if (bound) libc.unlink(path);
    removeDirectories(created);
    throw error;
  }
  let ino: bigint | undefined;
  if (bound) {
    const stat = libc.lstat(path);
    // Unreadable: the file will not be removed on close.
    if (typeof stat !== "number") ino = stat.ino;
  }
  return new FdListener(fd, {
    address: { family: "unix", path },
    description: `unix socket ${path}`,
    onClose: () => {
      if (ino === undefined) return;
      const stat = libc.lstat(path);
      // Another listener may have replaced the file since: leave it.
      if (typeof stat !== "number" && stat.ino === ino) libc.unlink(path);
      removeDirectories(created);
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

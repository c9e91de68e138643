/**
 * Reading what the kernel exposes under `/proc` and `/sys` (and statfs/uname),
 * through libc: Deno 2.9 refuses its own file API on those paths without
 * `--allow-all` (checked: `Requires all access to "/proc/meminfo"`), while the
 * agent runs with its explicit permission set.
 *
 * Owns nothing beyond each call (every fd and DIR handle is closed before the
 * call returns). Permissions: `--allow-ffi`.
 *
 * @module
 */

import * as libc from "../vsock/_libc.ts";
import { ERRNO, socketError } from "../vsock/socket_error.ts";

const READ_CHUNK = 64 * 1024;
/** ESRCH: reading a file of a process that has exited. */
const ESRCH = 3;

/**
 * The contents of a (small) kernel file as text, or `undefined` when it does
 * not exist (ENOENT, ESRCH: a process that went away). Reads at most `max`
 * bytes. Throws a `SocketError` naming the path for any other error.
 */
export function readKernelFile(path: string, max = 4 * 1024 * 1024): string | undefined {
  const fd = libc.openPath(path, libc.O_RDONLY | libc.O_CLOEXEC);
  if (fd < 0) {
    if (fd === -ERRNO.ENOENT || fd === -ESRCH || fd === -ERRNO.ENOTDIR) return undefined;
    throw socketError("open", -fd, `Cannot open ${path}`);
  }
  try {
    const chunks: Uint8Array[] = [];
    let total = 0;
    while (total < max) {
      const buf = new Uint8Array(Math.min(READ_CHUNK, max - total));
      const n = libc.read(fd, buf);
      if (n === -ERRNO.EINTR) continue;
      if (n === -ESRCH) return undefined;
      if (n < 0) throw socketError("read", -n, `Cannot read ${path}`);
      if (n === 0) break;
      chunks.push(buf.subarray(0, n));
      total += n;
    }
    const all = new Uint8Array(total);
    let offset = 0;
    for (const chunk of chunks) {
      all.set(chunk, offset);
      offset += chunk.byteLength;
    }
    return new TextDecoder().decode(all);
  } finally {
    libc.close(fd);
  }
}

/** A directory's entries (names and `d_type`), or `undefined` when it does not exist. */
export function listDirectory(path: string): libc.DirEntry[] | undefined {
  const entries = libc.readDir(path);
  if (typeof entries !== "number") return entries;
  if (entries === -ERRNO.ENOENT || entries === -ERRNO.ENOTDIR) return undefined;
  throw socketError("opendir", -entries, `Cannot list ${path}`);
}

/** The statfs(2) of a mounted path; throws a `SocketError` naming it on failure. */
export function statFs(path: string): libc.StatFs {
  const result = libc.statfs(path);
  if (typeof result === "number") throw socketError("statfs", -result, `Cannot statfs ${path}`);
  return result;
}

/** uname(2): the running kernel's name, release, version and machine, and the host name. */
export function kernelInfo(): {
  sysname: string;
  release: string;
  version: string;
  machine: string;
  nodename: string;
} {
  return libc.uname();
}

/**
 * The process's own user and group ids through libc (`Deno.uid()` needs
 * `--allow-sys=uid`, and reading `/proc/self/status` needs `--allow-all`).
 * Permissions: `--allow-ffi`.
 * @module
 */

import * as libc from "../vsock/_libc.ts";

/** getuid(2). */
export function currentUid(): number {
  return libc.getuid();
}

/** getgid(2). */
export function currentGid(): number {
  return libc.getgid();
}

/**
 * `sendUnixDatagram()`: sends one datagram to a unix `SOCK_DGRAM` socket
 * (such as systemd's `$NOTIFY_SOCKET`), which Deno cannot do natively
 * without unstable APIs: socket, connect, send, close — synchronously.
 *
 * Owns nothing past each call (the socket is closed before it returns).
 * Permissions: `--allow-ffi` (which bypasses Deno's net permission for it).
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { encodeSockaddrUn } from "./sockaddr.ts";
import { socketError } from "./socket_error.ts";

const SOCK_DGRAM = 2;

/** `path` for messages: an abstract name (`"\0name"`) shown as `@name`. */
function displayPath(path: string): string {
  return path.startsWith("\0") ? "@" + path.slice(1) : path;
}

/**
 * Sends `bytes` as one datagram to the unix datagram socket at `path` (an
 * abstract name when it starts with `"\0"`). Throws a `TypeError` or
 * `RangeError` for a path that cannot be a socket address, and a
 * `SocketError` naming the path, with `syscall` `"socket"`, `"connect"` or
 * `"send"` and the errno, when a call fails (ENOENT or ECONNREFUSED when
 * nobody listens there).
 */
export function sendUnixDatagram(path: string, bytes: Uint8Array): void {
  const addr = encodeSockaddrUn(path);
  const where = displayPath(path);
  const fd = libc.socket(libc.AF_UNIX, SOCK_DGRAM | libc.SOCK_CLOEXEC, 0);
  if (fd < 0) throw socketError("socket", -fd, `Cannot open a datagram socket for ${where}`);
  try {
    const r = libc.connect(fd, addr);
    if (r < 0) throw socketError("connect", -r, `Cannot connect to datagram socket ${where}`);
    const n = libc.send(fd, bytes);
    if (n < 0) throw socketError("send", -n, `Cannot send a datagram to ${where}`);
  } finally {
    libc.close(fd);
  }
}

/**
 * `notifySystemd()`: tells systemd (`Type=notify`) that the agent is ready,
 * by sending `READY=1` as one datagram to `$NOTIFY_SOCKET` — Deno cannot send
 * unix datagrams natively, so this uses the project's libc module (one
 * SOCK_DGRAM socket, connect, send, close). `@name` is an abstract socket.
 * Permissions: `--allow-ffi`, `--allow-env=NOTIFY_SOCKET`.
 * @module
 */

import * as libc from "../shared/vsock/_libc.ts";
import { encodeSockaddrUn } from "../shared/vsock/sockaddr.ts";

const SOCK_DGRAM = 2;

/**
 * Sends `state` (e.g. `READY=1`) to the notify socket. Returns false when
 * there is none (not started by systemd); throws an Error naming the failing
 * call otherwise.
 */
export function notifySystemd(
  state: string,
  socketPath: string | undefined = Deno.env.get("NOTIFY_SOCKET"),
): boolean {
  if (socketPath === undefined || socketPath === "") return false;
  const path = socketPath.startsWith("@") ? "\0" + socketPath.slice(1) : socketPath;
  const fd = libc.socket(libc.AF_UNIX, SOCK_DGRAM | libc.SOCK_CLOEXEC, 0);
  if (fd < 0) throw new Error(`Cannot notify systemd: socket() failed with errno ${-fd}`);
  try {
    const r = libc.connect(fd, encodeSockaddrUn(path));
    if (r < 0) throw new Error(`Cannot notify systemd at ${socketPath}: connect() errno ${-r}`);
    const bytes = new TextEncoder().encode(state);
    const n = libc.send(fd, bytes);
    if (n < 0) throw new Error(`Cannot notify systemd at ${socketPath}: send() errno ${-n}`);
    return true;
  } finally {
    libc.close(fd);
  }
}

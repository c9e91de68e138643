/**
 * `notifySystemd()`: tells systemd (`Type=notify`) that the agent is ready,
 * by sending `READY=1` as one datagram to `$NOTIFY_SOCKET` — Deno cannot send
 * unix datagrams natively, so this uses `sendUnixDatagram()` of shared/vsock
 * (one SOCK_DGRAM socket, connect, send, close). `@name` is an abstract socket.
 * Permissions: `--allow-ffi`, `--allow-env=NOTIFY_SOCKET`.
 * @module
 */

import { sendUnixDatagram, SocketError } from "../shared/vsock/mod.ts";

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
  try {
    sendUnixDatagram(path, new TextEncoder().encode(state));
  } catch (error) {
    if (!(error instanceof SocketError)) throw error;
    const where = error.syscall === "socket" ? "" : ` at ${socketPath}`;
    throw new Error(
      `Cannot notify systemd${where}: ${error.syscall}() failed with ${error.code}`,
      { cause: error },
    );
  }
  return true;
}

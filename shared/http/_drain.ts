/**
 * `drained(socket)`: waits until a socket that refused a write can take more.
 * Shared by the HTTP server and the WebSocket writer. Needs no permissions.
 * @module
 */

import type { Duplex } from "node:stream";

/** Resolves on "drain", or at once/on "close" when the socket is (or gets) destroyed. */
export function drained(socket: Duplex): Promise<void> {
  // A write to a destroyed socket returns false too, and its "close" may be past.
  if (socket.destroyed || !socket.writableNeedDrain) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = () => {
      socket.off("drain", done);
      socket.off("close", done);
      resolve();
    };
    socket.on("drain", done);
    socket.on("close", done);
  });
}

/**
 * `Transport`: the two calls the host and the agent need from a socket family
 * (listen on a port, connect to a CID and port), with the kernel vsock
 * implementation and the unix-socket stand-in of a hybrid-vsock guest.
 *
 * Owns nothing (listeners and sockets own their fds). Permissions:
 * `--allow-ffi`; the hybrid guest transport also `--allow-read`/`--allow-write`
 * on its socket paths.
 *
 * @module
 */

import type { FdSocket } from "./fd_socket.ts";
import { listenHybridMux } from "./hybrid.ts";
import type { Listener } from "./listener.ts";
import { checkU32, VMADDR_CID_ANY } from "./sockaddr.ts";
import { type ConnectOptions, connectUnix } from "./unix.ts";
import { connectVsock, listenVsock, randomPort } from "./vsock.ts";

/** Listening on a port and connecting to a (CID, port), whatever carries them. */
export interface Transport {
  /** Listens on `port` (0: a random free port, reported in `address`). */
  listen(port: number): Listener;
  /** Connects to `port` on `cid`. */
  connect(cid: number, port: number, options?: ConnectOptions): Promise<FdSocket>;
}

/** Kernel AF_VSOCK: `listenVsock({ port })` and `connectVsock(cid, port)`. */
export const vsockTransport: Transport = {
  listen(port: number): Listener {
    return listenVsock({ port });
  },
  connect(cid: number, port: number, options?: ConnectOptions): Promise<FdSocket> {
    return connectVsock(cid, port, options);
  },
};

/**
 * A hybrid-vsock guest over unix sockets (the agent's unix mode): as with
 * Firecracker / Cloud Hypervisor, `connect(cid, port)` reaches the host at
 * the unix socket `${udsPath}_${port}` (the CID is not used), and
 * `listen(port)` serves `CONNECT <port>` requests on `udsPath` with
 * `listenHybridMux` (replacing a stale socket file; port 0 picks a random port
 * in 1024–65534). The listener's `address` is `{ family: "vsock", cid:
 * 0xFFFFFFFF, port }`.
 */
export function hybridGuestTransport(udsPath: string): Transport {
  if (typeof udsPath !== "string" || udsPath === "") {
    throw new TypeError("hybridGuestTransport() needs the VMM's unix socket path");
  }
  return {
    listen(port: number): Listener {
      checkU32(port, "vsock port");
      const served = port !== 0 ? port : randomPort();
      return listenHybridMux(udsPath, [served], {
        replace: true,
        address: { family: "vsock", cid: VMADDR_CID_ANY, port: served },
      });
    },
    connect(cid: number, port: number, options?: ConnectOptions): Promise<FdSocket> {
      checkU32(cid, "vsock CID");
      checkU32(port, "vsock port");
      return connectUnix(`${udsPath}_${port}`, options);
    },
  };
}

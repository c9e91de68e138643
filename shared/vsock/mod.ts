/**
 * The AF_VSOCK and unix-socket transport of lxd-vsock: non-blocking sockets
 * driven by one epoll waiter through Deno FFI, exposed as `node:stream`
 * Duplexes (`FdSocket`) that `node:tls` and `node:http` accept, listeners,
 * Firecracker / Cloud Hypervisor hybrid vsock, and typed errors.
 *
 * Owns nothing at import time: libc is opened on first use. Permissions:
 * `--allow-ffi` (unix socket files and their directories are handled through it too).
 *
 * @example
 * ```ts
 * import { connectVsock, listenVsock } from "./mod.ts";
 * using listener = listenVsock({ port: 0 });
 * const socket = await connectVsock(1, listener.address.family === "vsock" ? listener.address.port : 0);
 * ```
 *
 * @module
 */

export { type ReactorStats, reactorStats } from "./_reactor.ts";
export { sendUnixDatagram } from "./datagram.ts";
export { DeviceFd } from "./device.ts";
export { FdSocket, type FdSocketOptions } from "./fd_socket.ts";
export {
  connectHybrid,
  type ConnectHybridOptions,
  HYBRID_FIRST_LOCAL_PORT,
  listenHybridMux,
  type ListenHybridMuxOptions,
} from "./hybrid.ts";
export {
  encodeHybridLine,
  HYBRID_LINE_MAX,
  type HybridLine,
  type HybridVerb,
  parseHybridLine,
} from "./hybrid_line.ts";
export {
  acceptLoop,
  type AcceptLoopOptions,
  type Listener,
  listenerClosedError,
} from "./listener.ts";
export {
  decodeSockaddr,
  decodeSockaddrUn,
  decodeSockaddrVm,
  encodeSockaddrUn,
  encodeSockaddrVm,
  formatAddress,
  type SocketAddress,
  VMADDR_CID_ANY,
  VMADDR_CID_HOST,
  VMADDR_CID_HYPERVISOR,
  VMADDR_CID_LOCAL,
} from "./sockaddr.ts";
export { ERRNO, errnoName, errnoReason, SocketError, VSOCK_UNAVAILABLE } from "./socket_error.ts";
export { hybridGuestTransport, type Transport, vsockTransport } from "./transport.ts";
export {
  type ConnectOptions,
  connectUnix,
  listenUnix,
  type ListenUnixOptions,
  makeDirectories,
} from "./unix.ts";
export {
  connectVsock,
  listenVsock,
  type ListenVsockOptions,
  localCid,
  RANDOM_PORT_MAX,
  RANDOM_PORT_MIN,
  randomPort,
} from "./vsock.ts";

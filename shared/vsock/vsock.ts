/**
 * The AF_VSOCK transport over the FFI layer: `listenVsock`, `connectVsock`
 * and `localCid`.
 *
 * Owns nothing past each call (listeners and sockets own their fds).
 * Permissions: `--allow-ffi`; `localCid()` opens `/dev/vsock` through libc.
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { closeFd, connectFd, openSocket, socketAddress } from "./_fd.ts";
import { FdSocket } from "./fd_socket.ts";
import { FdListener, type Listener } from "./listener.ts";
import { checkU32, encodeSockaddrVm, VMADDR_CID_ANY } from "./sockaddr.ts";
import { ERRNO, errnoName, SocketError, socketError, VSOCK_UNAVAILABLE } from "./socket_error.ts";
import {
  checkBacklog,
  type ConnectOptions,
  DEFAULT_BACKLOG,
  DEFAULT_CONNECT_TIMEOUT,
} from "./unix.ts";

/** The lowest port `listenVsock({ port: 0 })` picks (ports below need CAP_NET_BIND_SERVICE). */
export const RANDOM_PORT_MIN = 1024;
/** The highest port `listenVsock({ port: 0 })` picks. */
export const RANDOM_PORT_MAX = 65534;
/** How many random ports `listenVsock({ port: 0 })` tries before giving up. */
export const RANDOM_PORT_ATTEMPTS = 10;

/** Options of {@linkcode listenVsock}. */
export interface ListenVsockOptions {
  /**
   * The CID to bind.
   * @default {0xFFFFFFFF} (VMADDR_CID_ANY)
   */
  cid?: number;
  /**
   * The port; 0 picks a random free port in 1024–65534 (retrying up to 10
   * times on EADDRINUSE).
   * @default {0}
   */
  port?: number;
  /**
   * The listen backlog.
   * @default {511}
   */
  backlog?: number;
}

/** A port picked at random from {@linkcode RANDOM_PORT_MIN} … {@linkcode RANDOM_PORT_MAX}. */
export function randomPort(): number {
  return RANDOM_PORT_MIN + Math.floor(Math.random() * (RANDOM_PORT_MAX - RANDOM_PORT_MIN + 1));
}

function bindWhat(cid: number, port: number | undefined): string {
  const where = port === undefined ? "a random vsock port" : `vsock port ${port}`;
  return cid === VMADDR_CID_ANY ? `Cannot bind ${where}` : `Cannot bind ${where} on CID ${cid}`;
}

/**
 * Listens on a vsock port. Errors are thrown synchronously, e.g.
 * `SocketError: Cannot bind vsock port 1024: address in use` (code
 * `EADDRINUSE`), or the "AF_VSOCK is not available" error (code
 * `EAFNOSUPPORT`/`ENODEV`).
 */
export function listenVsock(options: ListenVsockOptions = {}): Listener {
  const { cid = VMADDR_CID_ANY, port = 0, backlog = DEFAULT_BACKLOG } = options;
  checkU32(cid, "vsock CID");
  checkU32(port, "vsock port");
  checkBacklog(backlog);
  const fd = openSocket(libc.AF_VSOCK, "Cannot create a vsock socket");
  try {
    if (port === 0) {
      let r = -ERRNO.EADDRINUSE;
      for (let i = 0; i < RANDOM_PORT_ATTEMPTS && r === -ERRNO.EADDRINUSE; i++) {
        r = libc.bind(fd, encodeSockaddrVm(cid, randomPort()));
      }
      if (r < 0) {
        const what = r === -ERRNO.EADDRINUSE
          ? `${bindWhat(cid, undefined)} (${RANDOM_PORT_ATTEMPTS} attempts)`
          : bindWhat(cid, undefined);
        throw socketError("bind", -r, what, { vsock: true });
      }
    } else {
      const r = libc.bind(fd, encodeSockaddrVm(cid, port));
      if (r < 0) throw socketError("bind", -r, bindWhat(cid, port), { vsock: true });
    }
    const r = libc.listen(fd, backlog);
    if (r < 0) throw socketError("listen", -r, "Cannot listen on a vsock socket", { vsock: true });
    const address = socketAddress(fd, false);
    const description = address.family === "vsock"
      ? `vsock ${address.cid === VMADDR_CID_ANY ? "*" : address.cid}:${address.port}`
      : "vsock";
    return new FdListener(fd, { address, description });
  } catch (error) {
    closeFd(fd);
    throw error;
  }
}

/**
 * Connects to vsock `cid`:`port`, e.g. failing with
 * `SocketError: Cannot connect to vsock 5:8443: connection refused` (code
 * `ECONNREFUSED`) or `…: timed out` (code `ETIMEDOUT`).
 */
export async function connectVsock(
  cid: number,
  port: number,
  options: ConnectOptions = {},
): Promise<FdSocket> {
  const { timeout = DEFAULT_CONNECT_TIMEOUT, signal } = options;
  checkU32(cid, "vsock CID");
  checkU32(port, "vsock port");
  signal?.throwIfAborted();
  const what = `Cannot connect to vsock ${cid}:${port}`;
  const fd = openSocket(libc.AF_VSOCK, what);
  if (timeout > 0 && Number.isFinite(timeout)) {
    // The kernel's own connect timeout (2 s by default) follows ours.
    const timeval = new BigInt64Array([
      BigInt(Math.floor(timeout / 1000)),
      BigInt(Math.round((timeout % 1000) * 1000)),
    ]);
    libc.setsockopt(
      fd,
      libc.AF_VSOCK,
      libc.SO_VM_SOCKETS_CONNECT_TIMEOUT,
      new Uint8Array(timeval.buffer),
    );
  }
  await connectFd(fd, encodeSockaddrVm(cid, port), what, { timeout, signal, vsock: true });
  try {
    const localAddress = socketAddress(fd, false);
    return new FdSocket(fd, { localAddress, remoteAddress: { family: "vsock", cid, port } });
  } catch (error) {
    closeFd(fd);
    throw error;
  }
}

/**
 * This machine's vsock CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID` on `/dev/vsock`):
 * the guest CID inside a VM, 2 (VMADDR_CID_HOST) on a host with only
 * vhost_vsock, 1 with only vsock_loopback. Throws a `SocketError` with the
 * "AF_VSOCK is not available" message when there is no `/dev/vsock` or no
 * vsock transport.
 */
export function localCid(): number {
  const fd = libc.openPath("/dev/vsock", libc.O_RDONLY | libc.O_CLOEXEC);
  if (fd < 0) {
    const errno = -fd;
    if (errno === ERRNO.ENOENT || errno === ERRNO.ENODEV || errno === ERRNO.ENXIO) {
      throw new SocketError(VSOCK_UNAVAILABLE, { code: errnoName(errno), syscall: "open", errno });
    }
    throw socketError("open", errno, "Cannot open /dev/vsock");
  }
  try {
    const cid = new Uint32Array(1);
    const r = libc.ioctl(fd, libc.IOCTL_VM_SOCKETS_GET_LOCAL_CID, new Uint8Array(cid.buffer));
    if (r < 0) throw socketError("ioctl", -r, "Cannot read the local vsock CID", { vsock: true });
    if (cid[0] === VMADDR_CID_ANY) {
      // No transport registered (neither guest, host nor loopback).
      throw new SocketError(VSOCK_UNAVAILABLE, {
        code: "ENODEV",
        syscall: "ioctl",
        errno: ERRNO.ENODEV,
      });
    }
    return cid[0];
  } finally {
    libc.close(fd);
  }
}

/**
 * Firecracker / Cloud Hypervisor "hybrid vsock" over unix sockets:
 * `connectHybrid` (the host reaching a guest port through the VMM's socket:
 * `CONNECT <port>\n` → `OK <n>\n`) and `listenHybridMux` (a stand-in for the
 * VMM side, for tests and the agent's unix mode: it answers `OK <n>\n` for the
 * ports it serves and closes every other connection).
 *
 * Handshake lines are read with a bounded buffer and a timeout; bytes that
 * follow a line are handed to the resulting `FdSocket`, never lost.
 *
 * Owns: each mux listener owns its unix listener, the connections still in
 * their handshake and the accepted connections nobody took yet (all closed by
 * `close()`). Permissions: `--allow-ffi`, `--allow-read`/`--allow-write` on
 * the socket path (see `unix.ts`).
 *
 * @module
 */

import * as libc from "./_libc.ts";
import {
  closedError,
  closeFd,
  connectFd,
  openSocket,
  readSome,
  withDeadline,
  writeAll,
} from "./_fd.ts";
import { FdSocket } from "./fd_socket.ts";
import { encodeHybridLine, HYBRID_LINE_MAX, parseHybridLine } from "./hybrid_line.ts";
import { acceptUntilClosed, FdListener, type Listener, listenerClosedError } from "./listener.ts";
import {
  checkU32,
  encodeSockaddrUn,
  type SocketAddress,
  VMADDR_CID_ANY,
  VMADDR_CID_HOST,
} from "./sockaddr.ts";
import { ERRNO, SocketError } from "./socket_error.ts";
import {
  type ConnectOptions,
  DEFAULT_BACKLOG,
  DEFAULT_CONNECT_TIMEOUT,
  listenUnix,
  type ListenUnixOptions,
} from "./unix.ts";

/** The first port a mux answers with in `OK <n>` (Firecracker starts host-side ports at 2^30). */
export const HYBRID_FIRST_LOCAL_PORT = 1 << 30;

/** Options of {@linkcode connectHybrid}. */
export interface ConnectHybridOptions extends ConnectOptions {
  /**
   * The guest's CID, only reported in the socket's `remoteAddress`.
   * @default {0xFFFFFFFF} (unknown)
   */
  cid?: number;
}

/** Options of {@linkcode listenHybridMux}. */
export interface ListenHybridMuxOptions extends ListenUnixOptions {
  /**
   * How long a client may take to send its `CONNECT` line, in milliseconds.
   * @default {3000}
   */
  handshakeTimeout?: number;
  /**
   * The address the listener reports (`hybridGuestTransport` reports the
   * vsock port it serves).
   * @default {{ family: "unix", path: udsPath }}
   */
  address?: SocketAddress;
}

function protocolError(what: string, cause: unknown): SocketError {
  const detail = cause instanceof Error ? cause.message : String(cause);
  return new SocketError(`${what}: protocol error (${detail})`, {
    code: "EPROTO",
    syscall: "recv",
    errno: ERRNO.EPROTO,
  }, { cause });
}

/**
 * Reads one `verb` line from `fd` with a buffer of {@linkcode HYBRID_LINE_MAX}
 * bytes (so nothing past the line is taken from the kernel unless it came in
 * the same read): the port and the bytes read past the line.
 */
async function readLine(
  fd: number,
  verb: "CONNECT" | "OK",
  what: string,
  isClosed: () => boolean,
): Promise<{ port: number; head: Uint8Array } | null> {
  const buf = new Uint8Array(HYBRID_LINE_MAX);
  let length = 0;
  for (;;) {
    const n = await readSome(fd, buf.subarray(length), what, isClosed);
    if (n === 0) return null;
    length += n;
    let line;
    try {
      line = parseHybridLine(buf.subarray(0, length), verb);
    } catch (error) {
      throw protocolError(what, error);
    }
    if (line !== null) return { port: line.port, head: buf.slice(line.length, length) };
  }
}

/**
 * Connects to guest `port` through the VMM's hybrid-vsock unix socket
 * `udsPath`: sends `CONNECT <port>\n`, waits for `OK <n>\n` (the whole
 * exchange bounded by `timeout`), then the socket carries the stream. The
 * socket's `localAddress` is `{ family: "vsock", cid: 2, port: n }` (how the
 * guest sees this end) and its `remoteAddress` `{ family: "vsock", cid, port }`.
 *
 * Fails with code `ECONNREFUSED` when the VMM closes the connection instead of
 * answering (nobody listens on that guest port), `EPROTO` on a malformed
 * answer, `ETIMEDOUT`, or the unix connect's own error (`ENOENT`, …).
 */
export async function connectHybrid(
  udsPath: string,
  port: number,
  options: ConnectHybridOptions = {},
): Promise<FdSocket> {
  const { timeout = DEFAULT_CONNECT_TIMEOUT, signal, cid = VMADDR_CID_ANY } = options;
  checkU32(port, "hybrid vsock port");
  checkU32(cid, "vsock CID");
  const addr = encodeSockaddrUn(udsPath);
  signal?.throwIfAborted();
  const what = `Cannot connect to hybrid vsock port ${port} via ${udsPath}`;
  const started = performance.now();
  const fd = openSocket(libc.AF_UNIX, what);
  await connectFd(fd, addr, what, { timeout, signal });
  let closed = false;
  const close = () => {
    if (!closed) {
      closed = true;
      closeFd(fd);
    }
  };
  const handshake = async () => {
    await writeAll(fd, encodeHybridLine("CONNECT", port), what, () => closed);
    const reply = await readLine(fd, "OK", what, () => closed);
    if (reply === null) {
      throw new SocketError(`${what}: connection refused (closed before "OK")`, {
        code: "ECONNREFUSED",
        syscall: "recv",
        errno: ERRNO.ECONNREFUSED,
      });
    }
    return reply;
  };
  const left = timeout > 0 && Number.isFinite(timeout)
    ? Math.max(1, timeout - (performance.now() - started))
    : 0;
  try {
    const reply = await withDeadline(handshake, what, close, {
      timeout: left,
      signal,
      syscall: "recv",
    });
    if (closed) throw closedError(what);
    return new FdSocket(fd, {
      localAddress: { family: "vsock", cid: VMADDR_CID_HOST, port: reply.port },
      remoteAddress: { family: "vsock", cid, port },
      head: reply.head,
    });
  } catch (error) {
    close();
    throw error;
  }
}

/**
 * A stand-in for the VMM side of hybrid vsock: listens on `udsPath`, reads
 * `CONNECT <port>\n` from each connection (bounded: garbage, oversized or
 * partial-then-EOF lines and slow clients are closed), answers `OK <n>\n` for
 * a port in `ports` (else closes), and yields the socket with `localAddress`
 * `{ family: "vsock", cid: 0xFFFFFFFF, port }` and `remoteAddress`
 * `{ family: "vsock", cid: 2, port: n }`. Handshakes run concurrently, and
 * (as a VMM does) whether or not `accept()` is pending: an open mux always
 * has an accept outstanding, so it keeps the process alive until `close()`;
 * at most `backlog` answered-but-unaccepted connections wait, newer ones are
 * closed. Errors of the unix listen are thrown synchronously.
 */
export function listenHybridMux(
  udsPath: string,
  ports: number[],
  options: ListenHybridMuxOptions = {},
): Listener {
  const { handshakeTimeout = DEFAULT_CONNECT_TIMEOUT, address, ...unixOptions } = options;
  if (!Array.isArray(ports)) throw new TypeError("ports must be an array of port numbers");
  for (const port of ports) checkU32(port, "hybrid vsock port");
  const inner = listenUnix(udsPath, unixOptions) as FdListener;
  return new HybridMuxListener(inner, new Set(ports), {
    handshakeTimeout,
    address: address ?? inner.address,
    backlog: unixOptions.backlog ?? DEFAULT_BACKLOG,
  });
}

type Pending = { resolve: (socket: FdSocket) => void; reject: (error: unknown) => void };

class HybridMuxListener implements Listener {
  #inner: FdListener;
  #ports: Set<number>;
  #handshakeTimeout: number;
  #closed = false;
  #pumping = false;
  #ready: FdSocket[] = [];
  #pending: Pending[] = [];
  #handshaking = new Set<() => void>();
  #nextPort = HYBRID_FIRST_LOCAL_PORT;
  #backlog: number;
  readonly address: SocketAddress;

  constructor(
    inner: FdListener,
    ports: Set<number>,
    options: { handshakeTimeout: number; address: SocketAddress; backlog: number },
  ) {
    this.#inner = inner;
    this.#backlog = Math.max(1, options.backlog);
    this.#ports = ports;
    this.#handshakeTimeout = options.handshakeTimeout;
    this.address = options.address;
    // Like a VMM, answer CONNECT requests whether or not accept() is pending.
    this.#pump();
  }

  accept(): Promise<FdSocket> {
    if (this.#closed) return Promise.reject(listenerClosedError(this.#describe()));
    const ready = this.#ready.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise<FdSocket>((resolve, reject) => {
      this.#pending.push({ resolve, reject });
      this.#pump(); // restarts it after an accept error
    });
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#inner.close();
    for (const cancel of this.#handshaking) cancel();
    this.#handshaking.clear();
    for (const socket of this.#ready.splice(0)) socket.destroy();
    const error = listenerClosedError(this.#describe());
    for (const pending of this.#pending.splice(0)) pending.reject(error);
  }

  [Symbol.dispose](): void {
    this.close();
  }

  [Symbol.asyncIterator](): AsyncIterator<FdSocket> {
    return acceptUntilClosed(this, () => this.#closed);
  }

  #describe(): string {
    return `hybrid vsock mux ${
      this.#inner.address.family === "unix" ? this.#inner.address.path : ""
    }`;
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (!this.#closed) {
        let accepted;
        try {
          accepted = await this.#inner.acceptFd();
        } catch (error) {
          // Closed, or out of fds: fail the waiting accept() calls; the next
          // accept() starts over.
          if (!this.#closed) {
            for (const pending of this.#pending.splice(0)) pending.reject(error);
          }
          return;
        }
        if (this.#ready.length + this.#handshaking.size >= this.#backlog) {
          closeFd(accepted.fd); // as a full backlog would
          continue;
        }
        this.#handshake(accepted.fd);
      }
    } finally {
      this.#pumping = false;
    }
  }

  async #handshake(fd: number): Promise<void> {
    let closed = false;
    let owned = false;
    const close = () => {
      if (!closed && !owned) {
        closed = true;
        closeFd(fd);
      }
    };
    this.#handshaking.add(close);
    const what = `Hybrid vsock handshake on ${this.#describe()}`;
    try {
      const socket = await withDeadline(
        async () => {
          const request = await readLine(fd, "CONNECT", what, () => closed);
          if (request === null || !this.#ports.has(request.port)) return null;
          const port = this.#nextPort;
          this.#nextPort = this.#nextPort >= 0xFFFFFFFF ? HYBRID_FIRST_LOCAL_PORT : port + 1;
          await writeAll(fd, encodeHybridLine("OK", port), what, () => closed);
          // From here the FdSocket owns the fd: the listener's close() destroys it.
          owned = true;
          this.#handshaking.delete(close);
          return new FdSocket(fd, {
            localAddress: { family: "vsock", cid: VMADDR_CID_ANY, port: request.port },
            remoteAddress: { family: "vsock", cid: VMADDR_CID_HOST, port },
            head: request.head,
          });
        },
        what,
        close,
        { timeout: this.#handshakeTimeout, syscall: "recv" },
      );
      this.#handshaking.delete(close);
      if (socket === null) return close();
      if (this.#closed) return void socket.destroy();
      const pending = this.#pending.shift();
      if (pending) pending.resolve(socket);
      else this.#ready.push(socket);
    } catch {
      // Garbage, oversized, too slow or reset: the client is dropped.
      this.#handshaking.delete(close);
      close();
    }
  }
}

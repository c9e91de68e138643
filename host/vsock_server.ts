/**
 * The devlxd server: accepts agent connections on vsock or hybrid-vsock
 * listeners, runs a mutual TLS 1.3 handshake, maps the peer to exactly one
 * instance by its certificate **and** its vsock CID (or, for hybrid vsock, the
 * listener's instance), then serves HTTP/1.1 with the given handler. Peers
 * that match no instance get one 401 in the LXD envelope and the connection
 * closes; nothing tells them which part failed or what else is registered.
 *
 * Hardening: handshake, header and idle timeouts, header and body bounds
 * (enforced by `serveHttp`), a cap on concurrent connections per CID (or per
 * hybrid instance) and overall, so one VM cannot starve the others. A
 * connection counts against its instance's cap only once its certificate and
 * peer match; before that it is one of at most `maxPendingPerPeer`
 * unauthenticated connections of its peer, where a new one evicts the oldest
 * (so a guest process without the agent's key cannot lock the agent out), all
 * within one `handshakeTimeout`. Refusals are logged as one summary line per
 * interval, never one line per connection.
 *
 * Owns the listeners it serves and the connections it accepted. Needs
 * `--allow-ffi` (sockets) and nothing else.
 * @module
 */

import type { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import { errorResponse } from "../shared/http/envelope.ts";
import { serveHttp } from "../shared/http/mod.ts";
import { type Logger, LogSummary, silentLogger } from "../shared/log.ts";
import {
  acceptTls,
  certificateDer,
  type PeerCertificate,
  sameCertificate,
} from "../shared/tls/mod.ts";
import type { FdSocket, Listener, SocketAddress } from "../shared/vsock/mod.ts";
import type { Instance } from "./instance.ts";

/** Where a listener's connections come from. */
export type ListenerSource =
  /** AF_VSOCK: the peer CID names the instance. */
  | { kind: "vsock" }
  /** `<uds_path>_<port>` of one hybrid-vsock instance. */
  | { kind: "hybrid"; instance: string };

export interface DevlxdServerOptions {
  /** The host's server certificate and key (PEM). */
  cert: string;
  key: string;
  /** Looks up the instance with this vsock CID. */
  byCid: (cid: number) => Instance | undefined;
  /** Looks up the instance with this name. */
  byName: (name: string) => Instance | undefined;
  /** Serves one authenticated request. */
  handler: (request: Request, instance: Instance) => Response | Promise<Response>;
  /** Called for every authenticated request (before the handler). */
  onAgentRequest?: (name: string) => void;
  /** Concurrent connections per CID (or hybrid instance). @default 32 */
  maxConnectionsPerInstance?: number;
  /** Concurrent connections overall. @default 1024 */
  maxConnections?: number;
  /**
   * Unauthenticated connections (before the certificate and peer match) per
   * CID (or hybrid instance); a new one over the cap evicts the oldest.
   * @default 8
   */
  maxPendingPerPeer?: number;
  /** Bound from accept to an authenticated connection (first byte + TLS handshake), ms. @default 3000 */
  handshakeTimeout?: number;
  /** Request line and headers bound, ms. @default 3000 (LXD's) */
  headersTimeout?: number;
  /** Idle keep-alive bound, ms. @default 30000 (LXD's) */
  idleTimeout?: number;
  /** Request line + headers, bytes. @default 16384 */
  maxHeaderSize?: number;
  /** Request body, bytes. @default 1048576 */
  maxBodySize?: number;
  logger?: Logger;
}

interface Connection {
  /** The raw socket, then the TLS socket once the handshake is done. */
  socket: Duplex;
  /** The raw socket: its `bytesWritten` is what really left for the peer. */
  raw: FdSocket;
  key: string;
  done: Promise<void>;
  /** Closes the connection at once (serveHttp's signal). */
  abort: AbortController;
  /** Requests whose response body has not been fully written. */
  inFlight: number;
  /** The server is closing: end the connection once nothing is in flight. */
  ending: boolean;
  /** Not (yet) authenticated: counted in the peer's pending list, not its cap. */
  pending: boolean;
  /** Counted against `#perKey`. */
  counted: boolean;
  /** The instance it was authenticated as, once it was. */
  instance?: string;
  /** Requests answered: a connection idle after one is a kept-alive one. */
  answered: number;
}

/** One 401 in the LXD envelope; serveHttp closes the connection after it. */
function unauthorized(): Response {
  const response = errorResponse(401, "Unauthorized");
  response.headers.set("connection", "close");
  return response;
}

function peerKey(source: ListenerSource, remote: SocketAddress): string | undefined {
  if (source.kind === "hybrid") return `hybrid:${source.instance}`;
  return remote.family === "vsock" ? `cid:${remote.cid}` : undefined;
}

/** Serves the devlxd API on any number of listeners. */
export class DevlxdServer {
  #options: DevlxdServerOptions;
  #logger: Logger;
  #listeners = new Map<Listener, Promise<void>>();
  #connections = new Set<Connection>();
  #perKey = new Map<string, number>();
  /** Unauthenticated connections per peer key, oldest first. */
  #pending = new Map<string, Connection[]>();
  #summary: LogSummary;
  #shutdown = new AbortController();
  #closed = false;

  constructor(options: DevlxdServerOptions) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    this.#summary = new LogSummary(this.#logger);
  }

  /** Open connections by CID (`cid:N`) or hybrid instance (`hybrid:NAME`). */
  get connections(): Record<string, number> {
    return Object.fromEntries(this.#perKey);
  }

  /** Accepts on `listener` until it or the server closes; the server now owns it. */
  serve(listener: Listener, source: ListenerSource): void {
    if (this.#closed) {
      listener.close();
      throw new Error("DevlxdServer is closed");
    }
    const loop = (async () => {
      let pause = 50;
      while (true) {
        let socket: FdSocket;
        try {
          socket = await listener.accept();
        } catch (error) {
          const stopped = this.#closed || !this.#listeners.has(listener) ||
            (error as Error)?.name === "AbortError";
          if (stopped) return;
          // Transient (EMFILE, ENOBUFS, …): keep the listener, retry after a bounded pause.
          this.#logger.error("accept failed; retrying", { error, retryMs: pause });
          await new Promise((resolve) => setTimeout(resolve, pause));
          pause = Math.min(pause * 2, 2000);
          continue;
        }
        pause = 50;
        this.#accept(socket, source);
      }
    })();
    this.#listeners.set(listener, loop);
  }

  /** Stops serving `listener` (connections already accepted continue). */
  async unserve(listener: Listener): Promise<void> {
    const loop = this.#listeners.get(listener);
    this.#listeners.delete(listener);
    listener.close();
    await loop;
  }

  #accept(socket: FdSocket, source: ListenerSource): void {
    const remote = socket.remoteAddress;
    const key = peerKey(source, remote);
    if (key === undefined || this.#connections.size >= (this.#options.maxConnections ?? 1024)) {
      this.#summary.note("warn", "connection refused: too many connections", {
        peer: key ?? "unknown",
        open: this.#connections.size,
      });
      socket.destroy();
      return;
    }
    const pending = this.#pending.get(key) ?? [];
    if (pending.length >= (this.#options.maxPendingPerPeer ?? 8)) {
      const oldest = pending.shift()!;
      this.#summary.note("warn", "unauthenticated connection evicted by a newer one", {
        peer: key,
      });
      oldest.abort.abort();
      oldest.socket.destroy();
    }
    const connection: Connection = {
      socket,
      raw: socket,
      key,
      done: Promise.resolve(),
      abort: new AbortController(),
      inFlight: 0,
      ending: false,
      pending: true,
      counted: false,
      answered: 0,
    };
    pending.push(connection);
    this.#pending.set(key, pending);
    this.#connections.add(connection);
    connection.done = this.#handle(connection, source, remote).catch((error) => {
      this.#logger.debug("connection ended with an error", { peer: key, error });
    }).finally(() => {
      socket.destroy();
      this.#connections.delete(connection);
      this.#settle(connection);
      this.#uncount(connection);
    });
  }

  /** Takes `connection` off its VM's count (once). */
  #uncount(connection: Connection): void {
    if (!connection.counted) return;
    connection.counted = false;
    const left = (this.#perKey.get(connection.key) ?? 1) - 1;
    if (left === 0) this.#perKey.delete(connection.key);
    else this.#perKey.set(connection.key, left);
  }

  /**
   * Closes one idle kept-alive connection of `key` (authenticated, answered
   * before, nothing in flight), the oldest, and takes it off the count at
   * once; false when there is none.
   */
  #evictIdle(key: string): boolean {
    for (const other of this.#connections) {
      if (
        other.key !== key || !other.counted || other.inFlight > 0 || other.ending ||
        other.answered === 0 // a new connection whose first request is on its way
      ) continue;
      this.#uncount(other);
      other.ending = true;
      other.abort.abort();
      return true;
    }
    return false;
  }

  /** Takes `connection` off its peer's list of unauthenticated connections. */
  #settle(connection: Connection): void {
    if (!connection.pending) return;
    connection.pending = false;
    const list = this.#pending.get(connection.key);
    if (list === undefined) return;
    const at = list.indexOf(connection);
    if (at >= 0) list.splice(at, 1);
    if (list.length === 0) this.#pending.delete(connection.key);
  }

  #match(
    source: ListenerSource,
    remote: SocketAddress,
    peer: PeerCertificate,
  ): Instance | undefined {
    const instance = source.kind === "hybrid"
      ? this.#options.byName(source.instance)
      : remote.family === "vsock"
      ? this.#options.byCid(remote.cid)
      : undefined;
    if (!instance) return undefined;
    if (source.kind === "vsock" && instance.hybrid !== undefined) return undefined;
    let pinned: Uint8Array;
    try {
      pinned = certificateDer(instance.agentCert);
    } catch {
      return undefined;
    }
    return sameCertificate(peer.der, pinned) ? instance : undefined;
  }

  async #handle(
    connection: Connection,
    source: ListenerSource,
    remote: SocketAddress,
  ): Promise<void> {
    const o = this.#options;
    const raw = connection.socket;
    // A connection that ends before sending a byte (an agent's liveness probe:
    // a plain connect every few seconds) costs an accept and a close, not a TLS
    // socket set up and torn down.
    // One deadline from accept to authenticated: first byte and handshake.
    const deadline = Date.now() + (o.handshakeTimeout ?? 3000);
    const preAuth = AbortSignal.any([this.#shutdown.signal, connection.abort.signal]);
    if (!await firstBytes(raw, deadline - Date.now(), preAuth)) return;
    // A peer that sends anything but a TLS 1.3 ClientHello is refused by the
    // handshake itself (acceptTls rejects; the connection is destroyed).
    const { socket: tls, peer } = await acceptTls(raw, {
      cert: o.cert,
      key: o.key,
      handshakeTimeout: Math.max(1, deadline - Date.now()),
      signal: preAuth,
    });
    connection.socket = tls;
    if (this.#closed) return;
    const httpOptions = {
      headersTimeout: o.headersTimeout ?? 3000,
      idleTimeout: o.idleTimeout ?? 30000,
      maxHeaderSize: o.maxHeaderSize ?? 16384,
      maxBodySize: o.maxBodySize ?? 1 << 20,
      signal: connection.abort.signal,
    };
    const first = this.#match(source, remote, peer);
    if (!first) {
      // Stays pending (evictable) while it gets its one 401.
      this.#summary.note("warn", "unauthorized agent connection", {
        peer: connection.key,
        fingerprint: peer.fingerprint,
      });
      await serveHttp(tls, unauthorized, httpOptions);
      return;
    }
    this.#settle(connection);
    const count = this.#perKey.get(connection.key) ?? 0;
    // At the cap, an idle kept-alive connection of the same VM makes room
    // (its agent opens a new one when it needs one); busy ones never do.
    if (count >= (o.maxConnectionsPerInstance ?? 32) && !this.#evictIdle(connection.key)) {
      this.#summary.note("warn", "connection refused: too many connections", {
        instance: first.name,
        peer: connection.key,
        open: count,
      });
      return;
    }
    connection.counted = true;
    connection.instance = first.name;
    this.#perKey.set(connection.key, (this.#perKey.get(connection.key) ?? 0) + 1);
    this.#logger.debug("agent connected", { instance: first.name, peer: connection.key });
    await serveHttp(tls, async (request) => {
      // Re-check on every request: the instance may have been removed or re-keyed.
      const instance = this.#match(source, remote, peer);
      if (!instance || instance.name !== first.name) return unauthorized();
      o.onAgentRequest?.(instance.name);
      connection.inFlight++;
      let response: Response;
      try {
        // Its signal aborts as soon as the agent goes away (serveHttp).
        response = await o.handler(request, instance);
      } finally {
        connection.inFlight--;
        connection.answered++;
      }
      return this.#track(connection, response);
    }, httpOptions);
  }

  /**
   * Counts `response` as in flight until its body has been handed to the
   * socket, for close(). Also gives a streamed body the backpressure the TLS
   * layer does not: Deno's node:tls socket reports "drain" at once whatever
   * the peer reads (it buffers without bound), so the next chunk is pulled
   * only while less than {@linkcode MAX_SEND_LAG} bytes handed to TLS have
   * not left through the raw socket. A source that fails meanwhile (an event
   * follower dropped for its backlog) fails the body, and serveHttp cuts the
   * connection. A response of a closing server says
   * `Connection: close` (serveHttp closes after it); a body still streaming
   * when close() begins ends the connection once it is complete.
   */
  #track(connection: Connection, response: Response): Response {
    if (connection.ending) {
      const headers = new Headers(response.headers);
      headers.set("connection", "close");
      return new Response(response.body, {
        status: response.status,
        statusText: response.statusText,
        headers,
      });
    }
    const source = response.body;
    if (source === null) return response;
    connection.inFlight++;
    const raw = connection.raw;
    const rawStart = raw.bytesWritten;
    let handed = 0;
    let finished = false;
    const done = () => {
      if (finished) return;
      finished = true;
      connection.inFlight--;
      if (connection.ending && connection.inFlight === 0) {
        // After serveHttp's synchronous write of the last bytes.
        setImmediate(() => connection.socket.end());
      }
    };
    const reader = source.getReader();
    const failed = reader.closed.then(() => false, () => true);
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        // Fail at once, even while serveHttp waits for the socket to drain.
        reader.closed.catch((reason) => {
          try {
            controller.error(reason);
          } catch {
            // already closed
          }
          done();
        });
      },
      async pull(controller) {
        try {
          while (handed - (raw.bytesWritten - rawStart) > MAX_SEND_LAG) {
            if (raw.destroyed) throw new Error("Connection closed");
            if (await sleepUnless(LAG_POLL_MS, failed)) break; // read() reports why
          }
          const { value, done: end } = await reader.read();
          if (end) {
            controller.close();
            done();
          } else {
            handed += value.byteLength;
            controller.enqueue(value);
          }
        } catch (error) {
          controller.error(error);
          done();
        }
      },
      cancel(reason) {
        done();
        return reader.cancel(reason);
      },
    }, { highWaterMark: 0 });
    return new Response(body, {
      status: response.status,
      statusText: response.statusText,
      headers: response.headers,
    });
  }

  /**
   * Closes the connections authenticated as instance `name` (removed, or its
   * devlxd turned off): idle ones (an agent's kept-alive connections) at once,
   * busy ones once their responses are complete. Returns how many it closed
   * or marked.
   */
  closeInstance(name: string): number {
    let count = 0;
    for (const connection of this.#connections) {
      if (connection.instance !== name) continue;
      count++;
      connection.ending = true;
      if (connection.inFlight === 0) connection.abort.abort(); // serveHttp closes it at once
    }
    return count;
  }

  /**
   * Stops accepting, closes idle connections, lets in-flight requests finish
   * for up to `timeout` ms, then closes what is left. Idempotent.
   */
  async close(timeout = 5000): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const loops = [...this.#listeners.entries()];
    this.#listeners.clear();
    for (const [listener] of loops) listener.close();
    await Promise.all(loops.map(([, loop]) => loop));
    // Handshakes in progress are abandoned; established connections end when idle.
    this.#shutdown.abort();
    this.#summary.close();
    for (const connection of this.#connections) {
      connection.ending = true;
      // Idle: nothing to flush, so no need to wait for the peer to close.
      if (connection.inFlight === 0) connection.socket.destroy();
    }
    const all = Promise.all([...this.#connections].map((c) => c.done));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = await Promise.race([
      all.then(() => false),
      new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(true), timeout)),
    ]);
    clearTimeout(timer);
    if (expired) {
      this.#logger.warn("shutdown timeout: closing remaining connections", {
        open: this.#connections.size,
      });
      for (const c of this.#connections) c.abort.abort();
      for (const c of this.#connections) c.socket.destroy();
      await all;
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Plaintext bytes of a streamed body that may wait in the TLS layer for a slow peer. */
const MAX_SEND_LAG = 1 << 20;
/** How often a streamed body waiting for a slow peer checks the raw socket's progress. */
const LAG_POLL_MS = 50;

/** Waits `ms`; resolves true at once if `early` resolves true first. */
function sleepUnless(ms: number, early: Promise<boolean>): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), ms)),
    early.then((yes) => yes ? true : new Promise<boolean>(() => {})),
  ]).finally(() => clearTimeout(timer));
}

/**
 * Resolves true once `socket` holds bytes to read (left buffered for the TLS
 * handshake), false when it ends, closes or fails before any, after `timeout`
 * ms, or on abort.
 */
function firstBytes(socket: Duplex, timeout: number, signal: AbortSignal): Promise<boolean> {
  if (socket.readableLength > 0) return Promise.resolve(true);
  if (socket.destroyed || socket.readableEnded || signal.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const done = (value: boolean) => {
      clearTimeout(timer);
      socket.off("readable", onReadable);
      socket.off("close", onEnd);
      socket.off("error", onEnd);
      signal.removeEventListener("abort", onEnd);
      resolve(value);
    };
    // "readable" with nothing buffered is the end of the stream.
    const onReadable = () => done(socket.readableLength > 0);
    const onEnd = () => done(false);
    const timer = setTimeout(onEnd, timeout);
    socket.on("readable", onReadable);
    socket.once("close", onEnd);
    socket.once("error", onEnd);
    signal.addEventListener("abort", onEnd, { once: true });
  });
}

/**
 * `HttpServer`: the one HTTP server adapter of both programs. It serves a
 * `Request` → `Response` handler ({@linkcode serveHttp} per connection) on
 * any number of listeners and owns what every serve loop needs around it:
 *
 * - an accept loop that survives failed accepts (EMFILE, ENOBUFS: it pauses,
 *   50 ms doubling to 2 s, and goes on; `acceptLoop`), logged once per run
 *   of failures;
 * - an authentication hook per connection, run before any request is read
 *   and within one deadline from accept: peer → identity, or a refusal;
 * - caps: connections open overall, unauthenticated connections per peer (a
 *   new one evicts the oldest, so strangers cannot lock the real peer out)
 *   and authenticated ones per peer (an idle kept-alive one makes room;
 *   busy ones never do); refusals are logged as one summary line per
 *   interval (`LogSummary`), never one line per connection;
 * - in-flight tracking: a request counts from its handler's start until its
 *   response body has been handed to the socket; a response body may also be
 *   held back while too much of it waits in a TLS layer for a slow peer;
 * - closing: {@linkcode HttpServer.closeWhere} ends the connections of some
 *   identities (idle ones at once, busy ones after their answer), and
 *   {@linkcode HttpServer.shutdown} stops accepting, closes idle
 *   connections, lets in-flight answers finish for `grace` ms, then closes
 *   the rest.
 *
 * Owns the listeners it serves and the connections it accepted. Needs no
 * permissions of its own (the listeners' sockets need `--allow-ffi`).
 * @module
 */

import type { Duplex } from "node:stream";
import { setImmediate } from "node:timers";
import { type LogFields, type Logger, LogSummary, silentLogger } from "../log.ts";
import { acceptLoop, type FdSocket, type Listener, type SocketAddress } from "../vsock/mod.ts";
import { type HttpHandler, serveHttp, type ServeHttpOptions } from "./serve_http.ts";

/** What the authentication hook decided about a new connection. */
export type Admission<I> =
  /** The peer is `identity`: `socket` is served with the server's handler. */
  | { socket: Duplex; identity: I }
  /**
   * The peer is not known: `socket` is served with `refuse` (one refusal, say)
   * while the connection stays unauthenticated (evictable, not counted).
   */
  | { socket: Duplex; refuse: HttpHandler }
  /** Close the connection without a word. */
  | undefined;

/** What the authentication hook knows of a new connection. */
export interface AuthContext<S> {
  /** The `source` its listener was served with. */
  source: S;
  /** Its peer key (`peer` option). */
  peer: string;
  /** `Date.now()` by which authentication must be done (`authTimeout`). */
  deadline: number;
  /**
   * Aborts at the deadline, when the server shuts down, or when a newer
   * unauthenticated connection of the same peer evicts this one.
   */
  signal: AbortSignal;
}

/** Options of {@linkcode HttpServer}. */
export interface HttpServerOptions<I, S> {
  /** Serves one request of a connection authenticated as `identity`. */
  handler: (request: Request, identity: I) => Response | Promise<Response>;
  /**
   * Authenticates a new connection before any request is read: resolves to
   * the socket to serve (a TLS socket over `socket`, or `socket` itself) and
   * who the peer is, to a refusal, or to undefined (closed). A rejection
   * closes the connection too (`connection ended with an error`, debug).
   * @default every connection is served as it is, as identity `undefined`
   */
  authenticate?: (socket: FdSocket, context: AuthContext<S>) => Promise<Admission<I>>;
  /**
   * The key a connection counts under in the per-peer caps, from its
   * listener's `source` and its remote address; undefined refuses the
   * connection.
   * @default one key, `""`, for every connection
   */
  peer?: (source: S, remote: SocketAddress) => string | undefined;
  /** Called once a connection is authenticated and counted. */
  onConnection?: (identity: I, peer: string) => void;
  /** Fields naming `identity` in log lines. @default none */
  logFields?: (identity: I) => LogFields;
  /** Connections open at once; one more is closed at once. @default Infinity */
  maxConnections?: number;
  /** Authenticated connections per peer at once. @default Infinity */
  maxConnectionsPerPeer?: number;
  /** Unauthenticated connections per peer; a new one over it evicts the oldest. @default Infinity */
  maxPendingPerPeer?: number;
  /** Bound from accept to an authenticated connection, ms. @default Infinity */
  authTimeout?: number;
  /**
   * Authenticate only once the peer has sent a byte: a connection that ends
   * before (a liveness probe: a plain connect) costs an accept and a close,
   * not a TLS socket set up and torn down.
   * @default false
   */
  waitForData?: boolean;
  /**
   * Bytes of a streamed response body that may wait between the served
   * socket and the raw one (a TLS layer that buffers without bound): the next
   * chunk is pulled only while fewer have not left through the raw socket.
   * @default Infinity (no bound)
   */
  maxSendLag?: number;
  /** Limits and timeouts of each connection (its signal is the server's). */
  http?: Omit<ServeHttpOptions, "signal">;
  /** Names the server in log lines (`"agent API"` → `agent API accept failed; retrying`). */
  label?: string;
  logger?: Logger;
}

interface Connection<I> {
  /** The accepted socket: its `bytesWritten` is what really left for the peer. */
  raw: FdSocket;
  /** The raw socket, then the one `authenticate` returned. */
  socket: Duplex;
  peer: string;
  /** Who it was authenticated as, once it was. */
  identity?: { value: I };
  done: Promise<void>;
  /** Closes the connection at once (serveHttp's signal; ends authentication). */
  abort: AbortController;
  /** Requests whose response body has not been fully handed to the socket. */
  inFlight: number;
  /** Requests answered: a connection idle after one is a kept-alive one. */
  answered: number;
  /** Closing: responses say `Connection: close`; it ends once nothing is in flight. */
  ending: boolean;
  /** Not (yet) authenticated: in its peer's pending list, not counted. */
  pending: boolean;
  /** Counted in its peer's authenticated connections. */
  counted: boolean;
  /** Handed over by an upgrade (a WebSocket): it ends itself. */
  upgraded: boolean;
}

interface Served {
  loop: Promise<void>;
  /** Ends the loop's pause after a failed accept at once. */
  stop: AbortController;
}

/** How often a streamed body waiting for a slow peer checks the raw socket's progress. */
const LAG_POLL_MS = 50;

/** Serves HTTP/1.1 on any number of listeners; see the module documentation. */
export class HttpServer<I = undefined, S = undefined> {
  #options: HttpServerOptions<I, S>;
  #logger: Logger;
  #prefix: string;
  #summary: LogSummary;
  #listeners = new Map<Listener, Served>();
  #connections = new Set<Connection<I>>();
  /** Authenticated connections counted per peer. */
  #perPeer = new Map<string, number>();
  /** Unauthenticated connections per peer, oldest first. */
  #pending = new Map<string, Connection<I>[]>();
  #shutdown = new AbortController();
  #closing: Promise<void> | undefined;

  constructor(options: HttpServerOptions<I, S>) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    this.#prefix = options.label ? `${options.label} ` : "";
    this.#summary = new LogSummary(this.#logger);
  }

  /** Aborts when shutdown begins: handlers end their open streams. */
  get signal(): AbortSignal {
    return this.#shutdown.signal;
  }

  /** Authenticated connections open now, by peer key. */
  get connectionsByPeer(): Record<string, number> {
    return Object.fromEntries(this.#perPeer);
  }

  /** Accepts on `listener` until it is unserved or the server shuts down; the server now owns it. */
  serve(listener: Listener, source: S = undefined as S): void {
    if (this.#closing !== undefined) {
      listener.close();
      throw new Error(`The ${this.#prefix}server is shut down`);
    }
    const served: Served = { loop: Promise.resolve(), stop: new AbortController() };
    // Registered first: the loop asks stopped() before its first accept.
    this.#listeners.set(listener, served);
    let failures = 0;
    served.loop = acceptLoop(listener, (socket) => {
      if (failures > 0) {
        this.#logger.info(`${this.#prefix}accepts again`, { failedAccepts: failures });
        failures = 0;
      }
      this.#accept(socket, source);
    }, {
      stopped: () => this.#closing !== undefined || this.#listeners.get(listener) !== served,
      signal: served.stop.signal,
      onError: (error, retryMs) => {
        // One line per run of failures (the pause grows to 2 s), not one per retry.
        if (failures++ === 0) {
          this.#logger.error(`${this.#prefix}accept failed; retrying`, { error, retryMs });
        }
      },
    });
  }

  /** Stops serving `listener` and closes it (connections already accepted go on). */
  async unserve(listener: Listener): Promise<void> {
    const served = this.#listeners.get(listener);
    this.#listeners.delete(listener);
    listener.close();
    served?.stop.abort();
    await served?.loop;
  }

  #accept(socket: FdSocket, source: S): void {
    const o = this.#options;
    const peer = o.peer === undefined ? "" : o.peer(source, socket.remoteAddress);
    if (peer === undefined || this.#connections.size >= (o.maxConnections ?? Infinity)) {
      this.#summary.note("warn", `${this.#prefix}connection refused: too many connections`, {
        ...peerField(peer ?? "unknown"),
        open: this.#connections.size,
      });
      socket.destroy();
      return;
    }
    const pending = this.#pending.get(peer) ?? [];
    if (pending.length >= (o.maxPendingPerPeer ?? Infinity)) {
      const oldest = pending.shift()!;
      this.#summary.note(
        "warn",
        `${this.#prefix}unauthenticated connection evicted by a newer one`,
        peerField(peer),
      );
      oldest.abort.abort();
      oldest.socket.destroy();
    }
    const connection: Connection<I> = {
      raw: socket,
      socket,
      peer,
      done: Promise.resolve(),
      abort: new AbortController(),
      inFlight: 0,
      answered: 0,
      ending: false,
      pending: true,
      counted: false,
      upgraded: false,
    };
    pending.push(connection);
    this.#pending.set(peer, pending);
    this.#connections.add(connection);
    connection.done = this.#run(connection, source).catch((error) => {
      this.#logger.debug(`${this.#prefix}connection ended with an error`, {
        ...peerField(connection.peer),
        error,
      });
    }).finally(() => {
      connection.socket.destroy();
      socket.destroy();
      this.#connections.delete(connection);
      this.#settle(connection);
      this.#uncount(connection);
    });
  }

  /** Authenticates `connection`, counts it, and serves it until it closes. */
  async #run(connection: Connection<I>, source: S): Promise<void> {
    const o = this.#options;
    const admission = await this.#authenticate(connection, source);
    if (admission === undefined) return;
    connection.socket = admission.socket;
    if (this.#closing !== undefined) return;
    const http: ServeHttpOptions = { ...o.http, signal: connection.abort.signal };
    if ("refuse" in admission) {
      // Stays pending (evictable) while it gets its refusal.
      await serveHttp(admission.socket, admission.refuse, http);
      return;
    }
    const identity = admission.identity;
    this.#settle(connection);
    const count = this.#perPeer.get(connection.peer) ?? 0;
    // At the cap, an idle kept-alive connection of the same peer makes room
    // (its owner opens a new one when it needs one); busy ones never do.
    if (count >= (o.maxConnectionsPerPeer ?? Infinity) && !this.#evictIdle(connection.peer)) {
      this.#summary.note("warn", `${this.#prefix}connection refused: too many connections`, {
        ...o.logFields?.(identity),
        ...peerField(connection.peer),
        open: count,
      });
      return;
    }
    connection.counted = true;
    connection.identity = { value: identity };
    this.#perPeer.set(connection.peer, (this.#perPeer.get(connection.peer) ?? 0) + 1);
    o.onConnection?.(identity, connection.peer);
    const socket = admission.socket;
    await serveHttp(socket, async (request) => {
      connection.inFlight++;
      let response: Response;
      try {
        response = await o.handler(request, identity);
      } finally {
        connection.inFlight--;
        connection.answered++;
      }
      return this.#track(connection, response);
    }, http);
    if (!socket.destroyed) {
      // Upgraded (a WebSocket): its handler owns the connection until it closes.
      connection.upgraded = true;
      await untilClosed(socket, connection.abort.signal);
    }
  }

  /** Runs the authentication hook within the deadline; undefined: close. */
  async #authenticate(connection: Connection<I>, source: S): Promise<Admission<I>> {
    const o = this.#options;
    const timeout = o.authTimeout ?? Infinity;
    const deadline = Date.now() + timeout;
    const expired = new AbortController();
    const timer = Number.isFinite(timeout)
      ? setTimeout(
        () => expired.abort(new DOMException("Authentication timed out", "TimeoutError")),
        timeout,
      )
      : undefined;
    const signal = AbortSignal.any([
      this.#shutdown.signal,
      connection.abort.signal,
      expired.signal,
    ]);
    try {
      if (o.waitForData && !await firstBytes(connection.raw, signal)) return undefined;
      const context = { source, peer: connection.peer, deadline, signal };
      if (o.authenticate === undefined) {
        return { socket: connection.raw, identity: undefined as I };
      }
      return await o.authenticate(connection.raw, context);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Takes `connection` off its peer's count (once). */
  #uncount(connection: Connection<I>): void {
    if (!connection.counted) return;
    connection.counted = false;
    const left = (this.#perPeer.get(connection.peer) ?? 1) - 1;
    if (left === 0) this.#perPeer.delete(connection.peer);
    else this.#perPeer.set(connection.peer, left);
  }

  /** Takes `connection` off its peer's list of unauthenticated connections. */
  #settle(connection: Connection<I>): void {
    if (!connection.pending) return;
    connection.pending = false;
    const list = this.#pending.get(connection.peer);
    if (list === undefined) return;
    const at = list.indexOf(connection);
    if (at >= 0) list.splice(at, 1);
    if (list.length === 0) this.#pending.delete(connection.peer);
  }

  /**
   * Closes one idle kept-alive connection of `peer` (authenticated, answered
   * before, nothing in flight), the oldest, and takes it off the count at
   * once; false when there is none.
   */
  #evictIdle(peer: string): boolean {
    for (const other of this.#connections) {
      if (
        other.peer !== peer || !other.counted || other.inFlight > 0 || other.ending ||
        other.upgraded ||
        other.answered === 0 // a new connection whose first request is on its way
      ) continue;
      this.#uncount(other);
      other.ending = true;
      other.abort.abort();
      return true;
    }
    return false;
  }

  /**
   * Counts `response` as in flight until its body has been handed to the
   * socket. With `maxSendLag`, also gives a streamed body the backpressure a
   * TLS layer may not: Deno's node:tls socket reports "drain" at once
   * whatever the peer reads (it buffers without bound), so the next chunk is
   * pulled only while less than `maxSendLag` bytes handed to the served
   * socket have not left through the raw one. A source that fails meanwhile
   * (an event follower dropped for its backlog) fails the body at once, and
   * serveHttp cuts the connection. A response of a closing connection says
   * `Connection: close` (serveHttp closes after it); a body still streaming
   * when closing begins ends the connection once it is complete.
   */
  #track(connection: Connection<I>, response: Response): Response {
    if (connection.ending) return withClose(response);
    const source = response.body;
    if (source === null) return response;
    connection.inFlight++;
    const maxLag = this.#options.maxSendLag ?? Infinity;
    const raw = connection.raw;
    const rawStart = raw.bytesWritten;
    let handed = 0;
    let finished = false;
    const done = () => {
      if (finished) return;
      finished = true;
      connection.inFlight--;
      if (connection.ending && connection.inFlight === 0 && !connection.upgraded) {
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
          while (handed - (raw.bytesWritten - rawStart) > maxLag) {
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
   * Closes the connections authenticated as an identity `match` accepts:
   * idle ones at once, busy ones once their responses are complete. Returns
   * how many it closed or marked.
   */
  closeWhere(match: (identity: I) => boolean): number {
    let count = 0;
    for (const connection of this.#connections) {
      if (connection.identity === undefined || !match(connection.identity.value)) continue;
      count++;
      connection.ending = true;
      if (connection.inFlight === 0) connection.abort.abort(); // serveHttp closes it at once
    }
    return count;
  }

  /**
   * Stops accepting (the listeners are closed), aborts {@linkcode signal}
   * and authentications under way, closes idle connections at once, lets
   * in-flight answers finish for up to `grace` ms, then closes what is left.
   * Idempotent: later calls return the first one's promise.
   */
  shutdown(grace = 5000): Promise<void> {
    this.#closing ??= this.#close(grace);
    return this.#closing;
  }

  async #close(grace: number): Promise<void> {
    const served = [...this.#listeners];
    this.#listeners.clear();
    for (const [listener, { stop }] of served) {
      listener.close();
      stop.abort();
    }
    await Promise.all(served.map(([, { loop }]) => loop));
    this.#shutdown.abort();
    this.#summary.close();
    for (const connection of this.#connections) {
      connection.ending = true;
      // Idle: nothing to flush, so no need to wait for the peer to close.
      if (connection.inFlight === 0 && !connection.upgraded) connection.socket.destroy();
    }
    const all = Promise.all([...this.#connections].map((c) => c.done));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const expired = this.#connections.size > 0 && await Promise.race([
      all.then(() => false),
      new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(true), grace)),
    ]);
    clearTimeout(timer);
    if (expired) {
      if (grace > 0) {
        this.#logger.warn(`${this.#prefix}shutdown timeout: closing remaining connections`, {
          open: this.#connections.size,
        });
      }
      for (const c of this.#connections) c.abort.abort();
      for (const c of this.#connections) c.socket.destroy();
      await all;
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }
}

function peerField(peer: string): LogFields {
  return peer === "" ? {} : { peer };
}

/** `response` with `Connection: close`; the same object when its headers can be changed. */
function withClose(response: Response): Response {
  try {
    // In place keeps what serveHttp knows of the object (an upgrade).
    response.headers.set("connection", "close");
    return response;
  } catch {
    const headers = new Headers(response.headers);
    headers.set("connection", "close");
    return new Response(response.body, {
      status: response.status,
      statusText: response.statusText,
      headers,
    });
  }
}

/** Waits `ms`; resolves true at once if `early` resolves true first. */
function sleepUnless(ms: number, early: Promise<boolean>): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return Promise.race([
    new Promise<boolean>((resolve) => timer = setTimeout(() => resolve(false), ms)),
    early.then((yes) => yes ? true : new Promise<boolean>(() => {})),
  ]).finally(() => clearTimeout(timer));
}

/** Resolves once `socket` has closed, or `signal` aborted. */
function untilClosed(socket: Duplex, signal: AbortSignal): Promise<void> {
  if (socket.destroyed || signal.aborted) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      socket.off("close", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    socket.once("close", done);
    signal.addEventListener("abort", done, { once: true });
  });
}

/**
 * Resolves true once `socket` holds bytes to read (left buffered for the
 * authentication, a TLS handshake), false when it ends, closes or fails
 * before any, or on abort.
 */
function firstBytes(socket: Duplex, signal: AbortSignal): Promise<boolean> {
  if (socket.readableLength > 0) return Promise.resolve(true);
  if (socket.destroyed || socket.readableEnded || signal.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    const done = (value: boolean) => {
      socket.off("readable", onReadable);
      socket.off("close", onEnd);
      socket.off("error", onEnd);
      signal.removeEventListener("abort", onEnd);
      resolve(value);
    };
    // "readable" with nothing buffered is the end of the stream.
    const onReadable = () => done(socket.readableLength > 0);
    const onEnd = () => done(false);
    socket.on("readable", onReadable);
    socket.once("close", onEnd);
    socket.once("error", onEnd);
    signal.addEventListener("abort", onEnd, { once: true });
  });
}

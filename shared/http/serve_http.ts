/**
 * An HTTP/1.1 server for ONE already-open connection (any `node:stream`
 * Duplex: a TLS socket over vsock, a unix socket): keep-alive requests served
 * one after another, Content-Length and chunked request bodies, streaming
 * (chunked) response bodies, and the limits a daemon facing untrusted guests
 * needs (head size, body size, slowloris, body and idle timeouts).
 *
 * Why our own codec and not `node:http` (`server.emit("connection", socket)`):
 * checked in Deno 2.9.6 over an emitted unix-socket Duplex, node:http honours
 * `maxHeaderSize` (431) and notices a peer leaving a streamed response, but
 * NOT `headersTimeout`/`requestTimeout`: a connection that sends half a head,
 * or nothing, stays open indefinitely (a slowloris hole on a daemon that
 * guests can reach). Costs are a wash: CPU per request, client and server in
 * one process (tests/bench/tls.ts, 2 loaded cores), new connection + mutual
 * TLS (P-384) + `GET /1.0`: own 1.6–2.3 ms, node:http 1.8–2.4 ms; plain unix,
 * new connection + request: own 160–250 µs, node:http 140–160 µs; the TLS
 * handshake dominates either way. So the codec is ours: small, explicit about
 * every limit (431/413/408/400/505/501 written before closing), a response
 * head that goes out before the first event of an endless stream, the stream
 * cancelled when the peer goes away, and one write per complete response (the
 * body joined to the head when it completes within a few microtasks).
 * It speaks what Go's net/http client and server send and expect
 * (go_interop_test.ts). A handler may answer {@linkcode upgradeResponse}: the
 * `101 Switching Protocols` head is written and the connection handed over
 * (a WebSocket, `websocket.ts`).
 *
 * Owns the connection it is given: it ends or destroys it, unless a handler
 * takes it over with an upgrade. Needs no permissions.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";
import { drained } from "./_drain.ts";
import { SocketReader } from "./_reader.ts";
import {
  ChunkedDecoder,
  chunkHeader,
  CRLF,
  hasCloseToken,
  headEnd,
  HttpError,
  LAST_CHUNK,
  parseRequestHead,
  STATUS_TEXT,
  summarize,
} from "./_codec.ts";

/** Options for {@linkcode serveHttp}. */
export interface ServeHttpOptions {
  /**
   * Milliseconds for a request's line and headers to arrive, counted from the
   * connection's start for the first request and from its first byte for later
   * ones. Past it the connection is closed (with a 408 if part of a request came).
   * @default 3000 (LXD)
   */
  headersTimeout?: number;
  /**
   * Milliseconds a kept-alive connection may wait for the next request, and the
   * longest pause while a request body is arriving.
   * @default 30000
   */
  idleTimeout?: number;
  /**
   * Milliseconds for a whole request body to arrive, from the end of its head;
   * past it → 408 and close (a body trickled a byte at a time never resets it).
   * @default 10000
   */
  bodyTimeout?: number;
  /**
   * Largest request line plus headers, in bytes; larger → 431 and close.
   * @default 16384
   */
  maxHeaderSize?: number;
  /**
   * Largest request body, in bytes; larger → 413 and close.
   * @default 1048576 (1 MiB)
   */
  maxBodySize?: number;
  /** Aborting closes the connection at once. */
  signal?: AbortSignal;
}

/**
 * Request handler; the request's `signal` aborts when the peer goes away (it
 * ends its side, or the connection errors or closes). A `Connection: close`
 * response header closes the connection once the response is written.
 */
export type HttpHandler = (request: Request) => Response | Promise<Response>;

/**
 * Takes over an upgraded connection: `socket` is paused (call `resume()` after
 * adding a "data" listener) and `head` holds the bytes the client sent after
 * the request, already read. The callee owns the socket from then on.
 */
export type UpgradeHandler = (socket: Duplex, head: Uint8Array) => void;

const UPGRADES = new WeakMap<Response, UpgradeHandler>();

/**
 * A `101 Switching Protocols` answer with `headers` (for example `Upgrade`,
 * `Connection` and `Sec-WebSocket-Accept`): `serveHttp` writes its head, stops
 * serving HTTP on the connection and hands it to `onSocket`. (A `Response`
 * cannot carry status 101, so this one is a marked 200 without a body; only
 * `serveHttp` gives it its meaning.)
 */
export function upgradeResponse(onSocket: UpgradeHandler, headers: HeadersInit = {}): Response {
  const response = new Response(null, { headers });
  UPGRADES.set(response, onSocket);
  return response;
}

/** Response headers this server sets itself. */
const HOP_BY_HOP = new Set([
  "connection",
  "content-length",
  "keep-alive",
  "transfer-encoding",
  "upgrade",
]);
const VALID_HOST = /^[A-Za-z0-9.\-_:[\]]+$/;
/** A response body complete within this many bytes is sent with Content-Length. */
const COLLECT_LIMIT = 64 * 1024;
/** Microtask turns to wait for a body read before treating the body as a stream. */
const SETTLE_TURNS = 8;
const CONTINUE = Buffer.from("HTTP/1.1 100 Continue\r\n\r\n", "latin1");

/**
 * Serves HTTP/1.1 requests on `socket` until the peer closes, a timeout
 * fires, a protocol error closes it, or `signal` aborts. Resolves once the
 * connection is closed; never rejects.
 */
export async function serveHttp(
  socket: Duplex,
  handler: HttpHandler,
  options: ServeHttpOptions = {},
): Promise<void> {
  const connection = new HttpConnection(socket, handler, options);
  await connection.run();
}

class HttpConnection {
  #socket: Duplex;
  #handler: HttpHandler;
  #headersTimeout: number;
  #idleTimeout: number;
  #bodyTimeout: number;
  /** performance.now() by which the body being read must be complete. */
  #bodyDeadline = Infinity;
  #maxHeaderSize: number;
  #maxBodySize: number;
  #signal: AbortSignal | undefined;
  #reader: SocketReader;
  #lifetime = new AbortController();
  #closed: Promise<void>;
  /** Resolves to CLOSED with #closed, for races. */
  #closedMarker: Promise<typeof CLOSED>;
  /** Resolves to CLOSED once the peer is gone: ended its side, errored or closed. */
  #goneMarker: Promise<typeof CLOSED>;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** Our side is ended; the connection closes when the peer closes or after a grace period. */
  #ending = false;
  /** What to do when #timer fires. */
  #onTimeout: () => void = () => {};
  /** A handler took the connection over (upgradeResponse): it is no longer ours. */
  #upgraded = false;

  constructor(socket: Duplex, handler: HttpHandler, options: ServeHttpOptions) {
    this.#socket = socket;
    this.#handler = handler;
    this.#headersTimeout = options.headersTimeout ?? 3000;
    this.#idleTimeout = options.idleTimeout ?? 30_000;
    this.#bodyTimeout = options.bodyTimeout ?? 10_000;
    this.#maxHeaderSize = options.maxHeaderSize ?? 16_384;
    this.#maxBodySize = options.maxBodySize ?? 1_048_576;
    this.#signal = options.signal;
    const { promise, resolve } = Promise.withResolvers<void>();
    this.#closed = promise;
    this.#closedMarker = promise.then((): typeof CLOSED => CLOSED);
    const gone = Promise.withResolvers<typeof CLOSED>();
    this.#goneMarker = gone.promise;
    this.#reader = new SocketReader(socket, {
      // A half-open socket (a TLS socket over an FdSocket) only ends when the
      // peer goes away: handlers and response streams must hear of it then,
      // not at the next write.
      onGone: (reason) => {
        this.#lifetime.abort(reason);
        gone.resolve(CLOSED);
      },
      onClose: () => {
        this.#clearTimer();
        resolve();
      },
    });
  }

  #abort = () => this.#socket.destroy();

  async run(): Promise<void> {
    const signal = this.#signal;
    if (signal?.aborted) this.#socket.destroy();
    signal?.addEventListener("abort", this.#abort, { once: true });
    try {
      let first = true;
      while (!this.#reader.closed) {
        if (!await this.#serveOne(first)) break;
        first = false;
        if (this.#socket.writableNeedDrain) await drained(this.#socket);
      }
    } catch {
      // Socket-level failures end the connection; there is nobody to report to.
      this.#socket.destroy();
    } finally {
      signal?.removeEventListener("abort", this.#abort);
      if (!this.#upgraded) this.#endSoon();
    }
    if (!this.#upgraded) await this.#closed;
  }

  #setTimer(ms: number, onTimeout: () => void): void {
    this.#clearTimer();
    this.#onTimeout = onTimeout;
    this.#timer = setTimeout(this.#fire, ms);
  }

  #fire = () => {
    this.#timer = undefined;
    this.#onTimeout();
  };

  #clearTimer(): void {
    if (this.#timer !== undefined) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
    }
  }

  #headersTimedOut = () => {
    if (this.#reader.buffer.length > 0) this.#fail(408);
    else this.#socket.destroy();
  };

  #idleTimedOut = () => this.#socket.destroy();

  #bodyTimedOut = () => this.#fail(408);

  /** While a body arrives: the idle bound per pause, within the body deadline. */
  #setBodyTimer(): void {
    const left = this.#bodyDeadline - performance.now();
    if (left < this.#idleTimeout) this.#setTimer(Math.max(0, left), this.#bodyTimedOut);
    else this.#setTimer(this.#idleTimeout, this.#idleTimedOut);
  }

  /** Serves one request; false when the connection must not be reused. */
  async #serveOne(first: boolean): Promise<boolean> {
    const reader = this.#reader;
    // Wait for a complete head. Leading CRLFs between requests are ignored (RFC 9112 2.2).
    let headersPhase = first || reader.buffer.length > 0;
    this.#setTimer(
      headersPhase ? this.#headersTimeout : this.#idleTimeout,
      headersPhase ? this.#headersTimedOut : this.#idleTimedOut,
    );
    let scanned = 0;
    let end: number;
    for (;;) {
      while (reader.buffer.length >= 2 && reader.buffer[0] === 0x0d && reader.buffer[1] === 0x0a) {
        reader.consume(2);
      }
      if (!headersPhase && reader.buffer.length > 0) {
        headersPhase = true;
        this.#setTimer(this.#headersTimeout, this.#headersTimedOut);
      }
      end = headEnd(reader.buffer, Math.max(0, scanned - 3));
      if (end >= 0 || reader.buffer.length > this.#maxHeaderSize) break;
      scanned = reader.buffer.length;
      if (reader.done) {
        if (reader.buffer.length > 0 && !reader.closed) this.#fail(400);
        return false;
      }
      await reader.wait();
      if (this.#ending) return false; // a 408 went out while we waited
    }
    if (end < 0 || end > this.#maxHeaderSize) return this.#fail(431);

    let request: Request;
    let keepAlive: boolean;
    let isHead: boolean;
    try {
      const head = parseRequestHead(reader.buffer.toString("latin1", 0, end - 4));
      reader.consume(end);
      const summary = summarize(head.fields, false);
      keepAlive = head.minor === 1 ? !summary.close : summary.keepAlive && !summary.close;
      isHead = head.method === "HEAD";
      let url: string;
      if (head.target[0] === "/") {
        const host = summary.host !== undefined && VALID_HOST.test(summary.host)
          ? summary.host
          : "localhost";
        url = `http://${host}${head.target}`;
      } else if (/^https?:\/\//i.test(head.target)) {
        url = head.target;
      } else {
        throw new HttpError(400, "Unsupported request target");
      }
      let body: Uint8Array<ArrayBuffer> | null | undefined = null;
      if (summary.framing.kind !== "none") {
        if (summary.framing.kind === "length" && summary.framing.length > this.#maxBodySize) {
          throw new HttpError(413, "Request body too large");
        }
        if (summary.expectContinue && head.minor === 1) this.#socket.write(CONTINUE);
        this.#bodyDeadline = performance.now() + this.#bodyTimeout;
        this.#setBodyTimer();
        body = summary.framing.kind === "length"
          ? await this.#readLength(summary.framing.length)
          : await this.#readChunked();
        if (body === undefined) return false;
      }
      this.#clearTimer();
      const hasBody = body !== null && !isHead && head.method !== "GET";
      request = new Request(url, {
        method: head.method,
        headers: head.fields,
        body: hasBody ? body : null,
        signal: this.#lifetime.signal,
      });
    } catch (error) {
      if (error instanceof HttpError) return this.#fail(error.status);
      if (error instanceof TypeError) return this.#fail(400); // Headers/Request/URL refused it
      throw error;
    }

    let response: Response;
    try {
      // A handler that never settles must not keep a closed connection's serveHttp pending.
      const handled = Promise.resolve(this.#handler(request));
      const result = await Promise.race([handled, this.#closedMarker]);
      if (result === CLOSED) {
        handled.then((late) => {
          if (late instanceof Response) late.body?.cancel().catch(() => {});
        }, () => {});
        return false;
      }
      response = result;
      if (!(response instanceof Response)) throw new TypeError("Handler did not return a Response");
    } catch {
      response = new Response("Internal Server Error", { status: 500 });
    }
    if (this.#reader.closed) {
      await response.body?.cancel().catch(() => {});
      return false;
    }
    const onUpgrade = UPGRADES.get(response);
    if (onUpgrade !== undefined) {
      this.#upgrade(response, onUpgrade);
      return false;
    }
    const reusable = await this.#writeResponse(response, isHead, keepAlive);
    if (!reusable) this.#endSoon();
    return reusable;
  }

  /** Writes the 101 head and hands the connection, with the bytes read past the request, over. */
  #upgrade(response: Response, onUpgrade: UpgradeHandler): void {
    this.#clearTimer();
    this.#upgraded = true;
    let head = "HTTP/1.1 101 Switching Protocols\r\n";
    for (const [name, value] of response.headers) head += `${name}: ${value}\r\n`;
    this.#socket.write(head + "\r\n", "latin1");
    this.#socket.pause();
    const rest = new Uint8Array(this.#reader.buffer);
    this.#reader.consume(rest.length);
    this.#reader.detach();
    try {
      onUpgrade(this.#socket, rest);
    } catch {
      this.#socket.destroy();
    }
  }

  async #readLength(length: number): Promise<Uint8Array<ArrayBuffer> | undefined> {
    const reader = this.#reader;
    const body = new Uint8Array(length);
    let filled = 0;
    while (filled < length) {
      if (reader.buffer.length === 0) {
        if (reader.done) return undefined;
        await reader.wait();
        if (this.#ending) return undefined; // the body deadline passed
        this.#setBodyTimer();
        continue;
      }
      const piece = reader.take(length - filled);
      body.set(piece, filled);
      filled += piece.length;
    }
    return body;
  }

  async #readChunked(): Promise<Uint8Array<ArrayBuffer> | undefined> {
    const decoder = new ChunkedDecoder(this.#reader);
    const pieces: Uint8Array[] = [];
    let size = 0;
    for (;;) {
      if (this.#reader.closed) return undefined;
      let piece: Buffer | null;
      try {
        piece = await decoder.next();
      } catch (error) {
        if (this.#reader.done) return undefined;
        throw error;
      }
      if (this.#ending) return undefined; // the body deadline passed
      this.#setBodyTimer();
      if (piece === null) break;
      size += piece.length;
      if (size > this.#maxBodySize) throw new HttpError(413, "Request body too large");
      pieces.push(piece);
    }
    const body = new Uint8Array(size);
    let offset = 0;
    for (const piece of pieces) {
      body.set(piece, offset);
      offset += piece.length;
    }
    return body;
  }

  /** Writes an error status with `Connection: close` and ends the connection. */
  #fail(status: number): false {
    this.#clearTimer();
    const text = STATUS_TEXT[status] ?? "Error";
    const body = `${text}\n`;
    if (!this.#reader.closed && this.#socket.writable) {
      this.#socket.write(
        `HTTP/1.1 ${status} ${text}\r\nContent-Type: text/plain; charset=utf-8\r\n` +
          `Content-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`,
        "latin1",
      );
    }
    this.#endSoon();
    return false;
  }

  /** Ends our side; destroys the connection if the peer does not close it soon after. */
  #endSoon(): void {
    if (this.#reader.closed || this.#ending) return;
    this.#ending = true;
    this.#socket.end();
    this.#setTimer(Math.min(this.#idleTimeout, 2000), () => this.#socket.destroy());
  }

  /** Writes `response`; false when the connection cannot carry another request. */
  async #writeResponse(response: Response, isHead: boolean, keepAlive: boolean): Promise<boolean> {
    const status = response.status;
    let head = `HTTP/1.1 ${status} ${response.statusText || STATUS_TEXT[status] || "Unknown"}\r\n`;
    for (const [name, value] of response.headers) {
      if (!HOP_BY_HOP.has(name)) head += `${name}: ${value}\r\n`;
    }
    // The handler may close the connection after its answer (`Connection: close`).
    keepAlive &&= !hasCloseToken(response.headers.get("connection"));
    head += keepAlive ? "" : "Connection: close\r\n";
    const body = response.body;
    const noBody = status === 204 || status === 304 || status < 200;
    if (body === null || noBody || isHead) {
      if (body !== null) await body.cancel().catch(() => {});
      if (!noBody) {
        const declared = isHead ? response.headers.get("content-length") : null;
        head += `Content-Length: ${declared ?? 0}\r\n`;
      }
      this.#socket.write(head + "\r\n", "latin1");
      return keepAlive;
    }

    // Collect the body while it completes within a few microtask turns; a body
    // that does not (an event stream) or grows large goes out chunked.
    const reader = body.getReader();
    const chunks: Uint8Array[] = [];
    let size = 0;
    let pending = reader.read();
    let streaming = false;
    try {
      for (;;) {
        const result = await settleSoon(pending);
        if (result === undefined) {
          streaming = true;
          break;
        }
        if (result.done) break;
        chunks.push(result.value);
        size += result.value.byteLength;
        pending = reader.read();
        if (size > COLLECT_LIMIT) {
          streaming = true;
          break;
        }
      }
    } catch {
      // The body failed before anything was sent: answer 500 instead.
      reader.releaseLock();
      this.#fail(500);
      return false;
    }
    if (!streaming) {
      const headBytes = Buffer.from(`${head}Content-Length: ${size}\r\n\r\n`, "latin1");
      this.#socket.write(
        chunks.length === 0
          ? headBytes
          : Buffer.concat([headBytes, ...chunks], headBytes.length + size),
      );
      return keepAlive;
    }

    const start: Uint8Array[] = [
      Buffer.from(`${head}Transfer-Encoding: chunked\r\n\r\n`, "latin1"),
    ];
    for (const chunk of chunks) start.push(chunkHeader(chunk.byteLength), chunk, CRLF);
    this.#socket.write(Buffer.concat(start));
    for (;;) {
      let result: ReadableStreamReadResult<Uint8Array> | typeof CLOSED;
      try {
        result = await Promise.race([pending, this.#goneMarker]);
      } catch {
        // The body stream failed mid-way: a chunked body cannot say so, so cut the connection.
        this.#socket.destroy();
        return false;
      }
      // A destroyed socket's "close" event may still be queued behind this
      // microtask loop: check the flag, or an eager stream would spin forever.
      // A peer that ended its side is gone too: nobody reads the rest.
      if (result === CLOSED || this.#socket.destroyed || this.#reader.done) {
        await reader.cancel(new Error("Connection closed")).catch(() => {});
        return false;
      }
      if (result.done) {
        this.#socket.write(LAST_CHUNK);
        return keepAlive;
      }
      const chunk = result.value;
      pending = reader.read();
      if (chunk.byteLength > 0) {
        this.#socket.write(chunkHeader(chunk.byteLength));
        this.#socket.write(chunk);
        if (!this.#socket.write(CRLF)) {
          // A peer that does not read must not keep a failed stream (a dropped
          // event follower) and its connection alive: cut it when the body fails.
          const failed = reader.closed.then(() => new Promise<never>(() => {}), () => FAILED);
          if (await Promise.race([drained(this.#socket), failed]) === FAILED) {
            this.#socket.destroy();
            return false;
          }
        }
      }
    }
  }
}

const CLOSED = Symbol("closed");
const FAILED = Symbol("failed");

/**
 * `promise`'s result if it settles within a few microtask turns, else
 * undefined (the promise keeps running; await it again later).
 */
async function settleSoon<T extends object>(promise: Promise<T>): Promise<T | undefined> {
  let result: T | undefined;
  let failure: { error: unknown } | undefined;
  promise.then((value) => result = value, (error) => failure = { error });
  for (let turn = 0; turn < SETTLE_TURNS && result === undefined && failure === undefined; turn++) {
    await null;
  }
  if (failure !== undefined) throw failure.error;
  return result;
}

/**
 * An HTTP/1.1 client for ONE request over an already-open connection (any
 * `node:stream` Duplex). Sends the request with `Host` from the URL,
 * `Content-Length` for a body and `Connection: close`; parses the response
 * head and returns a `Response` whose body streams (Content-Length, chunked,
 * or until close) with backpressure. The connection belongs to the response:
 * it is destroyed once the body is fully read, cancelled or failed (or at
 * once when there is no body). With `reuse`, the request asks for keep-alive
 * instead, and a connection whose response completed cleanly (framed by
 * length or chunks, nothing left over, neither side asked to close) is
 * handed back to the caller for the next request instead of being destroyed.
 * Interoperates with Go's net/http server.
 *
 * Needs no permissions.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";
import { SocketReader } from "./_reader.ts";
import {
  ChunkedDecoder,
  type Framing,
  hasCloseToken,
  headEnd,
  parseResponseHead,
  summarize,
} from "./_codec.ts";

/** Options for {@linkcode httpRequest}. */
export interface HttpRequestOptions {
  /**
   * Milliseconds to wait for the response head (not the body); `Infinity`
   * waits without a bound (until the head, a close or `signal`).
   * @default 30000
   */
  timeout?: number;
  /** Aborting destroys the connection: before the head the call rejects, after it the body errors. */
  signal?: AbortSignal;
  /**
   * Largest response status line plus headers, in bytes.
   * @default 65536
   */
  maxHeaderSize?: number;
  /**
   * Keep-alive: called with the connection once the response is complete and
   * the connection can carry another request (otherwise it is destroyed). The
   * request then omits `Connection: close`.
   */
  reuse?: (socket: Duplex) => void;
}

/**
 * The connection closed (or was reset) before a single byte of the response
 * arrived: the peer answered nothing, so a caller may send the request again
 * on another connection (a kept-alive connection the server closed meanwhile).
 */
export class NoResponseError extends Error {
  override name = "NoResponseError";
}

/** Request headers this client sets itself. */
const MANAGED = new Set(["host", "content-length", "transfer-encoding"]);
const BODYLESS_METHODS = new Set(["GET", "HEAD", "DELETE", "OPTIONS", "TRACE", "CONNECT"]);

/**
 * Sends `request` over `socket` and resolves with the response once its head
 * has arrived.
 *
 * @throws {Error} when the connection closes or times out before a complete
 * response head, or the head is malformed or too large.
 */
export async function httpRequest(
  socket: Duplex,
  request: Request,
  options: HttpRequestOptions = {},
): Promise<Response> {
  const { timeout = 30_000, maxHeaderSize = 65_536, signal, reuse } = options;
  const reader = new SocketReader(socket);
  let failure: unknown;
  /** A response head (even an interim 1xx) has arrived. */
  let answered = false;
  const fail = (error: unknown) => {
    failure ??= error;
    socket.destroy();
  };
  const onAbort = () => fail(signal!.reason);
  const timer = Number.isFinite(timeout)
    ? setTimeout(
      () => fail(new Deno.errors.TimedOut(`No HTTP response head within ${timeout} ms`)),
      timeout,
    )
    : undefined;
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    signal?.throwIfAborted();
    const url = new URL(request.url);
    let head = `${request.method} ${url.pathname}${url.search} HTTP/1.1\r\nHost: ${url.host}\r\n`;
    let connection = false;
    for (const [name, value] of request.headers) {
      if (MANAGED.has(name)) continue;
      if (name === "connection") connection = true;
      head += `${name}: ${value}\r\n`;
    }
    if (!connection && reuse === undefined) head += "Connection: close\r\n";
    const body = request.body === null ? null : new Uint8Array(await request.arrayBuffer());
    if (body !== null || !BODYLESS_METHODS.has(request.method)) {
      head += `Content-Length: ${body?.byteLength ?? 0}\r\n`;
    }
    const headBytes = Buffer.from(head + "\r\n", "latin1");
    socket.write(
      body === null || body.byteLength === 0 ? headBytes : Buffer.concat([headBytes, body]),
    );

    for (;;) {
      let scanned = 0;
      let end: number;
      for (;;) {
        if (failure !== undefined) throw failure;
        end = headEnd(reader.buffer, Math.max(0, scanned - 3));
        if (end >= 0 || reader.buffer.length > maxHeaderSize) break;
        scanned = reader.buffer.length;
        if (reader.done) {
          const message = "Connection closed before a complete HTTP response head";
          if (reader.buffer.length === 0 && !answered) {
            throw new NoResponseError(message, { cause: reader.error });
          }
          throw new Error(message, { cause: reader.error });
        }
        await reader.wait();
      }
      if (end < 0 || end > maxHeaderSize) {
        throw new Error(`HTTP response head larger than ${maxHeaderSize} bytes`);
      }
      const parsed = parseResponseHead(reader.buffer.toString("latin1", 0, end - 4));
      reader.consume(end);
      answered = true;
      if (parsed.status >= 100 && parsed.status < 200) {
        if (parsed.status === 101) throw new Error("HTTP upgrade (101) is not supported");
        continue; // 100 Continue, 103 Early Hints: the final response follows
      }
      const noBody = request.method === "HEAD" || parsed.status === 204 ||
        parsed.status === 304;
      const summary = summarize(parsed.fields, true);
      const framing: Framing = noBody ? { kind: "none" } : summary.framing;
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      // The connection can carry another request once this body is complete.
      const reusable = reuse !== undefined && framing.kind !== "close" &&
        !summary.close &&
        !hasCloseToken(request.headers.get("connection"));
      const done = (complete: boolean) => {
        reader.detach();
        if (complete && reusable && reader.buffer.length === 0 && !reader.done) {
          reuse!(socket);
        } else {
          socket.on("error", () => {});
          socket.destroy();
        }
      };
      const stream = framing.kind === "none" ? null : bodyStream(reader, framing, signal, done);
      const response = new Response(stream, {
        status: parsed.status,
        statusText: parsed.statusText,
        headers: parsed.fields,
      });
      if (stream === null) done(true);
      return response;
    }
  } catch (error) {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
    reader.detach();
    socket.on("error", () => {});
    socket.destroy();
    throw failure ?? error;
  }
}

/**
 * The response body as a pull stream over `reader`; calls `done(complete)`
 * once, when the body was read to its end (true) or cancelled or failed.
 */
function bodyStream(
  reader: SocketReader,
  framing: Framing,
  signal: AbortSignal | undefined,
  done: (complete: boolean) => void,
): ReadableStream<Uint8Array> {
  const decoder = framing.kind === "chunked" ? new ChunkedDecoder(reader) : undefined;
  let left = framing.kind === "length" ? framing.length : Infinity;
  let finished = false;
  const finish = (complete = false) => {
    if (finished) return;
    finished = true;
    signal?.removeEventListener("abort", onAbort);
    done(complete);
  };
  let controllerRef: ReadableStreamDefaultController<Uint8Array> | undefined;
  const onAbort = () => {
    const controller = controllerRef;
    finish();
    controller?.error(signal!.reason);
  };
  signal?.addEventListener("abort", onAbort, { once: true });
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controllerRef = controller;
    },
    async pull(controller) {
      try {
        for (;;) {
          if (finished) return;
          if (decoder !== undefined) {
            const piece = await decoder.next();
            if (piece === null) {
              finish(true);
              controller.close();
            } else {
              controller.enqueue(piece.slice());
            }
            return;
          }
          if (reader.buffer.length > 0) {
            const piece = reader.take(left);
            left -= piece.length;
            controller.enqueue(piece.slice());
            if (left === 0) {
              finish(true);
              controller.close();
            }
            return;
          }
          if (reader.done) {
            if (framing.kind === "close" && reader.error === undefined) {
              finish();
              controller.close();
              return;
            }
            throw new Error("Connection closed before the HTTP response body was complete", {
              cause: reader.error,
            });
          }
          await reader.wait();
        }
      } catch (error) {
        if (finished) return;
        finish();
        controller.error(
          error instanceof Error && error.name === "HttpError"
            ? new Error(`Malformed HTTP response body: ${error.message}`, { cause: error })
            : error,
        );
      }
    },
    cancel() {
      finish();
    },
  }, { highWaterMark: 0 });
}

/**
 * The devlxd API served to guest processes on `/dev/lxd/sock`:
 * `createGuestDevlxdApp()` is the Hono app (every route testable with
 * `app.request()`), `GuestDevlxdServer` serves it on a fresh unix socket.
 *
 * Each request that needs the host is proxied through the agent's `HostLink`
 * (`host.fetch`: one request, on a kept-alive or a new connection), the LXD
 * envelope is removed and the answer given in devlxd form: JSON, raw text for values, and plain-text
 * errors with the status as LXD's agent gives them (`http.Error`: text and a
 * newline). An unreachable host is a 503 with one sentence. Streams (events,
 * image export) pass through without buffering; `/1.0/events` is also
 * served as a WebSocket when the client asks (as LXD's devlxd does).
 *
 * Owns (GuestDevlxdServer): the unix socket, the directory created for it, and the
 * connections accepted on it. Permissions: `--allow-ffi` (the socket, its
 * mode, its directory and its removal all go through `listenUnix`).
 * @module
 */

import { Hono } from "hono";
import type { Context } from "hono";
import { isGuestVisibleKey } from "../shared/api.ts";
import {
  CLOSE_GOING_AWAY,
  CLOSE_NORMAL,
  HttpError,
  type HttpHandler,
  HttpServer,
  isWebSocketRequest,
  MtlsError,
  unwrapEnvelope,
  upgradeWebSocket,
} from "../shared/http/mod.ts";
import { LineBuffer } from "../shared/line_buffer.ts";
import { type Listener, listenUnix, SocketError } from "../shared/vsock/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import type { EventRelay } from "./event_relay.ts";
import { BodyTooLargeError, readBody } from "./read_body.ts";
import type { HostLink } from "./host_link.ts";

export interface GuestDevlxdAppOptions {
  /** The way to the host's devlxd API (the agent's `HostLink`; tests pass any `fetch`). */
  host: Pick<HostLink, "fetch">;
  events: EventRelay;
  /** Called with the state a guest PATCHes to `/1.0` (before it is forwarded). */
  onReady?: (state: "Ready" | "Started") => void;
  /**
   * Largest request body accepted, in bytes.
   * @default {65536}
   */
  maxBodySize?: number;
  /**
   * Largest non-streamed host answer accepted, in bytes.
   * @default {8388608}
   */
  maxResponseSize?: number;
  /** Ends open streams (events, exports) when aborted: the server is stopping. */
  signal?: AbortSignal;
  logger?: Logger;
}

/** LXD's `http.Error`: plain text and a newline. */
export function textError(status: number, message: string): Response {
  return new Response(message + "\n", {
    status,
    headers: {
      "Content-Type": "text/plain; charset=utf-8",
      "X-Content-Type-Options": "nosniff",
    },
  });
}

/** JSON and a newline, as LXD's agent answers (Go's `json.Encoder`). */
function json(value: unknown): Response {
  return new Response(JSON.stringify(value) + "\n", {
    headers: { "Content-Type": "application/json" },
  });
}

function raw(text: string): Response {
  return new Response(text, { headers: { "Content-Type": "application/octet-stream" } });
}

/** Passes `stream` through until `signal` aborts, then ends it. */
function untilAborted(
  stream: ReadableStream<Uint8Array>,
  signal: AbortSignal | undefined,
): ReadableStream<Uint8Array> {
  if (signal === undefined) return stream;
  const reader = stream.getReader();
  let onAbort: (() => void) | undefined;
  return new ReadableStream<Uint8Array>({
    start(controller) {
      onAbort = () => {
        reader.cancel().catch(() => {});
        try {
          controller.close();
        } catch {
          // already closed
        }
      };
      if (signal.aborted) onAbort();
      else signal.addEventListener("abort", onAbort, { once: true });
    },
    async pull(controller) {
      try {
        const { value, done } = await reader.read();
        if (done) {
          signal.removeEventListener("abort", onAbort!);
          controller.close();
        } else controller.enqueue(value);
      } catch (error) {
        signal.removeEventListener("abort", onAbort!);
        if (!signal.aborted) controller.error(error);
      }
    },
    cancel(reason) {
      signal.removeEventListener("abort", onAbort!);
      return reader.cancel(reason);
    },
  });
}

const decoder = new TextDecoder();

/** The devlxd Hono app. */
export function createGuestDevlxdApp(options: GuestDevlxdAppOptions): Hono {
  const logger = options.logger ?? silentLogger;
  const maxBody = options.maxBodySize ?? 64 * 1024;
  const maxResponse = options.maxResponseSize ?? 8 * 1024 * 1024;
  const app = new Hono();

  /** Asks the host; returns the unwrapped metadata or throws HttpError. */
  async function ask(method: string, path: string, body?: unknown): Promise<unknown> {
    const response = await options.host.fetch(
      new Request(`http://lxd${path}`, {
        method,
        body: body === undefined ? undefined : JSON.stringify(body),
        headers: body === undefined ? undefined : { "Content-Type": "application/json" },
      }),
    );
    return await unwrapAnswer(response);
  }

  async function unwrapAnswer(response: Response): Promise<unknown> {
    let text: string;
    try {
      text = decoder.decode(await readBody(response.body, maxResponse));
    } catch (error) {
      if (error instanceof BodyTooLargeError) {
        throw new HttpError(502, "The host's answer is too large");
      }
      throw new MtlsError(
        `The host closed the connection in the middle of its answer: ${(error as Error).message}.`,
        "closed",
        { cause: error },
      );
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new HttpError(
        502,
        `The host sent an answer that is not JSON (status ${response.status})`,
      );
    }
    const unwrapped = unwrapEnvelope(parsed);
    if (!unwrapped.ok) throw new HttpError(unwrapped.status, unwrapped.error);
    if (!response.ok) {
      throw new HttpError(response.status, `The host answered ${response.status}`);
    }
    return unwrapped.metadata;
  }

  function methods(c: Context, allowed: string[]): void {
    if (!allowed.includes(c.req.method)) {
      throw new HttpError(405, `method ${JSON.stringify(c.req.method)} not allowed`);
    }
  }

  app.use(async (c, next) => {
    const length = c.req.header("content-length");
    if (length !== undefined && Number(length) > maxBody) {
      throw new HttpError(413, "Request body too large");
    }
    await next();
  });

  app.all("/", (c) => {
    methods(c, ["GET"]);
    return json(["/1.0"]);
  });

  app.all("/1.0", async (c) => {
    methods(c, ["GET", "PATCH"]);
    if (c.req.method === "GET") return json(await ask("GET", "/1.0"));
    const bytes = await readBody(c.req.raw.body, maxBody);
    let body: unknown;
    try {
      body = JSON.parse(decoder.decode(bytes));
    } catch {
      throw new HttpError(400, "Invalid request body: not JSON");
    }
    const state = (body as { state?: unknown })?.state;
    if (state !== "Ready" && state !== "Started") {
      throw new HttpError(400, `Invalid state ${JSON.stringify(state ?? null)}`);
    }
    options.onReady?.(state);
    const answer = await ask("PATCH", "/1.0", { state });
    // LXD 5.0.2 has no ready state: its devlxd answers PATCH like GET, and its
    // agent hands that /1.0 JSON to the guest; so do we. Hosts that keep the
    // state (ours, later LXD) answer with no metadata: an empty body, as before.
    if (answer !== null && typeof answer === "object" && "api_version" in answer) {
      return json(answer);
    }
    return new Response("", { headers: { "Content-Type": "application/octet-stream" } });
  });

  app.all("/1.0/config", async (c) => {
    methods(c, ["GET"]);
    const keys = await ask("GET", "/1.0/config");
    const list = Array.isArray(keys) ? keys.filter((k): k is string => typeof k === "string") : [];
    return json(list.filter((k) => isGuestVisibleKey(k.replace(/^\/1\.0\/config\//, ""))));
  });

  app.all("/1.0/config/:key{.+}", async (c) => {
    methods(c, ["GET"]);
    const key = c.req.param("key");
    if (!isGuestVisibleKey(key)) throw new HttpError(403, "not authorized");
    const value = await ask("GET", `/1.0/config/${encodeURIComponent(key)}`);
    return raw(typeof value === "string" ? value : JSON.stringify(value));
  });

  app.all("/1.0/meta-data", async (c) => {
    methods(c, ["GET"]);
    const value = await ask("GET", "/1.0/meta-data");
    return raw(typeof value === "string" ? value : JSON.stringify(value));
  });

  app.all("/1.0/devices", async (c) => {
    methods(c, ["GET"]);
    return json(await ask("GET", "/1.0/devices"));
  });

  app.all("/1.0/events", (c) => {
    methods(c, ["GET"]);
    const typeParam = c.req.query("type");
    const types = typeParam === undefined || typeParam === ""
      ? undefined
      : typeParam.split(",").map((t) => t.trim()).filter((t) => t !== "");
    if (isWebSocketRequest(c.req.raw)) {
      try {
        return websocketEvents(c.req.raw, () => options.events.subscribe(types), options.signal);
      } catch (error) {
        // Not a valid handshake (LXD's gorilla upgrader answers 400 too).
        if (error instanceof TypeError) throw new HttpError(400, error.message);
        throw error;
      }
    }
    return new Response(untilAborted(options.events.subscribe(types), options.signal), {
      headers: { "Content-Type": "application/json" },
    });
  });

  app.all("/1.0/images/:fingerprint/export", async (c) => {
    methods(c, ["GET"]);
    const fingerprint = c.req.param("fingerprint");
    if (!/^[0-9a-fA-F]{1,64}$/.test(fingerprint)) throw new HttpError(400, "Invalid fingerprint");
    const response = await options.host.fetch(
      new Request(`http://lxd/1.0/images/${fingerprint}/export`),
    );
    if (!response.ok || response.body === null) {
      await unwrapAnswer(response);
      throw new HttpError(502, `The host answered ${response.status}`);
    }
    const headers = new Headers();
    for (const name of ["content-type", "content-length", "content-disposition"]) {
      const value = response.headers.get(name);
      if (value !== null) headers.set(name, value);
    }
    return new Response(untilAborted(response.body, options.signal), { headers });
  });

  app.notFound(() => textError(404, "not found"));

  app.onError((error) => {
    if (error instanceof HttpError) return textError(error.status, error.message);
    if (error instanceof BodyTooLargeError) return textError(413, "Request body too large");
    if (error instanceof MtlsError) {
      logger.warn("host unreachable", { error: error.message });
      return textError(503, error.message);
    }
    logger.error("devlxd request failed", { error });
    return textError(500, `Internal error: ${(error as Error).message}`);
  });
  return app;
}

/**
 * `/1.0/events` as a WebSocket: one text message per event line. The
 * subscription starts once the connection is upgraded and ends with it; when
 * `signal` aborts (the server stops) the client gets close code 1001.
 */
function websocketEvents(
  request: Request,
  subscribe: () => ReadableStream<Uint8Array>,
  signal: AbortSignal | undefined,
): Response {
  return upgradeWebSocket(request, (ws) => {
    const reader = subscribe().getReader();
    const stop = () => {
      reader.cancel().catch(() => {});
      ws.close(CLOSE_GOING_AWAY);
    };
    if (signal?.aborted) stop();
    else signal?.addEventListener("abort", stop, { once: true });
    ws.closed.then(() => {
      signal?.removeEventListener("abort", stop);
      reader.cancel().catch(() => {});
    });
    (async () => {
      const lines = new LineBuffer(Infinity);
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          for (const line of lines.push(value)) {
            if (!await ws.send(line)) return;
          }
        }
      } catch {
        // the subscriber was dropped or the socket closed
      }
      ws.close(CLOSE_NORMAL);
    })();
  });
}

export interface GuestDevlxdServerOptions {
  /**
   * File mode of the socket.
   * @default {0o600}
   */
  mode?: number;
  logger?: Logger;
}

/** How long stop() lets open answers finish before it cuts their connections. */
const STOP_GRACE = 2000;

/**
 * Serves a handler on a fresh unix socket (stale socket removed, mode set,
 * parent directory created), with an `HttpServer`. Everything on the socket
 * path goes through FFI (`listenUnix`), so `/dev/lxd/sock` works with the
 * agent's explicit permissions (Deno refuses `/dev` paths to its own file
 * system API without `--allow-all`).
 */
export class GuestDevlxdServer {
  #path: string;
  #options: GuestDevlxdServerOptions;
  #server: HttpServer | undefined;

  constructor(path: string, options: GuestDevlxdServerOptions = {}) {
    this.#path = path;
    this.#options = options;
  }

  get path(): string {
    return this.#path;
  }

  get serving(): boolean {
    return this.#server !== undefined;
  }

  /**
   * Starts serving `makeHandler(signal)`; `signal` aborts when the server stops,
   * so the handler can end its open streams. A no-op when already serving.
   */
  start(makeHandler: (signal: AbortSignal) => HttpHandler): Promise<void> {
    if (this.#server !== undefined) return Promise.resolve();
    let listener: Listener;
    try {
      listener = listenUnix(this.#path, {
        replace: true,
        mode: this.#options.mode ?? 0o600,
        createParent: true,
      });
    } catch (error) {
      if (error instanceof SocketError && error.code === "EADDRINUSE") {
        return Promise.reject(
          new Error(
            `Cannot serve devlxd on ${this.#path}: another process serves it, or a file that is not a socket is there`,
            { cause: error },
          ),
        );
      }
      return Promise.reject(error);
    }
    const logger = this.#options.logger ?? silentLogger;
    const server = new HttpServer({
      handler: async (request) => {
        try {
          return await handler(request);
        } catch (error) {
          logger.error("devlxd handler failed", { error });
          return textError(500, "Internal error");
        }
      },
      label: "devlxd",
      logger,
    });
    // Made once the server (its signal) exists, before the first request.
    const handler = makeHandler(server.signal);
    server.serve(listener);
    this.#server = server;
    logger.info("serving devlxd", { socket: this.#path });
    return Promise.resolve();
  }

  /**
   * Stops serving: closes the listener (the socket file, and the directory
   * created for it, are removed), ends open streams through the handler's
   * signal, closes idle connections at once and the others once their answer
   * is sent (at most 2 s later). Idempotent.
   */
  async stop(): Promise<void> {
    const server = this.#server;
    if (server === undefined) return;
    this.#server = undefined;
    await server.shutdown(STOP_GRACE);
    this.#options.logger?.info("stopped serving devlxd", { socket: this.#path });
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

/**
 * The devlxd API served to guest processes on `/dev/lxd/sock`:
 * `createDevlxdApp()` is the Hono app (every route testable with
 * `app.request()`), `DevlxdServer` serves it on a fresh unix socket.
 *
 * Each request that needs the host is proxied through one `HostFetch` call
 * (one dial, one TLS handshake, one request), the LXD envelope is removed and
 * the answer given in devlxd form: JSON, raw text for values, and plain-text
 * errors with the status as LXD's agent gives them (`http.Error`: text and a
 * newline). An unreachable host is a 503 with one sentence. Streams (events,
 * image export) pass through without buffering.
 *
 * Owns (DevlxdServer): the unix socket and its HTTP server.
 * Permissions: `--allow-net=unix:<socket>`, read/write on its directory.
 * @module
 */

import { Hono } from "hono";
import type { Context } from "hono";
import { isGuestVisibleKey } from "../shared/api.ts";
import { unwrapEnvelope } from "../shared/http/envelope.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import type { EventRelay } from "./event_relay.ts";
import { BodyTooLargeError, readBody } from "./read_body.ts";
import { type HostFetch, HostUnreachableError } from "./host_fetch.ts";

export interface DevlxdAppOptions {
  fetchHost: HostFetch;
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

/** A devlxd error answer: the status and LXD's plain-text message. */
export class DevlxdError extends Error {
  override name = "DevlxdError";
  constructor(readonly status: number, message: string) {
    super(message);
  }
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

function json(value: unknown): Response {
  return new Response(JSON.stringify(value), {
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
export function createDevlxdApp(options: DevlxdAppOptions): Hono {
  const logger = options.logger ?? silentLogger;
  const maxBody = options.maxBodySize ?? 64 * 1024;
  const maxResponse = options.maxResponseSize ?? 8 * 1024 * 1024;
  const app = new Hono();

  /** Asks the host; returns the unwrapped metadata or throws DevlxdError. */
  async function ask(method: string, path: string, body?: unknown): Promise<unknown> {
    const response = await options.fetchHost(
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
        throw new DevlxdError(502, "The host's answer is too large");
      }
      throw new HostUnreachableError(
        `The host closed the connection in the middle of its answer: ${(error as Error).message}.`,
        "closed",
        { cause: error },
      );
    }
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      throw new DevlxdError(
        502,
        `The host sent an answer that is not JSON (status ${response.status})`,
      );
    }
    const unwrapped = unwrapEnvelope(parsed);
    if (!unwrapped.ok) throw new DevlxdError(unwrapped.status, unwrapped.error);
    if (!response.ok) {
      throw new DevlxdError(response.status, `The host answered ${response.status}`);
    }
    return unwrapped.metadata;
  }

  function methods(c: Context, allowed: string[]): void {
    if (!allowed.includes(c.req.method)) {
      throw new DevlxdError(405, `method ${JSON.stringify(c.req.method)} not allowed`);
    }
  }

  app.use(async (c, next) => {
    const length = c.req.header("content-length");
    if (length !== undefined && Number(length) > maxBody) {
      throw new DevlxdError(413, "Request body too large");
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
      throw new DevlxdError(400, "Invalid request body: not JSON");
    }
    const state = (body as { state?: unknown })?.state;
    if (state !== "Ready" && state !== "Started") {
      throw new DevlxdError(400, `Invalid state ${JSON.stringify(state ?? null)}`);
    }
    options.onReady?.(state);
    await ask("PATCH", "/1.0", { state });
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
    if (!isGuestVisibleKey(key)) throw new DevlxdError(403, "not authorized");
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
    if (c.req.header("upgrade")?.toLowerCase() === "websocket") {
      return websocketEvents(c.req.raw, options.events.subscribe(types), options.signal);
    }
    return new Response(untilAborted(options.events.subscribe(types), options.signal), {
      headers: { "Content-Type": "application/json" },
    });
  });

  app.all("/1.0/images/:fingerprint/export", async (c) => {
    methods(c, ["GET"]);
    const fingerprint = c.req.param("fingerprint");
    if (!/^[0-9a-fA-F]{1,64}$/.test(fingerprint)) throw new DevlxdError(400, "Invalid fingerprint");
    const response = await options.fetchHost(
      new Request(`http://lxd/1.0/images/${fingerprint}/export`),
    );
    if (!response.ok || response.body === null) {
      await unwrapAnswer(response);
      throw new DevlxdError(502, `The host answered ${response.status}`);
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
    if (error instanceof DevlxdError) return textError(error.status, error.message);
    if (error instanceof BodyTooLargeError) return textError(413, "Request body too large");
    if (error instanceof HostUnreachableError) {
      logger.warn("host unreachable", { error: error.message });
      return textError(503, error.message);
    }
    logger.error("devlxd request failed", { error });
    return textError(500, `Internal error: ${(error as Error).message}`);
  });
  return app;
}

function websocketEvents(
  request: Request,
  stream: ReadableStream<Uint8Array>,
  signal: AbortSignal | undefined,
): Response {
  const { socket, response } = Deno.upgradeWebSocket(request);
  const reader = stream.getReader();
  const stop = () => {
    reader.cancel().catch(() => {});
    if (socket.readyState === WebSocket.OPEN) socket.close(1001);
  };
  signal?.addEventListener("abort", stop, { once: true });
  socket.onclose = () => {
    signal?.removeEventListener("abort", stop);
    reader.cancel().catch(() => {});
  };
  socket.onopen = async () => {
    let buffered = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value);
        for (let i = buffered.indexOf("\n"); i !== -1; i = buffered.indexOf("\n")) {
          if (socket.readyState !== WebSocket.OPEN) return;
          socket.send(buffered.slice(0, i));
          buffered = buffered.slice(i + 1);
        }
      }
    } catch {
      // the subscriber was dropped or the socket closed
    }
    if (socket.readyState === WebSocket.OPEN) socket.close(1000);
  };
  return response;
}

export interface DevlxdServerOptions {
  /**
   * File mode of the socket.
   * @default {0o600}
   */
  mode?: number;
  logger?: Logger;
}

/** Serves a handler on a fresh unix socket (stale socket removed, mode set). */
export class DevlxdServer {
  #path: string;
  #options: DevlxdServerOptions;
  #server: Deno.HttpServer | undefined;
  #abort: AbortController | undefined;

  constructor(path: string, options: DevlxdServerOptions = {}) {
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
  async start(makeHandler: (signal: AbortSignal) => Deno.ServeHandler): Promise<void> {
    if (this.#server !== undefined) return;
    const dir = this.#path.slice(0, this.#path.lastIndexOf("/")) || "/";
    await Deno.mkdir(dir, { recursive: true, mode: 0o755 });
    try {
      const info = await Deno.lstat(this.#path);
      if (!info.isSocket) {
        throw new Error(
          `Cannot serve devlxd on ${this.#path}: a file that is not a socket is there`,
        );
      }
      await Deno.remove(this.#path);
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
    const abort = new AbortController();
    const listening = Promise.withResolvers<void>();
    const server = Deno.serve({
      path: this.#path,
      onListen: () => listening.resolve(),
      onError: (error) => {
        this.#options.logger?.error("devlxd handler failed", { error });
        return textError(500, "Internal error");
      },
    }, makeHandler(abort.signal));
    await listening.promise;
    await Deno.chmod(this.#path, this.#options.mode ?? 0o600);
    this.#server = server;
    this.#abort = abort;
    this.#options.logger?.info("serving devlxd", { socket: this.#path });
  }

  /** Stops serving and removes the socket. Idempotent. */
  async stop(): Promise<void> {
    const server = this.#server;
    if (server === undefined) return;
    this.#server = undefined;
    this.#abort?.abort();
    await server.shutdown();
    this.#options.logger?.info("stopped serving devlxd", { socket: this.#path });
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.stop();
  }
}

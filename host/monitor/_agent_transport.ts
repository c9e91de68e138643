/**
 * Mutual TLS (`shared/tls` `connectTls`, pinning the agent's exact
 * certificate) and one HTTP/1.1 request over an already-connected socket, for
 * the announcer. `httpRequest` is a stand-in with the shape of `shared/http`
 * `httpRequest`, built on `node:http`; swap it for that once it lands.
 *
 * Owns nothing beyond the sockets handed to it; needs no permissions.
 * @module
 */

import { Buffer } from "node:buffer";
import http from "node:http";
import type { Duplex } from "node:stream";

export { connectTls } from "../../shared/tls/mod.ts";

export interface RequestOptions {
  /** Bound on the whole exchange (headers and body), in ms. @default 10000 */
  timeout?: number;
  signal?: AbortSignal;
}

/** Sends `request` over `socket` (one request, one connection); the body is read fully. */
export async function httpRequest(
  socket: Duplex,
  request: Request,
  options: RequestOptions = {},
): Promise<Response> {
  const url = new URL(request.url);
  const body = request.body === null ? undefined : new Uint8Array(await request.arrayBuffer());
  const headers: Record<string, string> = { host: url.host, connection: "close" };
  request.headers.forEach((value, key) => headers[key] = value);
  if (body !== undefined) headers["content-length"] = String(body.length);
  const timeout = options.timeout ?? 10_000;
  return await new Promise<Response>((resolve, reject) => {
    let settled = false;
    const finish = (f: () => void) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
      f();
    };
    const req = http.request({
      method: request.method,
      path: url.pathname + url.search,
      headers,
      createConnection: () => socket,
    });
    const fail = (error: Error) =>
      finish(() => {
        req.destroy();
        socket.destroy();
        reject(error);
      });
    const onAbort = () => fail(options.signal!.reason);
    const timer = setTimeout(
      () => fail(new Deno.errors.TimedOut(`HTTP ${request.method} ${url.pathname} timed out`)),
      timeout,
    );
    options.signal?.addEventListener("abort", onAbort, { once: true });
    req.on("error", fail);
    req.on("response", (res) => {
      const chunks: Uint8Array[] = [];
      res.on("data", (chunk: Uint8Array) => chunks.push(chunk));
      res.on("error", fail);
      res.on("end", () =>
        finish(() => {
          const responseHeaders = new Headers();
          for (const [key, value] of Object.entries(res.headers)) {
            if (typeof value === "string") responseHeaders.set(key, value);
          }
          resolve(
            new Response(res.statusCode === 204 ? null : Buffer.concat(chunks), {
              status: res.statusCode ?? 500,
              headers: responseHeaders,
            }),
          );
          socket.destroy();
        }));
    });
    req.end(body);
  });
}

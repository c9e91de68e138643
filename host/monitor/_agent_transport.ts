/**
 * Mutual TLS (pinning the agent's exact certificate) and one HTTP/1.1 request
 * over an already-connected socket, for the announcer. A stand-in with the
 * shapes of `shared/tls` `connectTls` and `shared/http` `httpRequest`, built
 * on `node:tls` and `node:http`; swap its body for those once they land.
 *
 * Owns nothing beyond the sockets handed to it; needs no permissions.
 * @module
 */

import { Buffer } from "node:buffer";
import { timingSafeEqual } from "node:crypto";
import http from "node:http";
import type { Duplex } from "node:stream";
import tls from "node:tls";

/** The peer presented another certificate than the pinned one. */
export class PinnedCertificateError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "PinnedCertificateError";
  }
}

/** DER bytes of the first certificate in a PEM text. */
export function pemToDer(pem: string): Uint8Array {
  const m = /-----BEGIN CERTIFICATE-----([\s\S]+?)-----END CERTIFICATE-----/.exec(pem);
  if (m === null) throw new TypeError("Not a PEM certificate");
  return Uint8Array.from(atob(m[1].replace(/\s+/g, "")), (c) => c.charCodeAt(0));
}

export interface SecureOptions {
  cert: string;
  key: string;
  /** PEM of the only certificate the peer may present. */
  pinned: string;
  /** @default 10000 */
  handshakeTimeout?: number;
  signal?: AbortSignal;
}

/** TLS 1.3 client over `socket`, presenting `cert`, accepting only `pinned`. */
export function connectTls(socket: Duplex, options: SecureOptions): Promise<tls.TLSSocket> {
  const pinned = Buffer.from(pemToDer(options.pinned));
  return new Promise((resolve, reject) => {
    const s = tls.connect({
      socket,
      cert: options.cert,
      key: options.key,
      rejectUnauthorized: false,
      minVersion: "TLSv1.3",
      servername: "agent",
    });
    const fail = (error: Error) => {
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
      s.destroy();
      reject(error);
    };
    const onAbort = () => fail(options.signal!.reason);
    const timeout = options.handshakeTimeout ?? 10_000;
    const timer = setTimeout(
      () => fail(new Deno.errors.TimedOut(`TLS handshake timed out after ${timeout} ms`)),
      timeout,
    );
    options.signal?.addEventListener("abort", onAbort, { once: true });
    s.once("error", fail);
    s.once("secureConnect", () => {
      const peer = s.getPeerCertificate(true);
      const raw = peer?.raw;
      if (!raw || raw.length !== pinned.length || !timingSafeEqual(raw, pinned)) {
        return fail(new PinnedCertificateError("Agent presented an unexpected certificate"));
      }
      const now = Date.now();
      if (now < Date.parse(peer.valid_from) || now > Date.parse(peer.valid_to)) {
        return fail(new PinnedCertificateError("Agent certificate is outside its validity dates"));
      }
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
      s.removeListener("error", fail);
      resolve(s);
    });
  });
}

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

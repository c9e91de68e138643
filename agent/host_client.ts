/**
 * `hostRequest()`: one request to the host's devlxd API — transport connect
 * to the host's (CID, port), TLS 1.3 presenting the agent's certificate and
 * pinning the host's exact certificate from the connection info, one
 * HTTP/1.1 request; the connection closes once the response body is read or
 * cancelled, so streams pass through. With a `HostPool`, a connection whose
 * response completed is kept for the next request (HTTP/1.1 keep-alive) for
 * the pool's idle window, and the next request takes it instead of dialling;
 * when the host closed it meanwhile without answering a byte, the request is
 * sent once more on a new connection (never when any answer came). Every
 * failure to get an answer becomes a `HostUnreachableError` with one clear
 * sentence; every phase is bounded.
 * `probeHost()` is the cheap liveness check: a plain transport connect.
 * Permissions: `--allow-ffi` (vsock), read/write on unix paths (hybrid).
 * @module
 */

import type { Duplex } from "node:stream";
import type { ConnectionInfo } from "../shared/api.ts";
import { httpRequest, NoResponseError } from "../shared/http/mod.ts";
import { CertificateError, connectTls } from "../shared/tls/mutual_tls.ts";
import type { Slots } from "../shared/slots.ts";
import { SocketError, type Transport } from "../shared/vsock/mod.ts";
import { HostUnreachableError, type UnreachableReason } from "./host_fetch.ts";
import type { HostPool } from "./host_pool.ts";

export interface HostRequestOptions {
  transport: Transport;
  /** The agent's certificate (PEM). */
  cert: string;
  /** The agent's key (PEM). */
  key: string;
  /**
   * Bound on the transport connect, in ms.
   * @default {3000}
   */
  connectTimeout?: number;
  /**
   * Bound on the TLS handshake, in ms.
   * @default {3000}
   */
  handshakeTimeout?: number;
  /**
   * Bound on waiting for the response head, in ms; `Infinity` waits until
   * the head, a close or `signal` (streams whose head comes with their first
   * item).
   * @default {10000}
   */
  responseTimeout?: number;
  /**
   * Bounds this caller's open connections to the host: the request waits for a
   * slot, held until its connection closes (response body read or cancelled).
   */
  slots?: Slots;
  /**
   * Bound on waiting for a slot, in ms; then a `busy` HostUnreachableError.
   * @default {10000}
   */
  queueTimeout?: number;
  /** Keeps completed connections for the next request (keep-alive); none: one per request. */
  pool?: HostPool;
  signal?: AbortSignal;
}

function where(info: Pick<ConnectionInfo, "cid" | "port">): string {
  return `${info.cid}:${info.port}`;
}

/** Turns a dial, handshake or request failure into one sentence and a reason. */
export function classifyFailure(
  error: unknown,
  phase: "connect" | "tls" | "request",
  info: Pick<ConnectionInfo, "cid" | "port">,
): HostUnreachableError {
  if (error instanceof HostUnreachableError) return error;
  const at = where(info);
  let reason: UnreachableReason = "error";
  let message: string;
  const code = (error as { code?: unknown })?.code;
  if (error instanceof SocketError || (phase === "connect" && typeof code === "string")) {
    if (code === "ECONNREFUSED" || code === "ENOENT" || code === "ECONNRESET") {
      reason = "refused";
      message = `The host at vsock ${at} refused the connection (${code}).`;
    } else if (code === "ETIMEDOUT") {
      reason = "timeout";
      message = `The host at vsock ${at} did not accept the connection in time.`;
    } else {
      message = `Cannot connect to the host at vsock ${at}: ${(error as Error).message}.`;
    }
  } else if (error instanceof CertificateError) {
    reason = "tls";
    message = `The host at vsock ${at} presented a certificate other than the pinned one (${
      (error as Error).message
    }).`;
  } else if (phase === "tls") {
    reason = /time/i.test(String((error as Error)?.message)) ? "timeout" : "tls";
    message = `The TLS handshake with the host at vsock ${at} failed: ${
      (error as Error)?.message ?? String(error)
    }.`;
  } else if ((error as Error)?.name === "AbortError") {
    reason = "error";
    message = `The request to the host at vsock ${at} was cancelled.`;
  } else if (/time/i.test(String((error as Error)?.message))) {
    reason = "timeout";
    message = `The host at vsock ${at} did not answer in time.`;
  } else {
    reason = "closed";
    message = `The host at vsock ${at} closed the connection before answering: ${
      (error as Error)?.message ?? String(error)
    }.`;
  }
  return new HostUnreachableError(message.replace(/\.\.$/, "."), reason, {
    cause: error,
    phase,
  });
}

/**
 * Sends `request` to the host of `info`: over an idle pooled connection when
 * there is one, else over a new connection.
 */
export async function hostRequest(
  info: ConnectionInfo,
  request: Request,
  options: HostRequestOptions,
): Promise<Response> {
  const pooled = options.pool?.take(info);
  if (pooled !== undefined) {
    // Kept for a second attempt: the first one consumes the body.
    const again = request.body === null ? request : request.clone();
    try {
      return await exchange(pooled, info, request, options);
    } catch (error) {
      // The host closed the idle connection before answering anything: try a new one.
      if (!(error instanceof NoResponseError) || options.signal?.aborted) {
        throw classifyFailure(error, "request", info);
      }
      request = again;
    }
  }
  return await newConnection(info, request, options);
}

/** One request on `socket` (TLS, open); a completed connection goes back to the pool. */
function exchange(
  socket: Duplex,
  info: ConnectionInfo,
  request: Request,
  options: HostRequestOptions,
): Promise<Response> {
  const pool = options.pool;
  return httpRequest(socket, request, {
    timeout: options.responseTimeout ?? 10_000,
    signal: options.signal,
    reuse: pool === undefined || pool.idleTimeout === 0
      ? undefined
      : (done) => pool.give(info, done, options.slots),
  });
}

/** Dials, handshakes and sends `request` on a new connection, within a slot. */
async function newConnection(
  info: ConnectionInfo,
  request: Request,
  options: HostRequestOptions,
): Promise<Response> {
  const slots = options.slots;
  if (slots !== undefined) {
    const queueTimeout = options.queueTimeout ?? 10_000;
    const waited = new AbortController();
    const timer = setTimeout(() => waited.abort(), queueTimeout);
    try {
      await slots.acquire(
        options.signal === undefined
          ? waited.signal
          : AbortSignal.any([options.signal, waited.signal]),
      );
    } catch (error) {
      if (!waited.signal.aborted || options.signal?.aborted) {
        throw classifyFailure(error, "request", info);
      }
      throw new HostUnreachableError(
        `Too many requests to the host at vsock ${where(info)} are in flight: this one waited ${
          queueTimeout / 1000
        } s for a connection.`,
        "busy",
        { cause: error, phase: "queue" },
      );
    } finally {
      clearTimeout(timer);
    }
  }
  let released = false;
  const release = () => {
    if (!released && slots !== undefined) slots.release();
    released = true;
  };
  let socket: Duplex;
  try {
    socket = await options.transport.connect(info.cid, info.port, {
      timeout: options.connectTimeout ?? 3000,
      signal: options.signal,
    });
  } catch (error) {
    release();
    throw classifyFailure(error, "connect", info);
  }
  socket.once("close", release);
  // Late errors (a reset after the answer) must not become uncaught exceptions.
  socket.on("error", () => {});
  let tlsSocket: Duplex;
  try {
    tlsSocket = await connectTls(socket, {
      cert: options.cert,
      key: options.key,
      pinned: info.certificate,
      handshakeTimeout: options.handshakeTimeout ?? 3000,
      signal: options.signal,
    });
  } catch (error) {
    socket.destroy();
    throw classifyFailure(error, "tls", info);
  }
  tlsSocket.on("error", () => {});
  // Closing the TLS layer (the body was read or cancelled) closes the connection.
  tlsSocket.once("close", () => socket.destroy());
  try {
    return await exchange(tlsSocket, info, request, options);
  } catch (error) {
    tlsSocket.destroy();
    socket.destroy();
    throw classifyFailure(error, "request", info);
  }
}

/** Plain transport connect to the host (no TLS): resolves if something listens. */
export async function probeHost(
  info: Pick<ConnectionInfo, "cid" | "port">,
  transport: Transport,
  options: { timeout?: number; signal?: AbortSignal } = {},
): Promise<void> {
  let socket: Duplex;
  try {
    socket = await transport.connect(info.cid, info.port, {
      timeout: options.timeout ?? 2000,
      signal: options.signal,
    });
  } catch (error) {
    throw classifyFailure(error, "connect", info);
  }
  socket.destroy();
}

/**
 * The one mutual-TLS HTTP client, both ways over vsock (as LXD's `lxd/vsock`
 * client): the host to an agent's API (announce, events, probes, exec,
 * files) and the agent to the host's devlxd API.
 *
 * - {@linkcode dialMtls}: connect over the peer's transport (bounded), TLS
 *   presenting our certificate and pinning the peer's exact one (bounded).
 * - {@linkcode probePeer}: a plain connect, to tell whether anything listens.
 * - {@linkcode mtlsRequest}: one HTTP/1.1 request over such a connection;
 *   the connection closes once the response body is read or cancelled, so
 *   streams pass through. With a {@linkcode ConnectionPool}, a connection
 *   whose response completed is kept for the next request to the same peer
 *   (keep-alive), and when the peer closed it meanwhile without answering a
 *   byte, the request is sent once more on a new connection (never when any
 *   answer came). With `slots`, the caller's open connections are bounded.
 * - {@linkcode MtlsError}: every failure to get an answer, with a
 *   {@linkcode MtlsFailure} reason, the {@linkcode MtlsPhase} it stopped in
 *   and one clear sentence naming the peer.
 *
 * Owns each request's connection (or hands it to the pool). Needs what the
 * peer's `connect` needs.
 * @module
 */

import type { Duplex } from "node:stream";
import { connectTls } from "../tls/mutual_tls.ts";
import type { Slots } from "../slots.ts";
import type { ConnectionPool } from "./connection_pool.ts";
import { httpRequest, NoResponseError } from "./http_request.ts";

/**
 * Why a request got no answer, or an answer that is an error:
 * - `no-host`: the peer's address is not known (the agent before any connection info);
 * - `busy`: the request waited too long for one of the caller's connection slots;
 * - `refused`: nothing listens at the peer's address;
 * - `unreachable`: the connect failed otherwise;
 * - `timeout`: the connect, the handshake or the answer did not come in time;
 * - `tls`: the handshake failed, or the peer is not the pinned certificate;
 * - `closed`: the peer closed the connection before (or while) answering;
 * - `cancelled`: the caller aborted;
 * - `status`: the peer answered with an error status (see `status`).
 */
export type MtlsFailure =
  | "no-host"
  | "busy"
  | "refused"
  | "unreachable"
  | "timeout"
  | "tls"
  | "closed"
  | "cancelled"
  | "status";

/**
 * Where the attempt stopped: waiting for a connection slot, the transport
 * connect, the TLS handshake, or the HTTP exchange on an established
 * connection.
 */
export type MtlsPhase = "queue" | "connect" | "tls" | "request";

/** Options of {@linkcode MtlsError}. */
export interface MtlsErrorOptions extends ErrorOptions {
  /** @default {"request"} */
  phase?: MtlsPhase;
  /** The HTTP status, for `status`. */
  status?: number;
  /** The errno-style code of the cause (`ECONNREFUSED`, `ECONNRESET`…), when it had one. */
  code?: string;
}

/** A request to a peer that got no answer, or an error answer. */
export class MtlsError extends Error {
  override name = "MtlsError";
  readonly phase: MtlsPhase;
  readonly status?: number;
  readonly code?: string;

  constructor(message: string, readonly reason: MtlsFailure, options: MtlsErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.phase = options.phase ?? "request";
    this.status = options.status;
    this.code = options.code;
  }
}

/** The far end of a request: how to reach it, and whom both ends must be. */
export interface MtlsPeer {
  /**
   * Names the peer in messages ("the host at vsock 2:5000", "the agent of
   * vm1"); with `pinned`, also the key of its pooled connections.
   */
  name: string;
  /** Opens the raw stream to the peer; must honour `signal` (the connect bound aborts it). */
  connect: (signal: AbortSignal) => Promise<Duplex>;
  /** Our certificate (PEM). */
  cert: string;
  /** Our key (PEM). */
  key: string;
  /** The peer's exact certificate (PEM). */
  pinned: string;
  /**
   * Error codes of `connect` that mean nothing listens at the peer's address
   * (`refused`); others are `unreachable`. The agent's hybrid transport adds
   * `ENOENT` (no socket file for the port) and `ECONNRESET`.
   * @default {["ECONNREFUSED"]}
   */
  refusedCodes?: readonly string[];
}

/** Options of {@linkcode dialMtls}. */
export interface DialMtlsOptions {
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
  signal?: AbortSignal;
}

/** Options of {@linkcode mtlsRequest}. */
export interface MtlsRequestOptions extends DialMtlsOptions {
  /**
   * Bound on waiting for the response head, in ms; `Infinity` waits until
   * the head, a close or `signal` (streams whose head comes with their first
   * item).
   * @default {10000}
   */
  responseTimeout?: number;
  /**
   * Bounds the caller's open connections: the request waits for a slot, held
   * until its connection closes (response body read or cancelled).
   */
  slots?: Slots;
  /**
   * Bound on waiting for a slot, in ms; then a `busy` {@linkcode MtlsError}.
   * @default {10000}
   */
  queueTimeout?: number;
  /** Keeps completed connections for the next request (keep-alive); none: one per request. */
  pool?: ConnectionPool;
  /**
   * Bounds the caller's connection set-ups in progress (connect + TLS
   * handshake) across requests: a burst then opens its connections a few at
   * a time instead of all at once (a host refuses many pending handshakes
   * from one peer). Waited for within `queueTimeout`.
   */
  dials?: Slots;
}

/** The key of `peer`'s pooled connections: its name (address) and the pinned certificate. */
export function poolKey(peer: Pick<MtlsPeer, "name" | "pinned">): string {
  return `${peer.name}\n${peer.pinned}`;
}

const TIMEOUT_CODES = new Set(["ETIMEDOUT", "TimedOut", "TimeoutError"]);
const TLS_CODES = /^(ERR_SSL|ERR_TLS|ERR_OSSL)/;

/** The error's string `code`, else its `name`. */
function errorCode(error: unknown): string {
  if (typeof error !== "object" || error === null) return "";
  const e = error as { code?: unknown; name?: unknown };
  return typeof e.code === "string" ? e.code : typeof e.name === "string" ? e.name : "";
}

function capitalized(text: string): string {
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** Turns a dial, handshake or request failure into one sentence and a reason. */
export function classifyFailure(
  error: unknown,
  phase: "connect" | "tls" | "request",
  peer: Pick<MtlsPeer, "name" | "refusedCodes">,
): MtlsError {
  if (error instanceof MtlsError) return error;
  const code = errorCode(error);
  const detail = (error as Error)?.message ?? String(error);
  const Peer = capitalized(peer.name);
  let reason: MtlsFailure;
  let message: string;
  if (code === "AbortError") {
    reason = "cancelled";
    message = `The request to ${peer.name} was cancelled.`;
  } else if (TIMEOUT_CODES.has(code) || (phase !== "connect" && /time/i.test(detail))) {
    reason = "timeout";
    message = phase === "connect"
      ? `${Peer} did not accept the connection in time.`
      : phase === "tls"
      ? `The TLS handshake with ${peer.name} failed: ${detail}.`
      : `${Peer} did not answer in time.`;
  } else if (phase === "connect" || (error as Error)?.name === "SocketError") {
    if ((peer.refusedCodes ?? ["ECONNREFUSED"]).includes(code)) {
      reason = "refused";
      message = `${Peer} refused the connection (${code}).`;
    } else {
      reason = "unreachable";
      message = `Cannot connect to ${peer.name}: ${detail}.`;
    }
  } else if ((error as Error)?.name === "CertificateError") {
    reason = "tls";
    message = `${Peer} presented a certificate other than the pinned one (${detail}).`;
  } else if (phase === "tls" || TLS_CODES.test(code)) {
    reason = "tls";
    message = `The TLS handshake with ${peer.name} failed: ${detail}.`;
  } else {
    reason = "closed";
    message = `${Peer} closed the connection before answering: ${detail}.`;
  }
  return new MtlsError(message.replace(/\.\.$/, "."), reason, {
    cause: error,
    phase,
    code: code === "" ? undefined : code,
  });
}

/** Rejects with `signal.reason` if it aborts first; a late stream is destroyed. */
function raceConnect(connecting: Promise<Duplex>, signal: AbortSignal): Promise<Duplex> {
  connecting.then((late) => signal.aborted && late.destroy(), () => {});
  return new Promise<Duplex>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    connecting.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/** What a failure of `phase` is, judged after the caller's signal. */
function failure(
  error: unknown,
  phase: "connect" | "tls" | "request",
  peer: Pick<MtlsPeer, "name" | "refusedCodes">,
  signal?: AbortSignal,
): MtlsError {
  return classifyFailure(signal?.aborted ? signal.reason : error, phase, peer);
}

/**
 * Opens a raw stream to `peer` (bounded by `connectTimeout`); the stream
 * swallows late errors (a reset after the answer must not become uncaught).
 */
async function connectRaw(
  peer: Pick<MtlsPeer, "name" | "connect" | "refusedCodes">,
  options: DialMtlsOptions,
): Promise<Duplex> {
  const bound = AbortSignal.timeout(options.connectTimeout ?? 3000);
  const signal = options.signal === undefined ? bound : AbortSignal.any([options.signal, bound]);
  let socket: Duplex;
  try {
    options.signal?.throwIfAborted();
    socket = await raceConnect(peer.connect(signal), signal);
  } catch (error) {
    throw failure(error, "connect", peer, options.signal);
  }
  socket.on("error", () => {});
  return socket;
}

/** TLS over `socket` (closed on failure); closing the TLS layer closes `socket`. */
async function handshake(
  socket: Duplex,
  peer: MtlsPeer,
  options: DialMtlsOptions,
): Promise<Duplex> {
  let secure: Duplex;
  try {
    secure = await connectTls(socket, {
      cert: peer.cert,
      key: peer.key,
      pinned: peer.pinned,
      handshakeTimeout: options.handshakeTimeout ?? 3000,
      signal: options.signal,
    });
  } catch (error) {
    socket.destroy();
    throw failure(error, "tls", peer, options.signal);
  }
  secure.on("error", () => {});
  secure.once("close", () => socket.destroy());
  return secure;
}

/**
 * A plain transport connect to `peer` (no TLS), closed at once: resolves if
 * something listens; rejects with an {@linkcode MtlsError} (phase `connect`).
 */
export async function probePeer(
  peer: Pick<MtlsPeer, "name" | "connect" | "refusedCodes">,
  options: { timeout?: number; signal?: AbortSignal } = {},
): Promise<void> {
  const socket = await connectRaw(peer, {
    connectTimeout: options.timeout ?? 2000,
    signal: options.signal,
  });
  socket.destroy();
}

/**
 * A mutual-TLS connection to `peer`: connect, then the handshake pinning
 * `peer.pinned`. Rejects with an {@linkcode MtlsError} (phase `connect` or `tls`).
 */
export async function dialMtls(peer: MtlsPeer, options: DialMtlsOptions = {}): Promise<Duplex> {
  return await handshake(await connectRaw(peer, options), peer, options);
}

/**
 * Sends `request` to `peer`: over an idle pooled connection when there is
 * one, else over a new connection. Resolves with any HTTP response (its body
 * streamed); rejects with an {@linkcode MtlsError}.
 */
export async function mtlsRequest(
  peer: MtlsPeer,
  request: Request,
  options: MtlsRequestOptions = {},
): Promise<Response> {
  const pooled = options.pool?.take(poolKey(peer));
  if (pooled !== undefined) {
    // Kept for a second attempt: the first one consumes the body.
    const again = request.body === null ? request : request.clone();
    try {
      return await exchange(pooled, peer, request, options);
    } catch (error) {
      // The peer closed the idle connection before answering anything: try a new one.
      if (!(error instanceof NoResponseError) || options.signal?.aborted) {
        throw failure(error, "request", peer, options.signal);
      }
      request = again;
    }
  }
  return await newConnection(peer, request, options);
}

/** One request on `socket` (TLS, open); a completed connection goes back to the pool. */
function exchange(
  socket: Duplex,
  peer: MtlsPeer,
  request: Request,
  options: MtlsRequestOptions,
): Promise<Response> {
  const pool = options.pool;
  return httpRequest(socket, request, {
    timeout: options.responseTimeout ?? 10_000,
    signal: options.signal,
    reuse: pool === undefined || pool.idleTimeout === 0
      ? undefined
      : (done) => pool.give(poolKey(peer), done, options.slots),
  });
}

/** Waits for one of `slots`, at most `queueTimeout` ms. */
async function acquire(slots: Slots, peer: MtlsPeer, options: MtlsRequestOptions): Promise<void> {
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
      throw failure(error, "request", peer, options.signal);
    }
    throw new MtlsError(
      `Too many requests to ${peer.name} are in flight: this one waited ${
        queueTimeout / 1000
      } s for a connection.`,
      "busy",
      { cause: error, phase: "queue" },
    );
  } finally {
    clearTimeout(timer);
  }
}

/** Dials, handshakes and sends `request` on a new connection, within a slot. */
async function newConnection(
  peer: MtlsPeer,
  request: Request,
  options: MtlsRequestOptions,
): Promise<Response> {
  const slots = options.slots;
  if (slots !== undefined) await acquire(slots, peer, options);
  let released = false;
  const release = () => {
    if (!released && slots !== undefined) slots.release();
    released = true;
  };
  const dials = options.dials;
  if (dials !== undefined) {
    try {
      await acquire(dials, peer, options);
    } catch (error) {
      release();
      throw error;
    }
  }
  let socket: Duplex;
  let secure: Duplex;
  try {
    try {
      socket = await connectRaw(peer, options);
    } catch (error) {
      release();
      throw error;
    }
    socket.once("close", release);
    secure = await handshake(socket, peer, options);
  } finally {
    dials?.release();
  }
  try {
    return await exchange(secure, peer, request, options);
  } catch (error) {
    secure.destroy();
    socket.destroy();
    throw failure(error, "request", peer, options.signal);
  }
}

/**
 * Calls to an instance's agent API (vsock `<cid>:8443`, mutual TLS pinning
 * `agent.crt`): `announce()` sends `PUT /1.0` with the host's connection info,
 * `pushEvent()` sends `POST /1.0/events`, `probeAgent()` sends `GET /1.0`.
 *
 * Every call goes through the mutual-TLS client (`shared/http/mtls_client.ts`).
 * How the socket is opened (AF_VSOCK or hybrid vsock) is the caller's
 * `connect` function, bounded by `connectTimeout` (3 s, as LXD). Failures are
 * {@linkcode MtlsError}s: `refused` (nothing listens yet: fail fast), `timeout`
 * (retried a bounded number of times with backoff by `announce`, as are
 * resets), `unreachable`, `tls`, `closed`, and `status` (the agent answered an
 * error; a 500 to `PUT /1.0`: it could not reach the host with that info).
 *
 * Owns nothing beyond each call's socket; needs what `connect` needs.
 * @module
 */

import type { Duplex } from "node:stream";
import type { ConnectionInfo, DevlxdEvent } from "../../shared/api.ts";
import type { Instance } from "../instance.ts";
import {
  classifyFailure,
  MtlsError,
  type MtlsPeer,
  mtlsRequest,
  unwrapEnvelope,
  type Unwrapped,
} from "../../shared/http/mod.ts";

/** What is needed to talk to one agent: its pinned cert and our client identity. */
export type AgentTarget = Pick<Instance, "name" | "agentCert" | "clientCert" | "clientKey">;

/** Opens a raw stream to the agent API; must honour `signal`. */
export type AgentConnect = (signal: AbortSignal) => Promise<Duplex>;

/** Options of every agent call. */
export interface AgentCallOptions {
  /** Opens the raw stream (vsock `<cid>:8443` or hybrid). */
  connect: AgentConnect;
  /** Bound on `connect`, in ms. @default 3000 */
  connectTimeout?: number;
  /** Bound on the TLS handshake and on the HTTP exchange, each, in ms. @default 10000 */
  timeout?: number;
  signal?: AbortSignal;
}

/** Options of {@linkcode announce}. */
export interface AnnounceOptions extends AgentCallOptions {
  /** Attempts in all when attempts time out. @default 3 */
  attempts?: number;
  /** Delay before the first retry, doubled after each, in ms. @default 500 */
  retryDelay?: number;
}

/** The outcome of a successful announce. */
export interface AnnounceResult {
  /** Attempts made (1 when the first one succeeded). */
  attempts: number;
  /**
   * The agent's pid when its answer carries `environment.server_pid` (our
   * agent; a stock lxd-agent answers `{}`).
   */
  pid?: number;
}

/**
 * One request to the agent API through the mutual-TLS client: connect
 * (bounded by `connectTimeout`), TLS pinning the agent's certificate, then
 * `method path` with an optional JSON body; handshake and answer each bounded
 * by `timeout`, the whole call by both. Resolves with any HTTP response, its
 * body read; rejects with an {@linkcode MtlsError}.
 */
export async function callAgent(
  target: AgentTarget,
  request: { method: string; path: string; body?: unknown },
  options: AgentCallOptions,
): Promise<Response> {
  const connectTimeout = options.connectTimeout ?? 3000;
  const timeout = options.timeout ?? 10_000;
  const peer = agentPeer(target, options.connect);
  const bound = AbortSignal.timeout(connectTimeout + timeout);
  const signal = options.signal === undefined ? bound : AbortSignal.any([options.signal, bound]);
  const init: RequestInit = { method: request.method };
  if (request.body !== undefined) {
    init.body = JSON.stringify(request.body);
    init.headers = { "content-type": "application/json" };
  }
  try {
    const response = await mtlsRequest(peer, new Request(`https://agent${request.path}`, init), {
      connectTimeout,
      handshakeTimeout: timeout,
      responseTimeout: timeout,
      signal,
    });
    // Bodies here are small: read them within the bound and hand back a complete Response.
    const body = await response.text();
    return new Response(body === "" ? null : body, {
      status: response.status,
      headers: response.headers,
    });
  } catch (error) {
    throw classifyFailure(signal.aborted ? signal.reason : error, "request", peer);
  }
}

/** The agent of `target` as a peer of the mutual-TLS client. */
function agentPeer(target: AgentTarget, connect: AgentConnect): MtlsPeer {
  return {
    name: `the agent of ${target.name}`,
    connect,
    cert: target.clientCert,
    key: target.clientKey,
    pinned: target.agentCert,
  };
}

/** Whether trying again soon may help: timeouts and resets. */
export function retryable(error: unknown): boolean {
  return error instanceof MtlsError && (error.reason === "timeout" || error.code === "ECONNRESET");
}

/**
 * The metadata of the agent's answer (its LXD envelope unwrapped; a body
 * that is not an envelope as it is); an error status becomes an
 * {@linkcode MtlsError} `status` with the envelope's message.
 */
async function answer(target: AgentTarget, what: string, response: Response): Promise<unknown> {
  const text = await response.text();
  let body: unknown = text === "" ? undefined : text;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON
  }
  let unwrapped: Unwrapped | undefined;
  try {
    unwrapped = unwrapEnvelope(body);
  } catch {
    // not the LXD envelope
  }
  if (response.ok) return unwrapped?.ok ? unwrapped.metadata : body;
  const message = unwrapped?.ok === false && unwrapped.error !== ""
    ? unwrapped.error
    : text.slice(0, 500).trim() || response.statusText;
  throw new MtlsError(
    `${what} to the agent of ${target.name} failed with ${response.status}: ${message}`,
    "status",
    { status: response.status },
  );
}

const sleep = (ms: number, signal?: AbortSignal) =>
  new Promise<void>((resolve, reject) => {
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    if (signal?.aborted) return onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
  });

/**
 * Tells the agent where the host is: `PUT /1.0` with `info`. Retries only
 * timeouts and resets (`attempts` in all, backoff from `retryDelay`); a
 * refused connection, a TLS failure or a 500 (the agent could not reach the
 * host) fails at once with an {@linkcode MtlsError}.
 */
export async function announce(
  target: AgentTarget,
  info: ConnectionInfo,
  options: AnnounceOptions,
): Promise<AnnounceResult> {
  const attempts = Math.max(1, options.attempts ?? 3);
  let delay = options.retryDelay ?? 500;
  for (let attempt = 1;; attempt++) {
    try {
      const response = await callAgent(
        target,
        { method: "PUT", path: "/1.0", body: info },
        options,
      );
      const metadata = await answer(target, "PUT /1.0", response);
      const pid = serverPid(metadata);
      return pid === undefined ? { attempts: attempt } : { attempts: attempt, pid };
    } catch (error) {
      if (!retryable(error) || attempt >= attempts) {
        throw error;
      }
      await sleep(delay, options.signal);
      delay *= 2;
    }
  }
}

/** Delivers one event to the agent: `POST /1.0/events`. No retries (callers queue). */
export async function pushEvent(
  target: AgentTarget,
  event: DevlxdEvent,
  options: AgentCallOptions,
): Promise<void> {
  const response = await callAgent(
    target,
    { method: "POST", path: "/1.0/events", body: event },
    options,
  );
  await answer(target, "POST /1.0/events", response);
}

/** What `GET /1.0` on the agent API tells about the agent process. */
export interface AgentProbe {
  /** `environment.server_pid` (0 or absent: unknown): changes when the agent restarts. */
  pid?: number;
  /**
   * The host address the agent holds, when it reports it (`connection`, as
   * our agent does, or `host`); `null` when it says it has none.
   */
  connection?: { cid: number; port: number } | null;
  /** The unwrapped metadata as received. */
  metadata: unknown;
}

/** Asks the agent API `GET /1.0`, to tell whether the agent restarted or lost our address. */
export async function probeAgent(
  target: AgentTarget,
  options: AgentCallOptions,
): Promise<AgentProbe> {
  const response = await callAgent(target, { method: "GET", path: "/1.0" }, options);
  const metadata = await answer(target, "GET /1.0", response);
  const m = (metadata ?? {}) as Record<string, unknown>;
  const conn = ("connection" in m ? m.connection : m.host) as Record<string, unknown> | null;
  let connection: AgentProbe["connection"];
  if (conn === null) connection = null;
  else if (typeof conn?.cid === "number" && typeof conn.port === "number") {
    connection = { cid: conn.cid, port: conn.port };
  }
  return { pid: serverPid(metadata), connection, metadata };
}

/** `environment.server_pid` of an agent's answer, when it is a positive number. */
function serverPid(metadata: unknown): number | undefined {
  const m = (metadata ?? {}) as Record<string, unknown>;
  const env = (m.environment ?? {}) as Record<string, unknown>;
  return typeof env.server_pid === "number" && env.server_pid > 0 ? env.server_pid : undefined;
}

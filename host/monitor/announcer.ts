/**
 * Calls to an instance's agent API (vsock `<cid>:8443`, mutual TLS pinning
 * `agent.crt`): `announce()` sends `PUT /1.0` with the host's connection info,
 * `pushEvent()` sends `POST /1.0/events`, `probeAgent()` sends `GET /1.0`.
 *
 * How the socket is opened (AF_VSOCK or hybrid vsock) is the caller's
 * `connect` function, bounded here by `connectTimeout` (3 s, as LXD). Failures
 * are classified in {@linkcode AgentCallError.kind}: `refused` (nothing
 * listens yet: fail fast), `timeout` (retried a bounded number of times with
 * backoff by `announce`), `unreachable`, `tls`, `rejected` (the agent answered
 * 500: it could not reach the host with that info) and `http`.
 *
 * Owns nothing beyond each call's socket; needs what `connect` needs.
 * @module
 */

import type { Duplex } from "node:stream";
import type { ConnectionInfo, DevlxdEvent } from "../../shared/api.ts";
import type { Instance } from "../instance.ts";
import { httpRequest } from "../../shared/http/mod.ts";
import { connectTls } from "../../shared/tls/mutual_tls.ts";

/** What is needed to talk to one agent: its pinned cert and our client identity. */
export type AgentTarget = Pick<Instance, "name" | "agentCert" | "clientCert" | "clientKey">;

/** Opens a raw stream to the agent API; must honour `signal`. */
export type AgentConnect = (signal: AbortSignal) => Promise<Duplex>;

/** Why a call to an agent failed. */
export type AgentCallFailure = "refused" | "timeout" | "unreachable" | "tls" | "rejected" | "http";

/** A failed call to an agent API, classified. */
export class AgentCallError extends Error {
  /** The class of failure; see the module doc. */
  readonly kind: AgentCallFailure;
  /** HTTP status for `rejected` and `http`. */
  readonly status?: number;

  constructor(
    kind: AgentCallFailure,
    message: string,
    options: { status?: number; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "AgentCallError";
    this.kind = kind;
    this.status = options.status;
  }

  /** Whether trying again soon may help (only timeouts and resets). */
  get retryable(): boolean {
    return this.kind === "timeout";
  }
}

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

const REFUSED = new Set(["ECONNREFUSED", "ConnectionRefused"]);
const TIMEOUT = new Set(["ETIMEDOUT", "TimedOut", "TimeoutError", "ECONNRESET", "ConnectionReset"]);
const TLS_CODES = /^(ERR_SSL|ERR_TLS|ERR_OSSL)|CERT|SSL/;

function errorCode(error: unknown): string {
  if (typeof error !== "object" || error === null) return "";
  const e = error as { code?: unknown; name?: unknown };
  return typeof e.code === "string" ? e.code : typeof e.name === "string" ? e.name : "";
}

/** Maps any failure of the connect / TLS / HTTP steps to an {@linkcode AgentCallError}. */
export function classifyAgentError(
  error: unknown,
  step: "connect" | "tls" | "http",
): AgentCallError {
  if (error instanceof AgentCallError) return error;
  const code = errorCode(error);
  const reason = error instanceof Error ? error.message : String(error);
  if (REFUSED.has(code)) {
    return new AgentCallError("refused", `Agent refused the connection: ${reason}`, {
      cause: error,
    });
  }
  if (TIMEOUT.has(code)) {
    return new AgentCallError("timeout", `Agent ${step} timed out: ${reason}`, { cause: error });
  }
  if (
    step === "tls" || TLS_CODES.test(code) || (error as Error)?.name === "CertificateError"
  ) {
    return new AgentCallError("tls", `TLS with the agent failed: ${reason}`, { cause: error });
  }
  return new AgentCallError("unreachable", `Agent ${step} failed: ${reason}`, { cause: error });
}

/** Aborts after `ms`, or when `parent` aborts, with a TimedOut reason. */
function deadline(
  ms: number,
  what: string,
  parent?: AbortSignal,
): { signal: AbortSignal; clear(): void } {
  const controller = new AbortController();
  const timer = setTimeout(
    () => controller.abort(new Deno.errors.TimedOut(`${what} timed out after ${ms} ms`)),
    ms,
  );
  const onAbort = () => controller.abort(parent!.reason);
  if (parent?.aborted) onAbort();
  parent?.addEventListener("abort", onAbort, { once: true });
  return {
    signal: controller.signal,
    clear: () => {
      clearTimeout(timer);
      parent?.removeEventListener("abort", onAbort);
    },
  };
}

/** Rejects with `signal.reason` if it aborts first. */
function raceSignal<T>(promise: Promise<T>, signal: AbortSignal): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

/**
 * One request to the agent API: connect (bounded), mutual TLS pinning the
 * agent's certificate, then `method path` with an optional JSON body.
 * Resolves with any HTTP response; rejects with an {@linkcode AgentCallError}
 * of kind refused/timeout/unreachable/tls.
 */
export async function callAgent(
  target: AgentTarget,
  request: { method: string; path: string; body?: unknown },
  options: AgentCallOptions,
): Promise<Response> {
  options.signal?.throwIfAborted();
  const connectTimeout = options.connectTimeout ?? 3000;
  const timeout = options.timeout ?? 10_000;
  const bound = deadline(
    connectTimeout,
    `Connecting to the agent of ${target.name}`,
    options.signal,
  );
  let socket: Duplex;
  try {
    const connecting = options.connect(bound.signal);
    connecting.then((late) => bound.signal.aborted && late.destroy(), () => {});
    socket = await raceSignal(connecting, bound.signal);
  } catch (error) {
    if (options.signal?.aborted) throw options.signal.reason;
    throw classifyAgentError(error, "connect");
  } finally {
    bound.clear();
  }
  // One bound for handshake, request and response body, each step failing as a timeout.
  const exchange = deadline(
    timeout,
    `${request.method} ${request.path} to the agent of ${target.name}`,
    options.signal,
  );
  let step: "tls" | "http" = "tls";
  try {
    const secure = await connectTls(socket, {
      cert: target.clientCert,
      key: target.clientKey,
      pinned: target.agentCert,
      handshakeTimeout: timeout,
      signal: exchange.signal,
    });
    step = "http";
    const init: RequestInit = { method: request.method };
    if (request.body !== undefined) {
      init.body = JSON.stringify(request.body);
      init.headers = { "content-type": "application/json" };
    }
    const response = await httpRequest(secure, new Request(`https://agent${request.path}`, init), {
      timeout,
      signal: exchange.signal,
    });
    // Bodies here are small: read them within the bound and hand back a complete Response.
    const body = await response.text();
    return new Response(body === "" ? null : body, {
      status: response.status,
      headers: response.headers,
    });
  } catch (error) {
    socket.destroy();
    if (options.signal?.aborted) throw options.signal.reason;
    throw classifyAgentError(exchange.signal.aborted ? exchange.signal.reason : error, step);
  } finally {
    exchange.clear();
  }
}

async function errorText(response: Response): Promise<string> {
  const text = (await response.text()).slice(0, 500);
  try {
    const body = JSON.parse(text);
    if (typeof body?.error === "string" && body.error !== "") return body.error;
  } catch {
    // not the LXD envelope
  }
  return text.trim() || response.statusText;
}

async function expectOk(target: AgentTarget, what: string, response: Response): Promise<unknown> {
  if (response.ok) {
    const text = await response.text();
    if (text === "") return undefined;
    try {
      const body = JSON.parse(text);
      return body !== null && typeof body === "object" && "metadata" in body ? body.metadata : body;
    } catch {
      return text;
    }
  }
  const message = await errorText(response);
  const kind = response.status === 500 ? "rejected" : "http";
  throw new AgentCallError(
    kind,
    `${what} to the agent of ${target.name} failed with ${response.status}: ${message}`,
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
 * timeouts (`attempts` in all, backoff from `retryDelay`); a refused
 * connection, a TLS failure or a 500 (the agent could not reach the host)
 * fails at once with an {@linkcode AgentCallError}.
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
      const metadata = await expectOk(target, "PUT /1.0", response);
      const pid = serverPid(metadata);
      return pid === undefined ? { attempts: attempt } : { attempts: attempt, pid };
    } catch (error) {
      if (!(error instanceof AgentCallError) || !error.retryable || attempt >= attempts) {
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
  await expectOk(target, "POST /1.0/events", response);
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
  const metadata = await expectOk(target, "GET /1.0", response);
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

/**
 * The one call the agent's HTTP apps need from the host: `HostFetch`, a
 * `fetch` to the host's devlxd API that either returns the host's response
 * or throws `HostUnreachableError` with one clear sentence. Implemented over
 * vsock + TLS + HTTP in `host_client.ts`; tests pass any function.
 * Needs no permissions.
 * @module
 */

/**
 * Why the host could not be reached. `busy`: the request waited too long for
 * one of the agent's connections to the host (the host itself may be fine).
 */
export type UnreachableReason =
  | "no-host"
  | "refused"
  | "timeout"
  | "tls"
  | "closed"
  | "busy"
  | "error";

/**
 * Where the attempt stopped: waiting for a connection slot, the transport
 * connect, the TLS handshake, or the HTTP exchange on an established
 * connection.
 */
export type UnreachablePhase = "queue" | "connect" | "tls" | "request";

/** The host could not be reached or broke off its answer; callers answer 503. */
export class HostUnreachableError extends Error {
  override name = "HostUnreachableError";
  /** @default {"request"} */
  readonly phase: UnreachablePhase;
  constructor(
    message: string,
    readonly reason: UnreachableReason,
    options?: ErrorOptions & { phase?: UnreachablePhase },
  ) {
    super(message, options);
    this.phase = options?.phase ?? "request";
  }
}

export interface HostFetchOptions {
  /** Aborts the request (and the dial). */
  signal?: AbortSignal;
  /**
   * A long-lived stream (`/1.0/events`): its response head may come late —
   * LXD 5.0.2 sends the head of its `/1.0/events` only with the first event —
   * so the head is not bounded in time, and a failure after the connection
   * and the TLS handshake succeeded does not count as the host being
   * unreachable (the agent's state does not change).
   * @default {false}
   */
  stream?: boolean;
}

/** Sends one request to the host's devlxd API; the URL's host part is ignored. */
export type HostFetch = (request: Request, options?: HostFetchOptions) => Promise<Response>;

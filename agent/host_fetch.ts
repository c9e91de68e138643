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

/** The host could not be reached or broke off its answer; callers answer 503. */
export class HostUnreachableError extends Error {
  override name = "HostUnreachableError";
  constructor(message: string, readonly reason: UnreachableReason, options?: ErrorOptions) {
    super(message, options);
  }
}

export interface HostFetchOptions {
  /** Aborts the request (and the dial). */
  signal?: AbortSignal;
}

/** Sends one request to the host's devlxd API; the URL's host part is ignored. */
export type HostFetch = (request: Request, options?: HostFetchOptions) => Promise<Response>;

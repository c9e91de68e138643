/**
 * `HostLink`: the agent's one way to the host's devlxd API. It holds the
 * connection info in use, the connection slots (the agent's bound on open
 * connections to the host, below the host's per-instance cap) and the idle
 * keep-alive connections, sends requests through the mutual-TLS client
 * (`shared/http/mtls_client.ts`: transport connect to the host's (CID,
 * port), TLS presenting the agent's certificate and pinning the host's from
 * the connection info, one HTTP/1.1 request), and turns outcomes into the
 * agent's reachability transitions:
 *
 * - any request that reaches the host makes the agent CONNECTED (a 401:
 *   failed, the host does not know it), any that cannot makes it STARTED —
 *   except a cancelled request, one that waited too long for a slot, or a
 *   failed connect that is not a refusal or a timeout;
 * - a long-lived stream (`/1.0/events`) whose head is late (LXD 5.0.2 sends
 *   it with the first event) or that breaks off once connected changes
 *   nothing: only failed connects, handshakes and plain requests do;
 * - {@linkcode HostLink.probe}: a plain transport connect while CONNECTED
 *   notices a host that went away.
 *
 * The devlxd app and the event relay get `fetch` ({@linkcode HostFetch});
 * `Agent` decides which connection info is in use.
 *
 * Owns the idle connections (`close()`). Permissions: `--allow-ffi`
 * (vsock), read/write on unix paths (hybrid).
 * @module
 */

import type { ConnectionInfo } from "../shared/api.ts";
import {
  ConnectionPool,
  MtlsError,
  type MtlsPeer,
  mtlsRequest,
  poolKey,
  probePeer,
} from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { Slots } from "../shared/slots.ts";
import type { Transport } from "../shared/vsock/mod.ts";
import type { GuestAgentStatus } from "./agent_state.ts";

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

/**
 * Sends one request to the host's devlxd API (the URL's host part is
 * ignored): the host's response, or an `MtlsError` with one clear sentence.
 */
export type HostFetch = (request: Request, options?: HostFetchOptions) => Promise<Response>;

/**
 * Codes of a failed connect that mean nothing listens at the host's port:
 * the hybrid transport's missing `<uds>_<port>` file, or a reset CONNECT.
 */
const HOST_REFUSED = ["ECONNREFUSED", "ENOENT", "ECONNRESET"];

/** The host of `info` as a peer of the mutual-TLS client. */
export function hostPeer(
  info: ConnectionInfo,
  transport: Transport,
  identity: { cert: string; key: string },
  connectTimeout = 3000,
): MtlsPeer {
  return {
    name: `the host at vsock ${info.cid}:${info.port}`,
    connect: (signal) =>
      transport.connect(info.cid, info.port, { timeout: connectTimeout, signal }),
    cert: identity.cert,
    key: identity.key,
    pinned: info.certificate,
    refusedCodes: HOST_REFUSED,
  };
}

/** Options of {@linkcode HostLink}. */
export interface HostLinkOptions {
  transport: Transport;
  /** The agent's certificate and key (PEM). */
  identity: { cert: string; key: string };
  /** The agent's state, which follows the outcome of requests and probes. */
  status: GuestAgentStatus;
  /**
   * Bound on each dial to the host, in ms.
   * @default {3000}
   */
  connectTimeout?: number;
  /**
   * Bound on waiting for the host's answer head, in ms.
   * @default {10000}
   */
  responseTimeout?: number;
  /**
   * Connections to the host open at once; more requests wait their turn.
   * @default {16}
   */
  maxConnections?: number;
  /**
   * How long an idle connection to the host is kept for the next request
   * (keep-alive; at most 4 idle), in ms; 0 opens one connection per request.
   * @default {2000}
   */
  idleTimeout?: number;
  /**
   * How long a request waits for the host's address when none is known yet,
   * in ms; 0 fails at once (`no-host`).
   * @default {30000}
   */
  hostWait?: number;
  /** The agent is stopping: waiting requests and probes end. */
  signal?: AbortSignal;
  logger?: Logger;
}

/**
 * Connection set-ups (connect + TLS handshake) to the host in progress at
 * once. A host counts a connection against its peer only once authenticated
 * and allows a few pending handshakes per peer (ours: 8, a newer one evicting
 * the oldest): a burst of 16 at once had its own handshakes evicted.
 */
export const MAX_DIALS = 4;

export class HostLink implements Disposable {
  #options: HostLinkOptions;
  #status: GuestAgentStatus;
  #logger: Logger;
  #info: ConnectionInfo | undefined;
  /** Requests waiting for the first connection info. */
  #waiters = new Set<() => void>();
  #slots: Slots;
  #pool: ConnectionPool;
  #dials: Slots;
  #probing = false;

  constructor(options: HostLinkOptions) {
    this.#options = options;
    this.#status = options.status;
    this.#logger = options.logger ?? silentLogger;
    this.#slots = new Slots(options.maxConnections ?? 16);
    this.#pool = new ConnectionPool({ idleTimeout: options.idleTimeout ?? 2000, maxIdle: 4 });
    this.#dials = new Slots(MAX_DIALS);
  }

  /** The connection info in use. */
  get connection(): ConnectionInfo | undefined {
    return this.#info;
  }

  /**
   * Makes `info` the connection in use: kept connections to another address
   * or certificate close, and requests waiting for an address go on.
   */
  use(info: ConnectionInfo): void {
    this.#info = info;
    this.#pool.retain(poolKey(this.#peer(info)));
    for (const wake of [...this.#waiters]) wake();
  }

  /**
   * One request to the host in use; the agent's state follows the outcome.
   * Before any connection info is known it waits up to `hostWait` for one
   * (the boot race: cloud-init asks as soon as /dev/lxd/sock exists).
   */
  fetch: HostFetch = async (request, options = {}) => {
    const info = this.#info ?? await this.#awaitInfo(options.signal);
    if (info === undefined) {
      const waited = this.#options.hostWait ?? 30_000;
      throw new MtlsError(
        "The host's address is not known yet: no connection info has been received" +
          (waited > 0 ? ` (waited ${waited} ms).` : "."),
        "no-host",
      );
    }
    return await this.fetchAt(info, request, options);
  };

  /** Waits up to `hostWait` for the first connection info; undefined if none came. */
  async #awaitInfo(signal?: AbortSignal): Promise<ConnectionInfo | undefined> {
    const wait = this.#options.hostWait ?? 30_000;
    const stopping = this.#options.signal;
    if (wait <= 0 || stopping?.aborted) return this.#info;
    this.#logger.debug("waiting for the host's address", { waitMs: wait });
    await new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#waiters.delete(done);
        signal?.removeEventListener("abort", done);
        stopping?.removeEventListener("abort", done);
        resolve();
      };
      const timer = setTimeout(done, wait);
      this.#waiters.add(done);
      signal?.addEventListener("abort", done, { once: true });
      stopping?.addEventListener("abort", done, { once: true });
    });
    return this.#info;
  }

  #peer(info: ConnectionInfo): MtlsPeer {
    return hostPeer(
      info,
      this.#options.transport,
      this.#options.identity,
      this.#options.connectTimeout,
    );
  }

  /** One request to the host at `info`; the state follows the outcome while `info` is in use. */
  async fetchAt(
    info: ConnectionInfo,
    request: Request,
    options: HostFetchOptions = {},
  ): Promise<Response> {
    try {
      const response = await mtlsRequest(this.#peer(info), request, {
        connectTimeout: this.#options.connectTimeout,
        responseTimeout: options.stream ? Infinity : this.#options.responseTimeout,
        slots: this.#slots,
        pool: this.#pool,
        dials: this.#dials,
        signal: options.signal,
      });
      if (this.#info === info) {
        if (response.status === 401) {
          this.#status.failed("The host does not recognise this agent (401).");
        } else this.#status.connected();
      }
      return response;
    } catch (error) {
      if (
        error instanceof MtlsError && this.#info === info &&
        error.reason !== "unreachable" && error.reason !== "cancelled" &&
        error.reason !== "busy" &&
        // A stream the host accepted but has not answered yet (LXD 5.0.2's
        // /1.0/events: no head until the first event) or broke off is not a
        // host that went away: the liveness probe and plain requests tell that.
        !(options.stream && error.phase === "request")
      ) {
        this.#status.failed(error.message);
      }
      throw error;
    }
  }

  /**
   * While CONNECTED: a plain transport connect to the host (bounded by 2 s);
   * when nothing listens any more, the agent is STARTED again (so a
   * restarted host on a new port re-announces itself).
   */
  async probe(): Promise<void> {
    const info = this.#info;
    if (this.#probing || info === undefined || this.#status.state !== "CONNECTED") return;
    this.#probing = true;
    try {
      await probePeer(this.#peer(info), { timeout: 2000, signal: this.#options.signal });
    } catch (error) {
      if (this.#info === info && !this.#options.signal?.aborted) {
        this.#status.failed(`The host stopped listening: ${(error as Error).message}`);
      }
    } finally {
      this.#probing = false;
    }
  }

  /** Closes the idle connections; later completed ones close at once. Idempotent. */
  close(): void {
    this.#pool.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * The devlxd server: accepts agent connections on vsock or hybrid-vsock
 * listeners, runs a mutual TLS 1.3 handshake, maps the peer to exactly one
 * instance by its certificate **and** its vsock CID (or, for hybrid vsock, the
 * listener's instance), then serves HTTP/1.1 with the given handler. Peers
 * that match no instance get one 401 in the LXD envelope and the connection
 * closes; nothing tells them which part failed or what else is registered.
 *
 * Hardening: handshake, header and idle timeouts, header and body bounds
 * (enforced by `serveHttp`), a cap on concurrent connections per CID (or per
 * hybrid instance) and overall, so one VM cannot starve the others. A
 * connection counts against its instance's cap only once its certificate and
 * peer match; before that it is one of at most `maxPendingPerPeer`
 * unauthenticated connections of its peer, where a new one evicts the oldest
 * (so a guest process without the agent's key cannot lock the agent out), all
 * within one `handshakeTimeout`. Refusals are logged as one summary line per
 * interval, never one line per connection. This module is the policy (peer
 * + certificate → instance, re-checked on every request); the mechanics
 * (accept loop, caps, eviction, deadline, in-flight tracking, closing) are
 * `HttpServer`'s (shared/http).
 *
 * Owns (through its `HttpServer`) the listeners it serves and the
 * connections it accepted. Needs `--allow-ffi` (sockets) and nothing else.
 * @module
 */

import { type Admission, type AuthContext, errorResponse, HttpServer } from "../shared/http/mod.ts";
import { type Logger, LogSummary, silentLogger } from "../shared/log.ts";
import {
  acceptTls,
  certificateDer,
  type PeerCertificate,
  sameCertificate,
} from "../shared/tls/mod.ts";
import type { FdSocket, Listener, SocketAddress } from "../shared/vsock/mod.ts";
import type { Instance } from "./instance.ts";

/** Where a listener's connections come from. */
export type ListenerSource =
  /** AF_VSOCK: the peer CID names the instance. */
  | { kind: "vsock" }
  /** `<uds_path>_<port>` of one hybrid-vsock instance. */
  | { kind: "hybrid"; instance: string };

export interface HostVsockServerOptions {
  /** The host's server certificate and key (PEM). */
  cert: string;
  key: string;
  /** Looks up the instance with this vsock CID (on every request: keep it cheap, no copy). */
  byCid: (cid: number) => Readonly<Instance> | undefined;
  /** Looks up the instance with this name (on every request: keep it cheap, no copy). */
  byName: (name: string) => Readonly<Instance> | undefined;
  /** Serves one authenticated request; `instance` is read, never modified. */
  handler: (request: Request, instance: Readonly<Instance>) => Response | Promise<Response>;
  /** Called for every authenticated request (before the handler). */
  onAgentRequest?: (name: string) => void;
  /** Concurrent connections per CID (or hybrid instance). @default 32 */
  maxConnectionsPerInstance?: number;
  /** Concurrent connections overall. @default 1024 */
  maxConnections?: number;
  /**
   * Unauthenticated connections (before the certificate and peer match) per
   * CID (or hybrid instance); a new one over the cap evicts the oldest.
   * @default 8
   */
  maxPendingPerPeer?: number;
  /** Bound from accept to an authenticated connection (first byte + TLS handshake), ms. @default 3000 */
  handshakeTimeout?: number;
  /** Request line and headers bound, ms. @default 3000 (LXD's) */
  headersTimeout?: number;
  /** Idle keep-alive bound, ms. @default 30000 (LXD's) */
  idleTimeout?: number;
  /** Request line + headers, bytes. @default 16384 */
  maxHeaderSize?: number;
  /** Request body, bytes. @default 1048576 */
  maxBodySize?: number;
  logger?: Logger;
}

/** One 401 in the LXD envelope; serveHttp closes the connection after it. */
function unauthorized(): Response {
  const response = errorResponse(401, "Unauthorized");
  response.headers.set("connection", "close");
  return response;
}

function peerKey(source: ListenerSource, remote: SocketAddress): string | undefined {
  if (source.kind === "hybrid") return `hybrid:${source.instance}`;
  return remote.family === "vsock" ? `cid:${remote.cid}` : undefined;
}

/** Who an authenticated connection is: re-checked on every request. */
interface Agent {
  /** The instance it was authenticated as. */
  instance: string;
  source: ListenerSource;
  remote: SocketAddress;
  peer: PeerCertificate;
  /** The instance's certificate (PEM) the peer's was found equal to. */
  agentCert: string;
}

/** Serves the devlxd API on any number of listeners. */
export class HostVsockServer {
  #options: HostVsockServerOptions;
  #logger: Logger;
  #summary: LogSummary;
  #http: HttpServer<Agent, ListenerSource>;

  constructor(options: HostVsockServerOptions) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    this.#summary = new LogSummary(this.#logger);
    this.#http = new HttpServer({
      handler: (request, agent) => this.#request(request, agent),
      authenticate: (socket, context) => this.#authenticate(socket, context),
      peer: peerKey,
      onConnection: (agent, peer) =>
        this.#logger.debug("agent connected", { instance: agent.instance, peer }),
      logFields: (agent) => ({ instance: agent.instance }),
      maxConnections: options.maxConnections ?? 1024,
      maxConnectionsPerPeer: options.maxConnectionsPerInstance ?? 32,
      maxPendingPerPeer: options.maxPendingPerPeer ?? 8,
      authTimeout: options.handshakeTimeout ?? 3000,
      // An agent's liveness probe (a plain connect every few seconds) costs
      // an accept and a close, not a TLS socket set up and torn down.
      waitForData: true,
      maxSendLag: MAX_SEND_LAG,
      http: {
        headersTimeout: options.headersTimeout ?? 3000,
        idleTimeout: options.idleTimeout ?? 30000,
        maxHeaderSize: options.maxHeaderSize ?? 16384,
        maxBodySize: options.maxBodySize ?? 1 << 20,
      },
      logger: this.#logger,
    });
  }

  /** Open connections by CID (`cid:N`) or hybrid instance (`hybrid:NAME`). */
  get connections(): Record<string, number> {
    return this.#http.connectionsByPeer;
  }

  /** Accepts on `listener` until it or the server closes; the server now owns it. */
  serve(listener: Listener, source: ListenerSource): void {
    this.#http.serve(listener, source);
  }

  /** Stops serving `listener` (connections already accepted continue). */
  unserve(listener: Listener): Promise<void> {
    return this.#http.unserve(listener);
  }

  /**
   * The TLS handshake (a peer that sends anything but a TLS 1.3 ClientHello
   * is refused by it), then the instance of this peer and certificate; a
   * stranger gets one 401 and stays unauthenticated meanwhile.
   */
  async #authenticate(
    socket: FdSocket,
    context: AuthContext<ListenerSource>,
  ): Promise<Admission<Agent>> {
    const { socket: tls, peer } = await acceptTls(socket, {
      cert: this.#options.cert,
      key: this.#options.key,
      handshakeTimeout: Math.max(1, context.deadline - Date.now()),
      signal: context.signal,
    });
    const remote = socket.remoteAddress;
    const instance = this.#match(context.source, remote, peer);
    if (!instance) {
      this.#summary.note("warn", "unauthorized agent connection", {
        peer: context.peer,
        fingerprint: peer.fingerprint,
      });
      return { socket: tls, refuse: unauthorized };
    }
    return {
      socket: tls,
      identity: {
        instance: instance.name,
        source: context.source,
        remote,
        peer,
        agentCert: instance.agentCert,
      },
    };
  }

  #request(request: Request, agent: Agent): Response | Promise<Response> {
    // Re-check on every request: the instance may have been removed, moved or
    // re-keyed. The same instance must still own this peer, with the very
    // certificate the handshake's was compared with (so no DER work here).
    const instance = this.#lookup(agent.source, agent.remote);
    if (instance?.name !== agent.instance || instance.agentCert !== agent.agentCert) {
      return unauthorized();
    }
    this.#options.onAgentRequest?.(instance.name);
    // Its signal aborts as soon as the agent goes away (serveHttp).
    return this.#options.handler(request, instance);
  }

  /** The instance this peer may be: by CID on AF_VSOCK, by listener on hybrid vsock. */
  #lookup(source: ListenerSource, remote: SocketAddress): Readonly<Instance> | undefined {
    const instance = source.kind === "hybrid"
      ? this.#options.byName(source.instance)
      : remote.family === "vsock"
      ? this.#options.byCid(remote.cid)
      : undefined;
    if (source.kind === "vsock" && instance?.hybrid !== undefined) return undefined;
    return instance;
  }

  /** The instance this peer is: the one it may be, if its certificate is that instance's. */
  #match(
    source: ListenerSource,
    remote: SocketAddress,
    peer: PeerCertificate,
  ): Readonly<Instance> | undefined {
    const instance = this.#lookup(source, remote);
    if (!instance) return undefined;
    let pinned: Uint8Array;
    try {
      pinned = certificateDer(instance.agentCert);
    } catch {
      return undefined;
    }
    return sameCertificate(peer.der, pinned) ? instance : undefined;
  }

  /**
   * Closes the connections authenticated as instance `name` (removed, or its
   * devlxd turned off): idle ones (an agent's kept-alive connections) at once,
   * busy ones once their responses are complete. Returns how many it closed
   * or marked.
   */
  closeInstance(name: string): number {
    return this.#http.closeWhere((agent) => agent.instance === name);
  }

  /**
   * Stops accepting, closes idle connections, lets in-flight requests finish
   * for up to `timeout` ms, then closes what is left. Idempotent.
   */
  async close(timeout = 5000): Promise<void> {
    this.#summary.close();
    await this.#http.shutdown(timeout);
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/** Plaintext bytes of a streamed body that may wait in the TLS layer for a slow peer. */
const MAX_SEND_LAG = 1 << 20;

/**
 * `Agent`: wires the in-VM agent together — the status channel, the agent API
 * on vsock (mutual TLS pinning `server.crt`), `/dev/lxd/sock`, the event
 * relay and the loops that keep the host informed:
 *
 * - every state transition is written to the serial port at once, and the
 *   current state is rewritten every `rewriteInterval` (5 s);
 * - new connection info (agent.conf at start, `PUT /1.0`, a serial
 *   `CONNECT <cid>:<port>` line) is stored, validated by one request to the
 *   host, and the guest's Ready flag is re-sent after it;
 * - while CONNECTED, a plain transport connect to the host port every
 *   `probeInterval` (by default with each rewrite, 5 s) notices a host that
 *   went away (back to STARTED, so a restarted host on a new port
 *   re-announces itself; 5 s + the 2 s bound on the connect stays within a
 *   restarted LXD's 10 s poll);
 * - any request that reaches the host makes the agent CONNECTED, any that
 *   cannot makes it STARTED; but it stays STARTED until a host has announced
 *   itself (PUT /1.0, a serial CONNECT line) since the agent started, even
 *   when agent.conf's address answers: LXD 5.0.2 reads the ring buffer every
 *   10 s and acts only on a last line of STARTED;
 * - a long-lived `/1.0/events` request whose head is late (LXD 5.0.2 sends
 *   it with the first event) or that breaks off once connected changes
 *   nothing: only failed connects, handshakes and plain requests do.
 *
 * Owns: the agent API listener and its connections, the devlxd server, the
 * serial channel, the relay and the timers; `close()` releases all of them.
 * Permissions: the "agent" set (ffi, net, read, write); `/dev/lxd/sock` needs only ffi.
 * @module
 */

import type { ConnectionInfo } from "../shared/api.ts";
import { HttpServer } from "../shared/http/mod.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { acceptTls, certificateFingerprint } from "../shared/tls/mod.ts";
import type { Transport } from "../shared/vsock/mod.ts";
import { createAgentApi } from "./agent_api.ts";
import { Operations } from "./operations.ts";
import type { GuestAgentStatus } from "./agent_state.ts";
import { createGuestDevlxdApp, GuestDevlxdServer } from "./devlxd_server.ts";
import { EventRelay } from "./event_relay.ts";
import { HostLink } from "./host_link.ts";
import type { Identity } from "./identity.ts";
import { SerialChannel } from "./serial_channel.ts";

export interface AgentOptions {
  identity: Identity;
  transport: Transport;
  status: GuestAgentStatus;
  /** Candidate serial ports, first existing wins. */
  serialPorts: string[];
  /** Port of the agent API. */
  agentPort: number;
  devlxdSocket: string;
  /** @default {0o600} */
  devlxdMode?: number;
  /** @default {5000} */
  rewriteInterval?: number;
  /**
   * Period of the host liveness probe while CONNECTED, in ms; keep it plus
   * 2 s under 10 s (a restarted LXD's poll).
   * @default {rewriteInterval}
   */
  probeInterval?: number;
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
   * Connections to the host open at once; more requests wait their turn. Keep
   * it under the host's per-instance cap (32 by default) so a burst in the
   * guest queues here instead of being refused there.
   * @default {16}
   */
  maxHostConnections?: number;
  /**
   * How long an idle connection to the host is kept for the next request
   * (keep-alive; at most 4 idle), in ms; 0 opens one connection per request.
   * @default {2000}
   */
  hostIdleTimeout?: number;
  /**
   * Whether a guest following `/1.0/events` makes the agent hold the host's
   * `/1.0/events` stream (pull); false: events reach it only by the host's
   * push (`POST /1.0/events` on the agent API), as from LXD.
   * @default {true}
   */
  pullEvents?: boolean;
  /**
   * Concurrent connections to the agent API (the host's announces, pushed
   * events, probes); one more is closed at once.
   * @default {32}
   */
  maxApiConnections?: number;
  /**
   * How long a guest request waits for the host's address when none is known
   * yet (agent.conf without a port, before the first announce), in ms; 0
   * answers 503 at once.
   * @default {30000}
   */
  hostWait?: number;
  /** Serial port polling/retry periods, in ms (tests shorten them). */
  serialPollInterval?: number;
  serialRetryInterval?: number;
  /**
   * Operations (exec sessions) running at once; more are refused with 503.
   * @default {32}
   */
  maxOperations?: number;
  version?: string;
  logger?: Logger;
}

/** SHA-256 of the certificate's DER, hex: what `--status` shows of the pinned host cert. */
function fingerprint(pem: string): string | undefined {
  try {
    return certificateFingerprint(pem);
  } catch {
    return undefined;
  }
}

export class Agent {
  #options: AgentOptions;
  #logger: Logger;
  #status: GuestAgentStatus;
  /** The way to the host: connection info in use, connections, reachability. */
  #host: HostLink;
  /** The last connection info a validation request reached the host with. */
  #good: ConnectionInfo | undefined;
  #generation = 0;
  #serial: SerialChannel | undefined;
  #relay: EventRelay;
  #devlxd: GuestDevlxdServer;
  #devlxdChange: Promise<void> = Promise.resolve();
  /** The agent API server (mutual TLS pinning `server.crt`). */
  #apiServer: HttpServer;
  #abort = new AbortController();
  #timers: ReturnType<typeof setInterval>[] = [];
  #closed = false;
  #api: ReturnType<typeof createAgentApi>;
  #operations: Operations;

  constructor(options: AgentOptions) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    this.#status = options.status;
    this.#host = new HostLink({
      transport: options.transport,
      identity: options.identity,
      status: options.status,
      connectTimeout: options.connectTimeout,
      responseTimeout: options.responseTimeout,
      maxConnections: options.maxHostConnections,
      idleTimeout: options.hostIdleTimeout,
      hostWait: options.hostWait,
      signal: this.#abort.signal,
      logger: this.#logger,
    });
    this.#operations = new Operations({
      maxRunning: options.maxOperations,
      logger: this.#logger.with({ part: "operations" }),
    });
    this.#relay = new EventRelay({
      fetchHost: this.#host.fetch,
      canPull: () => this.#host.connection !== undefined && (options.pullEvents ?? true),
      logger: this.#logger.with({ part: "events" }),
    });
    this.#api = createAgentApi({
      status: () => this.#status.snapshot(),
      applyConnection: (info) => this.applyConnection(info, "PUT /1.0"),
      publish: (event) => {
        this.#relay.publish(event);
        this.#operations.broadcast(event as { type: string });
      },
      version: options.version ?? "",
      logger: this.#logger.with({ part: "api" }),
      guest: { operations: this.#operations, logger: this.#logger.with({ part: "guest" }) },
    });
    this.#apiServer = new HttpServer({
      handler: (request) => this.#api.fetch(request),
      authenticate: async (socket, { deadline, signal }) => {
        try {
          const { socket: secure } = await acceptTls(socket, {
            cert: options.identity.cert,
            key: options.identity.key,
            pinned: options.identity.serverCert,
            handshakeTimeout: Math.max(1, deadline - Date.now()),
            signal,
          });
          return { socket: secure, identity: undefined };
        } catch (error) {
          this.#logger.debug("agent API connection refused or failed", { error });
          return undefined;
        }
      },
      maxConnections: options.maxApiConnections ?? 32,
      authTimeout: 5000,
      http: { idleTimeout: 30_000 },
      label: "agent API",
      logger: this.#logger,
    });
    this.#devlxd = new GuestDevlxdServer(options.devlxdSocket, {
      mode: options.devlxdMode ?? 0o600,
      logger: this.#logger,
    });
  }

  /** The connection info in use. */
  get connection(): ConnectionInfo | undefined {
    return this.#host.connection;
  }

  /**
   * Starts everything. Resolves once the agent API listens and, when
   * agent.conf asks for devlxd, `/dev/lxd/sock` exists (systemd readiness).
   */
  async start(): Promise<void> {
    const options = this.#options;
    this.#status.onTransition((state) => {
      // STOPPED is written by stopped() itself, which the caller awaits.
      if (state !== "STOPPED") this.#serial?.write(state);
    });
    this.#serial = new SerialChannel({
      paths: options.serialPorts,
      onConnect: (target) => this.#onSerialConnect(target),
      currentState: () => this.#status.state,
      pollInterval: options.serialPollInterval,
      retryInterval: options.serialRetryInterval,
      logger: this.#logger.with({ part: "serial" }),
    });
    await this.#serial.write(this.#status.state);
    this.#status.setSerialPort(this.#serial.path ?? null);

    this.#apiServer.serve(options.transport.listen(options.agentPort));
    this.#logger.info("agent API listening", { port: options.agentPort });

    const rewriteInterval = options.rewriteInterval ?? 5000;
    const probeInterval = options.probeInterval ?? rewriteInterval;
    if (probeInterval === rewriteInterval) {
      // One timer: the probe rides on the periodic rewrite.
      this.#timers.push(setInterval(() => {
        this.#host.probe();
        this.#rewrite();
      }, rewriteInterval));
    } else {
      this.#timers.push(setInterval(() => this.#rewrite(), rewriteInterval));
      this.#timers.push(setInterval(() => this.#host.probe(), probeInterval));
    }

    const pending = options.identity.pendingHost;
    if (options.identity.connection === undefined && pending !== undefined) {
      this.#logger.info("agent.conf names the host but not its port yet; waiting for it");
      this.#setDevlxd(pending.devlxd);
      await this.#devlxdChange;
    }
    const conf = options.identity.connection;
    if (conf !== undefined) {
      this.#logger.info("connection info from agent.conf", { cid: conf.cid, port: conf.port });
      const applying = this.applyConnection(conf, "agent.conf");
      applying.catch((error) =>
        this.#logger.warn("host not reachable with agent.conf's connection info", {
          error: error.message,
        })
      );
      await this.#devlxdChange;
    }
  }

  /**
   * Validates `info` by one `GET /1.0` to the host (a 403 counts as
   * reachable), then uses it: stores it and starts or stops devlxd
   * accordingly. Rejects with a sentence when the host cannot be reached:
   * the agent then keeps the last connection info that worked, if any;
   * without one it keeps `info` (nothing better is known) and is STARTED.
   */
  async applyConnection(
    info: ConnectionInfo,
    source: "agent.conf" | "PUT /1.0" | "serial",
  ): Promise<void> {
    const generation = ++this.#generation;
    // A host announced itself (LXD 5.0.2 acts only on STARTED: keep it until then).
    if (source !== "agent.conf") this.#status.hostAnnounced();
    const fallback = this.#good;
    // Nothing known works: use the new info at once, while it is checked.
    if (fallback === undefined) this.#use(info, source);
    let devlxd = this.#devlxdChange;
    try {
      let failure: Error | undefined;
      try {
        const response = await this.#host.fetchAt(info, new Request("http://lxd/1.0"));
        // Read to its end (small), so that its connection stays pooled for the next request.
        await response.arrayBuffer().catch(() => undefined);
        if (!response.ok && response.status !== 403) {
          if (this.#host.connection === info) {
            this.#status.failed(`The host answered ${response.status} to GET /1.0.`);
          }
          failure = new Error(`the host answered ${response.status} to GET /1.0`);
        }
      } catch (error) {
        failure = error as Error;
      }
      if (failure !== undefined) {
        if (fallback !== undefined && generation === this.#generation) {
          this.#logger.warn(
            "new connection info does not reach the host; keeping the last good one",
            {
              source,
              port: info.port,
              kept: fallback.port,
              error: failure.message,
            },
          );
        }
        throw failure;
      }
      if (generation !== this.#generation) return;
      this.#good = info;
      if (this.#host.connection !== info) {
        this.#use(info, source);
        devlxd = this.#devlxdChange;
        this.#status.connected();
      }
      this.#logger.info("connected to the host", { cid: info.cid, port: info.port, source });
      if (this.#status.ready) await this.#sendReady();
    } finally {
      await devlxd;
    }
  }

  /** Makes `info` the connection in use: status, event relay, devlxd on or off. */
  #use(info: ConnectionInfo, source: "agent.conf" | "PUT /1.0" | "serial"): void {
    this.#host.use(info); // kept connections to another address or certificate go
    this.#status.setHost(
      { cid: info.cid, port: info.port, fingerprint: fingerprint(info.certificate) },
      source,
    );
    this.#relay.reconnect();
    this.#setDevlxd(info.devlxd);
  }

  async #sendReady(): Promise<void> {
    try {
      const response = await this.#host.fetch(
        new Request("http://lxd/1.0", {
          method: "PATCH",
          body: JSON.stringify({ state: "Ready" }),
          headers: { "Content-Type": "application/json" },
        }),
      );
      await response.arrayBuffer().catch(() => undefined); // to its end: the connection stays pooled
      if (response.ok) this.#logger.info("re-sent the guest's Ready state to the host");
      else this.#logger.warn("the host refused the Ready state", { status: response.status });
    } catch (error) {
      this.#logger.warn("cannot re-send the Ready state", { error: (error as Error).message });
    }
  }

  #onSerialConnect(target: { cid: number; port: number }): void {
    const info = this.#host.connection ?? this.#options.identity.connection ??
      (this.#options.identity.pendingHost &&
        { cid: target.cid, port: target.port, ...this.#options.identity.pendingHost });
    if (info === undefined) {
      this.#logger.warn(
        "CONNECT line from the host, but no host certificate is known yet (no agent.conf, no PUT /1.0)",
        target,
      );
      return;
    }
    this.applyConnection({ ...info, cid: target.cid, port: target.port }, "serial").catch(
      (error) =>
        this.#logger.warn("host not reachable at the serial CONNECT address", {
          ...target,
          error: error.message,
        }),
    );
  }

  #setDevlxd(enabled: boolean): void {
    this.#devlxdChange = this.#devlxdChange.then(async () => {
      if (this.#closed) return;
      try {
        if (enabled) {
          await this.#devlxd.start((signal) =>
            createGuestDevlxdApp({
              host: this.#host,
              events: this.#relay,
              onReady: (state) => this.#status.setReady(state === "Ready"),
              signal,
              logger: this.#logger.with({ part: "devlxd" }),
            }).fetch
          );
        } else await this.#devlxd.stop();
        this.#status.setDevlxd(enabled, this.#devlxd.serving);
      } catch (error) {
        const reason = (error as Error).message;
        this.#logger.error("cannot serve devlxd", { socket: this.#devlxd.path, error: reason });
        this.#status.setDevlxd(enabled, this.#devlxd.serving, reason);
      }
    });
  }

  #rewrite(): void {
    const serial = this.#serial;
    if (serial === undefined) return;
    serial.write(this.#status.state).then(() => {
      this.#status.setSerialPort(serial.path ?? null);
      this.#status.flush();
    });
  }

  /**
   * Records STOPPED and writes it to the serial port at once (synchronously
   * on a device port), before anything is closed. Call on SIGTERM/SIGINT.
   */
  stopped(): Promise<boolean> {
    this.#status.stopped();
    return this.#serial?.write("STOPPED") ?? Promise.resolve(false);
  }

  /** Closes sockets, servers, loops and timers. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#abort.abort();
    for (const timer of this.#timers) clearInterval(timer);
    await this.#apiServer.shutdown(0);
    // Running commands are killed; their websockets are closed.
    await this.#operations.close();
    // Guests first: their streams end because the server stops (a WebSocket gets 1001).
    await this.#devlxdChange;
    await this.#devlxd.stop();
    await this.#relay.close();
    this.#host.close();
    await this.#serial?.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

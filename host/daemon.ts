/**
 * The host daemon, composed: the registry (and its lock), the host server
 * certificate, the event hubs, the instance service, the devlxd server on
 * AF_VSOCK and on one `<uds_path>_<port>` listener per hybrid instance, and
 * the admin API on `<state-dir>/admin.sock` (0600). The status monitor and
 * coordinator (the one writer of agent state) hears of every authenticated
 * agent request from the devlxd server and subscribes to `events` and
 * `lifecycle`.
 *
 * Owns every listener, connection and the registry; `close()` releases them.
 * Needs read/write on the state directory, net (unix sockets) and ffi.
 * @module
 */

import { join } from "node:path";
import type { DevlxdEvent } from "../shared/api.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { certificateDer, certificateFingerprint } from "../shared/tls/mod.ts";
import {
  connectHybrid,
  connectVsock,
  type Listener,
  listenUnix,
  listenVsock,
  localCid,
  randomPort,
} from "../shared/vsock/mod.ts";
import { AGENT_API_PORT } from "../shared/api.ts";
import { createAdminApp, type DaemonStatus } from "./admin_app.ts";
import { ensureServerCertificate, generateInstanceKeyPair } from "./certificates.ts";
import { dialAgent } from "./agent_proxy.ts";
import { VERSION } from "./version.ts";
import { writeFileAtomic } from "../shared/write_file_atomic.ts";
import { agentConf } from "./config_drive.ts";
import { createHostDevlxdApp } from "./devlxd_app.ts";
import { EventHub, type LifecycleEvent } from "./event_hub.ts";
import { devlxdEnabled, type Instance } from "./instance.ts";
import { InstanceService } from "./instance_service.ts";
import { Registry } from "./registry.ts";
import { checkOwner, defaultConfigDrive, prepareStateDir, type StatePaths } from "./state_dir.ts";
import { HostVsockServer } from "./vsock_server.ts";
import { Coordinator, type CoordinatorIntervals } from "./monitor/coordinator.ts";

export interface DaemonOptions {
  stateDir: string;
  /** vsock (or hybrid) port; 0 = the last one used if free, else random. @default 0 */
  port?: number;
  /** `vsock`: AF_VSOCK plus hybrid listeners; `unix`: hybrid listeners only. @default "vsock" */
  transport?: "vsock" | "unix";
  /** @default <state-dir>/images */
  imagesDir?: string;
  /** @default 32 */
  maxConnectionsPerInstance?: number;
  /** Bound for in-flight requests at close, ms. @default 5000 */
  shutdownTimeout?: number;
  /** TLS and HTTP bounds (tests shorten them). */
  handshakeTimeout?: number;
  headersTimeout?: number;
  idleTimeout?: number;
  maxHeaderSize?: number;
  maxBodySize?: number;
  /**
   * Run the status monitor and coordinator (status channels, announcing the
   * host to agents, pushing events to agents). @default true
   */
  monitor?: boolean;
  /** Status-channel poll periods by agent state, ms (the coordinator's defaults when unset). */
  intervals?: CoordinatorIntervals;
  /** `location` in devlxd `GET /1.0`. @default Deno.hostname() */
  location?: string;
  logger?: Logger;
}

/** Registry meta key: "<port> <server cert fingerprint>" the config drives were last refreshed for. */
const CONFIG_DRIVES_META = "config_drives";

export class Daemon {
  readonly paths: StatePaths;
  readonly registry: Registry;
  readonly service: InstanceService;
  /** devlxd events by instance name (any number of subscribers). */
  readonly events: EventHub<DevlxdEvent>;
  /** Lifecycle events by instance name. */
  readonly lifecycle: EventHub<LifecycleEvent>;
  /** The port agents dial (vsock, or the `_<port>` suffix of hybrid paths). */
  readonly port: number;
  /** This host's vsock CID when listening on AF_VSOCK, else null. */
  readonly cid: number | null;
  readonly transport: "vsock" | "unix";
  /** The host server certificate (PEM), what agents pin. */
  readonly serverCert: string;
  readonly startedAt = new Date();
  /**
   * Settles once every default-location config drive's `agent.conf` names this
   * daemon's port and certificate (started after the "listening" line; never rejects).
   */
  configDrivesRefreshed: Promise<void> = Promise.resolve();
  #server: HostVsockServer;
  #coordinator: Coordinator | undefined;
  #hybrid = new Map<string, { path: string; listener: Listener }>();
  #admin: Deno.HttpServer<Deno.UnixAddr> | undefined;
  #logger: Logger;
  #unsubscribe: () => void = () => {};
  #closing: Promise<void> | undefined;
  #shutdownTimeout: number;

  private constructor(init: {
    paths: StatePaths;
    registry: Registry;
    service: InstanceService;
    events: EventHub<DevlxdEvent>;
    lifecycle: EventHub<LifecycleEvent>;
    server: HostVsockServer;
    port: number;
    cid: number | null;
    transport: "vsock" | "unix";
    serverCert: string;
    logger: Logger;
    shutdownTimeout: number;
  }) {
    this.paths = init.paths;
    this.registry = init.registry;
    this.service = init.service;
    this.events = init.events;
    this.lifecycle = init.lifecycle;
    this.#server = init.server;
    this.port = init.port;
    this.cid = init.cid;
    this.transport = init.transport;
    this.serverCert = init.serverCert;
    this.#logger = init.logger;
    this.#shutdownTimeout = init.shutdownTimeout;
  }

  /**
   * Starts the daemon. Fails with RegistryError `LOCKED` when another process
   * holds the state directory, before touching anything else in it.
   */
  static async start(options: DaemonOptions): Promise<Daemon> {
    const logger = options.logger ?? silentLogger;
    const paths = await prepareStateDir(options.stateDir);
    const registry = Registry.open(paths.registry);
    let server: HostVsockServer | undefined;
    let vsock: Listener | undefined;
    let monitor: Coordinator | undefined;
    try {
      const { cert, key } = await ensureServerCertificate(paths);
      const onDrop = (stream: string) => (topic: string, error: Error) =>
        logger.warn("event stream dropped: its reader is too slow", {
          stream,
          instance: topic,
          reason: error.message,
        });
      const events = new EventHub<DevlxdEvent>({ onDrop: onDrop("devlxd") });
      const lifecycle = new EventHub<LifecycleEvent>({ onDrop: onDrop("lifecycle") });
      const transport = options.transport ?? "vsock";

      // Port: as asked; else the last one used (agents that kept it reconnect
      // without a new announce), else random.
      const last = Number(registry.getMeta("port") ?? 0);
      let port = options.port ?? 0;
      let cid: number | null = null;
      if (transport === "vsock") {
        if (port === 0 && last > 0) {
          try {
            vsock = listenVsock({ port: last });
          } catch {
            vsock = undefined;
          }
        }
        vsock ??= listenVsock({ port });
        port = vsock.address.family === "vsock" ? vsock.address.port : port;
        try {
          cid = localCid();
        } catch {
          cid = null;
        }
      } else if (port === 0) {
        port = last > 0 ? last : randomPort();
      }
      registry.setMeta("port", String(port));

      const service = new InstanceService({
        registry,
        paths,
        events,
        lifecycle,
        serverCert: cert,
        port: () => port,
        generateKeyPair: generateInstanceKeyPair,
        logger,
      });
      const app = createHostDevlxdApp({
        setReady: (name, ready) => service.setReady(name, ready),
        events,
        location: options.location ?? Deno.hostname(),
        imagesDir: options.imagesDir ?? paths.images,
        logger,
      });
      const coordinator = options.monitor === false ? undefined : new Coordinator({
        store: {
          list: () => registry.list(),
          get: (name) => registry.get(name),
          setRuntime: (name, patch) => service.applyRuntime(name, patch),
          recordSeen: (name) => service.recordSeen(name),
          queueEvent: (name, event) => registry.queueEvent(name, event),
          dequeueEvents: (ids) => registry.dequeueEvents(ids),
          queuedEvents: (name) => registry.queuedEvents(name),
        },
        hostPort: () => port,
        serverCert: cert,
        connectAgent: (instance, { timeout, signal }) =>
          instance.hybrid === undefined
            ? connectVsock(instance.cid, AGENT_API_PORT, { timeout, signal })
            : connectHybrid(instance.hybrid, AGENT_API_PORT, { timeout, signal }),
        // An agent holding GET /1.0/events gets the event there; else it is pushed.
        deliverViaStream: (name) => events.subscriberCount(name) > 0,
        intervals: options.intervals,
        logger: logger.with({ component: "monitor" }),
      });
      monitor = coordinator;
      server = new HostVsockServer({
        cert,
        key,
        byCid: (c) => registry.viewByCid(c),
        byName: (n) => registry.view(n),
        handler: (request, instance) => app.fetch(request, { instance }),
        // The coordinator records it (and acts on it); without one, only lastSeen is kept.
        onAgentRequest: coordinator
          ? (name) => coordinator.agentSeen(name)
          : (name) => service.recordSeen(name),
        maxConnectionsPerInstance: options.maxConnectionsPerInstance,
        handshakeTimeout: options.handshakeTimeout,
        headersTimeout: options.headersTimeout,
        idleTimeout: options.idleTimeout,
        maxHeaderSize: options.maxHeaderSize,
        maxBodySize: options.maxBodySize,
        logger,
      });
      const daemon = new Daemon({
        paths,
        registry,
        service,
        events,
        lifecycle,
        server,
        port,
        cid,
        transport,
        serverCert: cert,
        logger,
        shutdownTimeout: options.shutdownTimeout ?? 5000,
      });
      daemon.#coordinator = coordinator;
      if (vsock) server.serve(vsock, { kind: "vsock" });
      vsock = undefined;
      // One line for all of them (a fleet host opens hundreds here); each at debug.
      for (const instance of registry.list()) daemon.#openHybrid(instance, "debug");
      const unsubscribes = [
        lifecycle.subscribe("*", (event) => {
          const instance = registry.get(event.instance);
          if (event.action === "instance-added" && instance) {
            daemon.#openHybrid(instance);
            coordinator?.add(instance);
          } else if (event.action === "instance-removed") {
            daemon.#closeHybrid(event.instance);
            coordinator?.remove(event.instance);
            daemon.#closeAgentConnections(event.instance, "instance removed");
          } else if (event.action === "config-changed" && instance) {
            coordinator?.update(instance);
            if (!devlxdEnabled(instance)) {
              daemon.#closeAgentConnections(event.instance, "security.devlxd is false");
            }
          }
        }),
      ];
      if (coordinator) {
        unsubscribes.push(
          events.subscribe("*", (event, name) => void coordinator.pushEvent(name, event)),
        );
      }
      daemon.#unsubscribe = () => unsubscribes.forEach((u) => u());
      await daemon.#serveAdmin();
      logger.info("listening", {
        transport,
        cid: cid ?? undefined,
        port,
        instances: registry.size,
        hybridListeners: daemon.#hybrid.size,
        stateDir: paths.dir,
        admin: paths.adminSocket,
      });
      // Neither needs to precede the line: agents can connect already (the
      // listeners are open), `instance add` writes a current drive itself, and
      // an agent whose drive is stale learns the port from the announce.
      daemon.configDrivesRefreshed = daemon.#refreshConfigDrives();
      coordinator?.start();
      return daemon;
    } catch (error) {
      vsock?.close();
      await server?.close(0);
      await monitor?.close();
      registry.close();
      throw error;
    }
  }

  #openHybrid(instance: Instance, level: "info" | "debug" = "info"): void {
    if (instance.hybrid === undefined || this.#hybrid.has(instance.name)) return;
    const path = `${instance.hybrid}_${this.port}`;
    try {
      const listener = listenUnix(path, { replace: true });
      this.#hybrid.set(instance.name, { path, listener });
      this.#server.serve(listener, { kind: "hybrid", instance: instance.name });
      this.#logger[level]("hybrid listener", { instance: instance.name, path });
    } catch (error) {
      this.#logger.error("cannot listen for hybrid instance", {
        instance: instance.name,
        path,
        error,
      });
      this.#coordinator?.reportError(instance.name, `cannot listen on ${path}`);
    }
  }

  /** Closes the agent connections of `name` (kept-alive ones at once), saying why. */
  #closeAgentConnections(name: string, why: string): void {
    const closed = this.#server.closeInstance(name);
    if (closed > 0) this.#logger.info("agent connections closed", { instance: name, closed, why });
  }

  #closeHybrid(name: string): void {
    const entry = this.#hybrid.get(name);
    if (!entry) return;
    this.#hybrid.delete(name);
    this.#server.unserve(entry.listener).catch(() => {});
  }

  /**
   * Rewrites `agent.conf` in default-location config drives whose port or
   * certificate is stale, 8 at a time. Skipped when the registry's meta says
   * the drives were last brought up to date for this port and certificate (a
   * restart on the same port); recorded there once every drive is done.
   */
  async #refreshConfigDrives(): Promise<void> {
    const stamp = `${this.port} ${certificateFingerprint(certificateDer(this.serverCert))}`;
    if (this.registry.getMeta(CONFIG_DRIVES_META) === stamp) return;
    const wanted = agentConf(this.serverCert, this.port);
    const text = JSON.stringify(wanted) + "\n";
    const pending = this.registry.list();
    let rewritten = 0;
    const worker = async () => {
      for (let instance = pending.pop(); instance; instance = pending.pop()) {
        if (this.#closing) return;
        const dir = instance.configDrive ?? defaultConfigDrive(this.paths, instance.name);
        try {
          const info = JSON.parse(await Deno.readTextFile(join(dir, "agent.conf")));
          if (info?.port === wanted.port && info?.certificate === wanted.certificate) continue;
          await writeFileAtomic(join(dir, "agent.conf"), text);
          rewritten++;
        } catch {
          // Gone, unreadable or removed meanwhile: the announce covers it.
        }
      }
    };
    try {
      await Promise.all(Array.from({ length: 8 }, worker));
      if (this.#closing) return;
      this.registry.setMeta(CONFIG_DRIVES_META, stamp);
      if (rewritten > 0) {
        this.#logger.info("config drives refreshed", { rewritten, port: this.port });
      }
    } catch (error) {
      this.#logger.error("cannot refresh config drives", { error });
    }
  }

  async #serveAdmin(): Promise<void> {
    const path = this.paths.adminSocket;
    // One that another user put here means someone else can write our state directory.
    await checkOwner(path, "the admin socket").catch((error) => {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    });
    // We hold the registry lock, so any socket file left here is stale.
    await Deno.remove(path).catch(() => {});
    const app = createAdminApp({
      service: this.service,
      status: () => this.status(),
      logger: this.#logger,
      agentProxy: {
        dial: (name) => dialAgent(this.service.get(name)),
        logger: this.#logger.with({ component: "agent-proxy" }),
      },
    });
    const ready = Promise.withResolvers<void>();
    this.#admin = Deno.serve({
      path,
      transport: "unix",
      onListen: () => ready.resolve(),
      onError: (error) => {
        this.#logger.error("admin request failed", { error });
        return new Response("Internal Server Error", { status: 500 });
      },
    }, app.fetch);
    await ready.promise;
    await Deno.chmod(path, 0o600);
  }

  /** What `status` shows. */
  status(): DaemonStatus {
    return {
      running: true,
      version: VERSION,
      stateDir: this.paths.dir,
      pid: Deno.pid,
      startedAt: this.startedAt.toISOString(),
      transport: this.transport,
      vsock: this.transport === "vsock" ? { cid: this.cid ?? -1, port: this.port } : null,
      port: this.port,
      hybridListeners: Object.fromEntries(
        [...this.#hybrid].map(([name, { path }]) => [name, path]),
      ),
      instances: this.registry.size,
      connections: this.#server.connections,
      monitor: this.#coordinator?.snapshot(),
    };
  }

  /**
   * Stops listening, ends event streams, lets in-flight requests finish
   * within the shutdown bound, then closes the admin socket and the registry.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#logger.info("shutting down", { open: Object.values(this.#server.connections).length });
      this.#unsubscribe();
      await this.configDrivesRefreshed;
      await this.#coordinator?.close();
      this.#hybrid.clear();
      this.events.close();
      this.lifecycle.close();
      await this.#server.close(this.#shutdownTimeout);
      await this.#admin?.shutdown();
      this.registry.close();
      this.#logger.info("stopped");
    })();
    return this.#closing;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

/**
 * The coordinator: one status watcher per instance and its lifecycle (start,
 * add, update, remove, close), wired to the instance's
 * {@linkcode AnnounceMachine} (agent state and announces: see
 * `announce_machine.ts`) and to the {@linkcode EventOutbox} (events to
 * agents: see `event_outbox.ts`). Authenticated agent requests reach it
 * through `agentSeen()`.
 *
 * Poll periods follow the agent state: `waiting` while STARTED / "CONNECT
 * sent", `connected` once CONNECTED, `stopped` while STOPPED.
 *
 * Owns the watchers, their channels, the machines, the outbox and the agent
 * calls in flight until `close()`. Needs `--allow-read`, `--allow-write`,
 * `--allow-net` for the QMP and serial unix sockets, and what `connectAgent`
 * needs (`--allow-ffi` for vsock).
 * @module
 */

import type { Duplex } from "node:stream";
import type { DevlxdEvent } from "../../shared/api.ts";
import { type Logger, silentLogger } from "../../shared/log.ts";
import { Slots } from "../../shared/slots.ts";
import {
  devlxdEnabled,
  type HostAgentStatus,
  type Instance,
  type StatusChannel,
} from "../instance.ts";
import { type AgentCallOptions, announce, probeAgent, pushEvent } from "./announcer.ts";
import {
  type AgentApi,
  type AgentStateStore,
  type AgentView,
  type AnnounceContext,
  AnnounceMachine,
} from "./announce_machine.ts";
import { type EventDelivery, EventOutbox, type EventOutboxStore } from "./event_outbox.ts";
import { createStatusWatcher, type StatusWatcher } from "./status_watcher.ts";

/** What the coordinator needs of the instance registry. */
export interface CoordinatorStore extends AgentStateStore, EventOutboxStore {
  list(): Instance[];
  get(name: string): Instance | undefined;
  /** Cheap note of an authenticated agent request (called on every `agentSeen`). */
  recordSeen?(name: string): void;
}

/** Poll periods per state, in ms. */
export interface CoordinatorIntervals {
  /** While waiting for an agent (STARTED, "CONNECT sent"). @default 500 */
  waiting?: number;
  /** While STOPPED. @default 3000 */
  stopped?: number;
  /** While CONNECTED; also the stale-agent detection bound. @default 10000 */
  connected?: number;
}

/** Options of {@linkcode Coordinator}. */
export interface CoordinatorOptions {
  store: CoordinatorStore;
  /** The vsock port the host listens on now. */
  hostPort(): number;
  /** PEM of the host server certificate the agents pin. */
  serverCert: string;
  /** Opens a raw stream to the instance's agent API (vsock `<cid>:8443` or hybrid). */
  connectAgent?(
    instance: Instance,
    options: { timeout: number; signal: AbortSignal },
  ): Promise<Duplex>;
  /** Replaces the agent API calls built on `connectAgent`. */
  agentApi?: AgentApi;
  /** @default { waiting: 500, stopped: 3000, connected: 10000 } */
  intervals?: CoordinatorIntervals;
  /** Announces in flight at once. @default 16 */
  announceConcurrency?: number;
  /**
   * After a `CONNECT` line on a bidirectional channel, how long to wait for
   * the agent to reach the host by itself (ours reads the line) before
   * sending PUT /1.0 (a stock agent does not), in ms: our agents then cost
   * one TLS handshake per announce (their own request), not two.
   * @default 1000
   */
  connectLineWait?: number;
  /** Events kept per offline instance; the oldest is dropped beyond. @default 256 */
  eventQueueLimit?: number;
  /**
   * Bytes of event JSON kept per offline instance (a config event carries old
   * and new value, up to 1 MiB each); the oldest is dropped beyond, but the
   * newest event is always kept. @default 4194304 (4 MiB)
   */
  eventQueueBytes?: number;
  /** Bound on connecting to an agent, in ms (LXD uses 3 s). @default 3000 */
  connectTimeout?: number;
  /** Bound on QMP connect + greeting and each QMP command, in ms. @default 3000 */
  qmpTimeout?: number;
  /** Status channel reconnect backoff, in ms. @default { min: 500, max: 30000 } */
  backoff?: { min?: number; max?: number };
  /**
   * Called once for each new event given to `pushEvent`: return true when the
   * agent holds an open pull stream (`GET /1.0/events` on the host) that
   * receives it, so it is not pushed too. Events queued while the agent was
   * offline are pushed (`POST /1.0/events`) when it is back, whatever streams
   * it opens then (our agent's relay drops a second copy of an event).
   * @default () => false
   */
  deliverViaStream?(name: string, event: DevlxdEvent): boolean;
  /** Clock in ms. @default Date.now */
  now?: () => number;
  /** @default silentLogger */
  logger?: Logger;
  /** Aborting closes the coordinator. */
  signal?: AbortSignal;
}

/** What operators see per instance. */
export interface MonitorStatus extends AgentView {
  name: string;
  cid: number;
  channel: StatusChannel["kind"];
  /** Whether the status channel (QMP socket, serial socket, file) is open. */
  channelUp: boolean;
  /** ISO time since which the guest has not read a line the host wrote to its channel. */
  channelStalled?: string;
  queuedEvents: number;
  droppedEvents: number;
  /** Current poll period of the channel, in ms. */
  pollInterval: number;
}

interface Entry {
  instance: Instance;
  watcher: StatusWatcher;
  machine: AnnounceMachine;
  removed: boolean;
}

/** Runs the status watchers, announce machines and event outbox; see the module doc. */
export class Coordinator implements AsyncDisposable {
  #options: CoordinatorOptions;
  #store: CoordinatorStore;
  #logger: Logger;
  #intervals: Required<CoordinatorIntervals>;
  #api: AgentApi;
  #entries = new Map<string, Entry>();
  #abort = new AbortController();
  #tasks = new Set<Promise<unknown>>();
  #context: AnnounceContext;
  #outbox: EventOutbox;
  #started = false;
  #closed = false;
  #onAbort = () => void this.close();

  constructor(options: CoordinatorOptions) {
    this.#options = options;
    this.#store = options.store;
    this.#logger = options.logger ?? silentLogger;
    this.#intervals = {
      waiting: options.intervals?.waiting ?? 500,
      stopped: options.intervals?.stopped ?? 3000,
      connected: options.intervals?.connected ?? 10_000,
    };
    this.#api = options.agentApi ?? this.#defaultApi();
    this.#context = {
      store: this.#store,
      api: this.#api,
      hostPort: options.hostPort,
      serverCert: options.serverCert,
      intervals: this.#intervals,
      slots: new Slots(options.announceConcurrency ?? 16),
      connectLineWait: options.connectLineWait ?? 1000,
      now: options.now ?? Date.now,
      logger: this.#logger,
      signal: this.#abort.signal,
      track: (task) => this.#track(task),
    };
    this.#outbox = new EventOutbox({
      store: this.#store,
      push: (name, event, signal) => {
        const entry = this.#entries.get(name);
        if (!entry) return Promise.reject(new Error(`instance ${name} is not watched`));
        return this.#api.pushEvent(entry.instance, event, signal);
      },
      isConnected: (name) => this.#entries.get(name)?.machine.status === "CONNECTED",
      deliverViaStream: options.deliverViaStream,
      limit: options.eventQueueLimit,
      maxBytes: options.eventQueueBytes,
      retry: { min: this.#intervals.waiting, max: this.#intervals.connected },
      logger: this.#logger,
    });
    options.signal?.addEventListener("abort", this.#onAbort, { once: true });
  }

  #defaultApi(): AgentApi {
    const connectAgent = this.#options.connectAgent;
    if (connectAgent === undefined) {
      throw new TypeError("Coordinator needs connectAgent or agentApi");
    }
    const connectTimeout = this.#options.connectTimeout ?? 3000;
    const call = (instance: Instance, signal: AbortSignal): AgentCallOptions => ({
      connect: (s) => connectAgent(instance, { timeout: connectTimeout, signal: s }),
      connectTimeout,
      signal,
    });
    return {
      announce: async (instance, info, signal) => {
        const { pid } = await announce(instance, info, call(instance, signal));
        return { pid };
      },
      pushEvent: (instance, event, signal) => pushEvent(instance, event, call(instance, signal)),
      probe: (instance, signal) => probeAgent(instance, call(instance, signal)),
    };
  }

  /**
   * Starts a watcher for every instance in the store and announces the host
   * to every instance whose agent was last known up (bounded concurrency),
   * without waiting for its next STARTED. Idempotent.
   */
  start(): void {
    if (this.#started || this.#closed) return;
    this.#started = true;
    for (const instance of this.#store.list()) this.#addEntry(instance);
    for (const entry of this.#entries.values()) this.#startEntry(entry);
  }

  /** Watches a newly registered instance. */
  add(instance: Instance): void {
    if (this.#closed) return;
    if (this.#entries.has(instance.name)) return this.update(instance);
    const entry = this.#addEntry(instance);
    if (this.#started) this.#startEntry(entry);
  }

  /** Stops watching `name`; its queued events are dropped. */
  remove(name: string): void {
    const entry = this.#entries.get(name);
    if (!entry) return;
    this.#entries.delete(name);
    entry.removed = true;
    entry.machine.stop();
    this.#outbox.remove(name);
    this.#track(entry.watcher.close());
  }

  /**
   * Takes a changed instance (certificates, config, status channel). A
   * change of `security.devlxd` is announced to an agent that is up (the
   * `devlxd` field of `PUT /1.0`), as LXD does.
   */
  update(instance: Instance): void {
    const entry = this.#entries.get(instance.name);
    if (!entry) return this.add(instance);
    const channelChanged =
      JSON.stringify(entry.instance.status) !== JSON.stringify(instance.status);
    const devlxdChanged = devlxdEnabled(entry.instance) !== devlxdEnabled(instance);
    entry.instance = entry.machine.instance = instance;
    if (devlxdChanged && this.#started && entry.machine.status !== "STOPPED") {
      entry.machine.announce("security.devlxd changed", true);
    }
    if (!channelChanged) return;
    this.#track(entry.watcher.close());
    entry.watcher = this.#createWatcher(entry);
    if (this.#started) {
      entry.watcher.setInterval(this.#intervalFor(entry.machine.status));
      entry.watcher.start();
    }
  }

  /**
   * The vsock server calls this for every authenticated request from the
   * instance's agent: proof it reached the host → CONNECTED, lastSeen, and
   * queued events are delivered.
   */
  agentSeen(name: string): void {
    this.#store.recordSeen?.(name);
    const entry = this.#entries.get(name);
    if (!entry) return;
    entry.machine.seen();
    if (entry.machine.status === "CONNECTED") this.#outbox.flush(name);
  }

  /**
   * Records an error seen for the instance outside its status channel (its
   * hybrid listener could not open); the agent state stays.
   */
  reportError(name: string, error: string): void {
    const entry = this.#entries.get(name);
    if (entry) return entry.machine.reportError(error);
    if (this.#closed || this.#store.get(name) === undefined) return;
    // Not watched yet (before start()): recorded for the machine to load.
    try {
      this.#store.setRuntime(name, { lastError: error });
    } catch (e) {
      this.#logger.warn("cannot record agent state", { instance: name, error: e });
    }
  }

  /**
   * Delivers `event` to the instance's agent through the outbox: its open
   * pull stream, a push now, or the offline queue. Resolves with what
   * happened.
   */
  pushEvent(name: string, event: DevlxdEvent): Promise<EventDelivery> {
    if (this.#closed) return Promise.resolve("dropped");
    return this.#outbox.push(name, event);
  }

  /** The monitor's view of every instance. */
  snapshot(): MonitorStatus[] {
    return [...this.#entries.values()].map((e) => this.#status(e));
  }

  /** Stops every watcher and in-flight call. Idempotent. */
  async close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#options.signal?.removeEventListener("abort", this.#onAbort);
      this.#abort.abort(new Error("coordinator closed"));
      for (const name of [...this.#entries.keys()]) this.remove(name);
      this.#track(this.#outbox.close());
    }
    while (this.#tasks.size > 0) await Promise.allSettled([...this.#tasks]);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // --- internals ---------------------------------------------------------

  #status(e: Entry): MonitorStatus {
    const { queued, dropped } = this.#outbox.counts(e.instance.name);
    return {
      name: e.instance.name,
      cid: e.instance.cid,
      channel: e.instance.status.kind,
      channelUp: e.watcher.connected,
      channelStalled: e.watcher.stalledSince === undefined
        ? undefined
        : new Date(e.watcher.stalledSince).toISOString(),
      ...e.machine.view(),
      queuedEvents: queued,
      droppedEvents: dropped,
      pollInterval: e.watcher.interval,
    };
  }

  #track(promise: Promise<unknown>): void {
    this.#tasks.add(promise);
    promise.finally(() => this.#tasks.delete(promise)).catch(() => {});
  }

  #addEntry(instance: Instance): Entry {
    const entry: Entry = {
      instance,
      watcher: undefined as unknown as StatusWatcher,
      machine: undefined as unknown as AnnounceMachine,
      removed: false,
    };
    entry.machine = new AnnounceMachine(this.#context, {
      instance,
      channel: () => entry.watcher,
      onStatus: (status, changed) => {
        if (changed) entry.watcher.setInterval(this.#intervalFor(status));
        if (status === "CONNECTED") this.#outbox.flush(instance.name);
      },
    });
    entry.watcher = this.#createWatcher(entry);
    this.#outbox.open(instance.name);
    this.#entries.set(instance.name, entry);
    return entry;
  }

  #startEntry(entry: Entry): void {
    entry.watcher.setInterval(this.#intervalFor(entry.machine.status));
    entry.watcher.start();
    // The agent was up when the previous host process last knew it: it may
    // hold our old port. Announce now rather than at its next STARTED.
    if (entry.machine.status !== "STOPPED") entry.machine.announce("host started", true);
  }

  #createWatcher(entry: Entry): StatusWatcher {
    const name = entry.instance.name;
    return createStatusWatcher(entry.instance.status, {
      onState: (observation) => {
        if (this.#entries.get(name) === entry && !entry.removed) entry.machine.observe(observation);
      },
      onError: (error) => {
        if (this.#entries.get(name) === entry) {
          entry.machine.reportError(`status channel: ${error.message}`);
        }
      },
      interval: this.#intervals.stopped,
      timeout: this.#options.qmpTimeout,
      backoff: this.#options.backoff,
      logger: this.#logger.with({ instance: name }),
    });
  }

  #intervalFor(status: HostAgentStatus): number {
    switch (status) {
      case "STOPPED":
        return this.#intervals.stopped;
      case "CONNECTED":
        return this.#intervals.connected;
      default:
        return this.#intervals.waiting;
    }
  }
}

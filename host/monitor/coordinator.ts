/**
 * The coordinator: one status watcher per instance, the per-instance agent
 * state machine (STOPPED → STARTED → "CONNECT sent" → CONNECTED), announcing
 * the host to agents (`PUT /1.0` and, where the serial channel is
 * bidirectional, a `CONNECT 2:<port>` line), and event delivery to agents
 * (push with a bounded per-instance queue while the agent is offline).
 *
 * When it announces (PROTOCOL.md, "Compatibility pitfalls"): a stock
 * lxd-agent rewrites STARTED every 5 s even while connected, so a STARTED
 * line alone does not trigger an announce. The host announces when
 * - the agent shows up (first STARTED/CONNECTED after a STOPPED, after the
 *   channel came back, or after this host started — at start every instance
 *   whose agent was last known up is announced at once, bounded concurrency),
 * - the agent has not reached the host since the last announce
 *   ("CONNECT sent" and STARTED again), with backoff,
 * - the host's port changed (`portChanged()`),
 * - while CONNECTED, a STARTED line comes from an agent that has not reached
 *   us since the channel's previous read, and a check of its API (`GET /1.0`)
 *   shows it restarted (another `server_pid` than after our announce) or
 *   holds another host address — or tells nothing either way. This finds an
 *   agent that was killed without writing STOPPED and came back with stale
 *   connection info at the first read after it came back (one slow-poll
 *   period), at the cost of about one `GET /1.0` per slow-poll period for
 *   each idle stock agent (they rewrite STARTED every 5 s).
 *
 * Poll periods follow the state: `waiting` while STARTED / "CONNECT sent",
 * `connected` once CONNECTED, `stopped` while STOPPED.
 *
 * Owns the watchers, their channels, timers and in-flight agent calls until
 * `close()`. Needs `--allow-read`, `--allow-write`, `--allow-net` for the QMP
 * and serial unix sockets, and what `connectAgent` needs (`--allow-ffi` for
 * vsock).
 * @module
 */

import type { Duplex } from "node:stream";
import {
  type AgentState,
  type ConnectionInfo,
  type DevlxdEvent,
  formatConnectLine,
  HOST_CID,
} from "../../shared/api.ts";
import { type Logger, silentLogger } from "../../shared/log.ts";
import { MtlsError } from "../../shared/http/mod.ts";
import { Slots } from "../../shared/slots.ts";
import {
  type AgentStatus,
  devlxdEnabled,
  type Instance,
  type InstanceRuntime,
  type StatusChannel,
} from "../instance.ts";
import {
  type AgentCallOptions,
  type AgentProbe,
  announce,
  probeAgent,
  pushEvent,
} from "./announcer.ts";
import {
  createStatusWatcher,
  type StatusObservation,
  type StatusWatcher,
} from "./status_watcher.ts";

/** What the coordinator needs of the instance registry. */
export interface CoordinatorStore {
  list(): Instance[];
  get(name: string): Instance | undefined;
  /** Durably records runtime fields; called only when the state or the error changes. */
  setRuntime(name: string, patch: Partial<InstanceRuntime>): void;
  /** Cheap note of an authenticated agent request (called on every `agentSeen`). */
  recordSeen?(name: string): void;
  /** Durably keeps an event (JSON) queued for an offline agent; returns its id. */
  queueEvent?(name: string, event: string): number;
  /** Forgets kept events: delivered, refused by the agent, or dropped by the bound. */
  dequeueEvents?(ids: number[]): void;
  /** The events kept for an instance, oldest first (loaded when the coordinator adds it). */
  queuedEvents?(name: string): { id: number; event: string }[];
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

/** The three calls to an agent API, replaceable (tests, other transports). */
export interface AgentApi {
  /** Resolves to the agent's pid when its answer tells it (else the coordinator probes). */
  announce(
    instance: Instance,
    info: ConnectionInfo,
    signal: AbortSignal,
  ): Promise<{ pid?: number } | void>;
  pushEvent(instance: Instance, event: DevlxdEvent, signal: AbortSignal): Promise<void>;
  probe(instance: Instance, signal: AbortSignal): Promise<AgentProbe>;
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
  /** Called after every change of an instance's agent state or last error. */
  onChange?(name: string, runtime: InstanceRuntime): void;
  /** Clock in ms. @default Date.now */
  now?: () => number;
  /** @default silentLogger */
  logger?: Logger;
  /** Aborting closes the coordinator. */
  signal?: AbortSignal;
}

/** What operators see per instance. */
export interface MonitorStatus {
  name: string;
  cid: number;
  channel: StatusChannel["kind"];
  /** Whether the status channel (QMP socket, serial socket, file) is open. */
  channelUp: boolean;
  /** ISO time since which the guest has not read a line the host wrote to its channel. */
  channelStalled?: string;
  agentState: AgentStatus;
  /** The last state line read from the channel (or STOPPED when it went away). */
  observed?: AgentState;
  lastSeen?: string;
  lastChange?: string;
  lastError?: string;
  /** When the host last announced itself successfully, and which port. */
  lastAnnounce?: string;
  announcedPort?: number;
  queuedEvents: number;
  droppedEvents: number;
  /** Current poll period of the channel, in ms. */
  pollInterval: number;
}

/** How `pushEvent()` handled an event. */
export type EventDelivery = "stream" | "pushed" | "queued" | "dropped";

interface QueuedEvent {
  event: DevlxdEvent;
  /** Size of the event's JSON, for the queue's byte bound. */
  bytes: number;
  /** Its row in the store, when kept there. */
  id?: number;
  settle?: (result: EventDelivery) => void;
}

interface Entry {
  instance: Instance;
  watcher: StatusWatcher;
  status: AgentStatus;
  observed?: AgentState;
  lastError?: string;
  lastChange?: string;
  lastSeen?: number;
  /** Bumped at STOPPED and removal: results of older announces are ignored. */
  generation: number;
  announcedAt?: number;
  announcedPort?: number;
  /** Agent pid seen by the probe after the last announce. */
  agentPid?: number;
  announcing: boolean;
  forceAgain: boolean;
  failures: number;
  nextAnnounceAt: number;
  lastCheckAt: number;
  checking: boolean;
  queue: QueuedEvent[];
  dropped: number;
  flushing: boolean;
  pushFailures: number;
  /** Announces in a row that the agent did not answer by reaching us. */
  unanswered: number;
  announceTimer?: ReturnType<typeof setTimeout>;
  flushTimer?: ReturnType<typeof setTimeout>;
  removed: boolean;
  /** Called at the agent's next authenticated request (`agentSeen`). */
  seenWaiters: Array<() => void>;
  /** Whether the agent answered the last CONNECT line by reaching us (unknown: undefined). */
  readsLine?: boolean;
  /** The agent has written CONNECTED (ours; the stock 5.0.2 agent only ever writes STARTED). */
  writesConnected?: boolean;
}

/** Channel failures that just mean "the VM is not running": no lastError. */
const QUIET_CHANNEL_ERRORS = [
  Deno.errors.NotFound,
  Deno.errors.ConnectionRefused,
  Deno.errors.UnexpectedEof,
  Deno.errors.ConnectionReset,
  Deno.errors.BrokenPipe,
];

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

/** Runs the status watchers and announces; see the module doc. */
export class Coordinator implements AsyncDisposable {
  #options: CoordinatorOptions;
  #store: CoordinatorStore;
  #logger: Logger;
  #now: () => number;
  #intervals: Required<CoordinatorIntervals>;
  #api: AgentApi;
  #entries = new Map<string, Entry>();
  #slots: Slots;
  #abort = new AbortController();
  #tasks = new Set<Promise<unknown>>();
  #started = false;
  #closed = false;
  #onAbort = () => void this.close();

  constructor(options: CoordinatorOptions) {
    this.#options = options;
    this.#store = options.store;
    this.#logger = options.logger ?? silentLogger;
    this.#now = options.now ?? Date.now;
    this.#intervals = {
      waiting: options.intervals?.waiting ?? 500,
      stopped: options.intervals?.stopped ?? 3000,
      connected: options.intervals?.connected ?? 10_000,
    };
    this.#slots = new Slots(options.announceConcurrency ?? 16);
    this.#api = options.agentApi ?? this.#defaultApi();
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
    entry.generation++;
    clearTimeout(entry.announceTimer);
    clearTimeout(entry.flushTimer);
    for (const item of entry.queue.splice(0)) item.settle?.("dropped");
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
    entry.instance = instance;
    if (devlxdChanged && this.#started && entry.status !== "STOPPED") {
      this.#announce(entry, "security.devlxd changed", true);
    }
    if (!channelChanged) return;
    this.#track(entry.watcher.close());
    entry.watcher = this.#createWatcher(entry);
    if (this.#started) {
      entry.watcher.setInterval(this.#intervalFor(entry.status));
      entry.watcher.start();
    }
  }

  /**
   * The vsock server calls this for every authenticated request from the
   * instance's agent: proof it reached the host → CONNECTED, lastSeen, and
   * queued events are delivered.
   */
  agentSeen(name: string): void {
    const entry = this.#entries.get(name);
    if (!entry) return;
    entry.lastSeen = this.#now();
    for (const wake of entry.seenWaiters.splice(0)) wake();
    this.#store.recordSeen?.(name);
    entry.unanswered = 0;
    if (entry.status !== "CONNECTED") this.#setStatus(entry, "CONNECTED", undefined);
    else if (entry.queue.length > 0) this.#flush(entry);
  }

  /** The host listens on another port now: tell every agent that is up. */
  portChanged(): void {
    for (const entry of this.#entries.values()) {
      if (
        entry.status !== "STOPPED" || entry.observed !== undefined && entry.observed !== "STOPPED"
      ) {
        this.#announce(entry, "host port changed", true);
      }
    }
  }

  /**
   * Delivers `event` to the instance's agent: through its open pull stream
   * when `deliverViaStream` says so, else `POST /1.0/events` now when the
   * agent is CONNECTED (after any queued ones), else queued (bounded, oldest
   * dropped) and pushed in order when it is CONNECTED again. Resolves with
   * what happened.
   */
  pushEvent(name: string, event: DevlxdEvent): Promise<EventDelivery> {
    const entry = this.#entries.get(name);
    if (!entry || this.#closed) return Promise.resolve("dropped");
    if (this.#options.deliverViaStream?.(name, event)) return Promise.resolve("stream");
    return new Promise<EventDelivery>((resolve) => {
      const json = JSON.stringify(event);
      const item: QueuedEvent = { event, bytes: json.length, settle: resolve };
      // Kept in the store only when it has to wait (agent offline, or its push failed).
      if (entry.status !== "CONNECTED") this.#keep(name, item, json);
      entry.queue.push(item);
      this.#trimQueue(entry);
      if (entry.status === "CONNECTED") this.#flush(entry);
      else this.#settleQueued(entry);
    });
  }

  /** The monitor's view of every instance. */
  snapshot(): MonitorStatus[] {
    return [...this.#entries.values()].map((e) => this.#status(e));
  }

  /** The monitor's view of one instance. */
  status(name: string): MonitorStatus | undefined {
    const entry = this.#entries.get(name);
    return entry && this.#status(entry);
  }

  /** Stops every watcher and in-flight call. Idempotent. */
  async close(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      this.#options.signal?.removeEventListener("abort", this.#onAbort);
      this.#abort.abort(new Error("coordinator closed"));
      for (const name of [...this.#entries.keys()]) this.remove(name);
    }
    while (this.#tasks.size > 0) await Promise.allSettled([...this.#tasks]);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // --- internals ---------------------------------------------------------

  #status(e: Entry): MonitorStatus {
    return {
      name: e.instance.name,
      cid: e.instance.cid,
      channel: e.instance.status.kind,
      channelUp: e.watcher.connected,
      channelStalled: e.watcher.stalledSince === undefined
        ? undefined
        : new Date(e.watcher.stalledSince).toISOString(),
      agentState: e.status,
      observed: e.observed,
      lastSeen: e.lastSeen === undefined ? undefined : new Date(e.lastSeen).toISOString(),
      lastChange: e.lastChange,
      lastError: e.lastError,
      lastAnnounce: e.announcedAt === undefined ? undefined : new Date(e.announcedAt).toISOString(),
      announcedPort: e.announcedPort,
      queuedEvents: e.queue.length,
      droppedEvents: e.dropped,
      pollInterval: e.watcher.interval,
    };
  }

  #track<T>(promise: Promise<T>): Promise<T> {
    this.#tasks.add(promise);
    promise.finally(() => this.#tasks.delete(promise)).catch(() => {});
    return promise;
  }

  #addEntry(instance: Instance): Entry {
    const entry: Entry = {
      instance,
      watcher: undefined as unknown as StatusWatcher,
      status: instance.runtime.agentState,
      lastError: instance.runtime.lastError,
      lastChange: instance.runtime.lastChange,
      lastSeen: instance.runtime.lastSeen ? Date.parse(instance.runtime.lastSeen) : undefined,
      generation: 0,
      announcing: false,
      forceAgain: false,
      failures: 0,
      nextAnnounceAt: 0,
      lastCheckAt: -Infinity,
      checking: false,
      queue: this.#loadQueue(instance.name),
      dropped: 0,
      flushing: false,
      pushFailures: 0,
      unanswered: 0,
      removed: false,
      seenWaiters: [],
    };
    entry.watcher = this.#createWatcher(entry);
    this.#entries.set(instance.name, entry);
    return entry;
  }

  #startEntry(entry: Entry): void {
    entry.watcher.setInterval(this.#intervalFor(entry.status));
    entry.watcher.start();
    // The agent was up when the previous host process last knew it: it may
    // hold our old port. Announce now rather than at its next STARTED.
    if (entry.status !== "STOPPED") this.#announce(entry, "host started", true);
  }

  #createWatcher(entry: Entry): StatusWatcher {
    const name = entry.instance.name;
    return createStatusWatcher(entry.instance.status, {
      onState: (observation) => {
        if (this.#entries.get(name) === entry && !entry.removed) this.#observe(entry, observation);
      },
      onError: (error) => {
        if (this.#entries.get(name) === entry) {
          this.#setStatus(entry, entry.status, `status channel: ${error.message}`);
        }
      },
      interval: this.#intervals.stopped,
      timeout: this.#options.qmpTimeout,
      backoff: this.#options.backoff,
      logger: this.#logger.with({ instance: name }),
    });
  }

  #intervalFor(status: AgentStatus): number {
    switch (status) {
      case "STOPPED":
        return this.#intervals.stopped;
      case "CONNECTED":
        return this.#intervals.connected;
      default:
        return this.#intervals.waiting;
    }
  }

  #setStatus(entry: Entry, status: AgentStatus, error: string | undefined): void {
    const changed = entry.status !== status;
    if (!changed && error === entry.lastError) return;
    entry.status = status;
    entry.lastError = error;
    if (changed) entry.lastChange = new Date(this.#now()).toISOString();
    const name = entry.instance.name;
    const patch: Partial<InstanceRuntime> = {
      agentState: status,
      lastChange: entry.lastChange,
      lastError: error,
    };
    if (entry.lastSeen !== undefined) patch.lastSeen = new Date(entry.lastSeen).toISOString();
    try {
      this.#store.setRuntime(name, patch);
    } catch (e) {
      this.#logger.warn("cannot record agent state", { instance: name, error: e });
    }
    if (changed) {
      this.#logger.info("agent state", { instance: name, state: status, error });
      entry.watcher.setInterval(this.#intervalFor(status));
    }
    const runtime: InstanceRuntime = {
      ...(this.#store.get(name)?.runtime ?? entry.instance.runtime),
      ...patch,
    };
    try {
      this.#options.onChange?.(name, runtime);
    } catch (e) {
      this.#logger.warn("onChange failed", { instance: name, error: e });
    }
    if (status === "CONNECTED") this.#flush(entry);
  }

  #observe(entry: Entry, observation: StatusObservation): void {
    const { state } = observation;
    // When the channel was read before this line: it was written since.
    const previousReadAt = observation.elapsed === undefined
      ? undefined
      : this.#now() - observation.elapsed;
    entry.observed = state;
    if (state === "CONNECTED") entry.writesConnected = true;
    if (state === "STOPPED") {
      entry.generation++;
      entry.announcedAt = undefined;
      entry.announcedPort = undefined;
      entry.agentPid = undefined;
      entry.failures = 0;
      entry.nextAnnounceAt = 0;
      const quiet = observation.error === undefined ||
        QUIET_CHANNEL_ERRORS.some((type) => observation.error instanceof type);
      this.#setStatus(
        entry,
        "STOPPED",
        quiet ? undefined : `status channel: ${observation.error!.message}`,
      );
      return;
    }
    if (entry.announcedAt === undefined) {
      // The agent is up and we have not told it where we are since it (or we) started.
      // An agent that writes STARTED waits for an announce even when it already
      // reached us from agent.conf (ours does until a host announces itself, for
      // LXD 5.0.2): announced to once per run of it or of us.
      if (entry.status === "STOPPED") this.#setStatus(entry, "STARTED", undefined);
      if (entry.status !== "CONNECTED" || state === "STARTED") {
        this.#announce(entry, "agent started", false);
      }
      return;
    }
    switch (entry.status) {
      case "STOPPED":
        this.#setStatus(entry, "STARTED", undefined);
        this.#announce(entry, "agent started", false);
        break;
      case "STARTED":
        if (state === "CONNECTED") this.#setStatus(entry, "CONNECTED", undefined);
        else this.#announce(entry, "agent waiting for the host", false);
        break;
      case "CONNECT sent":
        if (state === "CONNECTED") this.#setStatus(entry, "CONNECTED", undefined);
        else this.#announce(entry, "agent did not reach the host since the announce", false);
        break;
      case "CONNECTED":
        if (state === "STARTED") this.#startedWhileConnected(entry, previousReadAt);
        break;
    }
  }

  /**
   * STARTED from an agent that reaches the host. An agent that has written
   * CONNECTED before (ours) writes STARTED only until a host announces itself
   * (LXD 5.0.2 acts on nothing else), even when agent.conf's address already
   * works: it is announced to. Otherwise (a stock agent rewrites STARTED every
   * 5 s) the stale check decides.
   */
  #startedWhileConnected(entry: Entry, previousReadAt: number | undefined): void {
    if (entry.writesConnected) this.#announce(entry, "agent waiting for an announce", false);
    else this.#checkStale(entry, previousReadAt);
  }

  /**
   * STARTED while CONNECTED: a stock agent's periodic rewrite, or an agent
   * that restarted with stale info. Skipped when the agent reached us since
   * the channel's previous read, before this line was written (it is alive
   * and knows us), or was checked less than half a slow-poll period ago;
   * otherwise `GET /1.0` tells.
   */
  #checkStale(entry: Entry, previousReadAt: number | undefined): void {
    const now = this.#now();
    if (entry.checking || entry.announcing) return;
    if (
      entry.lastSeen !== undefined && previousReadAt !== undefined &&
      entry.lastSeen >= previousReadAt
    ) return;
    if (now - entry.lastCheckAt < this.#intervals.connected / 2) return;
    entry.lastCheckAt = now;
    entry.checking = true;
    const generation = entry.generation;
    this.#track((async () => {
      let verdict: string | undefined;
      try {
        const probe = await this.#api.probe(entry.instance, this.#abort.signal);
        const port = this.#options.hostPort();
        if (probe.connection === null) {
          verdict = "agent has no host address";
        } else if (probe.connection !== undefined) {
          if (probe.connection.cid !== HOST_CID || probe.connection.port !== port) {
            verdict = "agent holds another host address";
          }
        } else if (probe.pid !== undefined && entry.agentPid !== undefined) {
          if (probe.pid !== entry.agentPid) verdict = "agent restarted";
        } else {
          verdict = "agent state unknown";
        }
      } catch (error) {
        if (this.#closed) return;
        verdict = `agent API check failed: ${message(error)}`;
      } finally {
        entry.checking = false;
      }
      if (generation !== entry.generation || entry.removed || verdict === undefined) return;
      this.#logger.info("re-announcing to a connected agent", {
        instance: entry.instance.name,
        reason: verdict,
      });
      this.#announce(entry, verdict, true);
    })());
  }

  /** Announces unless one is in flight or the failure backoff says wait (`force` skips the backoff). */
  #announce(entry: Entry, reason: string, force: boolean): void {
    if (this.#closed || entry.removed) return;
    if (entry.announcing) {
      if (force) entry.forceAgain = true;
      return;
    }
    if (!force && this.#now() < entry.nextAnnounceAt) return;
    entry.announcing = true;
    const generation = entry.generation;
    this.#track(
      this.#runAnnounce(entry, reason, generation).finally(() => {
        entry.announcing = false;
        if (entry.forceAgain && !entry.removed && !this.#closed) {
          entry.forceAgain = false;
          this.#announce(entry, "asked again while announcing", true);
        }
      }),
    );
  }

  /**
   * Resolves true once the agent has reached the host at or after `since`
   * (at once if it already has), false after `ms` or when the coordinator
   * closes.
   */
  #reachedSince(entry: Entry, since: number, ms: number): Promise<boolean> {
    if (entry.lastSeen !== undefined && entry.lastSeen >= since) return Promise.resolve(true);
    if (ms <= 0 || this.#abort.signal.aborted) return Promise.resolve(false);
    return new Promise((resolve) => {
      const done = (seen: boolean) => {
        clearTimeout(timer);
        this.#abort.signal.removeEventListener("abort", onAbort);
        const at = entry.seenWaiters.indexOf(wake);
        if (at >= 0) entry.seenWaiters.splice(at, 1);
        resolve(seen);
      };
      const wake = () => done(true);
      const onAbort = () => done(false);
      const timer = setTimeout(() => done(false), ms);
      this.#abort.signal.addEventListener("abort", onAbort, { once: true });
      entry.seenWaiters.push(wake);
    });
  }

  async #runAnnounce(entry: Entry, reason: string, generation: number): Promise<void> {
    if (generation !== entry.generation || entry.removed || this.#closed) return;
    const instance = entry.instance;
    const port = this.#options.hostPort();
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      this.#setStatus(entry, entry.status, `cannot announce: host port ${port} is not known yet`);
      return;
    }
    const startedAt = this.#now();
    this.#logger.debug("announcing", { instance: instance.name, reason, port });
    // The CONNECT line and the wait for the agent hold no announce slot: a guest
    // that does not read its channel, or a stock agent that ignores the line,
    // never delays the announces of others.
    const wait = this.#options.connectLineWait ?? 1000;
    let lineSent = false;
    // A bidirectional channel still connecting (the host just started): give it a moment.
    if (entry.watcher.canWrite || await entry.watcher.whenWritable(wait, this.#abort.signal)) {
      lineSent = await entry.watcher.writeLine(formatConnectLine(HOST_CID, port));
    }
    // Our agent reads the line and reaches us: that is the announce, and PUT is not
    // sent. An agent that did not is not waited for again until its VM stops.
    let viaLine = false;
    if (lineSent && entry.readsLine !== false) {
      viaLine = await this.#reachedSince(entry, startedAt, wait);
      entry.readsLine = viaLine;
    }
    const info: ConnectionInfo = {
      cid: HOST_CID,
      port,
      certificate: this.#options.serverCert,
      devlxd: devlxdEnabled(instance),
    };
    let failure: unknown;
    let announcedPid: number | undefined;
    if (!viaLine) {
      await this.#slots.acquire();
      try {
        if (generation !== entry.generation || entry.removed || this.#closed) return;
        announcedPid = (await this.#api.announce(instance, info, this.#abort.signal))?.pid;
      } catch (error) {
        failure = error;
      } finally {
        this.#slots.release();
      }
    }
    if (generation !== entry.generation || entry.removed || this.#closed) return;
    const now = this.#now();
    if (failure === undefined || lineSent) {
      entry.announcedAt = startedAt;
      entry.announcedPort = port;
      entry.failures = 0;
      const error = failure === undefined
        ? undefined
        : `PUT /1.0 failed (CONNECT line sent): ${message(failure)}`;
      const seen = entry.lastSeen !== undefined && entry.lastSeen >= startedAt;
      // An agent that does not answer an announce by reaching us is told
      // again at a falling rate: at most once per slow-poll period.
      entry.unanswered = seen ? 0 : entry.unanswered + 1;
      entry.nextAnnounceAt = now +
        Math.min(this.#intervals.waiting * 2 ** entry.unanswered, this.#intervals.connected);
      this.#setStatus(entry, seen ? "CONNECTED" : "CONNECT sent", error);
      // Our agent's answer carries its pid; only a stock agent's ({}) needs a
      // GET /1.0, a third TLS connection per announce.
      if (failure === undefined && announcedPid !== undefined) entry.agentPid = announcedPid;
      else if (failure === undefined && !viaLine) await this.#recordAgentPid(entry, generation);
      this.#logger.info("announced", {
        instance: instance.name,
        reason,
        port,
        via: viaLine ? "CONNECT line" : "PUT /1.0",
      });
      return;
    }
    entry.failures++;
    const backoff = Math.min(
      this.#intervals.waiting * 2 ** (entry.failures - 1),
      this.#intervals.connected,
    );
    entry.nextAnnounceAt = now + backoff;
    const kind = failure instanceof MtlsError ? failure.reason : "error";
    this.#logger.info("announce failed", {
      instance: instance.name,
      reason,
      kind,
      error: message(failure),
    });
    // An agent that reached us while we were announcing (it had the address
    // already: agent.conf, a CONNECT line) is connected whatever the PUT did.
    const seen = entry.lastSeen !== undefined && entry.lastSeen >= startedAt;
    const status = seen || entry.status === "STOPPED" ? entry.status : "STARTED";
    this.#setStatus(entry, status, `announce failed: ${message(failure)}`);
    // Without a status channel nothing else will prompt a retry.
    if (instance.status.kind === "none" && entry.failures < 8) {
      clearTimeout(entry.announceTimer);
      entry.announceTimer = setTimeout(() => {
        if (entry.status !== "CONNECTED") this.#announce(entry, "retry", false);
      }, backoff);
    }
  }

  /** Remembers the agent's pid after an announce, to spot a restart later. */
  async #recordAgentPid(entry: Entry, generation: number): Promise<void> {
    await this.#slots.acquire();
    try {
      const probe = await this.#api.probe(entry.instance, this.#abort.signal);
      if (generation === entry.generation) entry.agentPid = probe.pid;
    } catch (error) {
      this.#logger.debug("agent probe after announce failed", {
        instance: entry.instance.name,
        error,
      });
    } finally {
      this.#slots.release();
    }
  }

  /** Drops the oldest queued events beyond `eventQueueLimit` events or `eventQueueBytes` bytes. */
  #trimQueue(entry: Entry): void {
    const limit = Math.max(1, this.#options.eventQueueLimit ?? 256);
    const maxBytes = this.#options.eventQueueBytes ?? 4 << 20;
    let bytes = entry.queue.reduce((sum, item) => sum + item.bytes, 0);
    while (entry.queue.length > limit || (entry.queue.length > 1 && bytes > maxBytes)) {
      const dropped = entry.queue.shift()!;
      this.#forget(dropped);
      bytes -= dropped.bytes;
      entry.dropped++;
      dropped.settle?.("dropped");
      this.#logger.warn("event queue full: dropped the oldest event", {
        instance: entry.instance.name,
        limit,
        maxBytes,
      });
    }
  }

  /** Events kept in the store for `name` by an earlier host process, oldest first. */
  #loadQueue(name: string): QueuedEvent[] {
    let rows: { id: number; event: string }[] = [];
    try {
      rows = this.#store.queuedEvents?.(name) ?? [];
    } catch (error) {
      this.#logger.warn("cannot read queued events from the registry", { instance: name, error });
    }
    const queue: QueuedEvent[] = [];
    for (const row of rows) {
      try {
        queue.push({ event: JSON.parse(row.event), bytes: row.event.length, id: row.id });
      } catch {
        this.#store.dequeueEvents?.([row.id]);
      }
    }
    if (queue.length > 0) {
      this.#logger.info("events kept for an offline agent", {
        instance: name,
        queued: queue.length,
      });
    }
    return queue;
  }

  /** Keeps a waiting event in the store (once), so a host restart does not lose it. */
  #keep(name: string, item: QueuedEvent, json: string): void {
    if (item.id !== undefined) return;
    try {
      item.id = this.#store.queueEvent?.(name, json);
    } catch (error) {
      this.#logger.warn("cannot keep a queued event in the registry", { instance: name, error });
    }
  }

  /** Takes a queued event out of the store (delivered, refused or dropped). */
  #forget(item: QueuedEvent): void {
    if (item.id === undefined) return;
    try {
      this.#store.dequeueEvents?.([item.id]);
    } catch (error) {
      this.#logger.warn("cannot forget a delivered event in the registry", { error });
    }
    item.id = undefined;
  }

  /** Tells callers waiting on queued events that they stay queued. */
  #settleQueued(entry: Entry): void {
    for (const item of entry.queue) {
      item.settle?.("queued");
      item.settle = undefined;
    }
  }

  #flush(entry: Entry): void {
    if (entry.flushing || entry.queue.length === 0) return;
    entry.flushing = true;
    clearTimeout(entry.flushTimer);
    const name = entry.instance.name;
    this.#track((async () => {
      try {
        while (
          entry.queue.length > 0 && entry.status === "CONNECTED" && !entry.removed && !this.#closed
        ) {
          // Taken off the queue while in flight, so the bound drops only waiting events.
          const item = entry.queue.shift()!;
          try {
            await this.#api.pushEvent(entry.instance, item.event, this.#abort.signal);
            entry.pushFailures = 0;
            this.#forget(item);
            this.#logger.debug("event pushed", { instance: name, type: item.event.type });
            item.settle?.("pushed");
          } catch (error) {
            if (this.#closed || entry.removed) {
              item.settle?.("dropped");
              break;
            }
            if (
              error instanceof MtlsError && error.reason === "status"
            ) {
              // The agent answered: it will not take this event. Do not block the queue on it.
              entry.dropped++;
              this.#forget(item);
              item.settle?.("dropped");
              this.#logger.warn("agent refused an event", { instance: name, error });
              continue;
            }
            this.#keep(name, item, JSON.stringify(item.event));
            entry.queue.unshift(item);
            this.#trimQueue(entry);
            entry.pushFailures++;
            const delay = Math.min(
              this.#intervals.waiting * 2 ** (entry.pushFailures - 1),
              this.#intervals.connected,
            );
            this.#logger.info("event delivery failed; will retry", {
              instance: name,
              error,
              delay,
            });
            clearTimeout(entry.flushTimer);
            entry.flushTimer = setTimeout(() => this.#flush(entry), delay);
            break;
          }
        }
      } finally {
        entry.flushing = false;
        this.#settleQueued(entry);
      }
    })());
  }
}

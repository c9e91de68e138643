/**
 * The announce state machine of one instance's agent (STOPPED → STARTED →
 * "CONNECT sent" → CONNECTED), driven by the lines its status channel shows
 * and by the agent's authenticated requests, and announcing the host to the
 * agent (a `CONNECT 2:<port>` line where the channel is bidirectional, else or
 * then `PUT /1.0`). It is the only writer of the instance's agent runtime
 * state (agent state, change time, last error, last seen): it keeps it in
 * memory and records every change in the store.
 *
 * When it announces (PROTOCOL.md, "Compatibility pitfalls"): a stock
 * lxd-agent rewrites STARTED every 5 s even while connected, so a STARTED
 * line alone does not trigger an announce. The host announces when
 * - the agent shows up (first STARTED/CONNECTED after a STOPPED, after the
 *   channel came back, or after this host started — the coordinator then
 *   announces at once to every instance whose agent was last known up),
 * - the agent has not reached the host since the last announce
 *   ("CONNECT sent" and STARTED again), with backoff,
 * - while CONNECTED, a STARTED line comes from an agent that has not reached
 *   us since the channel's previous read, and a check of its API (`GET /1.0`)
 *   shows it restarted (another `server_pid` than after our announce) or
 *   holds another host address — or tells nothing either way. This finds an
 *   agent that was killed without writing STOPPED and came back with stale
 *   connection info at the first read after it came back (one slow-poll
 *   period), at the cost of about one `GET /1.0` per slow-poll period for
 *   each idle stock agent (they rewrite STARTED every 5 s).
 *
 * Owns its retry timer and, through `track`, its announces and checks in
 * flight. Needs what the agent API calls need.
 * @module
 */

import {
  type AgentState,
  type ConnectionInfo,
  type DevlxdEvent,
  formatConnectLine,
  HOST_CID,
} from "../../shared/api.ts";
import type { Logger } from "../../shared/log.ts";
import type { Slots } from "../../shared/slots.ts";
import { Waiters } from "../../shared/wait.ts";
import {
  devlxdEnabled,
  type HostAgentStatus,
  type Instance,
  type InstanceRuntime,
} from "../instance.ts";
import { type AgentProbe } from "./announcer.ts";
import { MtlsError } from "../../shared/http/mod.ts";
import type { StatusObservation, StatusWatcher } from "./status_watcher.ts";

/** The three calls to an agent API, replaceable (tests, other transports). */
export interface AgentApi {
  /** Resolves to the agent's pid when its answer tells it (else the machine probes). */
  announce(
    instance: Instance,
    info: ConnectionInfo,
    signal: AbortSignal,
  ): Promise<{ pid?: number } | void>;
  pushEvent(instance: Instance, event: DevlxdEvent, signal: AbortSignal): Promise<void>;
  probe(instance: Instance, signal: AbortSignal): Promise<AgentProbe>;
}

/** Where the machine records the agent runtime state it owns. */
export interface AgentStateStore {
  /** Durably records runtime fields; called only when the state or the error changes. */
  setRuntime(name: string, patch: Partial<InstanceRuntime>): void;
}

/** What every instance's machine shares: the coordinator's settings and resources. */
export interface AnnounceContext {
  store: AgentStateStore;
  api: AgentApi;
  /** The vsock port the host listens on now. */
  hostPort(): number;
  /** PEM of the host server certificate the agents pin. */
  serverCert: string;
  /** Poll periods: `waiting` starts the backoffs, `connected` bounds them and the stale checks. */
  intervals: { waiting: number; connected: number };
  /** Bounds the `PUT /1.0` and `GET /1.0` calls in flight across instances. */
  slots: Slots;
  /** How long to wait for the agent to answer a `CONNECT` line by reaching the host, in ms. */
  connectLineWait: number;
  now(): number;
  logger: Logger;
  /** Aborted when the coordinator closes. */
  signal: AbortSignal;
  /** Keeps a background task until the coordinator closes. */
  track(task: Promise<unknown>): void;
}

/** What one machine needs of its instance beyond the shared context. */
export interface AnnounceMachineInit {
  instance: Instance;
  /** The instance's status channel now (replaced when its description changes). */
  channel(): StatusWatcher;
  /** Called after every change of the agent state or last error, once recorded. */
  onStatus(status: HostAgentStatus, changed: boolean): void;
}

/** What operators see of an instance's agent and its announces. */
export interface AgentView {
  agentState: HostAgentStatus;
  /** The last state line read from the channel (or STOPPED when it went away). */
  observed?: AgentState;
  /** ISO times: the agent's last authenticated request, the last change of `agentState`. */
  lastSeen?: string;
  lastChange?: string;
  lastError?: string;
  /** When the host last announced itself successfully, and which port. */
  lastAnnounce?: string;
  announcedPort?: number;
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

/** One instance's agent state and announces; see the module doc. */
export class AnnounceMachine {
  instance: Instance;
  #ctx: AnnounceContext;
  #init: AnnounceMachineInit;
  #status: HostAgentStatus;
  #observed?: AgentState;
  #lastError?: string;
  #lastChange?: string;
  #lastSeen?: number;
  /** Bumped at STOPPED and removal: results of older announces are ignored. */
  #generation = 0;
  #announcedAt?: number;
  #announcedPort?: number;
  /** Agent pid seen by the probe after the last announce. */
  #agentPid?: number;
  #announcing = false;
  #forceAgain = false;
  #failures = 0;
  #nextAnnounceAt = 0;
  #lastCheckAt = -Infinity;
  #checking = false;
  /** Announces in a row that the agent did not answer by reaching us. */
  #unanswered = 0;
  #retryTimer?: ReturnType<typeof setTimeout>;
  #stopped = false;
  /** Woken at the agent's next authenticated request (`seen()`). */
  #seen = new Waiters();
  /** Whether the agent answered the last CONNECT line by reaching us (unknown: undefined). */
  #readsLine?: boolean;
  /** The agent has written CONNECTED (ours; the stock 5.0.2 agent only ever writes STARTED). */
  #writesConnected?: boolean;

  constructor(ctx: AnnounceContext, init: AnnounceMachineInit) {
    this.#ctx = ctx;
    this.#init = init;
    this.instance = init.instance;
    const runtime = init.instance.runtime;
    this.#status = runtime.agentState;
    this.#lastError = runtime.lastError;
    this.#lastChange = runtime.lastChange;
    this.#lastSeen = runtime.lastSeen ? Date.parse(runtime.lastSeen) : undefined;
  }

  /** The agent state. */
  get status(): HostAgentStatus {
    return this.#status;
  }

  /** What operators see of the machine (the coordinator adds the channel's side). */
  view(): AgentView {
    return {
      agentState: this.#status,
      observed: this.#observed,
      lastSeen: this.#lastSeen === undefined ? undefined : new Date(this.#lastSeen).toISOString(),
      lastChange: this.#lastChange,
      lastError: this.#lastError,
      lastAnnounce: this.#announcedAt === undefined
        ? undefined
        : new Date(this.#announcedAt).toISOString(),
      announcedPort: this.#announcedPort,
    };
  }

  /** Stops for good: results of announces in flight are ignored. */
  stop(): void {
    this.#stopped = true;
    this.#generation++;
    clearTimeout(this.#retryTimer);
  }

  /**
   * The agent made an authenticated request: proof it reached the host →
   * CONNECTED, lastSeen.
   */
  seen(): void {
    this.#lastSeen = this.#ctx.now();
    this.#seen.wake();
    this.#unanswered = 0;
    if (this.#status !== "CONNECTED") this.#setStatus("CONNECTED", undefined);
  }

  /** Records an error seen for the instance outside the machine (status channel, listener); the state stays. */
  reportError(error: string): void {
    this.#setStatus(this.#status, error);
  }

  /** Takes a line (or the loss) of the status channel. */
  observe(observation: StatusObservation): void {
    const { state } = observation;
    // When the channel was read before this line: it was written since.
    const previousReadAt = observation.elapsed === undefined
      ? undefined
      : this.#ctx.now() - observation.elapsed;
    this.#observed = state;
    if (state === "CONNECTED") this.#writesConnected = true;
    if (state === "STOPPED") {
      this.#generation++;
      this.#announcedAt = undefined;
      this.#announcedPort = undefined;
      this.#agentPid = undefined;
      this.#failures = 0;
      this.#nextAnnounceAt = 0;
      const quiet = observation.error === undefined ||
        QUIET_CHANNEL_ERRORS.some((type) => observation.error instanceof type);
      this.#setStatus(
        "STOPPED",
        quiet ? undefined : `status channel: ${observation.error!.message}`,
      );
      return;
    }
    if (this.#announcedAt === undefined) {
      // The agent is up and we have not told it where we are since it (or we) started.
      if (this.#status === "STOPPED") this.#setStatus("STARTED", undefined);
      // An agent that writes STARTED waits for an announce even when it already
      // reached us from agent.conf (ours does until a host announces itself, for
      // LXD 5.0.2): announced to once per run of it or of us.
      if (this.#status !== "CONNECTED" || state === "STARTED") {
        this.announce("agent started", false);
      }
      return;
    }
    switch (this.#status) {
      case "STOPPED":
        this.#setStatus("STARTED", undefined);
        this.announce("agent started", false);
        break;
      case "STARTED":
        if (state === "CONNECTED") this.#setStatus("CONNECTED", undefined);
        else this.announce("agent waiting for the host", false);
        break;
      case "CONNECT sent":
        if (state === "CONNECTED") this.#setStatus("CONNECTED", undefined);
        else this.announce("agent did not reach the host since the announce", false);
        break;
      case "CONNECTED":
        if (state === "STARTED") this.#startedWhileConnected(previousReadAt);
        break;
    }
  }

  /** Announces unless one is in flight or the failure backoff says wait (`force` skips the backoff). */
  announce(reason: string, force: boolean): void {
    if (this.#ctx.signal.aborted || this.#stopped) return;
    if (this.#announcing) {
      if (force) this.#forceAgain = true;
      return;
    }
    if (!force && this.#ctx.now() < this.#nextAnnounceAt) return;
    this.#announcing = true;
    const generation = this.#generation;
    this.#ctx.track(
      this.#runAnnounce(reason, generation).finally(() => {
        this.#announcing = false;
        if (this.#forceAgain && !this.#stopped && !this.#ctx.signal.aborted) {
          this.#forceAgain = false;
          this.announce("asked again while announcing", true);
        }
      }),
    );
  }

  #current(generation: number): boolean {
    return generation === this.#generation && !this.#stopped && !this.#ctx.signal.aborted;
  }

  #setStatus(status: HostAgentStatus, error: string | undefined): void {
    const changed = this.#status !== status;
    if (!changed && error === this.#lastError) return;
    this.#status = status;
    this.#lastError = error;
    if (changed) this.#lastChange = new Date(this.#ctx.now()).toISOString();
    const name = this.instance.name;
    const patch: Partial<InstanceRuntime> = {
      agentState: status,
      lastChange: this.#lastChange,
      lastError: error,
    };
    if (this.#lastSeen !== undefined) patch.lastSeen = new Date(this.#lastSeen).toISOString();
    try {
      this.#ctx.store.setRuntime(name, patch);
    } catch (e) {
      this.#ctx.logger.warn("cannot record agent state", { instance: name, error: e });
    }
    if (changed) this.#ctx.logger.info("agent state", { instance: name, state: status, error });
    this.#init.onStatus(status, changed);
  }

  /**
   * STARTED from an agent that reaches the host. An agent that has written
   * CONNECTED before (ours) writes STARTED only until a host announces itself
   * (LXD 5.0.2 acts on nothing else), even when agent.conf's address already
   * works: it is announced to. Otherwise (a stock agent rewrites STARTED every
   * 5 s) the stale check decides.
   */
  #startedWhileConnected(previousReadAt: number | undefined): void {
    if (this.#writesConnected) this.announce("agent waiting for an announce", false);
    else this.#checkStale(previousReadAt);
  }

  /**
   * STARTED while CONNECTED: a stock agent's periodic rewrite, or an agent
   * that restarted with stale info. Skipped when the agent reached us since
   * the channel's previous read, before this line was written (it is alive
   * and knows us), or was checked less than half a slow-poll period ago;
   * otherwise `GET /1.0` tells.
   */
  #checkStale(previousReadAt: number | undefined): void {
    const ctx = this.#ctx;
    const now = ctx.now();
    if (this.#checking || this.#announcing) return;
    if (
      this.#lastSeen !== undefined && previousReadAt !== undefined &&
      this.#lastSeen >= previousReadAt
    ) return;
    if (now - this.#lastCheckAt < ctx.intervals.connected / 2) return;
    this.#lastCheckAt = now;
    this.#checking = true;
    const generation = this.#generation;
    ctx.track((async () => {
      let verdict: string | undefined;
      try {
        const probe = await ctx.api.probe(this.instance, ctx.signal);
        const port = ctx.hostPort();
        if (probe.connection === null) {
          verdict = "agent has no host address";
        } else if (probe.connection !== undefined) {
          if (probe.connection.cid !== HOST_CID || probe.connection.port !== port) {
            verdict = "agent holds another host address";
          }
        } else if (probe.pid !== undefined && this.#agentPid !== undefined) {
          if (probe.pid !== this.#agentPid) verdict = "agent restarted";
        } else {
          verdict = "agent state unknown";
        }
      } catch (error) {
        if (ctx.signal.aborted) return;
        verdict = `agent API check failed: ${message(error)}`;
      } finally {
        this.#checking = false;
      }
      if (generation !== this.#generation || this.#stopped || verdict === undefined) return;
      ctx.logger.info("re-announcing to a connected agent", {
        instance: this.instance.name,
        reason: verdict,
      });
      this.announce(verdict, true);
    })());
  }

  /**
   * Resolves true once the agent has reached the host at or after `since`
   * (at once if it already has), false after `ms` or when the coordinator
   * closes.
   */
  #reachedSince(since: number, ms: number): Promise<boolean> {
    if (this.#lastSeen !== undefined && this.#lastSeen >= since) return Promise.resolve(true);
    return this.#seen.wait(ms, this.#ctx.signal);
  }

  async #runAnnounce(reason: string, generation: number): Promise<void> {
    const ctx = this.#ctx;
    if (!this.#current(generation)) return;
    const instance = this.instance;
    const port = ctx.hostPort();
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      this.#setStatus(this.#status, `cannot announce: host port ${port} is not known yet`);
      return;
    }
    const startedAt = ctx.now();
    ctx.logger.debug("announcing", { instance: instance.name, reason, port });
    // The CONNECT line and the wait for the agent hold no announce slot: a guest
    // that does not read its channel, or a stock agent that ignores the line,
    // never delays the announces of others.
    const wait = ctx.connectLineWait;
    const channel = this.#init.channel;
    let lineSent = false;
    // A bidirectional channel still connecting (the host just started): give it a moment.
    if (channel().canWrite || await channel().whenWritable(wait, ctx.signal)) {
      lineSent = await channel().writeLine(formatConnectLine(HOST_CID, port));
    }
    // Our agent reads the line and reaches us: that is the announce, and PUT is not
    // sent. An agent that did not is not waited for again until its VM stops.
    let viaLine = false;
    if (lineSent && this.#readsLine !== false) {
      viaLine = await this.#reachedSince(startedAt, wait);
      this.#readsLine = viaLine;
    }
    const info: ConnectionInfo = {
      cid: HOST_CID,
      port,
      certificate: ctx.serverCert,
      devlxd: devlxdEnabled(instance),
    };
    let failure: unknown;
    let announcedPid: number | undefined;
    if (!viaLine) {
      await ctx.slots.acquire();
      try {
        if (!this.#current(generation)) return;
        announcedPid = (await ctx.api.announce(instance, info, ctx.signal))?.pid;
      } catch (error) {
        failure = error;
      } finally {
        ctx.slots.release();
      }
    }
    if (!this.#current(generation)) {
      // The status channel went down and came back meanwhile (a QMP connect
      // timing out under load): what was announced still reached the agent;
      // said, not recorded (the new run of the channel decides the state).
      if (failure === undefined && !this.#stopped && !ctx.signal.aborted) {
        ctx.logger.info("announced", {
          instance: instance.name,
          reason,
          port,
          via: viaLine ? "CONNECT line" : "PUT /1.0",
          during: "a status channel restart",
        });
      }
      return;
    }
    const now = ctx.now();
    const { waiting, connected } = ctx.intervals;
    if (failure === undefined || lineSent) {
      this.#announcedAt = startedAt;
      this.#announcedPort = port;
      this.#failures = 0;
      const error = failure === undefined
        ? undefined
        : `PUT /1.0 failed (CONNECT line sent): ${message(failure)}`;
      const seen = this.#lastSeen !== undefined && this.#lastSeen >= startedAt;
      // An agent that does not answer an announce by reaching us is told
      // again at a falling rate: at most once per slow-poll period.
      this.#unanswered = seen ? 0 : this.#unanswered + 1;
      this.#nextAnnounceAt = now + Math.min(waiting * 2 ** this.#unanswered, connected);
      this.#setStatus(seen ? "CONNECTED" : "CONNECT sent", error);
      // Our agent's answer carries its pid; only a stock agent's ({}) needs a
      // GET /1.0, a third TLS connection per announce.
      if (failure === undefined && announcedPid !== undefined) this.#agentPid = announcedPid;
      else if (failure === undefined && !viaLine) await this.#recordAgentPid(generation);
      ctx.logger.info("announced", {
        instance: instance.name,
        reason,
        port,
        via: viaLine ? "CONNECT line" : "PUT /1.0",
      });
      return;
    }
    this.#failures++;
    const backoff = Math.min(waiting * 2 ** (this.#failures - 1), connected);
    this.#nextAnnounceAt = now + backoff;
    const kind = failure instanceof MtlsError ? failure.reason : "error";
    ctx.logger.info("announce failed", {
      instance: instance.name,
      reason,
      kind,
      error: message(failure),
    });
    // An agent that reached us while we were announcing (it had the address
    // already: agent.conf, a CONNECT line) is connected whatever the PUT did.
    const seen = this.#lastSeen !== undefined && this.#lastSeen >= startedAt;
    const status = seen || this.#status === "STOPPED" ? this.#status : "STARTED";
    this.#setStatus(status, `announce failed: ${message(failure)}`);
    // Without a status channel nothing else will prompt a retry.
    if (instance.status.kind === "none" && this.#failures < 8) {
      clearTimeout(this.#retryTimer);
      this.#retryTimer = setTimeout(() => {
        if (this.#status !== "CONNECTED") this.announce("retry", false);
      }, backoff);
    }
  }

  /** Remembers the agent's pid after an announce, to spot a restart later. */
  async #recordAgentPid(generation: number): Promise<void> {
    const ctx = this.#ctx;
    await ctx.slots.acquire();
    try {
      const probe = await ctx.api.probe(this.instance, ctx.signal);
      if (generation === this.#generation) this.#agentPid = probe.pid;
    } catch (error) {
      ctx.logger.debug("agent probe after announce failed", {
        instance: this.instance.name,
        error,
      });
    } finally {
      ctx.slots.release();
    }
  }
}

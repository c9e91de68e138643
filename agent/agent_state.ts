/**
 * `GuestAgentStatus`: the agent's state machine (STARTED → CONNECTED → STARTED …
 * → STOPPED) and what `--status` shows about it — the host it uses, when it
 * last connected or failed and why, whether devlxd is served, and the guest's
 * Ready flag. Every change rewrites the state file atomically (temp file +
 * rename); the Ready flag is also kept in its own file beside it, so a
 * restarted agent still re-sends it to the host.
 * Needs read/write permission on the state directory.
 * @module
 */

import type { AgentState } from "../shared/api.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { writeFileAtomicSync } from "../shared/write_file_atomic.ts";

/** What the state file holds (and `--status --format json` prints). */
export interface StatusSnapshot {
  /** pid of the agent that wrote the file. */
  pid: number;
  version: string;
  /** The state last written to the serial port. */
  state: AgentState;
  /** The host the agent dials, if known. */
  host: { cid: number; port: number; fingerprint?: string } | null;
  /** Where the connection info came from. */
  hostSource: "agent.conf" | "PUT /1.0" | "serial" | null;
  lastConnected: string | null;
  lastFailure: { at: string; reason: string } | null;
  devlxd: { enabled: boolean; serving: boolean; socket: string; error?: string };
  ready: boolean;
  /** The serial port in use, if any. */
  serialPort: string | null;
  startedAt: string;
  updatedAt: string;
}

export interface GuestAgentStatusOptions {
  /** State file path; none written when undefined. */
  stateFile?: string;
  /**
   * File keeping the Ready flag.
   * @default {"<dir of stateFile>/ready"}
   */
  readyFile?: string;
  /** @default {"/dev/lxd/sock"} */
  devlxdSocket?: string;
  version?: string;
  logger?: Logger;
  /** Clock, for tests. */
  now?: () => Date;
}

type Listener = (state: AgentState, previous: AgentState) => void;

function dirname(path: string): string {
  const i = path.lastIndexOf("/");
  return i <= 0 ? (i === 0 ? "/" : ".") : path.slice(0, i);
}

/** Writes `text` to `path` atomically (0644), making its directory first. */
function writeStateFile(path: string, text: string): void {
  Deno.mkdirSync(dirname(path), { recursive: true });
  writeFileAtomicSync(path, text, { mode: 0o644, durable: false });
}

export class GuestAgentStatus {
  #snapshot: StatusSnapshot;
  #options: GuestAgentStatusOptions;
  #readyFile: string | undefined;
  #listeners = new Set<Listener>();
  #dirty = false;
  #announced = false;
  #logger: Logger;
  #now: () => Date;

  constructor(options: GuestAgentStatusOptions = {}) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    this.#now = options.now ?? (() => new Date());
    this.#readyFile = options.readyFile ??
      (options.stateFile !== undefined ? `${dirname(options.stateFile)}/ready` : undefined);
    const now = this.#now().toISOString();
    this.#snapshot = {
      pid: Deno.pid,
      version: options.version ?? "",
      state: "STARTED",
      host: null,
      hostSource: null,
      lastConnected: null,
      lastFailure: null,
      devlxd: { enabled: false, serving: false, socket: options.devlxdSocket ?? "/dev/lxd/sock" },
      ready: this.#loadReady(),
      serialPort: null,
      startedAt: now,
      updatedAt: now,
    };
    this.save();
  }

  get state(): AgentState {
    return this.#snapshot.state;
  }

  get ready(): boolean {
    return this.#snapshot.ready;
  }

  /** A copy of the current status. */
  snapshot(): StatusSnapshot {
    return structuredClone(this.#snapshot);
  }

  /** Calls `listener` on every state transition; returns an unsubscribe function. */
  onTransition(listener: Listener): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #transition(state: AgentState): void {
    const previous = this.#snapshot.state;
    this.#snapshot.state = state;
    if (state !== previous) {
      this.#logger.info("state", { state, previous });
      for (const listener of this.#listeners) listener(state, previous);
    }
  }

  /** Whether a host has announced itself (PUT /1.0, a serial CONNECT line) since the start. */
  get announced(): boolean {
    return this.#announced;
  }

  /**
   * A host announced itself (PUT /1.0 or a serial `CONNECT` line). Until the
   * first announce the state stays STARTED even when the host answers (with
   * agent.conf's address): LXD 5.0.2 reads the ring buffer every 10 s, acts
   * only on a last line of STARTED, and never announces itself nor counts the
   * agent as started if it misses it.
   */
  hostAnnounced(): void {
    this.#announced = true;
  }

  /**
   * The last attempt to reach the host succeeded: CONNECTED once a host has
   * announced itself since the start (`hostAnnounced()`). The state file is
   * rewritten at once on a transition; a mere new `lastConnected` (every
   * guest request) waits for the next `flush()`.
   */
  connected(): void {
    if (this.#snapshot.state === "STOPPED") return;
    this.#snapshot.lastConnected = this.#now().toISOString();
    if (this.#snapshot.state === "CONNECTED" || !this.#announced) {
      this.#dirty = true;
      return;
    }
    this.#transition("CONNECTED");
    this.save();
  }

  /** Writes the state file if something changed since it was last written. */
  flush(): void {
    if (this.#dirty) this.save();
  }

  /** The last attempt to reach the host failed, for `reason`: back to STARTED. */
  failed(reason: string): void {
    if (this.#snapshot.state === "STOPPED") return;
    this.#snapshot.lastFailure = { at: this.#now().toISOString(), reason };
    this.#transition("STARTED");
    this.save();
  }

  /** The agent is stopping. */
  stopped(): void {
    this.#transition("STOPPED");
    this.save();
  }

  /** Records the host's address (new connection info). */
  setHost(host: StatusSnapshot["host"], source: StatusSnapshot["hostSource"]): void {
    this.#snapshot.host = host;
    this.#snapshot.hostSource = source;
    this.save();
  }

  /** Records whether devlxd should be and is served, and why not when it failed. */
  setDevlxd(enabled: boolean, serving: boolean, error?: string): void {
    this.#snapshot.devlxd = { socket: this.#snapshot.devlxd.socket, enabled, serving, error };
    this.save();
  }

  setSerialPort(path: string | null): void {
    if (this.#snapshot.serialPort === path) return;
    this.#snapshot.serialPort = path;
    this.save();
  }

  /** Records the guest's Ready flag, persistently. */
  setReady(ready: boolean): void {
    this.#snapshot.ready = ready;
    if (this.#readyFile !== undefined) {
      try {
        if (ready) writeStateFile(this.#readyFile, "Ready\n");
        else Deno.removeSync(this.#readyFile);
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) {
          this.#logger.warn("cannot record the ready state", { file: this.#readyFile, error });
        }
      }
    }
    this.save();
  }

  #loadReady(): boolean {
    if (this.#readyFile === undefined) return false;
    try {
      return Deno.readTextFileSync(this.#readyFile).trim() === "Ready";
    } catch {
      return false;
    }
  }

  /** Rewrites the state file (atomically); errors are logged, not thrown. */
  save(): void {
    this.#dirty = false;
    this.#snapshot.updatedAt = this.#now().toISOString();
    if (this.#options.stateFile === undefined) return;
    try {
      writeStateFile(this.#options.stateFile, JSON.stringify(this.#snapshot, null, 2) + "\n");
    } catch (error) {
      this.#logger.warn("cannot write the state file", { file: this.#options.stateFile, error });
    }
  }
}

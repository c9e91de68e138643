/**
 * LXD's background operations, as lxd-agent 5.0.2 runs them
 * (`lxd/operations/operations.go`): an {@linkcode AgentOperation} is created
 * Pending, started Running at once (LXD starts it while writing the 202
 * answer), and ends Success (its run resolved) or Failure (it threw; `err`
 * holds the message). Each transition and each metadata update is an
 * `operation` event (`{"type":"operation","timestamp",…,"metadata":<op>}`),
 * which LXD's Go client waits on through `GET /1.0/events`; a finished
 * operation stays visible for 5 s, then is forgotten.
 *
 * {@linkcode Operations} is the registry: it bounds how many operations run
 * at once ({@linkcode TooManyOperationsError} beyond), hands events to
 * subscribers, and `close()` aborts every run and waits for it.
 *
 * Owns: the operations' runs (through their abort signals) and the retention
 * timers. Needs no permissions.
 * @module
 */

import { type Operation, STATUS_CODE } from "../shared/instance_api.ts";
import { type Logger, silentLogger } from "../shared/log.ts";

/** An event as LXD's `/1.0/events` carries it (`api.Event`). */
export interface AgentEvent {
  type: string;
  timestamp?: string;
  metadata?: unknown;
}

/** An `operation` event as LXD sends it. */
export interface OperationEvent extends AgentEvent {
  type: "operation";
  timestamp: string;
  metadata: Operation;
}

/** What an operation does. */
export interface OperationSpec {
  class: Operation["class"];
  description: string;
  metadata: Record<string, unknown>;
  /** The work; resolves for Success, throws for Failure. Must end soon after `signal` aborts. */
  run: (operation: AgentOperation, signal: AbortSignal) => Promise<void>;
  /** Answers `GET …/websocket?secret=` (websocket operations). */
  connect?: (operation: AgentOperation, request: Request) => Response | Promise<Response>;
}

/** Refused because `max` operations already run. */
export class TooManyOperationsError extends Error {
  override name = "TooManyOperationsError";
  constructor(readonly max: number) {
    super(`Too many operations running (at most ${max} at once); try again later`);
  }
}

const STATUS_NAMES: Record<number, string> = {
  [STATUS_CODE.Pending]: "Pending",
  [STATUS_CODE.Running]: "Running",
  [STATUS_CODE.Success]: "Success",
  [STATUS_CODE.Failure]: "Failure",
  [STATUS_CODE.Cancelled]: "Cancelled",
};

/** One operation. */
export class AgentOperation {
  readonly id: string = crypto.randomUUID();
  readonly spec: OperationSpec;
  readonly createdAt = new Date();
  #updatedAt = this.createdAt;
  #status: number = STATUS_CODE.Pending;
  #metadata: Record<string, unknown>;
  #err = "";
  #done = Promise.withResolvers<void>();
  #emit: (operation: AgentOperation) => void;

  constructor(spec: OperationSpec, emit: (operation: AgentOperation) => void) {
    this.spec = spec;
    this.#metadata = spec.metadata;
    this.#emit = emit;
  }

  /** `/1.0/operations/<id>`. */
  get url(): string {
    return `/1.0/operations/${this.id}`;
  }

  get statusCode(): number {
    return this.#status;
  }

  /** Whether the operation has ended (Success, Failure, Cancelled). */
  get final(): boolean {
    return this.#status >= 200;
  }

  /** Resolves once the operation has ended. */
  get done(): Promise<void> {
    return this.#done.promise;
  }

  /** Replaces the metadata (only while Pending or Running), and emits an event. */
  updateMetadata(metadata: Record<string, unknown>): void {
    if (this.final) throw new Error("Only pending or running operations can be updated");
    this.#metadata = metadata;
    this.#updatedAt = new Date();
    this.#emit(this);
  }

  /** `api.Operation`. */
  render(): Operation {
    return {
      id: this.id,
      class: this.spec.class,
      description: this.spec.description,
      created_at: this.createdAt.toISOString(),
      updated_at: this.#updatedAt.toISOString(),
      status: STATUS_NAMES[this.#status] ?? "Unknown",
      status_code: this.#status,
      resources: {},
      metadata: this.#metadata,
      may_cancel: false,
      err: this.#err,
      location: "",
    };
  }

  /** @internal Sets the status (and error), emits an event, resolves `done` when final. */
  transition(status: number, err = ""): void {
    this.#status = status;
    this.#err = err;
    this.#updatedAt = new Date();
    this.#emit(this);
    if (this.final) this.#done.resolve();
  }
}

/** Options of {@linkcode Operations}. */
export interface OperationsOptions {
  /**
   * Operations running at once; more are refused with {@linkcode TooManyOperationsError}.
   * @default {32}
   */
  maxRunning?: number;
  /**
   * Milliseconds a finished operation stays visible (LXD: 5 s).
   * @default {5000}
   */
  retention?: number;
  logger?: Logger;
}

/** The registry of operations and the source of their events. */
export class Operations {
  #ops = new Map<string, AgentOperation>();
  #running = new Map<AgentOperation, { abort: AbortController; run: Promise<void> }>();
  #listeners = new Set<(event: AgentEvent) => void>();
  #timers = new Set<ReturnType<typeof setTimeout>>();
  #maxRunning: number;
  #retention: number;
  #logger: Logger;
  #closed = false;

  constructor(options: OperationsOptions = {}) {
    this.#maxRunning = options.maxRunning ?? 32;
    this.#retention = options.retention ?? 5000;
    this.#logger = options.logger ?? silentLogger;
  }

  /** Operations running now. */
  get running(): number {
    return this.#running.size;
  }

  /**
   * Creates and starts an operation (Pending, then Running at once, as LXD
   * starts it while answering). Throws {@linkcode TooManyOperationsError}.
   */
  start(spec: OperationSpec): AgentOperation {
    if (this.#closed) throw new Error("The agent is shutting down");
    if (this.#running.size >= this.#maxRunning) throw new TooManyOperationsError(this.#maxRunning);
    const operation = new AgentOperation(spec, (op) => this.#publish(op));
    this.#ops.set(operation.id, operation);
    this.#publish(operation);
    const abort = new AbortController();
    operation.transition(STATUS_CODE.Running);
    const run = (async () => {
      try {
        await spec.run(operation, abort.signal);
        operation.transition(STATUS_CODE.Success);
      } catch (error) {
        this.#logger.debug("operation failed", { id: operation.id, error });
        operation.transition(STATUS_CODE.Failure, (error as Error).message ?? String(error));
      } finally {
        this.#running.delete(operation);
        const timer = setTimeout(() => {
          this.#timers.delete(timer);
          this.#ops.delete(operation.id);
        }, this.#retention);
        this.#timers.add(timer);
      }
    })();
    this.#running.set(operation, { abort, run });
    return operation;
  }

  /** The operation with `id`, if it is still known. */
  get(id: string): AgentOperation | undefined {
    return this.#ops.get(id);
  }

  /** Every known operation. */
  list(): AgentOperation[] {
    return [...this.#ops.values()];
  }

  /**
   * Calls `listener` with every event from now on (operation events, and
   * what {@linkcode broadcast} hands over); returns the unsubscribe function.
   */
  subscribe(listener: (event: AgentEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #publish(operation: AgentOperation): void {
    const event: OperationEvent = {
      type: "operation",
      timestamp: new Date().toISOString(),
      metadata: operation.render(),
    };
    this.broadcast(event);
  }

  /** Hands `event` to every subscriber (events the host pushes reach `/1.0/events` too, as in lxd-agent). */
  broadcast(event: AgentEvent): void {
    for (const listener of this.#listeners) {
      try {
        listener(event);
      } catch (error) {
        this.#logger.warn("operation event listener failed", { error });
      }
    }
  }

  /** Aborts every running operation and waits for each to end. Idempotent. */
  async close(): Promise<void> {
    this.#closed = true;
    const runs = [...this.#running.values()];
    for (const { abort } of runs) abort.abort(new Error("The agent is shutting down"));
    await Promise.all(runs.map(({ run }) => run));
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    this.#listeners.clear();
  }
}

/**
 * The event outbox: devlxd events on their way to each instance's agent.
 * An event goes through the agent's open pull stream when it holds one
 * (`deliverViaStream`), else it is pushed (`POST /1.0/events`) while the
 * agent is connected, else it waits in a bounded per-instance queue (oldest
 * dropped beyond the bound, kept in the store so a host restart does not lose
 * it) and is pushed in order once the agent is connected again. A failed
 * push is retried with backoff; an event the agent refuses is dropped.
 *
 * Owns the queues, their retry timers and the pushes in flight until
 * `close()`. Needs what `push` needs.
 * @module
 */

import type { DevlxdEvent } from "../../shared/api.ts";
import { type Logger, silentLogger } from "../../shared/log.ts";
import { MtlsError } from "../../shared/http/mod.ts";

/** How `EventOutbox.push()` handled an event. */
export type EventDelivery = "stream" | "pushed" | "queued" | "dropped";

/** Where the outbox keeps events for offline agents across host restarts. */
export interface EventOutboxStore {
  /** Durably keeps an event (JSON) queued for an offline agent; returns its id. */
  queueEvent?(name: string, event: string): number;
  /** Forgets kept events: delivered, refused by the agent, or dropped by the bound. */
  dequeueEvents?(ids: number[]): void;
  /** The events kept for an instance, oldest first (loaded when the outbox opens its queue). */
  queuedEvents?(name: string): { id: number; event: string }[];
}

/** Options of {@linkcode EventOutbox}. */
export interface EventOutboxOptions {
  store: EventOutboxStore;
  /** Pushes one event to the instance's agent (`POST /1.0/events`). */
  push(name: string, event: DevlxdEvent, signal: AbortSignal): Promise<void>;
  /** Whether the instance's agent is connected now (events are pushed only then). */
  isConnected(name: string): boolean;
  /**
   * Called once for each new event: true when the agent holds an open pull
   * stream that receives it, so it is not pushed too.
   * @default () => false
   */
  deliverViaStream?(name: string, event: DevlxdEvent): boolean;
  /** Events kept per offline instance; the oldest is dropped beyond. @default 256 */
  limit?: number;
  /** Bytes of event JSON kept per offline instance; the newest event is always kept. @default 4194304 */
  maxBytes?: number;
  /** Retry backoff after a failed push, in ms: `min` doubling up to `max`. */
  retry: { min: number; max: number };
  /** @default silentLogger */
  logger?: Logger;
}

interface QueuedEvent {
  event: DevlxdEvent;
  /** Size of the event's JSON, for the queue's byte bound. */
  bytes: number;
  /** Its row in the store, when kept there. */
  id?: number;
  settle?: (result: EventDelivery) => void;
}

interface Outgoing {
  queue: QueuedEvent[];
  dropped: number;
  flushing: boolean;
  failures: number;
  timer?: ReturnType<typeof setTimeout>;
  removed: boolean;
}

/** Per-instance event queues towards the agents; see the module doc. */
export class EventOutbox implements AsyncDisposable {
  #options: EventOutboxOptions;
  #logger: Logger;
  #boxes = new Map<string, Outgoing>();
  #abort = new AbortController();
  #tasks = new Set<Promise<unknown>>();

  constructor(options: EventOutboxOptions) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
  }

  /** Opens the queue of `name`, with the events the store kept for it. */
  open(name: string): void {
    if (this.#boxes.has(name) || this.#abort.signal.aborted) return;
    this.#boxes.set(name, {
      queue: this.#load(name),
      dropped: 0,
      flushing: false,
      failures: 0,
      removed: false,
    });
  }

  /** Drops the queue of `name` and the events in it. */
  remove(name: string): void {
    const box = this.#boxes.get(name);
    if (!box) return;
    this.#boxes.delete(name);
    box.removed = true;
    clearTimeout(box.timer);
    for (const item of box.queue.splice(0)) item.settle?.("dropped");
  }

  /**
   * Delivers `event` to the instance's agent: through its open pull stream
   * when `deliverViaStream` says so, else `POST /1.0/events` now when the
   * agent is connected (after any queued ones), else queued (bounded, oldest
   * dropped) and pushed in order when it is connected again. Resolves with
   * what happened.
   */
  push(name: string, event: DevlxdEvent): Promise<EventDelivery> {
    const box = this.#boxes.get(name);
    if (!box || this.#abort.signal.aborted) return Promise.resolve("dropped");
    if (this.#options.deliverViaStream?.(name, event)) return Promise.resolve("stream");
    return new Promise<EventDelivery>((resolve) => {
      const json = JSON.stringify(event);
      const item: QueuedEvent = { event, bytes: json.length, settle: resolve };
      const connected = this.#options.isConnected(name);
      // Kept in the store only when it has to wait (agent offline, or its push failed).
      if (!connected) this.#keep(name, item, json);
      box.queue.push(item);
      this.#trim(name, box);
      if (connected) this.flush(name);
      else this.#settleQueued(box);
    });
  }

  /** Pushes the queued events of `name`, in order, while its agent is connected. */
  flush(name: string): void {
    const box = this.#boxes.get(name);
    if (!box || box.flushing || box.queue.length === 0) return;
    box.flushing = true;
    clearTimeout(box.timer);
    this.#track(this.#drain(name, box));
  }

  /** Events waiting for `name`'s agent, and events dropped since the queue opened. */
  counts(name: string): { queued: number; dropped: number } {
    const box = this.#boxes.get(name);
    return { queued: box?.queue.length ?? 0, dropped: box?.dropped ?? 0 };
  }

  /** Drops every queue (the store keeps their events) and waits for pushes in flight. Idempotent. */
  async close(): Promise<void> {
    if (!this.#abort.signal.aborted) {
      this.#abort.abort(new Error("event outbox closed"));
      for (const name of [...this.#boxes.keys()]) this.remove(name);
    }
    while (this.#tasks.size > 0) await Promise.allSettled([...this.#tasks]);
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #track(promise: Promise<unknown>): void {
    this.#tasks.add(promise);
    promise.finally(() => this.#tasks.delete(promise)).catch(() => {});
  }

  async #drain(name: string, box: Outgoing): Promise<void> {
    const signal = this.#abort.signal;
    try {
      while (
        box.queue.length > 0 && this.#options.isConnected(name) && !box.removed && !signal.aborted
      ) {
        // Taken off the queue while in flight, so the bound drops only waiting events.
        const item = box.queue.shift()!;
        try {
          await this.#options.push(name, item.event, signal);
          box.failures = 0;
          this.#forget(item);
          this.#logger.debug("event pushed", { instance: name, type: item.event.type });
          item.settle?.("pushed");
        } catch (error) {
          if (signal.aborted || box.removed) {
            item.settle?.("dropped");
            break;
          }
          if (
            error instanceof MtlsError && error.reason === "status"
          ) {
            // The agent answered: it will not take this event. Do not block the queue on it.
            box.dropped++;
            this.#forget(item);
            item.settle?.("dropped");
            this.#logger.warn("agent refused an event", { instance: name, error });
            continue;
          }
          this.#keep(name, item, JSON.stringify(item.event));
          box.queue.unshift(item);
          this.#trim(name, box);
          box.failures++;
          const { min, max } = this.#options.retry;
          const delay = Math.min(min * 2 ** (box.failures - 1), max);
          this.#logger.info("event delivery failed; will retry", {
            instance: name,
            error,
            delay,
          });
          clearTimeout(box.timer);
          box.timer = setTimeout(() => this.flush(name), delay);
          break;
        }
      }
    } finally {
      box.flushing = false;
      this.#settleQueued(box);
    }
  }

  /** Drops the oldest queued events beyond `limit` events or `maxBytes` bytes. */
  #trim(name: string, box: Outgoing): void {
    const limit = Math.max(1, this.#options.limit ?? 256);
    const maxBytes = this.#options.maxBytes ?? 4 << 20;
    let bytes = box.queue.reduce((sum, item) => sum + item.bytes, 0);
    while (box.queue.length > limit || (box.queue.length > 1 && bytes > maxBytes)) {
      const dropped = box.queue.shift()!;
      this.#forget(dropped);
      bytes -= dropped.bytes;
      box.dropped++;
      dropped.settle?.("dropped");
      this.#logger.warn("event queue full: dropped the oldest event", {
        instance: name,
        limit,
        maxBytes,
      });
    }
  }

  /** Events kept in the store for `name` by an earlier host process, oldest first. */
  #load(name: string): QueuedEvent[] {
    const store = this.#options.store;
    let rows: { id: number; event: string }[] = [];
    try {
      rows = store.queuedEvents?.(name) ?? [];
    } catch (error) {
      this.#logger.warn("cannot read queued events from the registry", { instance: name, error });
    }
    const queue: QueuedEvent[] = [];
    for (const row of rows) {
      try {
        queue.push({ event: JSON.parse(row.event), bytes: row.event.length, id: row.id });
      } catch {
        store.dequeueEvents?.([row.id]);
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
      item.id = this.#options.store.queueEvent?.(name, json);
    } catch (error) {
      this.#logger.warn("cannot keep a queued event in the registry", { instance: name, error });
    }
  }

  /** Takes a queued event out of the store (delivered, refused or dropped). */
  #forget(item: QueuedEvent): void {
    if (item.id === undefined) return;
    try {
      this.#options.store.dequeueEvents?.([item.id]);
    } catch (error) {
      this.#logger.warn("cannot forget a delivered event in the registry", { error });
    }
    item.id = undefined;
  }

  /** Tells callers waiting on queued events that they stay queued. */
  #settleQueued(box: Outgoing): void {
    for (const item of box.queue) {
      item.settle?.("queued");
      item.settle = undefined;
    }
  }
}

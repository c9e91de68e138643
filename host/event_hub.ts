/**
 * In-memory publish/subscribe by topic (an instance name), with any number
 * of subscribers per topic: devlxd `/1.0/events` streams, the admin
 * lifecycle stream and the coordinator's push delivery all subscribe here.
 * The topic {@linkcode ALL_TOPICS} receives every event. Streams are
 * newline-delimited JSON with a bounded queue: a subscriber that falls more
 * than `maxQueue` events behind is ended (it reconnects) instead of growing
 * host memory. Owns no OS resources; needs no permissions.
 * @module
 */

import type { AgentStatus } from "./instance.ts";

/** Subscribe to this topic to receive the events of every topic. */
export const ALL_TOPICS = "*";

/** A lifecycle event on the admin API's `GET /events` stream. */
export interface LifecycleEvent {
  timestamp: string;
  type: "lifecycle";
  /** The instance concerned. */
  instance: string;
  action:
    | "instance-added"
    | "instance-removed"
    | "config-changed"
    | "device-added"
    | "device-removed"
    | "agent-state"
    | "ready";
  metadata: {
    agentState?: AgentStatus;
    ready?: boolean;
    key?: string;
    value?: string;
    device?: string;
    error?: string;
  };
}

export interface StreamOptions<E> {
  /** Only events for which this returns true are sent. @default all */
  filter?: (event: E) => boolean;
  /** Ends the stream when aborted. */
  signal?: AbortSignal;
  /** Events queued for a slow reader before the stream is ended. @default hub's maxQueue */
  maxQueue?: number;
}

export interface EventHubOptions {
  /** Default bound of a stream's queue, in events. @default 1024 */
  maxQueue?: number;
}

interface Subscriber<E> {
  deliver: (event: E, topic: string) => void;
  end?: () => void;
}

const encoder = new TextEncoder();

export class EventHub<E> {
  #topics = new Map<string, Set<Subscriber<E>>>();
  #maxQueue: number;

  constructor(options: EventHubOptions = {}) {
    this.#maxQueue = options.maxQueue ?? 1024;
  }

  #add(topic: string, subscriber: Subscriber<E>): () => void {
    let set = this.#topics.get(topic);
    if (!set) this.#topics.set(topic, set = new Set());
    set.add(subscriber);
    return () => {
      set.delete(subscriber);
      if (set.size === 0 && this.#topics.get(topic) === set) this.#topics.delete(topic);
    };
  }

  /**
   * Calls `listener` for each event published on `topic` (or every topic for
   * {@linkcode ALL_TOPICS}), synchronously, in order. Returns the unsubscribe
   * function. A listener that throws is not removed; the error is swallowed.
   */
  subscribe(topic: string, listener: (event: E, topic: string) => void): () => void {
    return this.#add(topic, { deliver: listener });
  }

  /** Delivers `event` to the subscribers of `topic` and of ALL_TOPICS; returns how many. */
  publish(topic: string, event: E): number {
    let count = 0;
    for (const key of topic === ALL_TOPICS ? [ALL_TOPICS] : [topic, ALL_TOPICS]) {
      for (const subscriber of [...(this.#topics.get(key) ?? [])]) {
        try {
          subscriber.deliver(event, topic);
          count++;
        } catch {
          // A subscriber's failure must not stop delivery to the others.
        }
      }
    }
    return count;
  }

  /** Number of subscribers on `topic` (not counting ALL_TOPICS ones). */
  subscriberCount(topic: string): number {
    return this.#topics.get(topic)?.size ?? 0;
  }

  /**
   * A byte stream of the events of `topic`, one JSON object and `\n` each.
   * It ends on `signal`, on {@linkcode closeTopic}/{@linkcode close}, when the
   * reader cancels, or when the reader falls `maxQueue` events behind.
   */
  stream(topic: string, options: StreamOptions<E> = {}): ReadableStream<Uint8Array> {
    const { filter, signal } = options;
    const maxQueue = options.maxQueue ?? this.#maxQueue;
    let unsubscribe = () => {};
    let done = false;
    const finish = (controller?: ReadableStreamDefaultController<Uint8Array>) => {
      if (done) return;
      done = true;
      unsubscribe();
      signal?.removeEventListener("abort", onAbort);
      try {
        controller?.close();
      } catch {
        // Already closed or errored by the reader.
      }
    };
    let onAbort = () => {};
    return new ReadableStream<Uint8Array>({
      start: (controller) => {
        onAbort = () => finish(controller);
        if (signal?.aborted) return finish(controller);
        signal?.addEventListener("abort", onAbort, { once: true });
        unsubscribe = this.#add(topic, {
          deliver: (event) => {
            if (done || (filter && !filter(event))) return;
            if ((controller.desiredSize ?? 0) <= -maxQueue) return finish(controller);
            controller.enqueue(encoder.encode(JSON.stringify(event) + "\n"));
          },
          end: () => finish(controller),
        });
      },
      cancel: () => finish(),
    }, { highWaterMark: 0 });
  }

  /** Ends every stream on `topic` (e.g. the instance was removed); callbacks stay. */
  closeTopic(topic: string): void {
    for (const subscriber of [...(this.#topics.get(topic) ?? [])]) subscriber.end?.();
  }

  /** Ends every stream on every topic. */
  close(): void {
    for (const topic of [...this.#topics.keys()]) this.closeTopic(topic);
  }
}

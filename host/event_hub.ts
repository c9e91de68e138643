/**
 * In-memory publish/subscribe by topic (an instance name), with any number
 * of subscribers per topic: devlxd `/1.0/events` streams, the admin
 * lifecycle stream and the coordinator's push delivery all subscribe here.
 * The topic {@linkcode ALL_TOPICS} receives every event. Streams are
 * newline-delimited JSON with a queue bounded in events and in bytes: a
 * subscriber that falls more than `maxQueue` events or `maxQueueBytes` bytes
 * behind is dropped (its stream fails with an {@linkcode EventStreamOverflow},
 * its queue is freed, `onDrop` is told; it reconnects) instead of growing
 * host memory. A config event carries old and new value (up to 1 MiB each),
 * so a count alone does not bound memory. Owns no OS resources; needs no permissions.
 * @module
 */

import type { HostAgentStatus } from "./instance.ts";

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
    agentState?: HostAgentStatus;
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
  /** Bytes queued for a slow reader before the stream is ended. @default hub's maxQueueBytes */
  maxQueueBytes?: number;
}

export interface EventHubOptions {
  /** Default bound of a stream's queue, in events. @default 1024 */
  maxQueue?: number;
  /**
   * Default bound of a stream's queue, in bytes of encoded events; one event
   * larger than it still goes to a reader that is not behind.
   * @default 4194304 (4 MiB)
   */
  maxQueueBytes?: number;
  /** Told when a stream is dropped for falling behind (for the host log). */
  onDrop?: (topic: string, error: EventStreamOverflow) => void;
}

/** The reason a stream whose reader fell too far behind fails with. */
export class EventStreamOverflow extends Error {
  /** Events and bytes queued when it was dropped. */
  readonly queuedEvents: number;
  readonly queuedBytes: number;

  constructor(queuedEvents: number, queuedBytes: number, limit: string) {
    super(
      `Event stream dropped: the reader fell ${limit} behind (${queuedEvents} events, ${queuedBytes} bytes unread)`,
    );
    this.name = "EventStreamOverflow";
    this.queuedEvents = queuedEvents;
    this.queuedBytes = queuedBytes;
  }
}

interface Subscriber<E> {
  deliver: (event: E, topic: string) => void;
  end?: () => void;
}

const encoder = new TextEncoder();

export class EventHub<E> {
  #topics = new Map<string, Set<Subscriber<E>>>();
  #maxQueue: number;
  #maxQueueBytes: number;
  #onDrop: EventHubOptions["onDrop"];

  constructor(options: EventHubOptions = {}) {
    this.#maxQueue = options.maxQueue ?? 1024;
    this.#maxQueueBytes = options.maxQueueBytes ?? 4 << 20;
    this.#onDrop = options.onDrop;
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
   * reader cancels; it fails with an {@linkcode EventStreamOverflow} when the
   * reader falls `maxQueue` events or `maxQueueBytes` bytes behind.
   */
  stream(topic: string, options: StreamOptions<E> = {}): ReadableStream<Uint8Array> {
    const { filter, signal } = options;
    const maxQueue = options.maxQueue ?? this.#maxQueue;
    const maxBytes = options.maxQueueBytes ?? this.#maxQueueBytes;
    // Our own queue (the stream's highWaterMark is 0): counted in events and bytes.
    const queue: Uint8Array[] = [];
    let bytes = 0;
    /** A read is pending and nothing is queued: the next event goes straight to it. */
    let reading = false;
    /** Close once the queue is drained. */
    let ending = false;
    let done = false;
    let unsubscribe = () => {};
    let controller!: ReadableStreamDefaultController<Uint8Array>;
    const onAbort = () => finish();
    const stop = () => {
      if (done) return;
      done = true;
      unsubscribe();
      signal?.removeEventListener("abort", onAbort);
    };
    const finish = () => {
      stop();
      ending = true;
      if (queue.length > 0) return;
      try {
        controller.close();
      } catch {
        // Already closed or errored by the reader.
      }
    };
    const deliver = (event: E) => {
      if (done || (filter && !filter(event))) return;
      const chunk = encoder.encode(JSON.stringify(event) + "\n");
      if (reading) {
        reading = false;
        controller.enqueue(chunk);
        return;
      }
      const limit = queue.length >= maxQueue
        ? `${maxQueue} events`
        : queue.length > 0 && bytes + chunk.byteLength > maxBytes
        ? `${maxBytes} bytes`
        : undefined;
      if (limit === undefined) {
        queue.push(chunk);
        bytes += chunk.byteLength;
        return;
      }
      const error = new EventStreamOverflow(queue.length, bytes, limit);
      stop();
      queue.length = 0; // freed at once
      bytes = 0;
      controller.error(error);
      try {
        this.#onDrop?.(topic, error);
      } catch {
        // The log must not break delivery to the others.
      }
    };
    return new ReadableStream<Uint8Array>({
      start: (c) => {
        controller = c;
        if (signal?.aborted) return finish();
        signal?.addEventListener("abort", onAbort, { once: true });
        unsubscribe = this.#add(topic, { deliver, end: finish });
      },
      pull: () => {
        const chunk = queue.shift();
        if (chunk === undefined) {
          reading = true;
          return;
        }
        bytes -= chunk.byteLength;
        controller.enqueue(chunk);
        if (ending && queue.length === 0) controller.close();
      },
      cancel: () => {
        stop();
        queue.length = 0;
        bytes = 0;
      },
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

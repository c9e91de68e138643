/**
 * `EventRelay`: hands devlxd events to the guest processes following
 * `/dev/lxd/sock` `/1.0/events`. Events arrive two ways — pushed by a host
 * (`POST /1.0/events` on the agent API, what LXD does) and pulled (one
 * long-lived request to the host's `/1.0/events`, kept open while at least one
 * local subscriber exists) — and each event reaches each subscriber once,
 * whichever way it travelled (recent events are remembered by content).
 *
 * Owns: the subscriber streams and the pull loop.
 * Needs no permissions of its own (the pull goes through `HostLink.fetch`).
 * @module
 */

import { LineBuffer } from "../shared/line_buffer.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { sleep } from "../shared/wait.ts";
import type { HostFetch } from "./host_link.ts";

export interface EventRelayOptions {
  /** How the pull loop reaches the host; no pulling without it. */
  fetchHost?: HostFetch;
  /** Whether pulling makes sense now (connection info known). @default {() => true} */
  canPull?: () => boolean;
  /**
   * Events remembered to drop the second copy of.
   * @default {1024}
   */
  remember?: number;
  /**
   * Events queued for a subscriber that does not read before it is dropped.
   * @default {1024}
   */
  maxQueue?: number;
  /**
   * First and longest wait between pull attempts, in ms.
   * @default {[500, 10000]}
   */
  retry?: [number, number];
  /**
   * Longest event line accepted from the host, in bytes.
   * @default {1048576}
   */
  maxEventSize?: number;
  logger?: Logger;
}

interface Subscriber {
  types: Set<string> | undefined;
  controller: ReadableStreamDefaultController<Uint8Array>;
}

const encoder = new TextEncoder();

/** JSON with object keys sorted, so the same value always gives the same text. */
function canonical(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value).filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonical(v)}`).join(",")}}`;
  }
  return JSON.stringify(value) ?? "null";
}

/**
 * What makes two copies of an event the same event: its type, timestamp and
 * metadata, whatever the key order or extra fields (project, location) of the
 * way it came.
 */
function eventKey(event: unknown): string {
  const e = (event ?? {}) as Record<string, unknown>;
  return canonical([e.type, e.timestamp, e.metadata]);
}

/** The fields of LXD's `api.Event` in the order Go writes them; the rest follow as they came. */
const EVENT_FIELDS = ["type", "timestamp", "metadata", "location", "project"];

/**
 * `event` with its top-level fields in the order LXD's agent writes them
 * (`type`, `timestamp`, `metadata`, then `location` and `project` when
 * present), whatever order the host sent; anything else is left as it is.
 */
export function goEventOrder(event: unknown): unknown {
  if (event === null || typeof event !== "object" || Array.isArray(event)) return event;
  const source = event as Record<string, unknown>;
  const ordered: Record<string, unknown> = {};
  for (const key of EVENT_FIELDS) if (key in source) ordered[key] = source[key];
  for (const [key, value] of Object.entries(source)) if (!(key in ordered)) ordered[key] = value;
  return ordered;
}

export class EventRelay {
  #options: EventRelayOptions;
  #subscribers = new Set<Subscriber>();
  #recent = new Set<string>();
  #pull: { abort: AbortController; done: Promise<void> } | undefined;
  #logger: Logger;
  #closed = false;

  constructor(options: EventRelayOptions = {}) {
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
  }

  /** Number of local subscribers. */
  get subscribers(): number {
    return this.#subscribers.size;
  }

  /** Whether the pull loop is running. */
  get pulling(): boolean {
    return this.#pull !== undefined;
  }

  /**
   * A stream of events as JSON lines for one subscriber, filtered by `types`
   * (all when undefined). Cancelling the stream unsubscribes.
   */
  subscribe(types?: Iterable<string>): ReadableStream<Uint8Array> {
    let subscriber: Subscriber;
    const typeSet = types === undefined ? undefined : new Set(types);
    return new ReadableStream<Uint8Array>({
      start: (controller) => {
        subscriber = { types: typeSet, controller };
        if (this.#closed) return controller.close();
        this.#subscribers.add(subscriber);
        this.#startPull();
      },
      cancel: () => {
        this.#remove(subscriber);
      },
    }, { highWaterMark: this.#options.maxQueue ?? 1024 });
  }

  #remove(subscriber: Subscriber): void {
    if (!this.#subscribers.delete(subscriber)) return;
    if (this.#subscribers.size === 0) this.#stopPull();
  }

  /**
   * Delivers `event` to every matching subscriber, unless the same event was
   * delivered recently. Returns whether it was new.
   */
  publish(event: unknown): boolean {
    const line = JSON.stringify(goEventOrder(event));
    const key = eventKey(event);
    if (this.#recent.has(key)) return false;
    this.#recent.add(key);
    const max = this.#options.remember ?? 1024;
    if (this.#recent.size > max) {
      this.#recent.delete(this.#recent.values().next().value!);
    }
    const type = (event as { type?: unknown })?.type;
    const bytes = encoder.encode(line + "\n");
    for (const subscriber of [...this.#subscribers]) {
      if (subscriber.types !== undefined && !subscriber.types.has(String(type))) continue;
      const { controller } = subscriber;
      if ((controller.desiredSize ?? 0) <= 0) {
        this.#logger.warn("dropping an events subscriber that does not read");
        this.#remove(subscriber);
        try {
          controller.error(new Error("events subscriber too slow"));
        } catch {
          // already closed
        }
        continue;
      }
      try {
        controller.enqueue(bytes);
      } catch {
        this.#remove(subscriber);
      }
    }
    return true;
  }

  /** Restarts the pull (new connection info): the next attempt uses the new host. */
  reconnect(): void {
    if (this.#pull === undefined) return this.#startPull();
    this.#stopPull();
    this.#startPull();
  }

  #startPull(): void {
    if (this.#pull !== undefined || this.#closed) return;
    if (this.#options.fetchHost === undefined || this.#subscribers.size === 0) return;
    const abort = new AbortController();
    this.#pull = { abort, done: this.#pullLoop(abort.signal) };
  }

  #stopPull(): void {
    this.#pull?.abort.abort();
    this.#pull = undefined;
  }

  async #pullLoop(signal: AbortSignal): Promise<void> {
    const [first, longest] = this.#options.retry ?? [500, 10_000];
    let wait = first;
    while (!signal.aborted) {
      if (this.#options.canPull?.() ?? true) {
        try {
          const got = await this.#pullOnce(signal);
          if (got) wait = first;
        } catch (error) {
          if (signal.aborted) break;
          this.#logger.debug("events pull from the host failed", { error });
        }
      }
      await sleep(wait, signal);
      wait = Math.min(wait * 2, longest);
    }
  }

  /** One long-lived `/1.0/events` request; resolves true if it delivered anything. */
  async #pullOnce(signal: AbortSignal): Promise<boolean> {
    const response = await this.#options.fetchHost!(
      new Request("http://lxd/1.0/events", { signal }),
      { signal, stream: true },
    );
    if (!response.ok || response.body === null) {
      await response.body?.cancel();
      throw new Error(`the host answered ${response.status} to GET /1.0/events`);
    }
    this.#logger.debug("following the host's events");
    const lines = new LineBuffer(this.#options.maxEventSize ?? 1 << 20);
    const reader = response.body.getReader();
    const onAbort = () => reader.cancel().catch(() => {});
    signal.addEventListener("abort", onAbort, { once: true });
    let delivered = false;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return delivered;
        for (const line of lines.push(value)) {
          if (line.trim() === "") continue;
          let event: unknown;
          try {
            event = JSON.parse(line);
          } catch {
            this.#logger.debug("ignoring a malformed event line from the host");
            continue;
          }
          this.publish(event);
          delivered = true;
        }
      }
    } finally {
      signal.removeEventListener("abort", onAbort);
      reader.releaseLock();
    }
  }

  /** Ends every subscriber stream and the pull loop. Idempotent. */
  async close(): Promise<void> {
    this.#closed = true;
    const pull = this.#pull;
    this.#stopPull();
    for (const subscriber of this.#subscribers) {
      try {
        subscriber.controller.close();
      } catch {
        // already closed
      }
    }
    this.#subscribers.clear();
    await pull?.done;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * `Slots`: a counting semaphore. At most `count` holders at once; the others
 * wait in arrival order, and a waiter whose signal aborts leaves the queue
 * with the signal's reason. The host bounds its concurrent announces with it,
 * the agent its concurrent connections to the host (below the host's
 * per-instance cap, so a burst in the guest queues instead of being refused).
 * Needs no permissions.
 * @module
 */

interface Waiter {
  resolve: () => void;
  reject: (reason: unknown) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

export class Slots {
  #free: number;
  #waiters: Waiter[] = [];

  /** `count` below 1 counts as 1. */
  constructor(count: number) {
    this.#free = Math.max(1, Math.floor(count));
  }

  /** Holders waiting for a slot. */
  get waiting(): number {
    return this.#waiters.length;
  }

  /** Resolves once a slot is held; call `release()` exactly once afterwards. */
  acquire(signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    if (this.#free > 0) {
      this.#free--;
      return Promise.resolve();
    }
    return new Promise<void>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, signal };
      if (signal !== undefined) {
        waiter.onAbort = () => {
          const at = this.#waiters.indexOf(waiter);
          if (at >= 0) this.#waiters.splice(at, 1);
          reject(signal.reason);
        };
        signal.addEventListener("abort", waiter.onAbort, { once: true });
      }
      this.#waiters.push(waiter);
    });
  }

  /** Hands the slot to the oldest waiter, or frees it. */
  release(): void {
    const next = this.#waiters.shift();
    if (next === undefined) {
      this.#free++;
      return;
    }
    if (next.onAbort) next.signal!.removeEventListener("abort", next.onAbort);
    next.resolve();
  }
}

/**
 * Test helpers of host/monitor: temporary directories and a bounded queue of
 * callback values to await instead of sleeping.
 * @module
 */

/** A temporary directory removed on dispose. */
export async function tempDir(): Promise<{ path: string } & AsyncDisposable> {
  const path = await Deno.makeTempDir({ prefix: "lxd-vsock-monitor-" });
  return {
    path,
    [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }),
  };
}

/** Collects values pushed by callbacks; `next()` awaits one with a bound. */
export class Queue<T> {
  readonly all: T[] = [];
  #items: T[] = [];
  #waiters: Array<(value: T) => void> = [];

  push = (value: T): void => {
    this.all.push(value);
    const waiter = this.#waiters.shift();
    if (waiter) waiter(value);
    else this.#items.push(value);
  };

  /** Values pushed and not yet taken. */
  get pending(): readonly T[] {
    return this.#items;
  }

  /** The next value, or a rejection after `timeout` ms. */
  next(timeout = 5000): Promise<T> {
    if (this.#items.length > 0) return Promise.resolve(this.#items.shift()!);
    return new Promise<T>((resolve, reject) => {
      const waiter = (value: T) => {
        clearTimeout(timer);
        resolve(value);
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(waiter), 1);
        reject(new Error(`No value within ${timeout} ms`));
      }, timeout);
      this.#waiters.push(waiter);
    });
  }

  /** Takes values until one matches `predicate`; returns it. */
  async until(predicate: (value: T) => boolean, timeout = 5000): Promise<T> {
    const deadline = performance.now() + timeout;
    while (true) {
      const value = await this.next(Math.max(1, deadline - performance.now()));
      if (predicate(value)) return value;
    }
  }
}

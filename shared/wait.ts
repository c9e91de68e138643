/**
 * Abortable waits built on `AbortSignal.timeout` and `AbortSignal.any`:
 * {@linkcode sleep} (a pause that ends early on a signal) and
 * {@linkcode Waiters} (callers waiting for one condition, woken together when
 * it holds, each with its own time bound). Neither ever rejects. A pending
 * wait keeps the event loop alive (its timeout signal has a listener); an
 * ended one leaves no timer behind that does. Needs no permissions.
 * @module
 */

/**
 * Resolves true when `register`'s wake is called, false after `ms` or when
 * `signal` aborts; `register` returns the function that forgets the wake.
 */
function waitFor(
  ms: number,
  signal: AbortSignal | undefined,
  register: (wake: () => void) => () => void,
): Promise<boolean> {
  // As setTimeout does, a delay that is not a finite number (undefined, NaN) is 0.
  const timeout = AbortSignal.timeout(Number.isFinite(ms) ? Math.max(0, Math.trunc(ms)) : 0);
  const either = signal === undefined ? timeout : AbortSignal.any([signal, timeout]);
  if (either.aborted) return Promise.resolve(false);
  return new Promise((resolve) => {
    let forget = () => {};
    const done = (woken: boolean) => {
      forget();
      timeout.removeEventListener("abort", onAbort);
      either.removeEventListener("abort", onAbort);
      resolve(woken);
    };
    const onAbort = () => done(false);
    // A listener on the timeout signal itself refs its timer.
    timeout.addEventListener("abort", onAbort, { once: true });
    either.addEventListener("abort", onAbort, { once: true });
    forget = register(() => done(true));
  });
}

/**
 * Waits `ms` milliseconds (0 when it is not a finite number, as `setTimeout`
 * does), less when `signal` aborts first. Never rejects.
 */
export async function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  await waitFor(ms, signal, () => () => {});
}

/** Callers waiting for one condition; {@linkcode Waiters.wake} wakes them all. */
export class Waiters {
  #wakes = new Set<() => void>();

  /**
   * Resolves true at the next `wake()`, false after `ms` or when `signal`
   * aborts (at once when `ms` is not positive or `signal` has aborted).
   */
  wait(ms: number, signal?: AbortSignal): Promise<boolean> {
    if (!(ms > 0) || signal?.aborted) return Promise.resolve(false);
    return waitFor(ms, signal, (wake) => {
      this.#wakes.add(wake);
      return () => this.#wakes.delete(wake);
    });
  }

  /** Wakes every pending `wait()`. */
  wake(): void {
    for (const wake of [...this.#wakes]) wake();
  }
}

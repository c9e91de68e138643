/**
 * The VMM's side of a socket-backed virtserialport, for tests that run the
 * agent and the host daemon as processes: it stands in for QEMU's
 * `-chardev socket,server=on` between the guest end (the agent opens
 * `guestPath` as its serial port) and the host end (the daemon connects to
 * `hostPath`). Owns two unix listeners and the connections they accept.
 * Needs the `test` permission set (read, write).
 * @module
 */

/** One end of the port. */
export type SerialSide = "host" | "guest";

/** Options of `SerialRelay.waitForGuestLine()`. */
export interface WaitForLineOptions {
  /**
   * Index in `guestLines` to search from (e.g. its length before an action).
   * @default {0}
   */
  from?: number;
  /**
   * Milliseconds to wait before rejecting.
   * @default {10000}
   */
  timeout?: number;
  /** Rejects the wait with its reason when aborted. */
  signal?: AbortSignal;
}

/**
 * Relays bytes both ways while both ends are connected and drops them
 * otherwise, as QEMU does; a new connection on one end replaces the previous
 * one. Also records the lines the guest wrote (`STARTED`, `CONNECTED`, …),
 * delivered or not, so a test can wait for them.
 */
export class SerialRelay implements AsyncDisposable {
  /** Every complete line the guest wrote, in order. */
  readonly guestLines: string[] = [];
  #listeners: Record<SerialSide, Deno.UnixListener>;
  #ends: { host?: Deno.UnixConn; guest?: Deno.UnixConn } = {};
  #loops: Promise<void>[];
  #partial = "";
  #waiters = new Set<() => void>();
  #closing: Promise<void> | undefined;

  constructor(readonly hostPath: string, readonly guestPath: string) {
    this.#listeners = {
      host: Deno.listen({ transport: "unix", path: hostPath }),
      guest: Deno.listen({ transport: "unix", path: guestPath }),
    };
    this.#loops = [this.#serve("host"), this.#serve("guest")];
  }

  /** The last complete line the guest wrote. */
  get lastGuestLine(): string | undefined {
    return this.guestLines.at(-1);
  }

  /** Whether `side` is connected now. */
  connected(side: SerialSide): boolean {
    return this.#ends[side] !== undefined;
  }

  /**
   * Resolves with the index of the first guest line equal to `line` at or
   * after `options.from`; rejects after `options.timeout` ms or on abort.
   */
  waitForGuestLine(line: string, options: WaitForLineOptions = {}): Promise<number> {
    const { from = 0, timeout: ms = 10_000, signal } = options;
    const { promise, resolve, reject } = Promise.withResolvers<number>();
    const check = () => {
      const index = this.guestLines.indexOf(line, from);
      if (index < 0) return;
      done();
      resolve(index);
    };
    const timer = setTimeout(() => {
      done();
      reject(new Error(`Timed out after ${ms} ms waiting for the guest to write ${line}`));
    }, ms);
    const onAbort = () => {
      done();
      reject(signal!.reason);
    };
    const done = () => {
      clearTimeout(timer);
      this.#waiters.delete(check);
      signal?.removeEventListener("abort", onAbort);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    this.#waiters.add(check);
    if (signal?.aborted) onAbort();
    else check();
    return promise;
  }

  async #serve(side: SerialSide): Promise<void> {
    const pumps: Promise<void>[] = [];
    try {
      for await (const conn of this.#listeners[side]) {
        const previous = this.#ends[side];
        this.#ends[side] = conn;
        if (side === "guest") this.#partial = "";
        closeQuietly(previous);
        pumps.push(this.#pump(conn, side));
      }
    } catch {
      // listener closed
    }
    await Promise.all(pumps);
  }

  async #pump(conn: Deno.UnixConn, side: SerialSide): Promise<void> {
    const other: SerialSide = side === "host" ? "guest" : "host";
    const decoder = new TextDecoder();
    const buffer = new Uint8Array(4096);
    try {
      for (let n; (n = await conn.read(buffer)) !== null;) {
        const bytes = buffer.slice(0, n);
        if (side === "guest") this.#record(decoder.decode(bytes, { stream: true }));
        await this.#ends[other]?.write(bytes).catch(() => {});
      }
    } catch {
      // closed
    }
    if (this.#ends[side] === conn) delete this.#ends[side];
    closeQuietly(conn);
  }

  #record(text: string): void {
    const parts = (this.#partial + text).split("\n");
    this.#partial = parts.pop()!;
    if (parts.length === 0) return;
    this.guestLines.push(...parts);
    for (const waiter of [...this.#waiters]) waiter();
  }

  /** Stops listening and closes both ends; idempotent. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      for (const listener of Object.values(this.#listeners)) listener.close();
      closeQuietly(this.#ends.host);
      closeQuietly(this.#ends.guest);
      await Promise.all(this.#loops);
    })();
    return this.#closing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

function closeQuietly(conn: Deno.UnixConn | undefined): void {
  try {
    conn?.close();
  } catch {
    // already closed
  }
}

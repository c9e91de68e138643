/**
 * Watches one instance's status channel (the agent's virtio-serial "ring
 * buffer") and reports every state line the guest wrote, plus `STOPPED` when
 * the channel goes away. One watcher per instance; backends behind one class:
 *
 * - `qmp`: QEMU `-chardev ringbuf` read with QMP `ringbuf-read` (what LXD does):
 *   polled at start, after every QMP event and on a timer whose period the
 *   caller sets (`setInterval`, with up to a tenth of slack so that many
 *   watchers share wake-ups); a read consumes the bytes and only the last
 *   complete line counts.
 * - `socket`: a `-chardev socket,server=on` virtserialport: lines are read as
 *   they come, and `writeLine()` sends `CONNECT 2:<port>\n` to the guest,
 *   bounded by `writeTimeout`: a guest that stops reading (its socket buffer
 *   full) makes the channel `stalled`, and further lines are refused at once
 *   until the pending write completes; nobody waits on it.
 * - `file`: a plain file the guest side appends to (tests only), polled.
 * - `none`: never reports anything.
 *
 * A channel that cannot be opened or goes away (VM stopped, QEMU killed) is
 * reported once as `STOPPED` and retried with exponential backoff, but at
 * least once per poll period while nothing listens on the socket (so a VM
 * that starts is noticed); it never affects other watchers. Owns its connection and timers until `close()`.
 *
 * Needs `--allow-read`, `--allow-write`, `--allow-net=unix:<path>`.
 * @module
 */

import { type AgentState, parseStatusLine } from "../../shared/api.ts";
import { LineBuffer } from "../../shared/line_buffer.ts";
import { type Logger, silentLogger } from "../../shared/log.ts";
import { Waiters } from "../../shared/wait.ts";
import type { StatusChannel } from "../instance.ts";
import { QmpClient, QmpError, readRingBuffer, ringbufReadArgs } from "./qmp_client.ts";

/** One observation of the agent's state. */
export interface StatusObservation {
  state: AgentState;
  /** `"line"`: the guest wrote it; `"channel"`: the channel went away or is absent. */
  source: "line" | "channel";
  /** The raw text read (line source), for operators and logs. */
  text?: string;
  /** Why the channel is down (channel source). */
  error?: Error;
  /**
   * Ms between this read and the previous one on the same connection: the
   * window in which the line was written (0 on the socket backend, where
   * lines arrive as written). Undefined for the first read after
   * (re)connecting, and for channel observations.
   */
  elapsed?: number;
}

/** Options of {@linkcode createStatusWatcher}. */
export interface StatusWatcherOptions {
  /** Called with every observed state line, and with `STOPPED` when the channel goes down. */
  onState: (observation: StatusObservation) => void;
  /** Called with non-fatal errors (a QMP command error), deduplicated while it repeats. */
  onError?: (error: Error) => void;
  /** Poll period of polled backends (qmp, file), in ms. @default 3000 */
  interval?: number;
  /** Reconnect delay after the channel went away: doubles from `min` to `max`, in ms. @default { min: 500, max: 30000 } */
  backoff?: { min?: number; max?: number };
  /** Bound on the QMP connect + greeting and on each QMP command, in ms. @default 3000 */
  timeout?: number;
  /** Longest line accepted on the socket backend, in bytes. @default 256 */
  maxLineLength?: number;
  /** Bound on a write to the guest (socket backend), in ms. @default 1000 */
  writeTimeout?: number;
  /** @default silentLogger */
  logger?: Logger;
}

const encoder = new TextEncoder();

/** A status watcher; see the module doc. Create with {@linkcode createStatusWatcher}. */
export abstract class StatusWatcher implements AsyncDisposable {
  abstract readonly kind: StatusChannel["kind"];
  protected readonly options: StatusWatcherOptions;
  protected readonly logger: Logger;
  #interval: number;
  #closed = false;
  #up = false;
  #abort = new AbortController();
  #pollRequested = false;
  #lastPoll = -Infinity;
  #readAt = -Infinity;
  #previousReadAt = -Infinity;
  #kick: (() => void) | undefined;
  #lastError = "";
  #loop: Promise<void> | undefined;

  constructor(options: StatusWatcherOptions) {
    this.options = options;
    this.logger = options.logger ?? silentLogger;
    this.#interval = options.interval ?? 3000;
  }

  /** Starts watching (idempotent). */
  start(): this {
    this.#loop ??= this.#run();
    return this;
  }

  /** Whether the channel is currently open. */
  get connected(): boolean {
    return this.#up;
  }

  /** The current poll period, in ms. */
  get interval(): number {
    return this.#interval;
  }

  /** Whether `writeLine()` can reach the guest (socket backend). */
  get canWrite(): boolean {
    return false;
  }

  /**
   * Resolves true once `writeLine()` can reach the guest, false after `ms`
   * or on `signal`; false at once on backends that cannot write.
   */
  whenWritable(_ms: number, _signal?: AbortSignal): Promise<boolean> {
    return Promise.resolve(false);
  }

  /**
   * Since when (epoch ms) a write to the guest has been pending past
   * `writeTimeout`: the guest does not read its channel. Undefined otherwise.
   */
  get stalledSince(): number | undefined {
    return undefined;
  }

  /** Sets the poll period; a shorter one takes effect at once. */
  setInterval(ms: number): void {
    if (!(ms > 0)) throw new RangeError(`Invalid poll interval: ${ms} ms`);
    this.#interval = ms;
    this.#kick?.();
  }

  /** Asks for a check as soon as possible (no-op on push backends). */
  poll(): void {
    this.#pollRequested = true;
    this.#kick?.();
  }

  /** Writes a line to the guest; resolves false when the backend cannot. */
  writeLine(_line: string): Promise<boolean> {
    return Promise.resolve(false);
  }

  /** Stops watching and closes the channel. Idempotent. */
  async close(): Promise<void> {
    this.#closed = true;
    this.#abort.abort(new Error("status watcher closed"));
    this.#kick?.();
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Opens the channel, calls `up()` once it is usable, then reports until it fails. */
  protected abstract session(signal: AbortSignal, up: () => void): Promise<void>;

  protected get closed(): boolean {
    return this.#closed;
  }

  /** Notes that a polled channel is being read now. */
  protected markRead(): void {
    this.#previousReadAt = this.#readAt;
    this.#readAt = performance.now();
  }

  protected emit(observation: StatusObservation): void {
    if (
      observation.source === "line" && observation.elapsed === undefined &&
      Number.isFinite(this.#previousReadAt)
    ) {
      observation.elapsed = this.#readAt - this.#previousReadAt;
    }
    try {
      this.options.onState(observation);
    } catch (error) {
      this.logger.warn("status handler failed", { error });
    }
  }

  protected reportError(error: Error): void {
    if (error.message === this.#lastError) return;
    this.#lastError = error.message;
    try {
      this.options.onError?.(error);
    } catch (e) {
      this.logger.warn("status error handler failed", { error: e });
    }
  }

  /**
   * Waits until the next poll is due (period elapsed or `poll()` called).
   * Returns false when `gone()` or the watcher closed first.
   */
  protected async nextPoll(gone: () => boolean): Promise<boolean> {
    while (!this.#closed && !gone()) {
      const wait = this.#pollRequested ? 0 : this.#due() - performance.now();
      if (wait <= 0) {
        this.#pollRequested = false;
        this.#lastPoll = performance.now();
        this.markRead();
        return true;
      }
      await this.#wait(wait);
    }
    return false;
  }

  /**
   * When the next timed poll is due: one interval after the last, rounded up
   * to a tick of a tenth of the interval (at most 1 s) on a clock shared by
   * all watchers, so that the polls of many instances share event-loop
   * wake-ups (timer slack). tests/bench/poll.ts measured 400 watchers at 100 polls/s:
   * 87 µs of host CPU per poll with the slack, 257 µs without.
   */
  #due(): number {
    const due = this.#lastPoll + this.#interval;
    const tick = Math.min(1000, this.#interval / 10);
    return Math.ceil(due / tick) * tick;
  }

  /** Wakes a pending `nextPoll()` so it re-checks (channel gone, interval changed). */
  protected wake(): void {
    this.#kick?.();
  }

  #wait(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#kick = undefined;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#kick = done;
    });
  }

  async #run(): Promise<void> {
    const min = this.options.backoff?.min ?? 500;
    const max = this.options.backoff?.max ?? 30_000;
    let delay = min;
    let reportedDown = false;
    while (!this.#closed) {
      let failure: Error | undefined;
      try {
        await this.session(this.#abort.signal, () => {
          this.#up = true;
          delay = min;
          reportedDown = false;
          this.#lastError = "";
          this.#pollRequested = true; // read once at (re)connect, as LXD does
          this.#readAt = this.#previousReadAt = -Infinity;
        });
      } catch (error) {
        failure = error instanceof Error ? error : new Error(String(error));
      }
      this.#up = false;
      if (this.#closed) break;
      failure ??= new Error("status channel closed");
      if (!reportedDown) {
        reportedDown = true;
        this.logger.debug("status channel down", { error: failure });
        this.emit({ state: "STOPPED", source: "channel", error: failure });
      }
      // Nothing listening (VM not running) costs one syscall to find out: try
      // again at least once per poll period, so a VM that starts is seen soon.
      // Other failures (no greeting, garbage) back off fully.
      const cheap = failure instanceof Deno.errors.NotFound ||
        failure instanceof Deno.errors.ConnectionRefused;
      const jittered = (cheap ? Math.min(delay, this.#interval) : delay) *
        (0.8 + 0.4 * Math.random());
      await this.#wait(jittered);
      delay = Math.min(delay * 2, max);
    }
  }
}

class QmpStatusWatcher extends StatusWatcher {
  readonly kind = "qmp";
  constructor(
    readonly channel: Extract<StatusChannel, { kind: "qmp" }>,
    options: StatusWatcherOptions,
  ) {
    super(options);
  }

  protected async session(signal: AbortSignal, up: () => void): Promise<void> {
    const timeout = this.options.timeout ?? 3000;
    const client = await QmpClient.connect(this.channel.path, {
      greetingTimeout: timeout,
      commandTimeout: timeout,
      signal,
      onEvent: () => this.poll(),
      logger: this.logger,
    });
    let gone = false;
    client.closed.then(() => {
      gone = true;
      this.wake();
    });
    try {
      up();
      const args = ringbufReadArgs(this.channel.chardev, this.channel.size || 16);
      while (await this.nextPoll(() => gone)) {
        let text: unknown;
        try {
          text = await client.execute("ringbuf-read", args);
        } catch (error) {
          if (!(error instanceof QmpError)) throw error;
          this.reportError(error);
          continue;
        }
        if (typeof text !== "string") continue;
        const state = parseStatusLine(text);
        if (state !== undefined) this.emit({ state, source: "line", text });
      }
      if (!this.closed) {
        throw (await client.closed) ?? new Error(`QMP socket ${this.channel.path} closed`);
      }
    } finally {
      await client.close();
    }
  }
}

class SocketStatusWatcher extends StatusWatcher {
  readonly kind = "socket";
  #conn: Deno.UnixConn | undefined;
  /** The write in progress, if any: at most one at a time. */
  #writing: Promise<unknown> | undefined;
  #stalledSince: number | undefined;

  constructor(
    readonly channel: Extract<StatusChannel, { kind: "socket" }>,
    options: StatusWatcherOptions,
  ) {
    super(options);
  }

  override get canWrite(): boolean {
    return this.#conn !== undefined;
  }

  /** Woken once the channel is connected. */
  #writable = new Waiters();

  override whenWritable(ms: number, signal?: AbortSignal): Promise<boolean> {
    if (this.#conn !== undefined) return Promise.resolve(true);
    if (this.closed) return Promise.resolve(false);
    return this.#writable.wait(ms, signal);
  }

  override get stalledSince(): number | undefined {
    return this.#stalledSince;
  }

  /**
   * Writes `line`, waiting at most `writeTimeout`; false when the channel is
   * down, the write failed, timed out, or an earlier one is still pending.
   */
  override async writeLine(line: string): Promise<boolean> {
    const conn = this.#conn;
    if (conn === undefined || this.#writing !== undefined) return false;
    const bytes = encoder.encode(line.endsWith("\n") ? line : line + "\n");
    const write = (async () => {
      let offset = 0;
      while (offset < bytes.length) offset += await conn.write(bytes.subarray(offset));
    })();
    this.#writing = write;
    const settled = write.then(() => true, (error) => {
      this.logger.debug("serial write failed", { error });
      return false;
    }).finally(() => {
      if (this.#writing !== write) return;
      this.#writing = undefined;
      if (this.#stalledSince !== undefined) {
        this.#stalledSince = undefined;
        this.logger.info("serial channel reads again", { path: this.channel.path });
      }
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = this.options.writeTimeout ?? 1000;
    const result = await Promise.race([
      settled,
      new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), timeout)),
    ]);
    clearTimeout(timer);
    if (result !== "timeout") return result;
    this.#stalledSince ??= Date.now();
    this.logger.warn("serial channel stalled", {
      path: this.channel.path,
      error: `the guest has not read a ${bytes.length}-byte line for ${timeout} ms`,
    });
    return false;
  }

  protected async session(signal: AbortSignal, up: () => void): Promise<void> {
    const maxLine = this.options.maxLineLength ?? 256;
    // A unix connect succeeds or fails at once: no timeout needed.
    const conn = await Deno.connect({ transport: "unix", path: this.channel.path });
    const onAbort = () => conn.close();
    signal.addEventListener("abort", onAbort, { once: true });
    this.#conn = conn;
    this.#writable.wake();
    try {
      up();
      // Garbage without a newline is dropped (to its newline) once it is too long.
      const lines = new LineBuffer(maxLine + 1);
      const buf = new Uint8Array(1024);
      while (true) {
        const n = await conn.read(buf);
        if (n === null) throw new Deno.errors.UnexpectedEof(`${this.channel.path} closed`);
        for (const text of lines.push(buf.subarray(0, n))) {
          const line = text + "\n";
          const state = parseStatusLine(line);
          // Lines arrive as written: nothing happened between write and read.
          if (state !== undefined) this.emit({ state, source: "line", text: line, elapsed: 0 });
        }
      }
    } catch (error) {
      if (!this.closed) throw error;
    } finally {
      this.#conn = undefined;
      this.#writing = undefined;
      this.#stalledSince = undefined;
      signal.removeEventListener("abort", onAbort);
      try {
        conn.close();
      } catch {
        // closed by abort
      }
    }
  }
}

class FileStatusWatcher extends StatusWatcher {
  readonly kind = "file";
  constructor(
    readonly channel: Extract<StatusChannel, { kind: "file" }>,
    options: StatusWatcherOptions,
  ) {
    super(options);
  }

  protected async session(_signal: AbortSignal, up: () => void): Promise<void> {
    const path = this.channel.path;
    await Deno.stat(path);
    up();
    let offset = 0;
    const decoder = new TextDecoder();
    while (await this.nextPoll(() => false)) {
      using file = await Deno.open(path, { read: true });
      const { size } = await file.stat();
      if (size < offset) offset = 0; // truncated: start over
      if (size === offset) continue;
      await file.seek(offset, Deno.SeekMode.Start);
      const bytes = new Uint8Array(size - offset);
      let got = 0;
      while (got < bytes.length) {
        const n = await file.read(bytes.subarray(got));
        if (n === null) break;
        got += n;
      }
      const text = decoder.decode(bytes.subarray(0, got));
      const lastNewline = text.lastIndexOf("\n");
      if (lastNewline < 0) continue; // only a partial line so far
      offset += encoder.encode(text.slice(0, lastNewline + 1)).length;
      const state = parseStatusLine(text.slice(0, lastNewline + 1));
      if (state !== undefined) this.emit({ state, source: "line", text });
    }
  }
}

class NullStatusWatcher extends StatusWatcher {
  readonly kind = "none";
  protected session(signal: AbortSignal, _up: () => void): Promise<void> {
    return new Promise((resolve) => signal.addEventListener("abort", () => resolve()));
  }
}

/** A watcher for `channel`; call `start()` to begin, `close()` to stop. */
export function createStatusWatcher(
  channel: StatusChannel,
  options: StatusWatcherOptions,
): StatusWatcher {
  switch (channel.kind) {
    case "qmp":
      return new QmpStatusWatcher(channel, options);
    case "socket":
      return new SocketStatusWatcher(channel, options);
    case "file":
      return new FileStatusWatcher(channel, options);
    case "none":
      return new NullStatusWatcher(options);
  }
}

/** What a one-shot read of a status channel shows (`lxd-vsock-host --status NAME`). */
export interface ChannelReading {
  kind: StatusChannel["kind"];
  /** The raw text read (consumed, for a ring buffer). */
  text?: string;
  /** The last complete state line, or STOPPED when the channel is gone. */
  state?: AgentState;
  /** A sentence for operators when there is no state to show, or why. */
  note?: string;
}

/**
 * Reads a status channel once, as `--status NAME` shows it: for QMP, one
 * `ringbuf-read` (which consumes the bytes, as every read does: a running
 * daemon's watcher will not see them). A missing QMP socket or file reads as
 * STOPPED; a QMP socket that does not greet (QEMU serves one client per
 * socket: the daemon or LXD may hold it) gives a note. A socket channel is
 * not read: QEMU serves one client, the daemon.
 */
export async function readStatusChannel(
  channel: StatusChannel,
  options: { timeout?: number; signal?: AbortSignal } = {},
): Promise<ChannelReading> {
  const kind = channel.kind;
  try {
    switch (channel.kind) {
      case "qmp": {
        const { text, state } = await readRingBuffer(channel.path, channel.chardev, {
          size: channel.size || 16,
          timeout: options.timeout,
          signal: options.signal,
        });
        if (state !== undefined) return { kind, text, state };
        return {
          kind,
          text,
          note: text === ""
            ? "ring buffer empty (a read consumes it; an agent rewrites STARTED every 5 s until connected)"
            : "no complete state line in the ring buffer",
        };
      }
      case "file": {
        const text = await Deno.readTextFile(channel.path);
        const state = parseStatusLine(text);
        return state === undefined
          ? { kind, text, note: "no complete state line" }
          : { kind, text, state };
      }
      case "socket":
        return { kind, note: `socket channel ${channel.path} is read by the daemon only` };
      case "none":
        return { kind, note: "no status channel" };
    }
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.ConnectionRefused) {
      return { kind, state: "STOPPED", note: `${(error as Error).message} (VM not running?)` };
    }
    if (error instanceof Deno.errors.TimedOut && kind === "qmp") {
      // QEMU serves one QMP client per socket: a second one waits unanswered.
      return {
        kind,
        note: `${error.message}: another client (the daemon, LXD) may hold this QMP socket`,
      };
    }
    throw error;
  }
}

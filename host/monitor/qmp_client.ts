/**
 * A minimal QEMU Machine Protocol (QMP) client over a unix socket, and the
 * one-shot ring-buffer read behind `lxd-vsock-host --status NAME`.
 *
 * `QmpClient` owns one connection: it reads the greeting, negotiates
 * `qmp_capabilities`, sends commands (matched to replies by `id`) and hands
 * asynchronous events to a callback. Its reader is line-delimited JSON,
 * robust to partial reads and garbage lines, with a bounded line length.
 *
 * Needs `--allow-read`, `--allow-write` and `--allow-net=unix:<path>` for the
 * QMP socket.
 * @module
 */

import { type AgentState, parseStatusLine } from "../../shared/api.ts";
import { LineBuffer } from "../../shared/line_buffer.ts";
import { type Logger, silentLogger } from "../../shared/log.ts";

/** An asynchronous QMP event such as `{"event":"STOP","timestamp":{…}}`. */
export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** An `{"error":{"class":…,"desc":…}}` reply from QEMU. */
export class QmpError extends Error {
  /** QMP error class, such as `"GenericError"` or `"DeviceNotFound"`. */
  readonly class: string;
  /** QEMU's human description. */
  readonly desc: string;

  constructor(command: string, errorClass: string, desc: string) {
    super(`QMP command ${command} failed: ${errorClass}: ${desc}`);
    this.name = "QmpError";
    this.class = errorClass;
    this.desc = desc;
  }
}

/** Options of {@linkcode QmpClient.connect}. */
export interface QmpConnectOptions {
  /** How long to wait for connect + greeting, in ms. @default 3000 */
  greetingTimeout?: number;
  /** Default bound on each command's reply, in ms. @default 3000 */
  commandTimeout?: number;
  /** Longest accepted line, in bytes; a longer one closes the connection. @default 1048576 */
  maxLineLength?: number;
  /** Called for each asynchronous event, in order. */
  onEvent?: (event: QmpEvent) => void;
  /** Aborting closes the client (and fails a pending connect). */
  signal?: AbortSignal;
  /** @default silentLogger */
  logger?: Logger;
}

/** Options of {@linkcode QmpClient.execute}. */
export interface QmpExecuteOptions {
  /** Bound on the reply, in ms. @default the client's commandTimeout */
  timeout?: number;
  signal?: AbortSignal;
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(error: Error): void;
}

const encoder = new TextEncoder();

function timeoutError(message: string): Error {
  return new Deno.errors.TimedOut(message);
}

/** Waits for `promise`, failing after `ms` or when `signal` aborts. */
function bounded<T>(
  promise: Promise<T>,
  ms: number,
  message: string,
  signal?: AbortSignal,
): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => finish(() => reject(signal!.reason));
    const timer = setTimeout(() => finish(() => reject(timeoutError(message))), ms);
    const finish = (f: () => void) => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      f();
    };
    if (signal?.aborted) return onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    promise.then((v) => finish(() => resolve(v)), (e) => finish(() => reject(e)));
  });
}

/** One QMP connection. Create with {@linkcode QmpClient.connect}; `close()` when done. */
export class QmpClient implements AsyncDisposable {
  /** The socket path. */
  readonly path: string;
  /** The greeting's `QMP` object (version, capabilities). */
  greeting: Record<string, unknown> = {};
  /** Lines that were not JSON objects, skipped. */
  garbageLines = 0;

  #conn: Deno.UnixConn;
  #options: QmpConnectOptions;
  #logger: Logger;
  #pending = new Map<string, Pending>();
  #nextId = 1;
  #writeChain: Promise<void> = Promise.resolve();
  #closed = false;
  #closeReason: Error | undefined;
  #resolveClosed!: (reason: Error | undefined) => void;
  #resolveGreeting!: (greeting: Record<string, unknown>) => void;
  #greeting: Promise<Record<string, unknown>>;
  #onAbort = () => this.#shutdown(new Error("QMP client aborted"));
  /** Settles when the connection is gone: `undefined` after `close()`, else the reason. */
  readonly closed: Promise<Error | undefined>;

  private constructor(path: string, conn: Deno.UnixConn, options: QmpConnectOptions) {
    this.path = path;
    this.#conn = conn;
    this.#options = options;
    this.#logger = options.logger ?? silentLogger;
    this.closed = new Promise((resolve) => this.#resolveClosed = resolve);
    this.#greeting = new Promise((resolve) => this.#resolveGreeting = resolve);
    options.signal?.addEventListener("abort", this.#onAbort, { once: true });
    this.#readLoop();
  }

  /**
   * Connects to the QMP socket at `path`, waits for QEMU's greeting and
   * negotiates capabilities. Fails with `Deno.errors.TimedOut` when QEMU does
   * not greet within `greetingTimeout`, with `Deno.errors.NotFound` /
   * `ConnectionRefused` when nothing listens.
   */
  static async connect(path: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const greetingTimeout = options.greetingTimeout ?? 3000;
    options.signal?.throwIfAborted();
    const connecting = Deno.connect({ transport: "unix", path });
    let conn: Deno.UnixConn;
    try {
      conn = await bounded(
        connecting,
        greetingTimeout,
        `Connecting to QMP socket ${path} timed out after ${greetingTimeout} ms`,
        options.signal,
      );
    } catch (error) {
      connecting.then((late) => late.close(), () => {}); // do not leak a late connection
      throw error;
    }
    const client = new QmpClient(path, conn, options);
    try {
      const closedEarly = client.closed.then((reason) => {
        throw reason ?? new Deno.errors.UnexpectedEof(`QMP socket ${path} closed`);
      });
      client.greeting = await bounded(
        Promise.race([client.#greeting, closedEarly]),
        greetingTimeout,
        `QMP greeting from ${path} timed out after ${greetingTimeout} ms`,
        options.signal,
      );
      await client.execute("qmp_capabilities");
      return client;
    } catch (error) {
      await client.close();
      throw error;
    }
  }

  /**
   * Sends `command` with `args` and resolves with its `return` value; rejects
   * with {@linkcode QmpError} on an `error` reply, `Deno.errors.TimedOut`
   * after the timeout, or the close reason when the connection goes away.
   */
  execute(
    command: string,
    args?: Record<string, unknown>,
    options: QmpExecuteOptions = {},
  ): Promise<unknown> {
    if (this.#closed) {
      return Promise.reject(
        this.#closeReason ?? new Deno.errors.BadResource(`QMP client for ${this.path} is closed`),
      );
    }
    const id = `lxd-vsock-${this.#nextId++}`;
    const timeout = options.timeout ?? this.#options.commandTimeout ?? 3000;
    const reply = new Promise<unknown>((resolve, reject) => {
      this.#pending.set(id, { command, resolve, reject });
    });
    const message = JSON.stringify(
      args === undefined ? { execute: command, id } : {
        execute: command,
        arguments: args,
        id,
      },
    ) + "\n";
    this.#write(message).catch((error) => this.#shutdown(error));
    return bounded(
      reply,
      timeout,
      `QMP command ${command} on ${this.path} timed out after ${timeout} ms`,
      options.signal,
    ).finally(() => this.#pending.delete(id));
  }

  /** Closes the connection; pending commands fail. Idempotent. */
  close(): Promise<void> {
    this.#shutdown(undefined);
    return this.closed.then(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #write(text: string): Promise<void> {
    const bytes = encoder.encode(text);
    this.#writeChain = this.#writeChain.then(async () => {
      let offset = 0;
      while (offset < bytes.length) offset += await this.#conn.write(bytes.subarray(offset));
    });
    return this.#writeChain;
  }

  #shutdown(reason: Error | undefined): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closeReason = reason;
    this.#options.signal?.removeEventListener("abort", this.#onAbort);
    try {
      this.#conn.close();
    } catch {
      // already closed by the reader
    }
    const error = reason ?? new Deno.errors.BadResource(`QMP client for ${this.path} closed`);
    for (const pending of this.#pending.values()) pending.reject(error);
    this.#pending.clear();
    this.#resolveClosed(reason);
  }

  async #readLoop(): Promise<void> {
    const maxLine = this.#options.maxLineLength ?? 1 << 20;
    const lines = new LineBuffer(maxLine + 1);
    const buf = new Uint8Array(16 * 1024);
    try {
      while (!this.#closed) {
        const n = await this.#conn.read(buf);
        if (n === null) {
          this.#shutdown(new Deno.errors.UnexpectedEof(`QMP socket ${this.path} closed by QEMU`));
          return;
        }
        for (const line of lines.push(buf.subarray(0, n))) {
          this.#dispatch(line);
          if (this.#closed) return;
        }
        if (lines.dropped > 0) {
          this.#shutdown(
            new SyntaxError(`QMP line from ${this.path} exceeds ${maxLine} bytes`),
          );
          return;
        }
      }
    } catch (error) {
      this.#shutdown(this.#closed ? undefined : error as Error);
    }
  }

  #dispatch(line: string): void {
    if (line.trim() === "") return;
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      message = undefined;
    }
    if (typeof message !== "object" || message === null || Array.isArray(message)) {
      this.garbageLines++;
      this.#logger.debug("skipped a non-JSON QMP line", {
        path: this.path,
        line: line.slice(0, 80),
      });
      return;
    }
    const m = message as Record<string, unknown>;
    if ("QMP" in m) {
      this.#resolveGreeting((m.QMP ?? {}) as Record<string, unknown>);
    } else if (typeof m.event === "string") {
      try {
        this.#options.onEvent?.(m as unknown as QmpEvent);
      } catch (error) {
        this.#logger.warn("QMP event handler failed", { path: this.path, error });
      }
    } else if ("return" in m || "error" in m) {
      const id = typeof m.id === "string" ? m.id : this.#pending.keys().next().value;
      const pending = id === undefined ? undefined : this.#pending.get(id);
      if (pending === undefined) return; // a late reply to a timed-out command
      this.#pending.delete(id!);
      if ("error" in m) {
        const e = (m.error ?? {}) as Record<string, unknown>;
        pending.reject(new QmpError(pending.command, String(e.class), String(e.desc)));
      } else {
        pending.resolve(m.return);
      }
    } else {
      this.garbageLines++;
    }
  }
}

/** Options of {@linkcode readRingBuffer}. */
export interface ReadRingBufferOptions {
  /** Bytes to read. @default 16 */
  size?: number;
  /** Bound on connect, greeting and the read, each, in ms. @default 3000 */
  timeout?: number;
  signal?: AbortSignal;
}

/** What one ring-buffer read returned. */
export interface RingBufferRead {
  /** The raw text read (consumed from the buffer). */
  text: string;
  /** The last complete state line, if any. */
  state: AgentState | undefined;
}

/** The QMP command that reads (and consumes) a ring buffer. */
export function ringbufReadArgs(chardev: string, size: number): Record<string, unknown> {
  return { device: chardev, size, format: "utf8" };
}

/**
 * Connects to `qmpPath`, reads `size` bytes of the ring buffer `chardev` once
 * and disconnects. The read consumes the bytes, as every ring-buffer read does.
 */
export async function readRingBuffer(
  qmpPath: string,
  chardev: string,
  options: ReadRingBufferOptions = {},
): Promise<RingBufferRead> {
  const timeout = options.timeout ?? 3000;
  await using client = await QmpClient.connect(qmpPath, {
    greetingTimeout: timeout,
    commandTimeout: timeout,
    signal: options.signal,
  });
  const value = await client.execute("ringbuf-read", ringbufReadArgs(chardev, options.size ?? 16));
  const text = typeof value === "string" ? value : "";
  return { text, state: parseStatusLine(text) };
}

/**
 * The one small logger: one line per event, `level=… msg="…" key=value …`,
 * written to a sink the program's `main.ts` chooses (stderr by default).
 * Modules take a `Logger` as an option; only `main.ts` creates one.
 * Needs no permissions.
 * @module
 */

export const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;
export type LogLevel = typeof LOG_LEVELS[number];

/** Fields attached to a log line. */
export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  /** A logger that adds `fields` to every line. */
  with(fields: LogFields): Logger;
}

export interface LoggerOptions {
  /** Lowest level written. @default "info" */
  level?: LogLevel;
  /** Where lines go. @default a stderr writer */
  write?: (line: string) => void;
}

/** Parses a `--log-level` value; RangeError names the accepted ones. */
export function parseLogLevel(value: string): LogLevel {
  if ((LOG_LEVELS as readonly string[]).includes(value)) return value as LogLevel;
  throw new RangeError(`Invalid log level "${value}": use one of ${LOG_LEVELS.join(", ")}`);
}

function formatValue(value: unknown): string {
  if (value instanceof Error) value = value.message;
  const text = typeof value === "string" ? value : JSON.stringify(value) ?? String(value);
  return /^[^\s"=]+$/.test(text) ? text : JSON.stringify(text);
}

/** Formats one line: `level=info msg="listening" port=1234`. */
export function formatLogLine(level: LogLevel, msg: string, fields: LogFields): string {
  let line = `level=${level} msg=${JSON.stringify(msg)}`;
  for (const [key, value] of Object.entries(fields)) {
    if (value !== undefined) line += ` ${key}=${formatValue(value)}`;
  }
  return line;
}

const encoder = new TextEncoder();

function writeStderr(line: string): void {
  Deno.stderr.writeSync(encoder.encode(line + "\n"));
}

export function createLogger(options: LoggerOptions = {}, base: LogFields = {}): Logger {
  const min = LOG_LEVELS.indexOf(options.level ?? "info");
  const write = options.write ?? writeStderr;
  const log = (level: LogLevel) => (msg: string, fields: LogFields = {}) => {
    if (LOG_LEVELS.indexOf(level) < min) return;
    write(formatLogLine(level, msg, { ...base, ...fields }));
  };
  return {
    debug: log("debug"),
    info: log("info"),
    warn: log("warn"),
    error: log("error"),
    with: (fields) => createLogger(options, { ...base, ...fields }),
  };
}

/** A logger that drops everything (tests, library defaults). */
export const silentLogger: Logger = createLogger({ write: () => {} });

/** Options for {@linkcode LogSummary}. */
export interface LogSummaryOptions {
  /** Length of one interval, ms. @default 10000 */
  interval?: number;
}

/**
 * Rate-limited logging for events a peer can cause at will (refused
 * connections, stalled channels): the first event of a kind in an interval is
 * logged at once; the others of that interval are counted and written as one
 * summary line (`count=N`) when the interval ends. Owns one timer while
 * events are pending; `close()` writes what is pending and stops it.
 */
export class LogSummary {
  #logger: Logger;
  #interval: number;
  #pending = new Map<string, { level: LogLevel; count: number; fields: LogFields }>();
  #quiet = new Set<string>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #closed = false;

  constructor(logger: Logger, options: LogSummaryOptions = {}) {
    this.#logger = logger;
    this.#interval = options.interval ?? 10_000;
  }

  /** Notes one event `msg` at `level`; `fields` of the latest event go in the summary. */
  note(level: LogLevel, msg: string, fields: LogFields = {}): void {
    if (this.#closed) return this.#logger[level](msg, fields);
    if (!this.#quiet.has(msg)) {
      this.#quiet.add(msg);
      this.#logger[level](msg, fields);
    } else {
      const entry = this.#pending.get(msg);
      if (entry) {
        entry.count++;
        entry.fields = fields;
      } else this.#pending.set(msg, { level, count: 1, fields });
    }
    this.#timer ??= setTimeout(() => this.#flush(), this.#interval);
  }

  #flush(): void {
    this.#timer = undefined;
    for (const [msg, { level, count, fields }] of this.#pending) {
      this.#logger[level](msg, {
        ...fields,
        count,
        summary: `${count} more in the last ${this.#interval / 1000} s`,
      });
    }
    // A kind that kept happening stays summarized (one line per interval);
    // one that stopped is logged at once again next time.
    for (const msg of this.#quiet) if (!this.#pending.has(msg)) this.#quiet.delete(msg);
    const active = this.#pending.size > 0;
    this.#pending.clear();
    if (active) this.#timer = setTimeout(() => this.#flush(), this.#interval);
  }

  /** Writes the pending summary lines and stops the timer. Idempotent. */
  close(): void {
    this.#closed = true;
    clearTimeout(this.#timer);
    this.#timer = undefined;
    for (const [msg, { level, count, fields }] of this.#pending) {
      this.#logger[level](msg, { ...fields, count });
    }
    this.#pending.clear();
    this.#quiet.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * `SerialChannel`: the agent's side of the virtio-serial status port (the
 * "ring buffer"). It writes one state line per write (`STARTED\n`,
 * `CONNECTED\n`, `STOPPED\n`) and watches the same port for the host's
 * `CONNECT <cid>:<port>\n` lines.
 *
 * A virtio-serial port can be open only once at a time (a second open fails
 * with EBUSY), so while the port exists the channel holds ONE fd, opened
 * `O_RDWR | O_NONBLOCK`, for both reading and writing; when the port is
 * absent, each write tries to open it again (`O_RDWR` per write, as LXD's
 * agent does) and a missing port is not an error. Non-blocking matters: a
 * write to a port whose host end is not connected would otherwise block the
 * whole event loop; here it is dropped (the periodic rewrite repeats it).
 * The fd is polled for input every `pollInterval`, and closed and reopened when
 * the port disappears (hot-unplug, or the path now names another file).
 *
 * Test stand-in: when the path is a unix socket (the host end of QEMU's
 * `-chardev socket` seen from the guest), the channel connects to it instead
 * and speaks the same lines over the connection.
 *
 * Owns: the port fd or socket connection and its reader loop.
 * Permissions: `--allow-ffi` (open/read/write via `DeviceFd` of shared/vsock,
 * which works under /dev where Deno's own file APIs need --allow-all),
 * `--allow-read` (an inode check, skipped where refused), `--allow-net` (only
 * for the unix socket stand-in).
 * @module
 */

import { type AgentState, MAX_CONNECT_LINE, parseConnectLine } from "../shared/api.ts";
import { LineBuffer } from "../shared/line_buffer.ts";
import { type Logger, silentLogger } from "../shared/log.ts";
import { DeviceFd, SocketError } from "../shared/vsock/mod.ts";
import { sleep } from "../shared/wait.ts";

/** An open port: a char device fd or a unix socket connection. */
interface OpenPort {
  readonly path: string;
  /** Reads what is there; `undefined` when nothing is, `null` when the port ended. */
  read(buf: Uint8Array): Promise<number | null | undefined>;
  /** Writes one line; false when it was dropped. Throws when the port is gone. */
  write(bytes: Uint8Array): Promise<boolean>;
  /** Whether the path still names the file that was opened. */
  stillThere(): boolean;
  close(): void;
}

/** Failed reads in a row after which a device port is closed and reopened. */
const MAX_READ_FAILURES = 20;

class DevicePort implements OpenPort {
  #device: DeviceFd;
  #failures = 0;
  constructor(device: DeviceFd) {
    this.#device = device;
  }
  get path(): string {
    return this.#device.path;
  }
  read(buf: Uint8Array): Promise<number | null | undefined> {
    if (this.#device.closed) return Promise.resolve(null);
    let n: number | undefined;
    try {
      n = this.#device.read(buf);
    } catch (error) {
      // An unplugged port shows as the path going away (checked at each poll);
      // until then an odd error is retried (one was seen once under QEMU TCG),
      // and only a run of them gives the port up.
      if (++this.#failures < MAX_READ_FAILURES && this.stillThere()) {
        return Promise.resolve(undefined);
      }
      return Promise.reject(error);
    }
    this.#failures = 0;
    // 0: a virtio-serial port whose host end is not connected; nothing to read yet.
    // undefined: nothing there now (EAGAIN) or interrupted (EINTR).
    return Promise.resolve(n === 0 ? undefined : n);
  }
  write(bytes: Uint8Array): Promise<boolean> {
    if (this.#device.closed) return Promise.reject(new Error(`${this.path} is closed`));
    let n: number | undefined;
    try {
      n = this.#device.write(bytes);
    } catch (error) {
      return Promise.reject(error);
    }
    return Promise.resolve(n === bytes.byteLength);
  }
  stillThere(): boolean {
    return this.#device.stillThere();
  }
  close(): void {
    this.#device.close();
  }
}

class SocketPort implements OpenPort {
  #conn: Deno.UnixConn;
  #closed = false;
  #writing: Promise<unknown> = Promise.resolve();
  constructor(readonly path: string, conn: Deno.UnixConn) {
    this.#conn = conn;
  }
  async read(buf: Uint8Array): Promise<number | null | undefined> {
    if (this.#closed) return null;
    try {
      return await this.#conn.read(buf);
    } catch (error) {
      if (this.#closed) return null;
      throw error;
    }
  }
  write(bytes: Uint8Array): Promise<boolean> {
    if (this.#closed) return Promise.reject(new Error(`${this.path} is closed`));
    const done = this.#writing.then(async () => {
      let off = 0;
      while (off < bytes.byteLength) off += await this.#conn.write(bytes.subarray(off));
      return true;
    });
    this.#writing = done.catch(() => {});
    return done;
  }
  stillThere(): boolean {
    return !this.#closed;
  }
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch {
      // already closed by the peer
    }
  }
}

/**
 * Opens `path` as a port; `undefined` when it does not exist. The device is
 * opened through FFI without a `stat` first: Deno refuses its own file APIs on
 * anything under /dev unless run with --allow-all. open(2) on a unix socket
 * fails with ENXIO: that is the test stand-in, connected to instead.
 */
async function openPort(path: string): Promise<OpenPort | undefined> {
  try {
    const device = DeviceFd.open(path);
    return device === undefined ? undefined : new DevicePort(device);
  } catch (error) {
    if (!(error instanceof SocketError && error.code === "ENXIO")) throw error;
  }
  try {
    return new SocketPort(path, await Deno.connect({ transport: "unix", path }));
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    if (error instanceof Deno.errors.ConnectionRefused) return undefined;
    throw error;
  }
}

export interface SerialChannelOptions {
  /** Candidate port paths; the first that exists is used. */
  paths: string[];
  /** Called for each valid `CONNECT <cid>:<port>` line from the host. */
  onConnect?: (target: { cid: number; port: number }) => void;
  /** The state to write as soon as the port (re)appears. */
  currentState?: () => AgentState | undefined;
  /**
   * Watch the port for host lines (and hold it open while it exists).
   * @default {true}
   */
  watch?: boolean;
  /**
   * How often an absent or ended port is looked for again, in ms.
   * @default {1000}
   */
  retryInterval?: number;
  /**
   * How often an open device port is checked for input, in ms.
   * @default {200}
   */
  pollInterval?: number;
  logger?: Logger;
}

/** The virtio-serial status channel. */
export class SerialChannel {
  #options:
    & Required<Omit<SerialChannelOptions, "onConnect" | "currentState">>
    & SerialChannelOptions;
  #port: OpenPort | undefined;
  #abort = new AbortController();
  #loop: Promise<void> | undefined;
  #missingLogged = false;
  #lastPath: string | undefined;
  #lines = new LineBuffer(MAX_CONNECT_LINE);
  #encoder = new TextEncoder();
  /** Settles once the watcher's first open attempt is done (a second open could hit EBUSY). */
  #firstOpen: Promise<void> | undefined;

  constructor(options: SerialChannelOptions) {
    // `??` per field: an option passed as undefined (the agent forwards its
    // own optional settings) keeps the default instead of a 0 ms busy retry.
    this.#options = {
      ...options,
      watch: options.watch ?? true,
      retryInterval: options.retryInterval ?? 1000,
      pollInterval: options.pollInterval ?? 200,
      logger: options.logger ?? silentLogger,
    };
    if (this.#options.watch) {
      const first = Promise.withResolvers<void>();
      this.#firstOpen = first.promise;
      this.#loop = this.#watch(first.resolve);
    }
  }

  /** Whether the channel holds a port open (watching it). */
  get holding(): boolean {
    return this.#port !== undefined;
  }

  /** The port held open, or else the one last written to, if any. */
  get path(): string | undefined {
    return this.#port?.path ?? this.#lastPath;
  }

  /**
   * Writes `<state>\n`. Resolves true when written, false when the port is
   * absent or the line was dropped; never rejects. On a device port the
   * write is synchronous: it is done when this returns.
   */
  write(state: AgentState): Promise<boolean> {
    if (this.#firstOpen !== undefined) {
      const first = this.#firstOpen;
      return first.then(() => {
        if (this.#firstOpen === first) this.#firstOpen = undefined;
        return this.write(state);
      });
    }
    const bytes = this.#encoder.encode(`${state}\n`);
    const port = this.#port;
    if (port !== undefined) {
      return port.write(bytes).catch((error) => {
        this.#options.logger.debug("serial port write failed; reopening", {
          port: port.path,
          error,
        });
        this.#drop(port);
        return false;
      });
    }
    return this.#writeOnce(bytes);
  }

  async #writeOnce(bytes: Uint8Array): Promise<boolean> {
    for (const path of this.#options.paths) {
      let port: OpenPort | undefined;
      try {
        port = await openPort(path);
      } catch (error) {
        this.#options.logger.debug("cannot open serial port", { port: path, error });
        continue;
      }
      if (port === undefined) continue;
      try {
        this.#missingLogged = false;
        const written = await port.write(bytes);
        if (written) this.#lastPath = path;
        return written;
      } catch (error) {
        this.#options.logger.debug("serial port write failed", { port: path, error });
        return false;
      } finally {
        port.close();
      }
    }
    this.#lastPath = undefined;
    if (!this.#missingLogged) {
      this.#missingLogged = true;
      this.#options.logger.info("no serial status port present", {
        ports: this.#options.paths.join(","),
      });
    }
    return false;
  }

  #drop(port: OpenPort): void {
    port.close();
    if (this.#port === port) this.#port = undefined;
  }

  async #watch(opened: () => void): Promise<void> {
    const signal = this.#abort.signal;
    const buf = new Uint8Array(256);
    while (!signal.aborted) {
      const port = await this.#openFirst();
      if (port === undefined) {
        opened();
        await sleep(this.#options.retryInterval, signal);
        continue;
      }
      if (signal.aborted) {
        port.close();
        opened();
        break;
      }
      this.#port = port;
      opened();
      this.#lines.reset();
      this.#options.logger.debug("serial port open", { port: port.path });
      const state = this.#options.currentState?.();
      if (state !== undefined) await this.write(state);
      try {
        while (!signal.aborted && this.#port === port) {
          const n = await port.read(buf);
          if (n === null) break;
          if (n === undefined) {
            await sleep(this.#options.pollInterval, signal);
            if (!port.stillThere()) break;
            continue;
          }
          for (const line of this.#lines.push(buf.subarray(0, n))) this.#line(line);
        }
      } catch (error) {
        this.#options.logger.debug("serial port read failed", { port: port.path, error });
      }
      this.#drop(port);
      if (!signal.aborted) {
        this.#options.logger.debug("serial port closed; looking for it again", {
          port: port.path,
        });
        await sleep(this.#options.retryInterval, signal);
      }
    }
  }

  async #openFirst(): Promise<OpenPort | undefined> {
    for (const path of this.#options.paths) {
      try {
        const port = await openPort(path);
        if (port !== undefined) return port;
      } catch (error) {
        this.#options.logger.debug("cannot open serial port", { port: path, error });
      }
    }
    return undefined;
  }

  #line(line: string): void {
    if (line.trim() === "") return;
    let target: { cid: number; port: number };
    try {
      target = parseConnectLine(line);
    } catch (error) {
      this.#options.logger.debug("ignoring serial line", { error });
      return;
    }
    this.#options.logger.info("host announced itself on the serial port", target);
    this.#options.onConnect?.(target);
  }

  /** Stops watching and closes the port. Idempotent. */
  async close(): Promise<void> {
    this.#abort.abort();
    this.#firstOpen = undefined;
    const port = this.#port;
    if (port !== undefined) this.#drop(port);
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

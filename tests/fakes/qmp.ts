/**
 * Test helper: a fake QEMU QMP server on a unix socket with a ring buffer
 * that behaves like `-chardev ringbuf` (bounded, reads consume, writes past
 * the size overwrite the oldest bytes), plus knobs for fault cases.
 *
 * Needs `--allow-read`, `--allow-write`, `--allow-net=unix:<path>`.
 * @module
 */

const encoder = new TextEncoder();

/** A QEMU-like ring buffer of `size` bytes (ASCII content assumed). */
export class FakeRingBuffer {
  #data = "";
  constructor(readonly size = 16) {}
  /** The guest writes: keeps the newest `size` bytes. */
  write(text: string): void {
    this.#data = (this.#data + text).slice(-this.size);
  }
  /** The host reads: consumes up to `size` bytes from the oldest. */
  read(size: number): string {
    const out = this.#data.slice(0, size);
    this.#data = this.#data.slice(out.length);
    return out;
  }
}

/** What a fake server does with one command; return undefined for the default. */
export type FakeCommandHandler = (
  command: { execute: string; arguments?: Record<string, unknown>; id?: unknown },
  conn: FakeQmpConnection,
) => Promise<boolean | void> | boolean | void;

export interface FakeQmpOptions {
  /** Send the greeting on connect. @default true */
  greeting?: boolean;
  /** Ring buffers by chardev id. @default { vserial: new FakeRingBuffer(16) } */
  rings?: Record<string, FakeRingBuffer>;
  /** Called first for every command; return true when it answered itself. */
  onCommand?: FakeCommandHandler;
}

/** One accepted client connection of the fake server. */
export class FakeQmpConnection {
  constructor(readonly conn: Deno.UnixConn) {}
  /** Writes raw text (may be garbage or a partial line). */
  async send(text: string): Promise<void> {
    const bytes = encoder.encode(text);
    let offset = 0;
    while (offset < bytes.length) offset += await this.conn.write(bytes.subarray(offset));
  }
  /** Writes one JSON message and a newline. */
  sendJson(value: unknown): Promise<void> {
    return this.send(JSON.stringify(value) + "\n");
  }
  /** Sends a QMP event. */
  event(name: string, data: Record<string, unknown> = {}): Promise<void> {
    return this.sendJson({ event: name, data, timestamp: { seconds: 0, microseconds: 0 } });
  }
  close(): void {
    try {
      this.conn.close();
    } catch {
      // already closed
    }
  }
}

/** A fake QMP server; `close()` stops it and drops every connection. */
export class FakeQmpServer implements AsyncDisposable {
  readonly rings: Record<string, FakeRingBuffer>;
  readonly connections: FakeQmpConnection[] = [];
  /** Every command received, in order, by `execute` name. */
  readonly commands: string[] = [];
  #listener: Deno.UnixListener;
  #options: FakeQmpOptions;
  #tasks = new Set<Promise<void>>();
  #acceptLoop: Promise<void>;
  #connWaiters: Array<() => void> = [];
  #commandWaiters: Array<() => void> = [];

  constructor(readonly path: string, options: FakeQmpOptions = {}) {
    this.#options = options;
    this.rings = options.rings ?? { vserial: new FakeRingBuffer(16) };
    this.#listener = Deno.listen({ transport: "unix", path });
    this.#acceptLoop = this.#accept();
  }

  /** Resolves when at least `n` connections were accepted. */
  async waitConnections(n: number): Promise<FakeQmpConnection> {
    while (this.connections.length < n) {
      await new Promise<void>((resolve) => this.#connWaiters.push(resolve));
    }
    return this.connections[n - 1];
  }

  /** Resolves when at least `n` commands named `name` were received. */
  async waitCommands(name: string, n: number): Promise<void> {
    while (this.commands.filter((c) => c === name).length < n) {
      await new Promise<void>((resolve) => this.#commandWaiters.push(resolve));
    }
  }

  async #accept(): Promise<void> {
    try {
      for await (const conn of this.#listener) {
        const c = new FakeQmpConnection(conn);
        this.connections.push(c);
        for (const wake of this.#connWaiters.splice(0)) wake();
        const task = this.#serve(c).finally(() => this.#tasks.delete(task));
        this.#tasks.add(task);
      }
    } catch {
      // listener closed
    }
  }

  async #serve(c: FakeQmpConnection): Promise<void> {
    const decoder = new TextDecoder();
    const buf = new Uint8Array(4096);
    let partial = "";
    try {
      if (this.#options.greeting ?? true) {
        await c.sendJson({
          QMP: {
            version: { qemu: { micro: 0, minor: 2, major: 8 }, package: "" },
            capabilities: [],
          },
        });
      }
      while (true) {
        const n = await c.conn.read(buf);
        if (n === null) break;
        partial += decoder.decode(buf.subarray(0, n), { stream: true });
        let newline: number;
        while ((newline = partial.indexOf("\n")) >= 0) {
          const line = partial.slice(0, newline);
          partial = partial.slice(newline + 1);
          const command = JSON.parse(line);
          this.commands.push(command.execute);
          for (const wake of this.#commandWaiters.splice(0)) wake();
          if (await this.#options.onCommand?.(command, c)) continue;
          await this.#answer(command, c);
        }
      }
    } catch {
      // connection closed under us
    } finally {
      c.close();
    }
  }

  #answer(
    command: { execute: string; arguments?: Record<string, unknown>; id?: unknown },
    c: FakeQmpConnection,
  ): Promise<void> {
    const id = command.id;
    if (command.execute === "qmp_capabilities") return c.sendJson({ return: {}, id });
    if (command.execute === "ringbuf-read") {
      const args = command.arguments ?? {};
      const ring = this.rings[String(args.device)];
      if (ring === undefined) {
        return c.sendJson({
          error: { class: "GenericError", desc: `Device '${args.device}' not found` },
          id,
        });
      }
      return c.sendJson({ return: ring.read(Number(args.size ?? 16)), id });
    }
    return c.sendJson({
      error: {
        class: "CommandNotFound",
        desc: `The command ${command.execute} has not been found`,
      },
      id,
    });
  }

  /** Stops listening and drops every connection (like QEMU being killed). */
  async close(): Promise<void> {
    try {
      this.#listener.close();
    } catch {
      // already closed
    }
    for (const c of this.connections) c.close();
    await this.#acceptLoop;
    await Promise.all([...this.#tasks]);
    await Deno.remove(this.path).catch(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

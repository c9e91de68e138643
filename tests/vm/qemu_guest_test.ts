/**
 * A real QEMU guest's ring buffer read over a minimal QMP exchange (skipped, with the
 * reason printed, where QEMU or the VM files of tests/vm/setup are missing).
 * @module
 */
import { qemuMissing, startSerialGuest } from "./qemu_guest.ts";
import { requires } from "../../shared/_requires.ts";

const noQemu = qemuMissing();

const encoder = new TextEncoder();

/** Just enough QMP: newline-delimited JSON, events skipped. */
class MiniQmp implements Disposable {
  #conn: Deno.UnixConn;
  #reader: ReadableStreamDefaultReader<string>;
  #buffer = "";

  constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#reader = conn.readable.pipeThrough(new TextDecoderStream()).getReader();
  }

  static async connect(path: string): Promise<MiniQmp> {
    const qmp = new MiniQmp(await Deno.connect({ transport: "unix", path }));
    const greeting = await qmp.#message();
    if (!("QMP" in greeting)) throw new Error(`Not a QMP greeting: ${JSON.stringify(greeting)}`);
    await qmp.execute("qmp_capabilities");
    return qmp;
  }

  async #message(): Promise<Record<string, unknown>> {
    for (;;) {
      const newline = this.#buffer.indexOf("\n");
      if (newline >= 0) {
        const line = this.#buffer.slice(0, newline);
        this.#buffer = this.#buffer.slice(newline + 1);
        return JSON.parse(line);
      }
      const { value, done } = await this.#reader.read();
      if (done) throw new Error("QMP connection closed");
      this.#buffer += value;
    }
  }

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    await this.#conn.write(
      encoder.encode(JSON.stringify({ execute: command, arguments: args }) + "\n"),
    );
    for (;;) {
      const message = await this.#message();
      if ("return" in message) return message.return;
      if ("error" in message) throw new Error(`${command}: ${JSON.stringify(message.error)}`);
    }
  }

  [Symbol.dispose](): void {
    this.#reader.cancel().catch(() => {});
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }
}

async function withDeadline<T>(
  ms: number,
  what: string,
  run: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  const controller = new AbortController();
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      controller.abort();
      reject(new Error(`${what}: no result in ${ms} ms`));
    }, ms);
  });
  try {
    return await Promise.race([run(controller.signal), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

Deno.test(requires(noQemu, {
  name: "startSerialGuest(): the guest's STARTED line is read (and consumed) by QMP ringbuf-read",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "qemu-guest-" });
    try {
      await using guest = await startSerialGuest({ dir, lines: ["STARTED\n"] });
      using qmp = await MiniQmp.connect(guest.qmpPath);
      const read = () =>
        qmp.execute("ringbuf-read", { device: "vserial", size: 16, format: "utf8" }) as Promise<
          string
        >;
      let got = "";
      await withDeadline(60_000, "waiting for STARTED in the ring buffer", async (signal) => {
        while (!got.includes("STARTED\n") && !signal.aborted) {
          got += await read();
          if (!got.includes("\n")) await new Promise((r) => setTimeout(r, 100));
        }
      });
      if (got !== "STARTED\n") {
        throw new Error(`Expected exactly "STARTED\\n", got ${JSON.stringify(got)}`);
      }
      const again = await read();
      if (again !== "") {
        throw new Error(`Expected the read to consume the line, got ${JSON.stringify(again)}`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
}));

Deno.test(requires(noQemu, {
  name:
    "startSerialGuest(): a write past 16 bytes keeps the newest 16 in the ring, and the socket port echoes",
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "qemu-guest-" });
    try {
      await using guest = await startSerialGuest({
        dir,
        chardevId: "status",
        lines: ["STARTED\nCONNECTED\n"],
        socketPort: true,
      });
      using qmp = await MiniQmp.connect(guest.qmpPath);
      let got = "";
      await withDeadline(60_000, "waiting for CONNECTED in the ring buffer", async (signal) => {
        while (!got.endsWith("CONNECTED\n") && !signal.aborted) {
          got += await qmp.execute("ringbuf-read", { device: "status", size: 16, format: "utf8" });
          if (!got.endsWith("\n")) await new Promise((r) => setTimeout(r, 100));
        }
      });
      // One 18-byte write: the ring keeps the newest 16 bytes.
      if (got !== "ARTED\nCONNECTED\n") {
        throw new Error(`Unexpected ring content ${JSON.stringify(got)}`);
      }

      using conn = await Deno.connect({ transport: "unix", path: guest.socketPath! });
      await conn.write(encoder.encode("CONNECT 2:1024\n"));
      const reader = conn.readable.pipeThrough(new TextDecoderStream()).getReader();
      let echoed = "";
      await withDeadline(30_000, "waiting for the echo on the socket port", async () => {
        while (!echoed.includes("\n")) {
          const { value, done } = await reader.read();
          if (done) break;
          echoed += value;
        }
      });
      await reader.cancel();
      if (echoed !== "CONNECT 2:1024\n") {
        throw new Error(`Unexpected echo ${JSON.stringify(echoed)}`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
}));

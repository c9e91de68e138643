/**
 * Benchmark of the unix-socket transport, in one process: echo round-trip
 * latency (p50/p99, µs) and one-way throughput (MB/s, 1 MB = 10^6 bytes) of
 * the FFI transport (`FdSocket` from `shared/vsock/`, driven by the single
 * epoll waiter) against Deno's native unix sockets (`Deno.listen`/`Deno.connect`
 * with `transport: "unix"`). Bounded loops; prints figures, asserts nothing.
 *
 * `benchTransport()` returns the figures; run directly to print a table:
 * `deno run -P=test tests/bench/transport.ts`.
 *
 * Owns: a temporary directory for the sockets (removed at the end).
 * Permissions: `--allow-ffi`, `--allow-read`, `--allow-write`, `--allow-net`
 * (unix sockets).
 *
 * @module
 */

import type { Buffer } from "node:buffer";
import { connectUnix, type FdSocket, listenUnix } from "../../shared/vsock/mod.ts";

/** Options of {@linkcode benchTransport}. */
export interface BenchTransportOptions {
  /**
   * Echo round trips measured per transport (after a warm-up of a tenth).
   * @default {5000}
   */
  roundTrips?: number;
  /**
   * Bytes of each echo message.
   * @default {64}
   */
  messageSize?: number;
  /**
   * Bytes sent one way for the throughput figure.
   * @default {268435456} (256 MiB)
   */
  bytes?: number;
  /**
   * Bytes per write for the throughput figure.
   * @default {65536}
   */
  chunkSize?: number;
}

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, index)];
}

function round(value: number, digits = 1): number {
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}

type Figures = { p50: number; p99: number; perSecond: number; mbPerSecond: number };

function summarize(samples: number[], elapsedMs: number, bytes: number, bytesMs: number): Figures {
  const sorted = [...samples].sort((a, b) => a - b);
  return {
    p50: round(percentile(sorted, 50)),
    p99: round(percentile(sorted, 99)),
    perSecond: Math.round(samples.length / (elapsedMs / 1000)),
    mbPerSecond: round(bytes / 1e6 / (bytesMs / 1000)),
  };
}

/** Echo and throughput over the FFI transport (FdSocket streams). */
async function benchFfi(dir: string, options: Required<BenchTransportOptions>): Promise<Figures> {
  const path = `${dir}/ffi.sock`;
  using listener = listenUnix(path);
  // Echo.
  let client: FdSocket | undefined;
  let server: FdSocket | undefined;
  try {
    [client, server] = await Promise.all([connectUnix(path), listener.accept()]);
    const echoServer = server;
    echoServer.on("data", (chunk: Buffer) => echoServer.write(chunk));
    let pending = 0;
    let wake: () => void = () => {};
    client.on("data", (chunk: Buffer) => {
      pending -= chunk.byteLength;
      if (pending <= 0) wake();
    });
    const message = new Uint8Array(options.messageSize).fill(0x61);
    const warmup = Math.ceil(options.roundTrips / 10);
    const samples: number[] = [];
    const started = performance.now();
    for (let i = 0; i < warmup + options.roundTrips; i++) {
      const t0 = performance.now();
      const echoed = new Promise<void>((resolve) => (wake = resolve));
      pending = message.byteLength;
      client.write(message);
      await echoed;
      if (i >= warmup) samples.push((performance.now() - t0) * 1000);
    }
    const echoMs = performance.now() - started;
    client.destroy();
    server.destroy();

    // Throughput: the client writes `bytes` honouring backpressure; the server counts.
    [client, server] = await Promise.all([connectUnix(path), listener.accept()]);
    const sink = server;
    let received = 0;
    const done = new Promise<void>((resolve) => {
      sink.on("data", (chunk: Buffer) => {
        received += chunk.byteLength;
        if (received >= options.bytes) resolve();
      });
    });
    const chunk = new Uint8Array(options.chunkSize).fill(0x62);
    const t0 = performance.now();
    for (let sent = 0; sent < options.bytes; sent += chunk.byteLength) {
      if (!client.write(chunk)) {
        const source = client;
        await new Promise<void>((resolve) => source.once("drain", resolve));
      }
    }
    await done;
    const bytesMs = performance.now() - t0;
    return summarize(samples, echoMs, options.bytes, bytesMs);
  } finally {
    client?.destroy();
    server?.destroy();
  }
}

async function readFully(conn: Deno.Conn, buf: Uint8Array): Promise<void> {
  let off = 0;
  while (off < buf.byteLength) {
    const n = await conn.read(buf.subarray(off));
    if (n === null) throw new Error("unexpected EOF");
    off += n;
  }
}

async function writeFully(conn: Deno.Conn, buf: Uint8Array): Promise<void> {
  let off = 0;
  while (off < buf.byteLength) off += await conn.write(buf.subarray(off));
}

/** Echo and throughput over Deno's native unix sockets. */
async function benchNative(
  dir: string,
  options: Required<BenchTransportOptions>,
): Promise<Figures> {
  const path = `${dir}/native.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  const conns: Deno.Conn[] = [];
  try {
    // Echo.
    const accepting = listener.accept();
    const client = await Deno.connect({ transport: "unix", path });
    const server = await accepting;
    conns.push(client, server);
    const echoing = (async () => {
      const buf = new Uint8Array(64 * 1024);
      for (;;) {
        const n = await server.read(buf).catch(() => null);
        if (n === null) return;
        await writeFully(server, buf.subarray(0, n));
      }
    })();
    const message = new Uint8Array(options.messageSize).fill(0x61);
    const reply = new Uint8Array(options.messageSize);
    const warmup = Math.ceil(options.roundTrips / 10);
    const samples: number[] = [];
    const started = performance.now();
    for (let i = 0; i < warmup + options.roundTrips; i++) {
      const t0 = performance.now();
      await writeFully(client, message);
      await readFully(client, reply);
      if (i >= warmup) samples.push((performance.now() - t0) * 1000);
    }
    const echoMs = performance.now() - started;
    client.close();
    await echoing;
    server.close();
    conns.length = 0;

    // Throughput.
    const accepting2 = listener.accept();
    const writer = await Deno.connect({ transport: "unix", path });
    const reader = await accepting2;
    conns.push(writer, reader);
    const counting = (async () => {
      const buf = new Uint8Array(64 * 1024);
      let received = 0;
      while (received < options.bytes) {
        const n = await reader.read(buf);
        if (n === null) break;
        received += n;
      }
    })();
    const chunk = new Uint8Array(options.chunkSize).fill(0x62);
    const t0 = performance.now();
    for (let sent = 0; sent < options.bytes; sent += chunk.byteLength) {
      await writeFully(writer, chunk);
    }
    await counting;
    const bytesMs = performance.now() - t0;
    return summarize(samples, echoMs, options.bytes, bytesMs);
  } finally {
    for (const conn of conns) {
      try {
        conn.close();
      } catch {
        // already closed
      }
    }
    listener.close();
  }
}

/**
 * Runs the unix-transport benchmark and returns its figures, keyed
 * `<ffi|deno>_unix_<figure>`: `echo_p50_us`, `echo_p99_us`, `echo_per_s`,
 * `throughput_mb_s`.
 */
export async function benchTransport(
  options: BenchTransportOptions = {},
): Promise<Record<string, number>> {
  const settings: Required<BenchTransportOptions> = {
    roundTrips: options.roundTrips ?? 5000,
    messageSize: options.messageSize ?? 64,
    bytes: options.bytes ?? 256 * 1024 * 1024,
    chunkSize: options.chunkSize ?? 64 * 1024,
  };
  const dir = Deno.makeTempDirSync({ prefix: "bench-transport-" });
  try {
    const ffi = await benchFfi(dir, settings);
    const native = await benchNative(dir, settings);
    return {
      ffi_unix_echo_p50_us: ffi.p50,
      ffi_unix_echo_p99_us: ffi.p99,
      ffi_unix_echo_per_s: ffi.perSecond,
      ffi_unix_throughput_mb_s: ffi.mbPerSecond,
      deno_unix_echo_p50_us: native.p50,
      deno_unix_echo_p99_us: native.p99,
      deno_unix_echo_per_s: native.perSecond,
      deno_unix_throughput_mb_s: native.mbPerSecond,
    };
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

if (import.meta.main) {
  const figures = await benchTransport();
  const rows = ["ffi", "deno"].map((kind) => ({
    transport: kind === "ffi" ? "FFI FdSocket (unix)" : "Deno native unix",
    "echo p50 (µs)": figures[`${kind}_unix_echo_p50_us`],
    "echo p99 (µs)": figures[`${kind}_unix_echo_p99_us`],
    "echo round trips/s": figures[`${kind}_unix_echo_per_s`],
    "throughput (MB/s)": figures[`${kind}_unix_throughput_mb_s`],
  }));
  console.log("unix transport, client and server in one process (64 B echo, 256 MiB one way)");
  console.table(rows);
}

/**
 * Benchmark of the unix-socket transport: echo round-trip latency (p50/p99,
 * µs) and one-way throughput (MB/s, 1 MB = 10^6 bytes) of the FFI transport
 * (`FdSocket` from `shared/vsock/`, driven by the single epoll waiter)
 * against Deno's native unix sockets (`Deno.listen`/`Deno.connect` with
 * `transport: "unix"`).
 *
 * Two settings: both ends in this process (`*_unix_*`), and the client here
 * with a native echo server in a child Deno process (`*_unix_xproc_*`, the
 * shape of host ⇄ agent, where no reply is produced by this process's own
 * JavaScript). Bounded loops; prints figures, asserts nothing.
 *
 * `benchTransport()` returns the figures; run directly to print a table:
 * `deno run -P=test tests/bench/transport.ts`.
 *
 * Owns: a temporary directory for the sockets and the child echo server
 * (both gone when it returns). Permissions: `--allow-ffi`, `--allow-read`,
 * `--allow-write`, `--allow-net` (unix sockets), `--allow-run` (the child).
 *
 * @module
 */

import type { Buffer } from "node:buffer";
import { connectUnix, type FdSocket, listenUnix, reactorStats } from "../../shared/vsock/mod.ts";

/** Options of {@linkcode benchTransport}. */
export interface BenchTransportOptions {
  /**
   * Echo round trips measured per setting (after a warm-up of a tenth).
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
  /**
   * Also measure against an echo server in a child process.
   * @default {true}
   */
  crossProcess?: boolean;
}

type Settings = Required<BenchTransportOptions>;

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, index)];
}

function round(value: number, digits = 1): number {
  const factor = 10 ** digits;
  return Math.round(value * factor) / factor;
}

type Echo = { p50: number; p99: number; perSecond: number; waitsPerRoundTrip: number };

/** Round trips of `messageSize` bytes through an echoing peer, over an FdSocket. */
async function echoFfi(client: FdSocket, settings: Settings): Promise<Echo> {
  let pending = 0;
  let wake: () => void = () => {};
  const onData = (chunk: Buffer) => {
    pending -= chunk.byteLength;
    if (pending <= 0) wake();
  };
  client.on("data", onData);
  const message = new Uint8Array(settings.messageSize).fill(0x61);
  const warmup = Math.ceil(settings.roundTrips / 10);
  const samples: number[] = [];
  let waitsBefore = 0;
  let started = 0;
  for (let i = 0; i < warmup + settings.roundTrips; i++) {
    if (i === warmup) {
      waitsBefore = reactorStats().waits;
      started = performance.now();
    }
    const t0 = performance.now();
    const echoed = new Promise<void>((resolve) => (wake = resolve));
    pending = message.byteLength;
    client.write(message);
    await echoed;
    if (i >= warmup) samples.push((performance.now() - t0) * 1000);
  }
  const elapsed = performance.now() - started;
  client.removeListener("data", onData);
  const sorted = samples.sort((a, b) => a - b);
  return {
    p50: round(percentile(sorted, 50)),
    p99: round(percentile(sorted, 99)),
    perSecond: Math.round(samples.length / (elapsed / 1000)),
    waitsPerRoundTrip: round((reactorStats().waits - waitsBefore) / settings.roundTrips, 3),
  };
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

/** Round trips of `messageSize` bytes through an echoing peer, over a Deno.Conn. */
async function echoNative(client: Deno.Conn, settings: Settings): Promise<Echo> {
  const message = new Uint8Array(settings.messageSize).fill(0x61);
  const reply = new Uint8Array(settings.messageSize);
  const warmup = Math.ceil(settings.roundTrips / 10);
  const samples: number[] = [];
  let started = 0;
  for (let i = 0; i < warmup + settings.roundTrips; i++) {
    if (i === warmup) started = performance.now();
    const t0 = performance.now();
    await writeFully(client, message);
    await readFully(client, reply);
    if (i >= warmup) samples.push((performance.now() - t0) * 1000);
  }
  const elapsed = performance.now() - started;
  const sorted = samples.sort((a, b) => a - b);
  return {
    p50: round(percentile(sorted, 50)),
    p99: round(percentile(sorted, 99)),
    perSecond: Math.round(samples.length / (elapsed / 1000)),
    waitsPerRoundTrip: Number.NaN,
  };
}

/** Echoes every connection of a native unix listener until it is closed. */
async function serveNativeEcho(listener: Deno.Listener): Promise<void> {
  const conns: Promise<void>[] = [];
  for await (const conn of listener) {
    conns.push((async () => {
      const buf = new Uint8Array(64 * 1024);
      try {
        for (;;) {
          const n = await conn.read(buf);
          if (n === null) break;
          await writeFully(conn, buf.subarray(0, n));
        }
      } catch {
        // The client went away.
      } finally {
        try {
          conn.close();
        } catch {
          // already closed
        }
      }
    })());
  }
  await Promise.all(conns);
}

/** MB/s of `bytes` written over an FdSocket pair, honouring backpressure. */
async function throughputFfi(path: string, settings: Settings): Promise<number> {
  using listener = listenUnix(path);
  const [client, server] = await Promise.all([connectUnix(path), listener.accept()]);
  try {
    let received = 0;
    const done = new Promise<void>((resolve) => {
      server.on("data", (chunk: Buffer) => {
        received += chunk.byteLength;
        if (received >= settings.bytes) resolve();
      });
    });
    const chunk = new Uint8Array(settings.chunkSize).fill(0x62);
    const t0 = performance.now();
    for (let sent = 0; sent < settings.bytes; sent += chunk.byteLength) {
      if (!client.write(chunk)) {
        await new Promise<void>((resolve) => client.once("drain", resolve));
      }
    }
    await done;
    return round(settings.bytes / 1e6 / ((performance.now() - t0) / 1000));
  } finally {
    client.destroy();
    server.destroy();
  }
}

/** MB/s of `bytes` written over a native Deno unix connection. */
async function throughputNative(path: string, settings: Settings): Promise<number> {
  const listener = Deno.listen({ transport: "unix", path });
  const accepting = listener.accept();
  const writer = await Deno.connect({ transport: "unix", path });
  const reader = await accepting;
  try {
    const counting = (async () => {
      const buf = new Uint8Array(64 * 1024);
      let received = 0;
      while (received < settings.bytes) {
        const n = await reader.read(buf);
        if (n === null) break;
        received += n;
      }
    })();
    const chunk = new Uint8Array(settings.chunkSize).fill(0x62);
    const t0 = performance.now();
    for (let sent = 0; sent < settings.bytes; sent += chunk.byteLength) {
      await writeFully(writer, chunk);
    }
    await counting;
    return round(settings.bytes / 1e6 / ((performance.now() - t0) / 1000));
  } finally {
    writer.close();
    reader.close();
    listener.close();
  }
}

/** MB/s of `bytes` sent through an echoing peer and read back, over an FdSocket. */
async function bulkEchoFfi(client: FdSocket, bytes: number, settings: Settings): Promise<number> {
  let received = 0;
  const done = new Promise<void>((resolve) => {
    client.on("data", (chunk: Buffer) => {
      received += chunk.byteLength;
      if (received >= bytes) resolve();
    });
  });
  const chunk = new Uint8Array(settings.chunkSize).fill(0x63);
  const t0 = performance.now();
  for (let sent = 0; sent < bytes; sent += chunk.byteLength) {
    if (!client.write(chunk)) await new Promise<void>((resolve) => client.once("drain", resolve));
  }
  await done;
  return round(bytes / 1e6 / ((performance.now() - t0) / 1000));
}

/** MB/s of `bytes` sent through an echoing peer and read back, over a Deno.Conn. */
async function bulkEchoNative(
  client: Deno.Conn,
  bytes: number,
  settings: Settings,
): Promise<number> {
  const reading = (async () => {
    const buf = new Uint8Array(64 * 1024);
    let received = 0;
    while (received < bytes) {
      const n = await client.read(buf);
      if (n === null) throw new Error("unexpected EOF");
      received += n;
    }
  })();
  const chunk = new Uint8Array(settings.chunkSize).fill(0x63);
  const t0 = performance.now();
  for (let sent = 0; sent < bytes; sent += chunk.byteLength) await writeFully(client, chunk);
  await reading;
  return round(bytes / 1e6 / ((performance.now() - t0) / 1000));
}

/** Echo figures with both ends in this process. */
async function inProcess(dir: string, settings: Settings): Promise<{ ffi: Echo; deno: Echo }> {
  let ffi: Echo;
  {
    using listener = listenUnix(`${dir}/ffi-echo.sock`);
    const [client, server] = await Promise.all([
      connectUnix(`${dir}/ffi-echo.sock`),
      listener.accept(),
    ]);
    server.on("data", (chunk: Buffer) => server.write(chunk));
    try {
      ffi = await echoFfi(client, settings);
    } finally {
      client.destroy();
      server.destroy();
    }
  }
  const listener = Deno.listen({ transport: "unix", path: `${dir}/native-echo.sock` });
  const serving = serveNativeEcho(listener);
  const client = await Deno.connect({ transport: "unix", path: `${dir}/native-echo.sock` });
  try {
    return { ffi, deno: await echoNative(client, settings) };
  } finally {
    client.close();
    listener.close();
    await serving;
  }
}

/** Echo figures against a native echo server in a child Deno process. */
async function crossProcess(
  dir: string,
  settings: Settings,
): Promise<{ ffi: Echo; deno: Echo; ffiBulk: number; denoBulk: number }> {
  const path = `${dir}/child-echo.sock`;
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      `--allow-read=${dir}`,
      `--allow-write=${dir}`,
      `--allow-net=unix:${path}`,
      new URL(import.meta.url).pathname,
      "--echo-server",
      path,
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  try {
    // The child prints one line once it listens.
    const reader = child.stdout.getReader();
    const first = await reader.read();
    reader.releaseLock();
    if (first.done) throw new Error("the echo server child exited before listening");
    const bulk = Math.floor(settings.bytes / 4);
    const ffiClient = await connectUnix(path);
    let ffi: Echo;
    let ffiBulk: number;
    try {
      ffi = await echoFfi(ffiClient, settings);
      ffiBulk = await bulkEchoFfi(ffiClient, bulk, settings);
    } finally {
      ffiClient.destroy();
    }
    const nativeClient = await Deno.connect({ transport: "unix", path });
    try {
      const deno = await echoNative(nativeClient, settings);
      const denoBulk = await bulkEchoNative(nativeClient, bulk, settings);
      return { ffi, deno, ffiBulk, denoBulk };
    } finally {
      nativeClient.close();
    }
  } finally {
    await child.stdin.close(); // the child exits when its stdin closes
    await child.stdout.cancel();
    await child.status;
  }
}

/**
 * Runs the unix-transport benchmark and returns its figures, keyed
 * `<ffi|deno>_unix_<figure>` (both ends in this process: `echo_p50_us`,
 * `echo_p99_us`, `echo_per_s`, `throughput_mb_s`), `<ffi|deno>_unix_xproc_*`
 * (echo against a child process; `bulk_echo_mb_s`: a quarter of `bytes` sent
 * and echoed back) and `ffi_unix_*epoll_waits_per_round_trip`
 * (blocking `epoll_wait` calls, i.e. hops to Deno's blocking pool, per round trip).
 */
export async function benchTransport(
  options: BenchTransportOptions = {},
): Promise<Record<string, number>> {
  const settings: Settings = {
    roundTrips: options.roundTrips ?? 5000,
    messageSize: options.messageSize ?? 64,
    bytes: options.bytes ?? 256 * 1024 * 1024,
    chunkSize: options.chunkSize ?? 64 * 1024,
    crossProcess: options.crossProcess ?? true,
  };
  const dir = Deno.makeTempDirSync({ prefix: "bench-transport-" });
  try {
    const local = await inProcess(dir, settings);
    const figures: Record<string, number> = {
      ffi_unix_echo_p50_us: local.ffi.p50,
      ffi_unix_echo_p99_us: local.ffi.p99,
      ffi_unix_echo_per_s: local.ffi.perSecond,
      ffi_unix_echo_epoll_waits_per_round_trip: local.ffi.waitsPerRoundTrip,
      ffi_unix_throughput_mb_s: await throughputFfi(`${dir}/ffi-bulk.sock`, settings),
      deno_unix_echo_p50_us: local.deno.p50,
      deno_unix_echo_p99_us: local.deno.p99,
      deno_unix_echo_per_s: local.deno.perSecond,
      deno_unix_throughput_mb_s: await throughputNative(`${dir}/native-bulk.sock`, settings),
    };
    if (settings.crossProcess) {
      const remote = await crossProcess(dir, settings);
      Object.assign(figures, {
        ffi_unix_xproc_echo_p50_us: remote.ffi.p50,
        ffi_unix_xproc_echo_p99_us: remote.ffi.p99,
        ffi_unix_xproc_echo_per_s: remote.ffi.perSecond,
        ffi_unix_xproc_echo_epoll_waits_per_round_trip: remote.ffi.waitsPerRoundTrip,
        ffi_unix_xproc_bulk_echo_mb_s: remote.ffiBulk,
        deno_unix_xproc_echo_p50_us: remote.deno.p50,
        deno_unix_xproc_echo_p99_us: remote.deno.p99,
        deno_unix_xproc_echo_per_s: remote.deno.perSecond,
        deno_unix_xproc_bulk_echo_mb_s: remote.denoBulk,
      });
    }
    return figures;
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

async function runEchoServer(path: string): Promise<void> {
  const listener = Deno.listen({ transport: "unix", path });
  const serving = serveNativeEcho(listener);
  console.log("listening");
  // Exit when the parent closes our stdin.
  for await (const _ of Deno.stdin.readable) { /* drain */ }
  listener.close();
  await serving.catch(() => {});
}

if (import.meta.main) {
  if (Deno.args[0] === "--echo-server") {
    await runEchoServer(Deno.args[1]);
  } else {
    const f = await benchTransport();
    const row = (name: string, prefix: string, throughput: string | null) => ({
      setting: name,
      "echo p50 (µs)": f[`${prefix}_echo_p50_us`],
      "echo p99 (µs)": f[`${prefix}_echo_p99_us`],
      "round trips/s": f[`${prefix}_echo_per_s`],
      "epoll_wait hops/rt": f[`${prefix}_echo_epoll_waits_per_round_trip`] ?? "-",
      "throughput (MB/s)": throughput === null ? "-" : f[throughput],
    });
    console.log(
      "unix transport: 64 B echo round trips; throughput: 256 MiB one way in-process, " +
        "64 MiB sent and echoed back by the child",
    );
    console.table([
      row("FFI FdSocket, same process", "ffi_unix", "ffi_unix_throughput_mb_s"),
      row("Deno native, same process", "deno_unix", "deno_unix_throughput_mb_s"),
      row("FFI FdSocket → child process", "ffi_unix_xproc", "ffi_unix_xproc_bulk_echo_mb_s"),
      row("Deno native → child process", "deno_unix_xproc", "deno_unix_xproc_bulk_echo_mb_s"),
    ]);
  }
}

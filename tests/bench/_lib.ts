/**
 * Helpers shared by the `make bench` programs: CPU and RSS of other processes
 * (read from `/proc` through `cat`, since Deno opens `/proc` only to
 * `--allow-all`), percentiles, bounded request loops, the machine's load, and
 * the host daemon / agent child processes over the hybrid unix transport.
 *
 * Owns the child processes it starts (each has an idempotent async dispose).
 * Permissions: the "test" set (run, read, write, net, ffi, env).
 * @module
 */

import "reflect-metadata";
import { join } from "node:path";
import type { Duplex } from "node:stream";
import { httpRequest } from "../../shared/http/mod.ts";
import { connectUnix } from "../../shared/vsock/mod.ts";
import { agentConnection, type AgentIdentity, bounded } from "../host_harness.ts";
import { agentFlags } from "../agent_harness.ts";
import { runFlags } from "../deno_tasks.ts";

export const ROOT = new URL("../../", import.meta.url).pathname;
const CLOCK_TICKS = 100; // USER_HZ on Linux

/** CPU (user + system, µs, 10 ms resolution) and memory (kB) of one process. */
export interface ProcSample {
  cpuUs: number;
  rssKb: number;
  /** The anonymous part of the RSS (heaps, stacks): this process's own. */
  rssAnonKb: number;
  /** The file-backed part (the deno binary's pages it touched): shared, reclaimable. */
  rssFileKb: number;
  hwmKb: number;
}

/** Samples processes by pid with one `cat` (missing processes are left out). */
export async function procSample(pids: number[]): Promise<Map<number, ProcSample>> {
  const args = pids.flatMap((pid) => [`/proc/${pid}/stat`, `/proc/${pid}/status`]);
  const out = await new Deno.Command("cat", { args, stdout: "piped", stderr: "null" }).output();
  const text = new TextDecoder().decode(out.stdout);
  const result = new Map<number, ProcSample>();
  // Each stat is one line "pid (comm) state …"; each status block follows it.
  const statRe = /^(\d+) \(.*?\) (.*)$/gm;
  const statuses = text.split(/^Name:/m).slice(1);
  let m;
  let i = 0;
  while ((m = statRe.exec(text)) !== null) {
    const pid = Number(m[1]);
    const fields = m[2].split(" ");
    const status = statuses[i++] ?? "";
    const kb = (key: string) =>
      Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(status)?.[1] ?? 0);
    result.set(pid, {
      cpuUs: (Number(fields[11]) + Number(fields[12])) * (1e6 / CLOCK_TICKS),
      rssKb: kb("VmRSS"),
      rssAnonKb: kb("RssAnon"),
      rssFileKb: kb("RssFile"),
      hwmKb: kb("VmHWM"),
    });
  }
  return result;
}

/** One process's sample, or throws when it is gone. */
export async function procOne(pid: number): Promise<ProcSample> {
  const s = (await procSample([pid])).get(pid);
  if (s === undefined) throw new Error(`process ${pid} is gone`);
  return s;
}

/** `/proc/loadavg`'s first three figures. */
export async function loadAverage(): Promise<string> {
  const out = await new Deno.Command("cat", { args: ["/proc/loadavg"], stdout: "piped" }).output();
  return new TextDecoder().decode(out.stdout).split(" ").slice(0, 3).join(" ");
}

/** A short description of this machine (from /proc/cpuinfo and /proc/meminfo). */
export async function machine(): Promise<string> {
  const out = await new Deno.Command("cat", {
    args: ["/proc/cpuinfo", "/proc/meminfo"],
    stdout: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  const cpus = text.match(/^processor\s*:/gm)?.length ?? 0;
  const model = /^model name\s*:\s*(.*)$/m.exec(text)?.[1] ?? "unknown CPU";
  const memKb = Number(/^MemTotal:\s+(\d+)/m.exec(text)?.[1] ?? 0);
  return `${cpus} × ${model}, ${Math.round(memKb / 1024 / 1024)} GiB, Deno ${Deno.version.deno}`;
}

export function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return Number.NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1))];
}

export function round(value: number, digits = 2): number {
  const f = 10 ** digits;
  return Math.round(value * f) / f;
}

/** Figures of one bounded request loop. */
export interface LoopFigures {
  requests: number;
  rps: number;
  p50Ms: number;
  p99Ms: number;
  errors: number;
}

/**
 * Runs `once` in `concurrency` loops until `durationMs` passed or
 * `maxRequests` were made (after `warmup` sequential calls); failed calls
 * count as errors and stop the run after 100 of them.
 */
export async function runLoop(
  once: () => Promise<void>,
  options: { concurrency: number; durationMs: number; maxRequests?: number; warmup?: number },
): Promise<LoopFigures> {
  for (let i = 0; i < (options.warmup ?? 20); i++) await once();
  const samples: number[] = [];
  let errors = 0;
  let started = 0;
  const max = options.maxRequests ?? 1_000_000;
  const start = performance.now();
  const deadline = start + options.durationMs;
  await Promise.all(Array.from({ length: options.concurrency }, async () => {
    while (performance.now() < deadline && started < max && errors < 100) {
      started++;
      const t0 = performance.now();
      try {
        await once();
        samples.push(performance.now() - t0);
      } catch {
        errors++;
      }
    }
  }));
  const elapsed = performance.now() - start;
  samples.sort((a, b) => a - b);
  return {
    requests: samples.length,
    rps: Math.round(samples.length / (elapsed / 1000)),
    p50Ms: round(percentile(samples, 50)),
    p99Ms: round(percentile(samples, 99)),
    errors,
  };
}

/** Reads a response body and checks it is devlxd's `GET /1.0` answer (bare or enveloped). */
async function expectApi(response: Response): Promise<void> {
  const text = await response.text();
  if (response.status !== 200 || !text.includes('"api_version":"1.0"')) {
    throw new Error(`unexpected answer ${response.status}: ${text.slice(0, 200)}`);
  }
}

/** `GET /1.0` on a new plain connection to a devlxd unix socket (the guest's view). */
export async function devlxdGet(socketPath: string, path = "/1.0"): Promise<void> {
  const socket = await connectUnix(socketPath, { timeout: 5000 });
  try {
    await expectApi(
      await httpRequest(socket, new Request(`http://lxd${path}`), { timeout: 10_000 }),
    );
  } finally {
    socket.destroy();
  }
}

/**
 * The floor: `GET /1.0` on a new mutual-TLS connection straight to the host
 * (same transport, same certificates as the agent).
 */
export async function directGet(hybrid: string, port: number, id: AgentIdentity): Promise<void> {
  using connection = await agentConnection(hybrid, port, id);
  await expectApi(
    await httpRequest(connection, new Request("http://lxd/1.0"), { timeout: 10_000 }),
  );
}

/**
 * The keep-alive floor: `GET /1.0` straight to the host on one mutual-TLS
 * connection kept open between requests (opened on the first call).
 */
export class KeptClient implements Disposable {
  #connection: (Duplex & Disposable) | undefined;
  constructor(readonly hybrid: string, readonly port: number, readonly id: AgentIdentity) {}

  async get(): Promise<void> {
    // A connection the host closed meanwhile (evicted while idle) is replaced.
    if (this.#connection?.destroyed) this[Symbol.dispose]();
    this.#connection ??= await agentConnection(this.hybrid, this.port, this.id);
    let kept = false;
    try {
      await expectApi(
        await httpRequest(this.#connection, new Request("http://lxd/1.0"), {
          timeout: 10_000,
          reuse: () => kept = true,
        }),
      );
    } finally {
      if (!kept) this[Symbol.dispose]();
    }
  }

  [Symbol.dispose](): void {
    this.#connection?.[Symbol.dispose]();
    this.#connection = undefined;
  }
}

/** A child Deno process whose stderr is kept, killed on dispose. */
export class Child implements AsyncDisposable {
  readonly process: Deno.ChildProcess;
  readonly spawnedAt = performance.now();
  log = "";
  #pipedStdout: boolean;
  #pump: Promise<void>;
  #waiters: { re: RegExp; resolve: (at: number) => void }[] = [];

  /**
   * @param options.stdout pipe stdout for the caller to read
   * @param options.stdoutToLog pipe stdout into `log` as well (e.g. `--trace-gc`)
   */
  constructor(
    args: string[],
    options: { stdout?: boolean; stdin?: boolean; stdoutToLog?: boolean } = {},
  ) {
    this.#pipedStdout = (options.stdout || options.stdoutToLog) ?? false;
    const child = new Deno.Command(Deno.execPath(), {
      args,
      cwd: ROOT,
      stdin: options.stdin ? "piped" : "null",
      stdout: this.#pipedStdout ? "piped" : "null",
      stderr: "piped",
      env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    }).spawn();
    this.process = child;
    const streams = [child.stderr];
    if (options.stdoutToLog) streams.push(child.stdout);
    this.#pump = Promise.all(streams.map(async (stream) => {
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        const now = performance.now();
        this.log = (this.log + chunk).slice(-200_000);
        this.#waiters = this.#waiters.filter((w) => {
          if (!w.re.test(this.log)) return true;
          w.resolve(now);
          return false;
        });
      }
    })).then(() => {}, () => {});
  }

  get pid(): number {
    return this.process.pid;
  }

  /** Resolves with the time (performance.now()) the log first matched `re`. */
  waitLog(re: RegExp, ms = 30_000): Promise<number> {
    if (re.test(this.log)) return Promise.resolve(performance.now());
    const { promise, resolve } = Promise.withResolvers<number>();
    this.#waiters.push({ re, resolve });
    const exited = this.process.status.then((s) => {
      throw new Error(`process exited (${s.code}) before ${re}: ${this.log.slice(-2000)}`);
    });
    return bounded(Promise.race([promise, exited]), ms, `log ${re}`);
  }

  async stop(signal: Deno.Signal = "SIGTERM", ms = 15_000): Promise<void> {
    try {
      this.process.kill(signal);
    } catch {
      // already exited
    }
    await bounded(this.process.status, ms, "a child to exit").catch(async () => {
      try {
        this.process.kill("SIGKILL");
      } catch {
        // gone
      }
      await this.process.status;
    });
    await this.#pump;
    if (this.#pipedStdout) await this.process.stdout.cancel().catch(() => {});
  }

  /** SIGTERM (so profiles are written), SIGKILL after 10 s. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop("SIGTERM", 10_000);
  }
}

/**
 * Deno flags for the daemon processes, from `BENCH_DAEMON_FLAGS` (e.g.
 * `--cpu-prof --cpu-prof-dir=/tmp/prof` to profile the host under a benchmark).
 */
function daemonFlags(): string[] {
  return (Deno.env.get("BENCH_DAEMON_FLAGS") ?? "").split(" ").filter(Boolean);
}

/** Starts the host daemon (unix transport) on `stateDir`, with the `host` task's Deno flags. */
export function startDaemon(stateDir: string, extra: string[] = []): Child {
  const flags = daemonFlags();
  return new Child([
    "run",
    ...runFlags("host"),
    ...flags,
    join(ROOT, "host/main.ts"),
    "daemon",
    "--state-dir",
    stateDir,
    "--transport",
    "unix",
    "--log-level",
    "info",
    ...extra,
  ], { stdoutToLog: flags.some((f) => f.includes("trace-gc")) });
}

/** The port from the daemon's "listening" line. */
export function daemonPort(child: Child): number {
  const m = /msg="listening".* port=(\d+)/.exec(child.log) ??
    / port=(\d+).*listening/.exec(child.log);
  if (!m) throw new Error(`no port in the daemon log: ${child.log.slice(-1000)}`);
  return Number(m[1]);
}

/** Starts our agent process (hybrid transport). */
export function startAgent(paths: {
  configDir: string;
  hybrid: string;
  serial: string;
  devlxdSocket: string;
  stateFile: string;
}, extra: string[] = []): Child {
  return new Child([
    "run",
    "-q",
    ...runFlags("agent"),
    ...agentFlags(),
    join(ROOT, "agent/main.ts"),
    `--config-dir=${paths.configDir}`,
    `--serial-port=${paths.serial}`,
    `--transport=hybrid:${paths.hybrid}`,
    `--devlxd-socket=${paths.devlxdSocket}`,
    `--state-file=${paths.stateFile}`,
    "--log-level=warn",
    ...extra,
  ]);
}

/** Retries `f` until it resolves, within `ms`. */
export async function until<T>(f: () => Promise<T>, ms: number, what: string): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    try {
      return await f();
    } catch (error) {
      if (Date.now() > deadline) {
        throw new Error(`Timed out waiting for ${what}: ${(error as Error).message}`);
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  }
}

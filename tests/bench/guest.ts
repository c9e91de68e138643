/**
 * The guest request path, side by side with its floor, in one run:
 *
 * - `devlxd_*`: `GET /1.0` on `/dev/lxd/sock` of our agent (a child process,
 *   hybrid unix transport), which forwards it to the host daemon (another
 *   child process) over its kept-alive mutual-TLS connections ("warm": each
 *   request comes within the agent's idle window), as in a VM; with the host
 *   CPU time per warm request;
 * - `devlxd_cold_*`: the same through an agent started with
 *   `--host-idle-timeout=0`, so that every request opens a new connection,
 *   as the first request after an idle window does;
 * - `floor_*`: a minimal client that opens one mutual-TLS connection straight
 *   to the host per request and sends the same request (same transport, same
 *   certificates: the agent's own identity from the config drive);
 *   `floor_kept_*`: the same client on one connection kept open;
 * - `host_direct_*`: many direct clients, and the host process's CPU time per
 *   request (requests per second per core);
 * - `agent_rss_*`: the agent's resident memory idle, during the bursts, and
 *   after 1,000 and 10,000 sequential requests.
 *
 * Both clients use the project's HTTP/1.1 client (`shared/http`) over the
 * FFI unix transport, from this process. Prints nothing; `benchGuest()`
 * returns figures. Run alone: `deno run -P=test tests/bench/guest.ts`.
 *
 * Owns: a temporary state directory, the daemon and agent processes.
 * Permissions: the "test" set.
 * @module
 */

import "reflect-metadata";
import { join } from "node:path";
import { agentIdentity, cliOk, tempDir } from "../host_harness.ts";
import {
  daemonPort,
  devlxdGet,
  directGet,
  KeptClient,
  type LoopFigures,
  procOne,
  type ProcSample,
  ROOT,
  round,
  runLoop,
  startAgent,
  startDaemon,
  until,
} from "./_lib.ts";

/** Options of {@linkcode benchGuest}. */
export interface BenchGuestOptions {
  /**
   * Milliseconds per measured setting.
   * @default 3000
   */
  durationMs?: number;
  /**
   * Concurrency levels of the request loops.
   * @default [1, 8, 64]
   */
  concurrency?: number[];
  /**
   * Concurrent direct clients for the host capacity figure.
   * @default 16
   */
  capacityClients?: number;
}

function put(figures: Record<string, number>, prefix: string, f: LoopFigures): void {
  figures[`${prefix}_rps`] = f.rps;
  figures[`${prefix}_p50_ms`] = f.p50Ms;
  figures[`${prefix}_p99_ms`] = f.p99Ms;
  if (f.errors > 0) figures[`${prefix}_errors`] = f.errors;
}

/**
 * Runs `loop` and reads the host process's CPU time (its `/proc` counters)
 * around it: µs per counted request (warm-up requests are not counted, a
 * slight overestimate), and the host's sample after it.
 */
async function withHostCpu(
  pid: number,
  loop: () => Promise<LoopFigures>,
): Promise<{ loop: LoopFigures; cpuUsPerRequest: number; after: ProcSample }> {
  const before = await procOne(pid);
  const figures = await loop();
  const after = await procOne(pid);
  return { loop: figures, cpuUsPerRequest: (after.cpuUs - before.cpuUs) / figures.requests, after };
}

/**
 * RSS of a Deno process that only imports `modules` (with the agent's
 * permission set) and idles: the memory floor under the agent's own.
 */
/** RSS of a process that imports `modules` and idles: [total, anonymous, file-backed] MB. */
async function rssFloorMb(modules: string[]): Promise<[number, number, number]> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "-P=agent", join(ROOT, "tests/bench/_rss_probe.ts"), ...modules],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  try {
    const reader = child.stdout.getReader();
    await reader.read();
    reader.releaseLock();
    await new Promise((r) => setTimeout(r, 500));
    const s = await procOne(child.pid);
    return [s.rssKb, s.rssAnonKb, s.rssFileKb].map((kb) => round(kb / 1024, 1)) as [
      number,
      number,
      number,
    ];
  } finally {
    await child.stdin.close();
    await child.stdout.cancel();
    await child.status;
  }
}

/** Runs the guest-path, floor, host-capacity and agent-memory measurements. */
export async function benchGuest(options: BenchGuestOptions = {}): Promise<Record<string, number>> {
  const durationMs = options.durationMs ?? 3000;
  const levels = options.concurrency ?? [1, 8, 64];
  const figures: Record<string, number> = {};
  await using dir = await tempDir("bench-guest-");
  const state = join(dir.path, "state");
  const hybrid = join(dir.path, "vm1.vsock");
  await cliOk(["instance", "add", "vm1", "--cid", "10", "--hybrid", hybrid, "--state-dir", state]);
  await using daemon = startDaemon(state);
  await daemon.waitLog(/msg="listening"/);
  const port = daemonPort(daemon);
  const id = await agentIdentity(state, "vm1");
  const devlxdSocket = join(dir.path, "dev-lxd", "sock");
  const agentPaths = {
    configDir: join(state, "instances", "vm1", "config"),
    hybrid,
    serial: join(dir.path, "no-serial-port"),
    devlxdSocket,
    stateFile: join(dir.path, "run", "state.json"),
  };
  const agent = startAgent(agentPaths);
  await until(() => devlxdGet(devlxdSocket), 30_000, "the agent to serve /dev/lxd/sock");
  // Let start-up work (announce, first validation) settle before sampling idle memory.
  await new Promise((r) => setTimeout(r, 1000));
  const idle = await procOne(agent.pid);
  figures.agent_rss_idle_mb = round(idle.rssKb / 1024, 1);
  figures.agent_rss_idle_anon_mb = round(idle.rssAnonKb / 1024, 1);
  figures.agent_rss_idle_file_mb = round(idle.rssFileKb / 1024, 1);
  [figures.deno_rss_floor_mb, figures.deno_rss_floor_anon_mb, figures.deno_rss_floor_file_mb] =
    await rssFloorMb([]);
  [
    figures.agent_imports_rss_floor_mb,
    figures.agent_imports_rss_floor_anon_mb,
    figures.agent_imports_rss_floor_file_mb,
  ] = await rssFloorMb(["../../agent/main.ts"]);

  const guest = () => devlxdGet(devlxdSocket);
  const floor = () => directGet(hybrid, port, id);
  using kept = new KeptClient(hybrid, port, id);
  const keptRun = await withHostCpu(
    daemon.pid,
    () => runLoop(() => kept.get(), { concurrency: 1, durationMs }),
  );
  put(figures, "floor_kept_c1", keptRun.loop);
  // The host's own cost of a request on a kept connection: the floor under the warm guest path's.
  figures.floor_kept_c1_host_cpu_us_per_request = Math.round(keptRun.cpuUsPerRequest);
  let agentPeakKb = 0;
  for (const concurrency of levels) {
    const sampling = { on: true };
    const sampler = (async () => {
      while (sampling.on) {
        agentPeakKb = Math.max(agentPeakKb, (await procOne(agent.pid)).rssKb);
        await new Promise((r) => setTimeout(r, 200));
      }
    })();
    const run = await withHostCpu(daemon.pid, () => runLoop(guest, { concurrency, durationMs }));
    put(figures, `devlxd_c${concurrency}`, run.loop);
    figures[`devlxd_c${concurrency}_host_cpu_us_per_request`] = Math.round(run.cpuUsPerRequest);
    sampling.on = false;
    await sampler;
    put(figures, `floor_c${concurrency}`, await runLoop(floor, { concurrency, durationMs }));
  }
  const agentAfter = await procOne(agent.pid);
  figures.agent_rss_burst_mb = round(Math.max(agentPeakKb, agentAfter.rssKb) / 1024, 1);
  figures.agent_rss_peak_hwm_mb = round(agentAfter.hwmKb / 1024, 1);
  figures.devlxd_floor_p50_ratio = round(figures.devlxd_c1_p50_ms / figures.floor_c1_p50_ms);
  figures.devlxd_kept_floor_p50_ratio = round(
    figures.devlxd_c1_p50_ms / figures.floor_kept_c1_p50_ms,
  );

  // Memory over many requests: growth from 1,000 to 10,000 sequential ones.
  await runLoop(guest, { concurrency: 1, durationMs: 600_000, maxRequests: 1000, warmup: 0 });
  figures.agent_rss_1k_mb = round((await procOne(agent.pid)).rssKb / 1024, 1);
  await runLoop(guest, { concurrency: 1, durationMs: 600_000, maxRequests: 9000, warmup: 0 });
  figures.agent_rss_10k_mb = round((await procOne(agent.pid)).rssKb / 1024, 1);
  await agent[Symbol.asyncDispose]();

  // Cold: an agent that keeps no connection pays a handshake on every request.
  await using _cold = startAgent(agentPaths, ["--host-idle-timeout=0"]);
  await until(() => devlxdGet(devlxdSocket), 30_000, "the cold agent to serve /dev/lxd/sock");
  put(figures, "devlxd_cold_c1", await runLoop(guest, { concurrency: 1, durationMs }));
  figures.devlxd_cold_floor_p50_ratio = round(
    figures.devlxd_cold_c1_p50_ms / figures.floor_c1_p50_ms,
  );

  // Host capacity: many direct clients; the host's own CPU time per request.
  const clients = options.capacityClients ?? 16;
  const capacity = await withHostCpu(
    daemon.pid,
    () => runLoop(floor, { concurrency: clients, durationMs, warmup: 0 }),
  );
  put(figures, `host_direct_c${clients}`, capacity.loop);
  figures.host_direct_cpu_us_per_request = Math.round(capacity.cpuUsPerRequest);
  figures.host_direct_rps_per_core = Math.round(1e6 / capacity.cpuUsPerRequest);
  figures.host_rss_mb = round(capacity.after.rssKb / 1024, 1);
  return figures;
}

if (import.meta.main) {
  const figures = await benchGuest();
  console.log(JSON.stringify(figures, null, 2));
}

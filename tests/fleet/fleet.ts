/**
 * The fleet benchmark: one host daemon process and N instances whose agents
 * (the agent's real `Agent` class, one per instance, each with its own
 * certificate, serial channel and connections) run in a few worker processes
 * (tests/fleet/worker.ts), over the hybrid unix transport, with QMP status
 * channels served by a fake QMP stand-in in the workers.
 *
 * Instances are registered in-process through the host's own
 * `InstanceService.add()` (registry checks, key pairs, config drive), before
 * the daemon starts, with key pairs generated ahead in parallel (the CLI,
 * one process per instance, would take minutes for 1,000).
 *
 * Figures (`fleet_*`): host start → listening (empty store and N instances),
 * host RSS (empty, idle with N CONNECTED, with N `/1.0/events` streams), host
 * restart → all agents CONNECTED, config change → every guest event stream,
 * host CPU while N CONNECTED instances idle (QMP status polling and the
 * agents' liveness probes), with the poll and probe rates counted.
 *
 * `benchFleet()` returns figures; run alone:
 * `deno run -P=test tests/fleet/fleet.ts [--instances N] [--workers W]`.
 * Owns: a temporary directory, the daemon and worker processes.
 * Permissions: the "test" set.
 * @module
 */

import "reflect-metadata";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { httpRequest } from "../../shared/http/mod.ts";
import { connectUnix } from "../../shared/vsock/mod.ts";
import { ensureServerCertificate, generateInstanceKeyPair } from "../../host/certificates.ts";
import { InstanceService, type KeyPair } from "../../host/instance_service.ts";
import { Registry } from "../../host/registry.ts";
import { prepareStateDir } from "../../host/state_dir.ts";
import { bounded } from "../host_harness.ts";
import { Child, percentile, procOne, ROOT, round, startDaemon } from "../bench/_lib.ts";
import { FLEET_SUBDIRS, fleetPaths } from "./paths.ts";

/** Options of {@linkcode benchFleet}. */
export interface BenchFleetOptions {
  /** @default 1000 */
  instances?: number;
  /** Worker processes the agents are spread over. @default 4 */
  workers?: number;
  /** Seconds of idle CPU measurement (the host polls CONNECTED instances every 10 s). @default 30 */
  idleSeconds?: number;
  /** Progress lines. @default nothing */
  log?: (line: string) => void;
  /**
   * How the agents get the events their guest followers wait for: `pull`
   * (each agent holds the host's `/1.0/events` stream) or `push` (the host
   * POSTs each event to the agent's API, as LXD does).
   * @default "pull"
   */
  events?: "pull" | "push";
}

type WorkerMessage =
  | { type: "ready" | "stopped" | "diverted" }
  | { type: "subscribed"; failed: number }
  | { type: "state"; i: number; state: string; t: number }
  | { type: "event"; i: number; t: number }
  | { type: "counters"; polls: number; connects: number }
  | { type: "error"; error: string };

/** A worker process and its message stream. */
class Worker implements AsyncDisposable {
  readonly child: Child;
  #waiters: { match: (m: WorkerMessage) => boolean; resolve: (m: WorkerMessage) => void }[] = [];
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #pump: Promise<void>;

  constructor(args: string[], onMessage: (m: WorkerMessage) => void) {
    const child = new Child(
      ["run", "-q", "-P=test", "--v8-flags=--max-old-space-size=2048", ...args],
      { stdout: true, stdin: true },
    );
    this.child = child;
    this.#writer = child.process.stdin.getWriter();
    this.#pump = (async () => {
      let buffer = "";
      for await (const chunk of child.process.stdout.pipeThrough(new TextDecoderStream())) {
        buffer += chunk;
        let nl;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl);
          let message: WorkerMessage;
          try {
            message = JSON.parse(line);
          } catch {
            // Not a message (something in the worker wrote to stdout): shown, skipped.
            console.error(`fleet worker stdout: ${line.slice(0, 300)}`);
            buffer = buffer.slice(nl + 1);
            continue;
          }
          buffer = buffer.slice(nl + 1);
          onMessage(message);
          this.#waiters = this.#waiters.filter((w) => {
            if (!w.match(message)) return true;
            w.resolve(message);
            return false;
          });
        }
      }
    })().catch(() => {});
  }

  next(type: string, ms: number): Promise<WorkerMessage> {
    const { promise, resolve } = Promise.withResolvers<WorkerMessage>();
    this.#waiters.push({ match: (m) => m.type === type, resolve });
    const exited = this.child.process.status.then((s) => {
      throw new Error(`fleet worker exited (${s.code}): ${this.child.log.slice(-3000)}`);
    });
    return bounded(Promise.race([promise, exited]), ms, `fleet worker message ${type}`);
  }

  async send(command: Record<string, unknown>): Promise<void> {
    await this.#writer.write(new TextEncoder().encode(JSON.stringify(command) + "\n"));
  }

  async [Symbol.asyncDispose](): Promise<void> {
    try {
      await this.send({ type: "stop" });
      await this.next("stopped", 20_000);
    } catch {
      // killed below
    }
    await this.#writer.close().catch(() => {});
    await this.child.stop("SIGKILL", 5000);
    await this.#pump;
  }
}

/**
 * Key pairs generated ahead with the host's own generator
 * (`generateInstanceKeyPair`), `parallel` at a time (webcrypto runs off the
 * main thread).
 */
async function keyPool(count: number, parallel = 32): Promise<KeyPair[]> {
  const pool: KeyPair[] = [];
  for (let k = 0; k < count; k += parallel) {
    const batch = await Promise.all(
      Array.from(
        { length: Math.min(parallel, count - k) },
        (_, j) => generateInstanceKeyPair({ commonName: `pool-${k + j}` }),
      ),
    );
    pool.push(...batch);
  }
  return pool;
}

/** Registers `count` instances through the host's InstanceService, before any daemon runs. */
export async function register(dir: string, stateDir: string, count: number): Promise<void> {
  // The directories the instances' hybrid, QMP and serial paths point into.
  for (const sub of FLEET_SUBDIRS) await Deno.mkdir(join(dir, sub), { recursive: true });
  const paths = await prepareStateDir(stateDir);
  const registry = Registry.open(paths.registry);
  try {
    const { cert } = await ensureServerCertificate(paths);
    const pool = await keyPool(2 * count);
    const service = new InstanceService({
      registry,
      paths,
      serverCert: cert,
      // The common name differs from what `instance add` would put; the
      // pinning and CID checks are the same.
      generateKeyPair: () => Promise.resolve(pool.pop()!),
    });
    for (let i = 0; i < count; i++) {
      const p = fleetPaths(dir, stateDir, i);
      await service.add({
        name: p.name,
        cid: p.cid,
        hybrid: p.hybrid,
        status: { kind: "qmp", path: p.qmp, chardev: "vserial", size: 16 },
        config: { "user.fleet": "1" },
      });
    }
  } finally {
    registry.close();
  }
}

/**
 * One request to the daemon's admin API (plain HTTP on its unix socket), with
 * the project's HTTP client: `fetch` through `Deno.createHttpClient` on a unix
 * socket stalls 5 s on some requests (Deno 2.9.6, seen here; curl does not).
 */
async function admin(stateDir: string, path: string, init: RequestInit = {}): Promise<Response> {
  const socket = await connectUnix(join(stateDir, "admin.sock"), { timeout: 10_000 });
  try {
    const response = await httpRequest(socket, new Request(`http://admin${path}`, init), {
      timeout: 30_000,
    });
    const body = new Uint8Array(await response.arrayBuffer());
    return new Response(body, { status: response.status });
  } finally {
    socket.destroy();
  }
}

/** Starts a daemon and resolves to [ms from spawn to its "listening" line, the child]. */
async function timedStart(stateDir: string): Promise<[number, Child]> {
  const daemon = startDaemon(stateDir);
  const at = await daemon.waitLog(/msg="listening"/, 60_000);
  return [at - daemon.spawnedAt, daemon];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Runs the fleet benchmark; see the module doc. */
export async function benchFleet(options: BenchFleetOptions = {}): Promise<Record<string, number>> {
  const n = options.instances ?? 1000;
  const workerCount = Math.max(1, Math.min(options.workers ?? 4, n));
  const idleSeconds = options.idleSeconds ?? 30;
  const log = options.log ?? (() => {});
  const figures: Record<string, number> = { fleet_instances: n };
  const dir = await Deno.makeTempDir({ prefix: "fleet-" });
  const stateDir = join(dir, "state");
  const children: AsyncDisposable[] = [];
  let daemon: Child | undefined;
  try {
    // Baseline: an empty store (second start: the first one makes the server certificate).
    {
      const empty = join(dir, "empty");
      const [, first] = await timedStart(empty);
      await first.stop();
      const [ms, again] = await timedStart(empty);
      figures.fleet_host_start_empty_ms = Math.round(ms);
      await sleep(500);
      figures.fleet_host_rss_empty_mb = round((await procOne(again.pid)).rssKb / 1024, 1);
      await again.stop();
    }

    log(`   registering ${n} instances in-process (InstanceService.add) …`);
    let t = performance.now();
    await register(dir, stateDir, n);
    figures.fleet_register_ms = Math.round(performance.now() - t);

    // V8 heap after the last GC, when the daemon runs with --trace-gc (BENCH_DAEMON_FLAGS).
    const heap = (phase: string) => {
      const all = [
        ...(daemon?.log ?? "").matchAll(/([\d.]+) \(([\d.]+)\) -> ([\d.]+) \(([\d.]+)\) MB/g),
      ];
      const last = all.at(-1);
      if (last) {
        figures[`fleet_host_v8_heap_${phase}_mb`] = Number(last[3]);
        figures[`fleet_host_v8_heap_${phase}_committed_mb`] = Number(last[4]);
      }
    };
    let startMs;
    [startMs, daemon] = await timedStart(stateDir);
    figures.fleet_host_start_ms = Math.round(startMs);
    figures.fleet_host_rss_started_mb = round((await procOne(daemon.pid)).rssKb / 1024, 1);

    // Agents' view of their state, by instance.
    const states: { state: string; t: number }[] = Array.from({ length: n }, () => ({
      state: "STARTED",
      t: 0,
    }));
    const events: number[] = [];
    const onMessage = (m: WorkerMessage) => {
      if (m.type === "state") states[m.i] = { state: m.state, t: m.t };
      else if (m.type === "event") events[m.i] = m.t;
      else if (m.type === "error") log(`   worker error: ${m.error.slice(0, 500)}`);
    };
    const waitAll = async (pred: (i: number) => boolean, ms: number, what: string) => {
      const deadline = Date.now() + ms;
      for (;;) {
        let ok = 0;
        for (let i = 0; i < n; i++) if (pred(i)) ok++;
        if (ok === n) return;
        if (Date.now() > deadline) {
          const seen = new Map<string, number>();
          for (const s of states) seen.set(s.state, (seen.get(s.state) ?? 0) + 1);
          log(`   agents by state: ${[...seen].map(([k, v]) => `${k} ${v}`).join(", ")}`);
          log(
            `   daemon log, last lines:\n${(daemon?.log ?? "").split("\n").slice(-40).join("\n")}`,
          );
          for (const w of workers) log(`   worker log, last lines:\n${w.child.log.slice(-6000)}`);
          throw new Error(`Timed out waiting for ${what} (${ok}/${n})`);
        }
        await sleep(20);
      }
    };

    log(`   starting ${n} agents in ${workerCount} processes …`);
    const per = Math.ceil(n / workerCount);
    const workers: Worker[] = [];
    t = performance.now();
    for (let w = 0; w < workerCount; w++) {
      const first = w * per;
      const count = Math.min(per, n - first);
      if (count <= 0) break;
      const worker = new Worker(
        [
          join(ROOT, "tests/fleet/worker.ts"),
          dir,
          stateDir,
          String(first),
          String(count),
          options.events ?? "pull",
        ],
        onMessage,
      );
      children.push(worker);
      workers.push(worker);
    }
    await Promise.all(workers.map((w) => w.next("ready", 300_000)));
    await waitAll((i) => states[i].state === "CONNECTED", 300_000, "agents CONNECTED");
    figures.fleet_first_connected_ms = Math.round(performance.now() - t);

    // Idle: every agent CONNECTED, nothing asked of anyone.
    log(`   idle for ${idleSeconds} s …`);
    await sleep(5000);
    const counters = async () => {
      const all = await Promise.all(workers.map(async (w) => {
        const next = w.next("counters", 10_000);
        await w.send({ type: "counters" });
        return await next as { polls: number; connects: number };
      }));
      return all.reduce((a, c) => ({
        polls: a.polls + c.polls,
        connects: a.connects + c.connects,
      }));
    };
    const c0 = await counters();
    const p0 = await procOne(daemon.pid);
    const w0 = performance.now();
    await sleep(idleSeconds * 1000);
    const p1 = await procOne(daemon.pid);
    const wall = performance.now() - w0;
    const c1 = await counters();
    figures.fleet_host_rss_idle_mb = round(p1.rssKb / 1024, 1);
    figures.fleet_host_idle_cpu_pct = round((p1.cpuUs - p0.cpuUs) / (wall * 1000) * 100, 2);
    figures.fleet_qmp_polls_per_s = round((c1.polls - c0.polls) / (wall / 1000), 1);
    figures.fleet_probes_per_s = round((c1.connects - c0.connects) / (wall / 1000), 1);
    figures.fleet_idle_seconds = round(wall / 1000, 1);
    heap("idle");

    // The same idle window with the agents' probes kept off the host: QMP polling alone.
    const divert = (on: boolean) =>
      Promise.all(workers.map(async (w) => {
        const next = w.next("diverted", 10_000);
        await w.send({ type: "divert", on });
        await next;
      }));
    await divert(true);
    await sleep(3500);
    const d0 = await counters();
    const q0 = await procOne(daemon.pid);
    const v0 = performance.now();
    await sleep(idleSeconds * 1000);
    const q1 = await procOne(daemon.pid);
    const wall2 = performance.now() - v0;
    const d1 = await counters();
    await divert(false);
    figures.fleet_host_poll_only_cpu_pct = round((q1.cpuUs - q0.cpuUs) / (wall2 * 1000) * 100, 2);
    figures.fleet_poll_only_qmp_polls_per_s = round((d1.polls - d0.polls) / (wall2 / 1000), 1);
    const probesPerS = figures.fleet_probes_per_s;
    figures.fleet_host_cpu_us_per_probe = probesPerS > 0
      ? Math.round(
        (figures.fleet_host_idle_cpu_pct - figures.fleet_host_poll_only_cpu_pct) * 1e4 / probesPerS,
      )
      : Number.NaN;
    figures.fleet_host_cpu_us_per_poll = Math.round(
      figures.fleet_host_poll_only_cpu_pct * 1e4 / figures.fleet_poll_only_qmp_polls_per_s,
    );

    // Restart: stop the host, let every agent notice (its probe), start it again.
    log("   host restart …");
    await daemon.stop();
    await waitAll((i) => states[i].state === "STARTED", 60_000, "agents to notice (STARTED)");
    [startMs, daemon] = await timedStart(stateDir);
    figures.fleet_restart_listening_ms = Math.round(startMs);
    const spawnedAt = performance.timeOrigin + daemon.spawnedAt;
    try {
      await waitAll(
        (i) => states[i].state === "CONNECTED" && states[i].t >= spawnedAt,
        120_000,
        "agents CONNECTED after the restart",
      );
    } catch (error) {
      const counts: Record<string, number> = {};
      for (const s of states) counts[s.state] = (counts[s.state] ?? 0) + 1;
      log(`   agents' states: ${JSON.stringify(counts)}; daemon log tail:`);
      log(daemon.log.split("\n").filter((l) => !/ -> .* MB/.test(l)).slice(-40).join("\n"));
      throw error;
    }
    const last = Math.max(...states.map((s) => s.t));
    figures.fleet_restart_connected_ms = Math.round(last - spawnedAt);
    // Host CPU from its spawn to the last agent CONNECTED (start-up included): robust to load.
    figures.fleet_restart_host_cpu_ms = Math.round((await procOne(daemon.pid)).cpuUs / 1000);
    const sorted = states.map((s) => s.t - spawnedAt).sort((a, b) => a - b);
    figures.fleet_restart_connected_p50_ms = Math.round(percentile(sorted, 50));

    // Event streams: one guest follower per instance (each agent then pulls from the host).
    log(`   opening ${n} /1.0/events streams …`);
    await sleep(3000);
    const subscribed = await Promise.all(workers.map(async (w) => {
      const next = w.next("subscribed", 180_000);
      await w.send({ type: "subscribe" });
      return await next as { failed?: number };
    }));
    figures.fleet_event_streams_failed = subscribed.reduce((a, m) => a + (m.failed ?? 0), 0);
    let streams = 0;
    // Pushed events need no stream: nothing to wait for.
    const deadline = Date.now() + (options.events === "push" ? 0 : 60_000);
    while (Date.now() < deadline) {
      try {
        const status = await (await admin(stateDir, "/1.0")).json();
        const connections = status.metadata?.connections ?? {};
        streams = Object.values(connections as Record<string, number>).reduce((a, b) => a + b, 0);
        if (streams >= n) break;
      } catch (error) {
        // A host too busy to answer in 30 s: noted, and asked again.
        log(`   admin GET /1.0: ${(error as Error).message}`);
        figures.fleet_admin_timeouts = (figures.fleet_admin_timeouts ?? 0) + 1;
      }
      await sleep(500);
    }
    figures.fleet_event_streams = streams;
    await sleep(2000);
    figures.fleet_host_rss_streams_mb = round((await procOne(daemon.pid)).rssKb / 1024, 1);
    heap("streams");

    if (Deno.env.get("FLEET_DEBUG")) {
      for (let i = 0; i < 10; i++) {
        const a = performance.now();
        const r = await admin(stateDir, `/1.0/instances/vm${i}/config/user.dbg`, {
          method: "PUT",
          body: JSON.stringify({ value: `d${i}` }),
        });
        const b = performance.now();
        const out = await new Deno.Command("curl", {
          args: [
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "--unix-socket",
            join(stateDir, "admin.sock"),
            "-X",
            "PUT",
            "-d",
            `{"value":"e${i}"}`,
            `http://admin/1.0/instances/vm${i}/config/user.dbg2`,
          ],
        }).output();
        log(
          `   debug PUT fetch ${r.status} ${(b - a).toFixed(1)} ms; curl ${
            new TextDecoder().decode(out.stdout)
          } s`,
        );
      }
    }
    // One config change per instance, through the admin API, 16 at a time.
    log(`   config change → ${n} event streams …`);
    const sentAt: number[] = [];
    const putMs: number[] = [];
    let next = 0;
    const t0 = performance.timeOrigin + performance.now();
    const hostCpuBefore = (await procOne(daemon.pid)).cpuUs;
    await Promise.all(Array.from({ length: 16 }, async () => {
      while (next < n) {
        const i = next++;
        sentAt[i] = performance.timeOrigin + performance.now();
        const r = await admin(stateDir, `/1.0/instances/vm${i}/config/user.bench`, {
          method: "PUT",
          body: JSON.stringify({ value: "changed" }),
        });
        if (r.status !== 200) throw new Error(`config change on vm${i}: ${r.status}`);
        putMs.push(performance.timeOrigin + performance.now() - sentAt[i]);
      }
    }));
    const deadline2 = Date.now() + 60_000;
    while (events.filter((e) => e !== undefined).length < n && Date.now() < deadline2) {
      await sleep(20);
    }
    const delivered = events.filter((e) => e !== undefined).length;
    figures.fleet_events_delivered = delivered;
    figures.fleet_event_host_cpu_us_per_event = Math.round(
      ((await procOne(daemon.pid)).cpuUs - hostCpuBefore) / Math.max(1, delivered),
    );
    figures.fleet_event_fanout_ms = Math.round(Math.max(...events.filter(Boolean)) - t0);
    const latencies = events.map((e, i) => e - sentAt[i]).filter((x) => !Number.isNaN(x))
      .sort((a, b) => a - b);
    figures.fleet_event_p50_ms = round(percentile(latencies, 50), 1);
    figures.fleet_event_p99_ms = round(percentile(latencies, 99), 1);
    putMs.sort((a, b) => a - b);
    figures.fleet_config_put_p50_ms = round(percentile(putMs, 50), 1);
    figures.fleet_host_rss_final_mb = round((await procOne(daemon.pid)).rssKb / 1024, 1);
    figures.fleet_host_rss_hwm_mb = round((await procOne(daemon.pid)).hwmKb / 1024, 1);

    return figures;
  } finally {
    await daemon?.stop().catch(() => {});
    for (const child of children.reverse()) {
      await Promise.resolve(child[Symbol.asyncDispose]()).catch(() => {});
    }
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      instances: { type: "string", default: "1000" },
      workers: { type: "string", default: "4" },
      idle: { type: "string", default: "30" },
      "register-only": { type: "string" },
      events: { type: "string", default: "pull" },
    },
  });
  if (values["register-only"] !== undefined) {
    // Leaves a state directory with the fleet registered (for profiling the daemon).
    const dir = values["register-only"];
    await register(dir, join(dir, "state"), Number(values.instances));
    Deno.exit(0);
  }
  const figures = await benchFleet({
    instances: Number(values.instances),
    workers: Number(values.workers),
    idleSeconds: Number(values.idle),
    events: values.events === "push" ? "push" : "pull",
    log: (line) => console.error(`${new Date().toISOString().slice(11, 23)} ${line}`),
  });
  console.log(JSON.stringify(figures, null, 2));
}

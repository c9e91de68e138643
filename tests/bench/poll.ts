/**
 * Benchmark: the CPU cost of one status poll (QMP `ringbuf-read` of a 16-byte
 * ring buffer), to size idle polling ("1,000 CONNECTED instances polled every
 * 10 s ≤ 1% of a core"). Prints figures; asserts nothing.
 *
 * Runs one real QEMU per simulated instance (`-machine none`: no guest, the
 * same QMP and ringbuf code), then measures
 * 1. a tight loop of reads on one connection (host-process CPU and QEMU CPU per read),
 * 2. `--watchers` StatusWatchers polling on their timers for `--duration` ms
 *    (host-process CPU per poll, timers and parsing included).
 *
 * Usage: deno run -P=test tests/bench/poll.ts [--reads 5000]
 *        [--watchers 20] [--interval 50] [--duration 5000] [--per-qemu 1]
 * (`--per-qemu N` puts N QMP sockets in each QEMU, to simulate many
 * instances with few processes; the QEMU figure is then less realistic.)
 * Needs `--allow-run` (QEMU), read/write/net on a temp dir, `--allow-env`.
 * @module
 */

import process from "node:process";
import { parseArgs } from "node:util";
import { QmpClient, ringbufReadArgs } from "../../host/monitor/qmp_client.ts";
import { createStatusWatcher, type StatusWatcher } from "../../host/monitor/status_watcher.ts";

const CLOCK_TICKS = 100; // USER_HZ on Linux

function cpuMicros(): number {
  const u = process.cpuUsage();
  return u.user + u.system;
}

/**
 * utime + stime of a process, in µs (10 ms resolution). Read with `cat`:
 * Deno asks for --allow-all to read /proc directly.
 */
async function processCpuMicros(pid: number): Promise<number> {
  const out = await new Deno.Command("cat", { args: [`/proc/${pid}/stat`] }).output();
  const stat = new TextDecoder().decode(out.stdout);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * (1e6 / CLOCK_TICKS);
}

async function waitForSocket(path: string, child: Deno.ChildProcess): Promise<void> {
  let exited = false;
  child.status.then(() => exited = true);
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline && !exited) {
    try {
      (await Deno.connect({ transport: "unix", path })).close();
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  throw new Error(`QEMU did not open ${path}`);
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      reads: { type: "string", default: "5000" },
      watchers: { type: "string", default: "20" },
      interval: { type: "string", default: "50" },
      duration: { type: "string", default: "5000" },
      "per-qemu": { type: "string", default: "1" },
    },
  });
  const reads = Number(values.reads);
  const watcherCount = Number(values.watchers);
  const interval = Number(values.interval);
  const duration = Number(values.duration);
  const perQemu = Math.max(1, Number(values["per-qemu"]));

  const dir = await Deno.makeTempDir({ prefix: "bench-poll-" });
  // One QEMU per simulated instance, as in production (index 0: the tight loop).
  const sockets = Array.from({ length: watcherCount + 1 }, (_, i) => `${dir}/qmp${i}.sock`);
  // QEMU 0 serves socket 0 (tight loop); the others `perQemu` watcher sockets each.
  const groups = [sockets.slice(0, 1)];
  for (let i = 1; i < sockets.length; i += perQemu) groups.push(sockets.slice(i, i + perQemu));
  const children: Deno.ChildProcess[] = [];
  const qemuCpu = async () => {
    let sum = 0;
    for (const c of children.slice(1)) sum += await processCpuMicros(c.pid);
    return sum;
  };
  try {
    for (const group of groups) {
      children.push(
        new Deno.Command("qemu-system-x86_64", {
          args: [
            ...["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none"],
            ...["-chardev", "ringbuf,id=vserial,size=16"],
            ...group.flatMap((path) => ["-qmp", `unix:${path},server=on,wait=off`]),
          ],
          stdin: "null",
          stdout: "null",
          stderr: "inherit",
        }).spawn(),
      );
    }
  } catch (error) {
    console.log(`tests/bench/poll.ts: skipped, cannot start QEMU: ${(error as Error).message}`);
    for (const c of children) c.kill("SIGKILL");
    await Promise.all(children.map((c) => c.status));
    await Deno.remove(dir, { recursive: true });
    return 0;
  }
  try {
    for (const [i, group] of groups.entries()) {
      for (const path of group) await waitForSocket(path, children[i]);
    }
    console.log(
      `${children.length} QEMU processes (-machine none, ringbuf size 16), ` +
        `${watcherCount} watcher QMP sockets, ${perQemu} per QEMU`,
    );

    // 1. Tight loop on one connection.
    {
      await using client = await QmpClient.connect(sockets[0]);
      const args = ringbufReadArgs("vserial", 16);
      for (let i = 0; i < 200; i++) await client.execute("ringbuf-read", args); // warm-up
      const qemu0 = await processCpuMicros(children[0].pid);
      const cpu0 = cpuMicros();
      const t0 = performance.now();
      for (let i = 0; i < reads; i++) await client.execute("ringbuf-read", args);
      const wall = performance.now() - t0;
      const cpu = cpuMicros() - cpu0;
      const qemu = await processCpuMicros(children[0].pid) - qemu0;
      console.log(
        `tight loop: ${reads} reads in ${wall.toFixed(0)} ms; ` +
          `host CPU ${(cpu / reads).toFixed(1)} µs/read, QEMU CPU ${
            (qemu / reads).toFixed(1)
          } µs/read ` +
          `(${(reads / wall * 1000).toFixed(0)} reads/s on one connection)`,
      );
    }

    // Idle baseline: what both sides burn without polling, subtracted below.
    const idleQemu0 = await qemuCpu();
    const idleCpu0 = cpuMicros();
    const idleT0 = performance.now();
    await new Promise((r) => setTimeout(r, duration));
    const idleWall = performance.now() - idleT0;
    const idleCpu = (cpuMicros() - idleCpu0) / idleWall;
    const idleQemu = (await qemuCpu() - idleQemu0) / idleWall;
    console.log(
      `idle baseline: host ${(idleCpu / 10).toFixed(3)}% of a core, ` +
        `${children.length - 1} idle QEMUs ${(idleQemu / 10).toFixed(3)}% of a core`,
    );

    // 2. Watchers on their timers (the production path).
    const watchers: StatusWatcher[] = [];
    let observed = 0;
    for (let i = 1; i <= watcherCount; i++) {
      // Instances start at unrelated times: spread the phases over one interval.
      await new Promise((r) => setTimeout(r, interval / watcherCount));
      watchers.push(
        createStatusWatcher({ kind: "qmp", path: sockets[i], chardev: "vserial", size: 16 }, {
          onState: () => observed++,
          interval,
        }).start(),
      );
    }
    await new Promise((r) => setTimeout(r, 500)); // let them connect
    const qemu0 = await qemuCpu();
    const cpu0 = cpuMicros();
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, duration));
    const wall = performance.now() - t0;
    const cpu = cpuMicros() - cpu0;
    const qemu = await qemuCpu() - qemu0;
    await Promise.all(watchers.map((w) => w.close()));
    const polls = watcherCount * wall / interval;
    const hostPerPoll = (cpu - idleCpu * wall) / polls;
    const qemuPerPoll = (qemu - idleQemu * wall) / polls;
    console.log(
      `watchers: ${watcherCount} × every ${interval} ms for ${wall.toFixed(0)} ms ≈ ${
        polls.toFixed(0)
      } polls; ` +
        `host CPU ${hostPerPoll.toFixed(1)} µs/poll, QEMU CPU ${
          qemuPerPoll.toFixed(1)
        } µs/poll above idle ` +
        `(${observed} state lines: the ring stays empty)`,
    );
    for (const [instances, every] of [[1000, 10_000], [1000, 3000], [1000, 500]]) {
      const rate = instances * 1000 / every;
      console.log(
        `→ ${instances} instances polled every ${every / 1000} s = ${rate.toFixed(0)} polls/s: ` +
          `host daemon ${(rate * hostPerPoll / 1e4).toFixed(2)}% of a core, ` +
          `QEMUs ${(rate * qemuPerPoll / 1e4).toFixed(2)}% of a core in all`,
      );
    }
    return 0;
  } finally {
    for (const c of children) {
      try {
        c.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
    await Promise.all(children.map((c) => c.status));
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) Deno.exit(await main());

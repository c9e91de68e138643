/**
 * `make bench` / `deno task bench`: one run on this machine over the unix
 * ("hybrid vsock") transport, printing one table of what users feel beside
 * the floor of the same path, with the issue's targets:
 *
 * 1. transport floor (`tests/bench/transport.ts`): FFI vs Deno's native socket;
 * 2. guest request path (`tests/bench/guest.ts`): `GET /1.0` via
 *    `/dev/lxd/sock` → agent → host, and the direct mutual-TLS floor;
 * 3. host capacity: requests per second per core of host CPU;
 * 4. a fleet of instances (`tests/fleet/`): host start, RSS, restart →
 *    CONNECTED, event fan-out, idle polling CPU;
 * 5. agent memory.
 *
 * Benchmarks print figures; nothing here asserts a timing.
 *
 * Usage: deno run -P=test tests/bench/main.ts [--json] [--seconds N]
 *        [--fleet N] [--skip transport,guest,fleet] | --from-json FILE
 * `BENCH_DAEMON_FLAGS` adds Deno flags to the host daemon processes, e.g.
 * `--v8-flags=--trace-gc` (V8 heap figures beside RSS) or `--cpu-prof
 * --cpu-prof-dir=DIR` (profiles written when each daemon exits).
 * `BENCH_AGENT_FLAGS` does the same for the agent processes of section 2 and 5.
 * Permissions: the "test" set.
 * @module
 */

import { parseArgs } from "node:util";
import { benchTransport } from "./transport.ts";
import { benchGuest } from "./guest.ts";
import { loadAverage, machine } from "./_lib.ts";
import { benchFleet } from "../fleet/fleet.ts";

/** One line of the table. */
interface Row {
  section: string;
  figure: string;
  value: string;
  floor?: string;
  target?: string;
  met?: boolean;
}

function fmt(value: number | undefined, unit = "", digits = 2): string {
  if (value === undefined || Number.isNaN(value)) return "n/a";
  const text = Number.isInteger(value) ? value.toLocaleString("en-US") : value.toFixed(digits);
  return `${text}${unit}`;
}

function rowsOf(f: Record<string, number>, fleetSize: number): Row[] {
  const rows: Row[] = [];
  const has = (k: string) => f[k] !== undefined;
  // " (anon A, file F)": the process's own memory and the binary's pages it touched.
  const split = (k: string) =>
    has(`${k}_anon_mb`)
      ? ` (anon ${fmt(f[`${k}_anon_mb`], "", 1)}, file ${fmt(f[`${k}_file_mb`], "", 1)})`
      : "";
  if (has("ffi_unix_echo_p50_us")) {
    rows.push(
      {
        section: "1 transport",
        figure: "64 B echo RTT p50 / p99, same process",
        value: `${fmt(f.ffi_unix_echo_p50_us, " µs", 1)} / ${
          fmt(f.ffi_unix_echo_p99_us, " µs", 1)
        }`,
        floor: `Deno native ${fmt(f.deno_unix_echo_p50_us, " µs", 1)} / ${
          fmt(f.deno_unix_echo_p99_us, " µs", 1)
        }`,
      },
      {
        section: "1 transport",
        figure: "64 B echo RTT p50 / p99, to a child process",
        value: `${fmt(f.ffi_unix_xproc_echo_p50_us, " µs", 1)} / ${
          fmt(f.ffi_unix_xproc_echo_p99_us, " µs", 1)
        }`,
        floor: `Deno native ${fmt(f.deno_unix_xproc_echo_p50_us, " µs", 1)} / ${
          fmt(f.deno_unix_xproc_echo_p99_us, " µs", 1)
        }`,
      },
      {
        section: "1 transport",
        figure: "throughput one way, same process",
        value: fmt(f.ffi_unix_throughput_mb_s, " MB/s", 0),
        floor: `Deno native ${fmt(f.deno_unix_throughput_mb_s, " MB/s", 0)}`,
      },
      {
        section: "1 transport",
        figure: "throughput echoed by a child process",
        value: fmt(f.ffi_unix_xproc_bulk_echo_mb_s, " MB/s", 0),
        floor: `Deno native ${fmt(f.deno_unix_xproc_bulk_echo_mb_s, " MB/s", 0)}`,
      },
    );
  }
  if (has("devlxd_c1_p50_ms")) {
    const errs = (k: string) => f[`${k}_errors`] ? ` (${f[`${k}_errors`]} errors)` : "";
    rows.push(
      {
        section: "2 guest path",
        figure: "GET /1.0 via /dev/lxd/sock, warm (kept connection), sequential p50 / p99",
        value: `${fmt(f.devlxd_c1_p50_ms, " ms")} / ${fmt(f.devlxd_c1_p99_ms, " ms")}`,
        floor: `kept connection ${fmt(f.floor_kept_c1_p50_ms, " ms")} / ${
          fmt(f.floor_kept_c1_p99_ms, " ms")
        }`,
        target: "≤ 1.0 ms / ≤ 4 ms",
        met: f.devlxd_c1_p50_ms <= 1.0 && f.devlxd_c1_p99_ms <= 4,
      },
      {
        section: "2 guest path",
        figure: "warm p50 ratio guest path / keep-alive floor",
        value: `${fmt(f.devlxd_kept_floor_p50_ratio, "×")}`,
        target: "≤ 1.5×",
        met: f.devlxd_kept_floor_p50_ratio <= 1.5,
      },
      {
        section: "2 guest path",
        figure: "GET /1.0 via /dev/lxd/sock, cold (new connection each), p50 / p99",
        value: `${fmt(f.devlxd_cold_c1_p50_ms, " ms")} / ${fmt(f.devlxd_cold_c1_p99_ms, " ms")}`,
        floor: `new connection ${fmt(f.floor_c1_p50_ms, " ms")} / ${
          fmt(f.floor_c1_p99_ms, " ms")
        } (ratio ${fmt(f.devlxd_cold_floor_p50_ratio, "×")})`,
        target: "p50 ≤ 1.2× floor",
        met: f.devlxd_cold_floor_p50_ratio <= 1.2,
      },
      {
        section: "2 guest path",
        figure: "host CPU per warm guest request (sequential)",
        value: fmt(f.devlxd_c1_host_cpu_us_per_request, " µs", 0),
        floor: has("floor_kept_c1_host_cpu_us_per_request")
          ? `kept connection, direct client ${
            fmt(f.floor_kept_c1_host_cpu_us_per_request, " µs", 0)
          }`
          : undefined,
        target: "≤ 300 µs",
        met: f.devlxd_c1_host_cpu_us_per_request <= 300,
      },
    );
    for (const c of [1, 8, 64]) {
      if (!has(`devlxd_c${c}_rps`)) continue;
      rows.push({
        section: "2 guest path",
        figure: `requests/s through one agent, concurrency ${c} (p50 / p99)`,
        value: `${fmt(f[`devlxd_c${c}_rps`])}${errs(`devlxd_c${c}`)} (${
          fmt(f[`devlxd_c${c}_p50_ms`], " ms")
        } / ${fmt(f[`devlxd_c${c}_p99_ms`], " ms")})`,
        floor: `${fmt(f[`floor_c${c}_rps`])}${errs(`floor_c${c}`)} (${
          fmt(f[`floor_c${c}_p50_ms`], " ms")
        } / ${fmt(f[`floor_c${c}_p99_ms`], " ms")})`,
        target: c === 8 ? "≥ 2,500/s" : undefined,
        met: c === 8 ? f.devlxd_c8_rps >= 2500 : undefined,
      });
    }
    const clients = Object.keys(f).find((k) => /^host_direct_c\d+_rps$/.test(k));
    rows.push({
      section: "3 host capacity",
      figure: `direct mutual-TLS GET /1.0, ${clients?.match(/c(\d+)/)?.[1]} clients: ` +
        "requests/s per core of host CPU",
      value: `${fmt(f.host_direct_rps_per_core)} (${
        fmt(f.host_direct_cpu_us_per_request)
      } µs CPU/request; ${clients ? fmt(f[clients]) : "n/a"} req/s wall)`,
      target: "≥ 2,000/s per core",
      met: f.host_direct_rps_per_core >= 2000,
    });
    rows.push(
      {
        section: "5 memory",
        figure: "agent RSS idle / during the bursts (1, 8, 64 concurrent)",
        value: `${fmt(f.agent_rss_idle_mb, " MB", 1)}${split("agent_rss_idle")} / ${
          fmt(f.agent_rss_burst_mb, " MB", 1)
        }`,
        floor: `bare Deno ${fmt(f.deno_rss_floor_mb, " MB", 1)}${
          split("deno_rss_floor")
        }; agent modules loaded, idle ${fmt(f.agent_imports_rss_floor_mb, " MB", 1)}${
          split("agent_imports_rss_floor")
        }`,
        target: "idle ≤ 50 MB",
        met: f.agent_rss_idle_mb <= 50,
      },
      {
        section: "5 memory",
        figure: "agent RSS after 1,000 / 10,000 sequential requests (growth)",
        value: `${fmt(f.agent_rss_1k_mb, " MB", 1)} / ${fmt(f.agent_rss_10k_mb, " MB", 1)} (${
          fmt((f.agent_rss_10k_mb / f.agent_rss_1k_mb - 1) * 100, " %", 1)
        })`,
        target: "≤ 70 MB, growth ≤ 10 %",
        met: f.agent_rss_10k_mb <= 70 && f.agent_rss_10k_mb <= f.agent_rss_1k_mb * 1.1,
      },
    );
  }
  if (has("fleet_instances")) {
    const n = fmt(f.fleet_instances);
    const heap = (phase: string) =>
      has(`fleet_host_v8_heap_${phase}_mb`)
        ? ` (V8 heap ${fmt(f[`fleet_host_v8_heap_${phase}_mb`], " MB", 1)})`
        : "";
    rows.push(
      {
        section: "4 fleet",
        figure: `host start → listening, ${n} instances in the store (first start / restart)`,
        value: `${fmt(f.fleet_host_start_ms, " ms", 0)} / ${
          fmt(f.fleet_restart_listening_ms, " ms", 0)
        }`,
        floor: `empty store ${fmt(f.fleet_host_start_empty_ms, " ms", 0)}`,
        target: "≤ 200 ms",
        met: f.fleet_host_start_ms <= 200 && f.fleet_restart_listening_ms <= 200,
      },
      {
        section: "4 fleet",
        figure: `host RSS: started with ${n} instances / ${n} CONNECTED, idle`,
        value: `${fmt(f.fleet_host_rss_started_mb, " MB", 1)} / ${
          fmt(f.fleet_host_rss_idle_mb, " MB", 1)
        }${heap("idle")}`,
        floor: `empty store ${fmt(f.fleet_host_rss_empty_mb, " MB", 1)}`,
      },
      {
        section: "4 fleet",
        figure: `host RSS, ${n} instances and ${
          fmt(f.fleet_instances - (f.fleet_event_streams_failed ?? 0))
        } /1.0/events streams (${fmt(f.fleet_event_streams)} host connections)`,
        value: `${fmt(f.fleet_host_rss_streams_mb, " MB", 1)}${heap("streams")}`,
        target: "≤ 180 MB (issue 14; issue 7 asked ≤ 80 MB)",
        met: f.fleet_host_rss_streams_mb <= 180,
      },
      {
        section: "4 fleet",
        figure: `host restart → all ${n} agents CONNECTED (last / median agent)`,
        value: `${fmt(f.fleet_restart_connected_ms, " ms", 0)} / ${
          fmt(f.fleet_restart_connected_p50_ms, " ms", 0)
        }`,
        floor: has("fleet_restart_host_cpu_ms")
          ? `host CPU meanwhile ${fmt(f.fleet_restart_host_cpu_ms, " ms", 0)}`
          : undefined,
        target: "≤ 2 s (issue 14; issue 7 asked ≤ 1 s)",
        met: f.fleet_restart_connected_ms <= 2000,
      },
      {
        section: "4 fleet",
        figure:
          `config change on each of ${n} instances → its guest event stream (all / p50 / p99)`,
        value: `${fmt(f.fleet_event_fanout_ms, " ms", 0)} / ${
          fmt(f.fleet_event_p50_ms, " ms", 1)
        } / ${fmt(f.fleet_event_p99_ms, " ms", 1)}`,
        floor: `admin PUT p50 ${fmt(f.fleet_config_put_p50_ms, " ms", 1)}`,
      },
      {
        section: "4 fleet",
        figure: `host CPU, ${n} CONNECTED idle instances: QMP status polling only`,
        value: fmt(f.fleet_host_poll_only_cpu_pct, " % of a core", 2),
        floor: `${fmt(f.fleet_poll_only_qmp_polls_per_s, " polls/s", 1)}, ${
          fmt(f.fleet_host_cpu_us_per_poll, " µs", 0)
        } host CPU per poll`,
        target: "≤ 1 %",
        met: f.fleet_host_poll_only_cpu_pct <= 1,
      },
      {
        section: "4 fleet",
        figure: `host CPU, ${n} CONNECTED idle instances: polling + our agents' liveness probes`,
        value: fmt(f.fleet_host_idle_cpu_pct, " % of a core", 2),
        floor: `${fmt(f.fleet_probes_per_s, " probes/s", 0)}, ${
          fmt(f.fleet_host_cpu_us_per_probe, " µs", 0)
        } host CPU per probe`,
        target: "≤ 1 %",
        met: f.fleet_host_idle_cpu_pct <= 1,
      },
    );
    if (fleetSize !== f.fleet_instances) {
      rows.push({
        section: "4 fleet",
        figure: `(fleet run with ${n}, not ${fleetSize})`,
        value: "",
      });
    }
  }
  return rows;
}

function markdown(rows: Row[]): string {
  const lines = [
    "| section | figure | value | floor / baseline | target | met |",
    "|---|---|---|---|---|---|",
  ];
  for (const r of rows) {
    const met = r.met === undefined ? "" : r.met ? "yes" : "**no**";
    lines.push(
      `| ${r.section} | ${r.figure} | ${r.value} | ${r.floor ?? ""} | ${r.target ?? ""} | ${met} |`,
    );
  }
  return lines.join("\n");
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      json: { type: "boolean", default: false },
      seconds: { type: "string", default: "3" },
      fleet: { type: "string", default: "1000" },
      skip: { type: "string", default: "" },
      help: { type: "boolean", short: "h", default: false },
      "from-json": { type: "string" },
    },
  });
  if (values["from-json"] !== undefined) {
    // Re-renders the table of an earlier `--json` run.
    const saved = JSON.parse(await Deno.readTextFile(values["from-json"]));
    console.log(`${saved.date}, ${saved.machine}`);
    console.log(markdown(rowsOf(saved.figures, saved.figures.fleet_instances ?? 0)));
    console.log(`\nload average before ${saved.load.before}, after ${saved.load.after}`);
    return 0;
  }
  if (values.help) {
    console.log(
      "Usage: deno task bench [--json] [--seconds N] [--fleet N] [--skip transport,guest,fleet]\n" +
        "       deno task bench --from-json FILE   (the table of an earlier --json run)",
    );
    return 0;
  }
  const skip = new Set(values.skip.split(",").filter(Boolean));
  const seconds = Number(values.seconds);
  const fleetSize = Number(values.fleet);
  const log = (text: string) => values.json ? console.error(text) : console.log(text);
  const startedAt = new Date();
  const loadBefore = await loadAverage();
  log(`lxd-vsock bench, ${startedAt.toISOString()}, ${await machine()}, load ${loadBefore}`);
  const figures: Record<string, number> = {};
  if (!skip.has("transport")) {
    log("1. transport floor …");
    Object.assign(figures, await benchTransport({ roundTrips: 5000, bytes: 64 * 1024 * 1024 }));
  }
  if (!skip.has("guest")) {
    log("2, 3, 5. guest path, floor, host capacity, agent memory …");
    Object.assign(figures, await benchGuest({ durationMs: seconds * 1000 }));
  }
  if (!skip.has("fleet") && fleetSize > 0) {
    log(`4. fleet of ${fleetSize} …`);
    Object.assign(figures, await benchFleet({ instances: fleetSize, log }));
  }
  const loadAfter = await loadAverage();
  const rows = rowsOf(figures, fleetSize);
  if (values.json) {
    console.log(JSON.stringify(
      {
        date: startedAt.toISOString(),
        machine: await machine(),
        load: { before: loadBefore, after: loadAfter },
        figures,
        table: rows,
      },
      null,
      2,
    ));
  } else {
    console.log("");
    console.log(markdown(rows));
    console.log(`\nload average before ${loadBefore}, after ${loadAfter}`);
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main());

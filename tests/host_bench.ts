/**
 * Figures for the host daemon (not a test): a daemon process with one hybrid
 * instance, and this process as its agent over the unix transport with real
 * mutual TLS. Prints requests per second and latency percentiles for
 * `GET /1.0/config/user.foo` with a new connection (and TLS handshake) per
 * request, as LXD's agent and ours make them, sequential and 8 at a time.
 *
 *   node_modules/deno/deno run -P=test tests/host_bench.ts [--seconds 5]
 */

import "reflect-metadata";
import { parseArgs } from "node:util";
import { httpRequest } from "../shared/http/mod.ts";
import {
  addHybridInstance,
  agentConnection,
  agentIdentity,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: { seconds: { type: "string", default: "5" } },
});
const seconds = Number(values.seconds);

function report(label: string, latencies: number[], elapsed: number): void {
  latencies.sort((a, b) => a - b);
  const p = (q: number) =>
    latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))].toFixed(2);
  console.log(
    `${label}: ${(latencies.length / (elapsed / 1000)).toFixed(0)} req/s ` +
      `(n=${latencies.length}, p50 ${p(0.5)} ms, p99 ${p(0.99)} ms)`,
  );
}

await using dir = await tempDir("host-bench-");
const hybrid = await addHybridInstance(dir.path, ["-c", "user.foo=bar"]);
await using daemon = await DaemonProcess.start(dir.path, ["--log-level", "info", "--no-monitor"]);
const id = await agentIdentity(dir.path, "vm1");
const request = () => new Request("http://devlxd/1.0/config/user.foo");

{
  const latencies: number[] = [];
  const start = performance.now();
  while (performance.now() - start < seconds * 1000) {
    const t0 = performance.now();
    using connection = await agentConnection(hybrid, daemon.port, id);
    const response = await httpRequest(connection, request());
    await response.arrayBuffer();
    latencies.push(performance.now() - t0);
  }
  report("new TLS connection per request, sequential", latencies, performance.now() - start);
}
{
  const latencies: number[] = [];
  const start = performance.now();
  await Promise.all(Array.from({ length: 8 }, async () => {
    while (performance.now() - start < seconds * 1000) {
      const t0 = performance.now();
      using connection = await agentConnection(hybrid, daemon.port, id);
      const response = await httpRequest(connection, request());
      await response.arrayBuffer();
      latencies.push(performance.now() - t0);
    }
  }));
  report("new TLS connection per request, 8 concurrent", latencies, performance.now() - start);
}

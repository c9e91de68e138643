import assert from "node:assert/strict";
import {
  collectMetrics,
  fsTypeName,
  parseCpuSeconds,
  parseDiskstats,
  reportedMounts,
} from "./guest_metrics.ts";
import { parseMeminfo } from "./guest_state.ts";

async function run(program: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command(program, { args, stdout: "piped" }).output();
  if (!out.success) throw new Error(`${program} failed`);
  return new TextDecoder().decode(out.stdout);
}

Deno.test("parseCpuSeconds() skips the aggregate line and divides by USER_HZ", () => {
  const stats = parseCpuSeconds(
    "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 100 200 300 400 500 600 700 800 0 0\n",
  );
  assert.deepEqual(Object.keys(stats), ["cpu0"]);
  assert.equal(stats.cpu0.cpu_seconds_user, 1);
  assert.equal(stats.cpu0.cpu_seconds_steal, 8);
});

Deno.test("parseDiskstats() reports sectors as bytes per device", () => {
  const disk = parseDiskstats("   8       0 sda 10 0 20 0 30 0 40 0 0 0 0\n");
  assert.deepEqual(disk.sda, {
    disk_read_bytes: 20 * 512,
    disk_reads_completed: 10,
    disk_written_bytes: 40 * 512,
    disk_writes_completed: 30,
  });
});

Deno.test("reportedMounts() leaves out pseudo file systems and /dev, /proc, /sys", () => {
  const mounts = reportedMounts(
    "proc /proc proc rw 0 0\n/dev/vda1 / ext4 rw 0 0\ntmpfs /dev/shm tmpfs rw 0 0\n" +
      "tmpfs /run tmpfs rw 0 0\n/dev/vdb /mnt/a\\040b xfs rw 0 0\n",
  );
  assert.deepEqual(mounts, [["/dev/vda1", "/"], ["tmpfs", "/run"], ["/dev/vdb", "/mnt/a b"]]);
  assert.equal(fsTypeName(0xef53n), "ext4");
  assert.equal(fsTypeName(0x1021994n), "tmpfs");
  assert.equal(fsTypeName(0xabcn), "0xabc");
});

Deno.test("collectMetrics() agrees with /proc/meminfo, /proc/stat and df on this machine", async () => {
  const metrics = collectMetrics();
  const meminfo = parseMeminfo(await run("cat", "/proc/meminfo"));
  assert.equal(metrics.memory.memory_mem_total_bytes, meminfo.get("MemTotal"));
  const cpus = (await run("cat", "/proc/stat")).split("\n").filter((l) => /^cpu\d+ /.test(l));
  assert.equal(Object.keys(metrics.cpu_seconds_total).length, cpus.length);
  const df = (await run("df", "-B1", "--output=target,size", "/")).trim().split("\n")[1]
    .trim().split(/\s+/);
  const root = Object.values(metrics.filesystem).find((fs) => fs.mountpoint === "/");
  assert.ok(root !== undefined, "the root file system is reported");
  assert.equal(root.filesystem_size_bytes, Number(df[1]));
  assert.ok(metrics.procs_total > 0);
  assert.ok("lo" in metrics.network);
});

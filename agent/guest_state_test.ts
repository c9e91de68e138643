import assert from "node:assert/strict";
import { missingProgram, requires } from "../shared/_requires.ts";
import {
  addressScope,
  collectState,
  hardwareAddress,
  interfaceType,
  parseCpuUsage,
  parseMeminfo,
  processCount,
} from "./guest_state.ts";

async function run(program: string, ...args: string[]): Promise<string> {
  const out = await new Deno.Command(program, { args, stdout: "piped", stderr: "piped" }).output();
  if (!out.success) throw new Error(`${program} ${args.join(" ")} failed`);
  return new TextDecoder().decode(out.stdout);
}

Deno.test("parseMeminfo() converts kB values to bytes and keeps unitless counts", () => {
  const m = parseMeminfo("MemTotal:  1000 kB\nHugePages_Total:   4\nbogus line\n");
  assert.equal(m.get("MemTotal"), 1024000);
  assert.equal(m.get("HugePages_Total"), 4);
  assert.equal(m.size, 2);
});

Deno.test("parseCpuUsage() prefers cgroup v1 ns, converts v2 usage_usec, else -1", () => {
  assert.equal(parseCpuUsage("12345\n", "usage_usec 7\n"), 12345);
  assert.equal(parseCpuUsage(undefined, "user_usec 1\nusage_usec 7\n"), 7000);
  assert.equal(parseCpuUsage(undefined, undefined), -1);
});

Deno.test("addressScope() and interfaceType() follow lxd-agent's rules", () => {
  assert.equal(addressScope("127.0.0.1"), "local");
  assert.equal(addressScope("::1"), "local");
  assert.equal(addressScope("169.254.3.4"), "link");
  assert.equal(addressScope("fe80::1"), "link");
  assert.equal(addressScope("10.1.2.3"), "global");
  assert.equal(interfaceType(0x1003), "broadcast");
  assert.equal(interfaceType(0x9), "loopback");
  assert.equal(interfaceType(0x11), "point-to-point");
  assert.equal(interfaceType(0x1), "unknown");
});

Deno.test("hardwareAddress() leaves out an all-zero address, as Go's net package does", () => {
  assert.equal(hardwareAddress("00:00:00:00:00:00\n"), "");
  assert.equal(hardwareAddress("52:54:00:12:34:56\n"), "52:54:00:12:34:56");
  assert.equal(hardwareAddress("00:00:00:00:00:01"), "00:00:00:00:00:01");
  assert.equal(hardwareAddress(undefined), "");
});

Deno.test("processCount() counts pid 1 and the children of every task, breadth-first", () => {
  const tree: Record<string, string> = {
    "/proc/1/task/1/children": "10 11 ",
    "/proc/1/task/5/children": "13",
    "/proc/10/task/10/children": "12",
    "/proc/11/task/11/children": "",
  };
  const tasks: Record<string, string[]> = { "/proc/1/task": ["1", "5"] };
  assert.equal(processCount({ readFile: (path) => tree[path], listDir: (path) => tasks[path] }), 5);
});

Deno.test(requires(missingProgram("ip", "it compares with ip -j addr"), {
  name: "collectState() reports the interfaces, addresses, MTU and hwaddr `ip -j addr` shows",
  async fn() {
    const state = collectState();
    const links = JSON.parse(await run("ip", "-j", "addr")) as {
      ifname: string;
      mtu: number;
      address?: string;
      flags: string[];
      addr_info: { family: string; local: string; prefixlen: number }[];
    }[];
    assert.deepEqual(Object.keys(state.network!).sort(), links.map((l) => l.ifname).sort());
    for (const link of links) {
      const ours = state.network![link.ifname];
      assert.equal(ours.mtu, link.mtu, link.ifname);
      assert.equal(ours.hwaddr, hardwareAddress(link.address), link.ifname);
      assert.equal(ours.state, link.flags.includes("UP") ? "up" : "down", link.ifname);
      assert.deepEqual(
        ours.addresses.map((a) => `${a.family} ${a.address}/${a.netmask}`).sort(),
        link.addr_info.map((a) => `${a.family} ${a.local}/${a.prefixlen}`).sort(),
        link.ifname,
      );
    }
    assert.ok(state.network!.lo.counters.bytes_received >= 0);
  },
}));

Deno.test("collectState() memory, processes and root disk agree with /proc/meminfo, ps and df", async () => {
  const meminfo = parseMeminfo(await run("cat", "/proc/meminfo"));
  const state = collectState();
  const expected = meminfo.get("MemTotal")! - meminfo.get("MemFree")!;
  // Memory moves between the two reads; 5 % of the total is plenty and still catches unit errors.
  assert.ok(
    Math.abs(state.memory.usage - expected) < meminfo.get("MemTotal")! * 0.05,
    `usage ${state.memory.usage} vs ${expected}`,
  );
  assert.equal(
    state.memory.swap_usage,
    meminfo.get("SwapTotal")! - meminfo.get("SwapFree")!,
  );
  // Every process outside the kernel threads (children of pid 2) descends from pid 1.
  const ps = (await run("ps", "-e", "-o", "pid=,ppid=")).trim().split("\n")
    .map((line) => line.trim().split(/\s+/).map(Number));
  const user = ps.filter(([pid, ppid]) => pid !== 2 && ppid !== 2).length;
  assert.ok(Math.abs(state.processes - user) <= 5, `processes ${state.processes} vs ps ${user}`);
  const df = (await run("df", "-B1", "--output=used", "/")).trim().split("\n")[1].trim();
  const used = Number(df);
  assert.ok(
    Math.abs(state.disk!.root.usage - used) < 256 * 1024 * 1024,
    `root usage ${state.disk!.root.usage} vs df ${used}`,
  );
  assert.equal(state.pid, 1);
  assert.ok(Number.isInteger(state.cpu.usage) && state.cpu.usage !== 0);
});

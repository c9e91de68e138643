/**
 * The guest's state as `GET /1.0/state` answers it (LXD 5.0.2's
 * `api.InstanceState`, read by LXD for `lxc list` and `lxc info`): network
 * interfaces with addresses, MTU, hardware address and counters; memory and
 * swap; the root file system's usage; the process count; CPU time.
 *
 * Sources, as LXD 5.0.2's `lxd-agent/state.go` reads them: `/proc/meminfo`
 * (usage = MemTotal − MemFree), the cgroup v1 `memory.max_usage_in_bytes`
 * (peak), `cpuacct.usage` or cgroup v2 `cpu.stat` `usage_usec` (CPU time in
 * ns, -1 when neither exists), `/sys/class/net/<if>/{mtu,address,flags,
 * statistics/*}`, the interface addresses (getifaddrs through Deno), and the
 * descendants of pid 1 walked through `/proc/<pid>/task/<tid>/children`.
 * Beyond lxd-agent 5.0.2 (which leaves them 0 or null): swap usage
 * (SwapTotal − SwapFree), error and drop counters, and `disk.root` (statfs of
 * `/`); LXD replaces `disk`, `pid` and `status` with its own values anyway.
 *
 * The parsers are pure; {@linkcode collectState} reads the machine through
 * `shared/sys/fs.ts` (FFI: Deno refuses `/proc` and `/sys` without
 * `--allow-all`). Permissions: `--allow-ffi`, `--allow-sys=networkInterfaces`.
 * @module
 */

import type {
  InstanceState,
  InstanceStateNetwork,
  InstanceStateNetworkAddress,
} from "../shared/instance_api.ts";
import { listDirectory, readKernelFile, statFs } from "../shared/sys/fs.ts";

/** `/proc/meminfo` as bytes per key (values with a `kB` suffix multiplied by 1024). */
export function parseMeminfo(text: string): Map<string, number> {
  const values = new Map<string, number>();
  for (const line of text.split("\n")) {
    const match = /^([^:\s]+):\s+(\d+)(\s+kB)?\s*$/.exec(line);
    if (match === null) continue;
    values.set(match[1], Number(match[2]) * (match[3] ? 1024 : 1));
  }
  return values;
}

/** CPU time in ns from cgroup v1 `cpuacct.usage` or v2 `cpu.stat`; -1 when unknown. */
export function parseCpuUsage(v1Usage: string | undefined, v2Stat: string | undefined): number {
  if (v1Usage !== undefined) {
    const n = Number(v1Usage.trim());
    return Number.isInteger(n) ? n : -1;
  }
  if (v2Stat !== undefined) {
    for (const line of v2Stat.split("\n")) {
      const [key, value] = line.trim().split(/\s+/);
      if (key === "usage_usec") {
        const n = Number(value);
        return Number.isInteger(n) ? n * 1000 : -1;
      }
    }
  }
  return -1;
}

/** LXD's address scope: local for 127.*, ::1; link for 169.254.*, fe80:; else global. */
export function addressScope(address: string): InstanceStateNetworkAddress["scope"] {
  if (address.startsWith("127") || address === "::1") return "local";
  if (address.startsWith("169.254") || address.startsWith("fe80:")) return "link";
  return "global";
}

/** `IFF_*` flags of `/sys/class/net/<if>/flags`. */
const IFF_UP = 0x1;
const IFF_BROADCAST = 0x2;
const IFF_LOOPBACK = 0x8;
const IFF_POINTOPOINT = 0x10;

/** The interface type LXD reports for `flags` (broadcast first, as Go's net flags are tested). */
export function interfaceType(flags: number): InstanceStateNetwork["type"] {
  if (flags & IFF_BROADCAST) return "broadcast";
  if (flags & IFF_LOOPBACK) return "loopback";
  if (flags & IFF_POINTOPOINT) return "point-to-point";
  return "unknown";
}

/**
 * The `hwaddr` of `/sys/class/net/<if>/address`: "" for an all-zero address,
 * as Go's `net.Interfaces()` leaves it out (lxd-agent 5.0.2 reports `lo` with
 * no MAC address, so `lxc info` prints none for it).
 */
export function hardwareAddress(text: string | undefined): string {
  const address = text?.trim() ?? "";
  return /^0{2}(:0{2})*$/.test(address) ? "" : address;
}

/** An address of an interface as `Deno.networkInterfaces()` reports it. */
export interface InterfaceAddress {
  name: string;
  family: "IPv4" | "IPv6";
  address: string;
  cidr: string;
}

/** Reads one counter of `/sys/class/net/<name>/statistics`; 0 when unreadable. */
function counter(read: (path: string) => string | undefined, name: string, key: string): number {
  const n = Number(read(`/sys/class/net/${name}/statistics/${key}`)?.trim());
  return Number.isFinite(n) ? n : 0;
}

/** How {@linkcode collectState} reads the machine (tests substitute fakes). */
export interface StateSources {
  readFile: (path: string) => string | undefined;
  listDir: (path: string) => string[] | undefined;
  addresses: () => InterfaceAddress[];
  rootUsage: () => number | undefined;
}

/** The machine's own sources. */
export const machineSources: StateSources = {
  readFile: (path) => readKernelFile(path),
  listDir: (path) => listDirectory(path)?.map((entry) => entry.name),
  addresses: () => Deno.networkInterfaces() as InterfaceAddress[],
  rootUsage: () => {
    try {
      const fs = statFs("/");
      return Number((fs.blocks - fs.bfree) * fs.bsize);
    } catch {
      return undefined;
    }
  },
};

/** Every interface of `/sys/class/net` with its addresses and counters (LXD's `networkState`). */
export function networkState(sources: StateSources): Record<string, InstanceStateNetwork> {
  const result: Record<string, InstanceStateNetwork> = {};
  const read = sources.readFile;
  let addresses: InterfaceAddress[] = [];
  try {
    addresses = sources.addresses();
  } catch {
    // Without the permission or on failure: interfaces without addresses.
  }
  for (const name of (sources.listDir("/sys/class/net") ?? []).sort()) {
    const flags = parseInt(read(`/sys/class/net/${name}/flags`)?.trim() ?? "0", 16) || 0;
    const mtu = Number(read(`/sys/class/net/${name}/mtu`)?.trim());
    result[name] = {
      addresses: addresses.filter((a) => a.name === name).map((a) => ({
        family: a.family === "IPv6" ? "inet6" : "inet",
        address: a.address,
        netmask: a.cidr.split("/")[1] ?? "",
        scope: addressScope(a.address),
      })),
      counters: {
        bytes_received: counter(read, name, "rx_bytes"),
        bytes_sent: counter(read, name, "tx_bytes"),
        packets_received: counter(read, name, "rx_packets"),
        packets_sent: counter(read, name, "tx_packets"),
        errors_received: counter(read, name, "rx_errors"),
        errors_sent: counter(read, name, "tx_errors"),
        packets_dropped_outbound: counter(read, name, "tx_dropped"),
        packets_dropped_inbound: counter(read, name, "rx_dropped"),
      },
      hwaddr: hardwareAddress(read(`/sys/class/net/${name}/address`)),
      host_name: "",
      mtu: Number.isInteger(mtu) ? mtu : 0,
      state: flags & IFF_UP ? "up" : "down",
      type: interfaceType(flags),
    };
  }
  return result;
}

/**
 * The number of processes: pid 1 and its descendants. lxd-agent reads only
 * `/proc/<pid>/task/<pid>/children`, which misses children forked by other
 * threads of a multi-threaded parent; this reads the file of every task.
 */
export function processCount(sources: Pick<StateSources, "readFile" | "listDir">): number {
  const pids = [1];
  const seen = new Set(pids);
  for (let i = 0; i < pids.length; i++) {
    const tasks = sources.listDir(`/proc/${pids[i]}/task`) ?? [String(pids[i])];
    for (const task of tasks) {
      const children = sources.readFile(`/proc/${pids[i]}/task/${task}/children`);
      if (children === undefined) continue;
      for (const word of children.split(/\s+/)) {
        if (!/^\d+$/.test(word) || seen.has(Number(word))) continue;
        seen.add(Number(word));
        pids.push(Number(word));
      }
    }
  }
  return pids.length;
}

/** The guest's state now. */
export function collectState(sources: StateSources = machineSources): InstanceState {
  const read = sources.readFile;
  const meminfo = parseMeminfo(read("/proc/meminfo") ?? "");
  const peak = Number(read("/sys/fs/cgroup/memory/memory.max_usage_in_bytes")?.trim());
  const rootUsage = sources.rootUsage();
  return {
    status: "",
    status_code: 0,
    disk: rootUsage === undefined ? null : { root: { usage: rootUsage } },
    memory: {
      usage: meminfo.size === 0
        ? 0
        : (meminfo.get("MemTotal") ?? 0) - (meminfo.get("MemFree") ?? 0),
      usage_peak: Number.isInteger(peak) ? peak : 0,
      swap_usage: (meminfo.get("SwapTotal") ?? 0) - (meminfo.get("SwapFree") ?? 0),
      swap_usage_peak: 0,
    },
    network: networkState(sources),
    pid: 1,
    processes: processCount(sources),
    cpu: {
      usage: parseCpuUsage(
        read("/sys/fs/cgroup/cpuacct/cpuacct.usage"),
        read("/sys/fs/cgroup/cpu.stat"),
      ),
    },
  };
}

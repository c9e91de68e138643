/**
 * `GET /1.0/metrics` in the JSON form LXD 5.0.2's lxd-agent serves
 * (`metrics.Metrics`, `lxd-agent/metrics.go`), which LXD parses and turns into
 * its own Prometheus `/1.0/metrics`: per-CPU seconds from `/proc/stat` (USER_HZ
 * 100), `/proc/diskstats` (512-byte sectors), mounted file systems
 * (`/proc/mounts` + statfs, the same exclusions of pseudo file systems and of
 * `/dev`, `/proc`, `/sys`, `/var/lib/docker/*`), `/proc/meminfo`, network
 * counters, and processes (numeric `/proc` entries with a non-empty cmdline).
 *
 * Pure parsers plus {@linkcode collectMetrics}. Permissions: `--allow-ffi`,
 * `--allow-sys=networkInterfaces` (through the network state).
 * @module
 */

import type { AgentMetrics } from "../shared/instance_api.ts";
import { statFs } from "../shared/sys/fs.ts";
import { machineSources, networkState, parseMeminfo, type StateSources } from "./guest_state.ts";

/** Per-CPU lines of `/proc/stat` (the aggregate `cpu` line skipped), in seconds. */
export function parseCpuSeconds(text: string): AgentMetrics["cpu_seconds_total"] {
  const out: AgentMetrics["cpu_seconds_total"] = {};
  const keys = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];
  for (const line of text.split("\n")) {
    const fields = line.trim().split(/\s+/);
    if (!fields[0].startsWith("cpu") || fields[0] === "cpu" || fields.length < 9) continue;
    const stats: Record<string, number> = {};
    keys.forEach((key, i) => stats[`cpu_seconds_${key}`] = Number(fields[i + 1]) / 100);
    out[fields[0]] = stats;
  }
  return out;
}

/** `/proc/diskstats`: reads/writes completed and bytes per device. */
export function parseDiskstats(text: string): AgentMetrics["disk"] {
  const out: AgentMetrics["disk"] = {};
  for (const line of text.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length < 10) continue;
    out[f[2]] = {
      disk_read_bytes: Number(f[5]) * 512,
      disk_reads_completed: Number(f[3]),
      disk_written_bytes: Number(f[9]) * 512,
      disk_writes_completed: Number(f[7]),
    };
  }
  return out;
}

const EXCLUDED_FS_TYPES = new Set([
  "autofs",
  "binfmt_misc",
  "bpf",
  "cgroup",
  "cgroup2",
  "configfs",
  "debugfs",
  "devpts",
  "devtmpfs",
  "fusectl",
  "hugetlbfs",
  "iso9660",
  "mqueue",
  "nsfs",
  "overlay",
  "proc",
  "procfs",
  "pstore",
  "rpc_pipefs",
  "securityfs",
  "selinuxfs",
  "squashfs",
  "sysfs",
  "tracefs",
]);
const EXCLUDED_MOUNT_POINTS = /^\/(dev|proc|sys|var\/lib\/docker\/.+)($|\/)/;

/** The mounts of `/proc/mounts` that LXD reports: `[device, mount point]`. */
export function reportedMounts(text: string): [string, string][] {
  const out: [string, string][] = [];
  for (const line of text.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length < 3) continue;
    // /proc/mounts escapes spaces and the like as octal (\040).
    const mountPoint = f[1].replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
    if (EXCLUDED_FS_TYPES.has(f[2]) || EXCLUDED_MOUNT_POINTS.test(mountPoint)) continue;
    out.push([f[0], mountPoint]);
  }
  return out;
}

/** LXD's names for statfs magic numbers; others as `0x…`. */
export function fsTypeName(magic: bigint): string {
  const names: Record<string, string> = {
    "9123683e": "btrfs",
    "1021994": "tmpfs",
    "ef53": "ext4",
    "58465342": "xfs",
    "6969": "nfs",
    "2fc12fc1": "zfs",
  };
  const hex = (magic & 0xffffffffn).toString(16);
  return names[hex] ?? `0x${hex}`;
}

/** `/proc/meminfo` as LXD's memory metrics (bytes). */
export function memoryMetrics(meminfo: Map<string, number>): Record<string, number> {
  const map: Record<string, string> = {
    "Active(anon)": "memory_active_anon_bytes",
    "Active(file)": "memory_active_file_bytes",
    Active: "memory_active_bytes",
    Cached: "memory_cached_bytes",
    Dirty: "memory_dirty_bytes",
    HugePages_Free: "memory_hugepages_free_bytes",
    HugePages_Total: "memory_hugepages_total_bytes",
    "Inactive(anon)": "memory_inactive_anon_bytes",
    "Inactive(file)": "memory_inactive_file_bytes",
    Inactive: "memory_inactive_bytes",
    Mapped: "memory_mapped_bytes",
    MemAvailable: "memory_mem_available_bytes",
    MemFree: "memory_mem_free_bytes",
    MemTotal: "memory_mem_total_bytes",
    Shmem: "memory_shmem_bytes",
    SwapCached: "memory_swap_bytes",
    Unevictable: "memory_unevictable_bytes",
    Writeback: "memory_writeback_bytes",
  };
  const out: Record<string, number> = { memory_rss_bytes: 0 };
  for (const name of Object.values(map)) out[name] = 0;
  for (const [key, name] of Object.entries(map)) out[name] = meminfo.get(key) ?? 0;
  return out;
}

/** Processes with a non-empty `/proc/<pid>/cmdline` (kernel threads excluded). */
export function processTotal(sources: StateSources): number {
  let count = 0;
  for (const name of sources.listDir("/proc") ?? []) {
    if (!/^\d+$/.test(name)) continue;
    const cmdline = sources.readFile(`/proc/${name}/cmdline`);
    if (cmdline !== undefined && cmdline !== "") count++;
  }
  return count;
}

/** The guest's metrics now. */
export function collectMetrics(sources: StateSources = machineSources): AgentMetrics {
  const read = sources.readFile;
  const filesystem: AgentMetrics["filesystem"] = {};
  for (const [device, mountPoint] of reportedMounts(read("/proc/mounts") ?? "")) {
    try {
      const fs = statFs(mountPoint);
      filesystem[device] = {
        mountpoint: mountPoint,
        fstype: fsTypeName(fs.type),
        filesystem_avail_bytes: Number(fs.bavail * fs.bsize),
        filesystem_free_bytes: Number(fs.bfree * fs.bsize),
        filesystem_size_bytes: Number(fs.blocks * fs.bsize),
      };
    } catch {
      // A mount that went away (or cannot be stat'ed) is left out.
    }
  }
  const network: AgentMetrics["network"] = {};
  for (const [name, state] of Object.entries(networkState(sources))) {
    const c = state.counters;
    network[name] = {
      network_receive_bytes: c.bytes_received,
      network_receive_drop: c.packets_dropped_inbound,
      network_receive_errs: c.errors_received,
      network_receive_packets: c.packets_received,
      network_transmit_bytes: c.bytes_sent,
      network_transmit_drop: c.packets_dropped_outbound,
      network_transmit_errs: c.errors_sent,
      network_transmit_packets: c.packets_sent,
    };
  }
  return {
    cpu_seconds_total: parseCpuSeconds(read("/proc/stat") ?? ""),
    disk: parseDiskstats(read("/proc/diskstats") ?? ""),
    filesystem,
    memory: memoryMetrics(parseMeminfo(read("/proc/meminfo") ?? "")),
    network,
    procs_total: processTotal(sources),
  };
}

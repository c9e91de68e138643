import assert from "node:assert/strict";
import type { InstanceState } from "../shared/instance_api.ts";
import { formatState, ipv4Addresses } from "./agent_commands.ts";

const counters = {
  bytes_received: 2048,
  bytes_sent: 10,
  packets_received: 3,
  packets_sent: 1,
  errors_received: 0,
  errors_sent: 0,
  packets_dropped_outbound: 0,
  packets_dropped_inbound: 0,
};

const state: InstanceState = {
  status: "",
  status_code: 0,
  disk: { root: { usage: 1024 * 1024 } },
  memory: { usage: 3 * 1024 * 1024, usage_peak: 0, swap_usage: 0, swap_usage_peak: 0 },
  network: {
    lo: {
      addresses: [{ family: "inet", address: "127.0.0.1", netmask: "8", scope: "local" }],
      counters,
      hwaddr: "00:00:00:00:00:00",
      host_name: "",
      mtu: 65536,
      state: "up",
      type: "loopback",
    },
    enp5s0: {
      addresses: [
        { family: "inet", address: "10.0.0.5", netmask: "24", scope: "global" },
        { family: "inet", address: "169.254.1.1", netmask: "16", scope: "link" },
        { family: "inet6", address: "fd42::5", netmask: "64", scope: "global" },
      ],
      counters,
      hwaddr: "00:16:3e:00:00:01",
      host_name: "tap0",
      mtu: 1500,
      state: "up",
      type: "broadcast",
    },
    eth1: {
      addresses: [{ family: "inet", address: "192.168.1.9", netmask: "24", scope: "global" }],
      counters,
      hwaddr: "00:16:3e:00:00:02",
      host_name: "",
      mtu: 1500,
      state: "up",
      type: "broadcast",
    },
  },
  pid: 1,
  processes: 5,
  cpu: { usage: 2_500_000_000 },
};

Deno.test("ipv4Addresses() lists global IPv4 of non-loopback interfaces in lxc list's order", () => {
  assert.deepEqual(ipv4Addresses(state), ["192.168.1.9 (eth1)", "10.0.0.5 (enp5s0)"]);
  assert.deepEqual(ipv4Addresses({ network: null }), []);
});

Deno.test("formatState() shows processes, CPU, memory, disk and each interface's addresses", () => {
  const text = formatState("vm1", state);
  assert.match(text, /Processes: +5/);
  assert.match(text, /CPU usage: +2\.50 s/);
  assert.match(text, /Memory: +3\.00 MiB/);
  assert.match(text, /Disk root: 1\.00 MiB/);
  assert.match(text, /enp5s0: broadcast, up, mtu 1500, 00:16:3e:00:00:01, host tap0/);
  assert.match(text, /inet 10\.0\.0\.5\/24 global/);
  assert.match(text, /received 2\.00 KiB \(3 packets\)/);
});

/**
 * The host's model of one VM ("instance"): identity, how its status channel is
 * read, how its agent is reached, its guest-visible config and devices, and its
 * runtime state. Plain data shared by the registry, the devlxd API, the admin
 * API and the status monitor. Needs no permissions.
 * @module
 */

import type { AgentState } from "../shared/api.ts";

/** How the host reads the agent's ring-buffer state for an instance. */
export type StatusChannel =
  /** QEMU `-chardev ringbuf` read with QMP `ringbuf-read` (what LXD does). */
  | { kind: "qmp"; path: string; chardev: string; size: number }
  /** A `-chardev socket,server=on` virtserialport: lines both ways. */
  | { kind: "socket"; path: string }
  /** A plain file or FIFO the guest side appends lines to (tests only). */
  | { kind: "file"; path: string }
  /** No status channel: the host learns the state only from the agent's requests. */
  | { kind: "none" };

/** What operators see as an instance's agent state. */
export type HostAgentStatus = AgentState | "CONNECT sent";

export interface InstanceRuntime {
  /** Agent state as last observed. @default "STOPPED" */
  agentState: HostAgentStatus;
  /** Whether the guest said `PATCH /1.0 {"state":"Ready"}` (kept across host restarts). */
  ready: boolean;
  /** ISO time the agent last made an authenticated request. */
  lastSeen?: string;
  /** ISO time `agentState` last changed. */
  lastChange?: string;
  /** Last error seen for this instance (announce failure, QMP error, …). */
  lastError?: string;
}

export interface Instance {
  /** `[a-z0-9][a-z0-9-]{0,62}`, unique. */
  name: string;
  /** The VM's vsock guest CID (3 … 2^32-2), unique. */
  cid: number;
  status: StatusChannel;
  /**
   * Firecracker / Cloud Hypervisor hybrid vsock: the VMM's `uds_path`. When set,
   * the agent reaches the host at `<hybrid>_<port>` and the host reaches the
   * agent through `<hybrid>` + `CONNECT 8443`; otherwise AF_VSOCK.
   */
  hybrid?: string;
  /**
   * Where its config drive was written (absolute, symlinks resolved), when
   * recorded; else the default `<state-dir>/instances/<name>/config`.
   */
  configDrive?: string;
  /** PEM of the agent's certificate (`agent.crt`), pinned by the host. */
  agentCert: string;
  /** The host's per-instance client certificate (`server.crt` in the VM). */
  clientCert: string;
  /** Its key; never leaves the host. */
  clientKey: string;
  /** Instance config: `user.*`, `cloud-init.*`, `security.devlxd`, … */
  config: Record<string, string>;
  /** Devices by name, each a flat string map (`type`, `network`, …). */
  devices: Record<string, Record<string, string>>;
  runtime: InstanceRuntime;
}

/**
 * `record[key]` when `key` is an own property, else undefined: names from
 * operators and guests (`constructor`, `__proto__`) never reach the prototype.
 */
export function own<T>(record: Record<string, T>, key: string): T | undefined {
  return Object.hasOwn(record, key) ? record[key] : undefined;
}

/** `security.devlxd` defaults to true, as in LXD. */
export function devlxdEnabled(instance: Instance): boolean {
  return instance.config["security.devlxd"] !== "false";
}

/** `security.devlxd.images` defaults to false, as in LXD. */
export function devlxdImagesEnabled(instance: Instance): boolean {
  return instance.config["security.devlxd.images"] === "true";
}

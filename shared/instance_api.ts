/**
 * Wire types of the agent API beyond devlxd, as LXD 5.0.2 defines them
 * (`shared/api/instance_state.go`, `instance_exec.go`, `operation.go`,
 * `lxd/metrics/api.go`): instance state, exec requests and control messages,
 * operations, and the metrics document. Both the agent (which serves them) and
 * the host (which reads them) import this leaf module. Imports nothing; needs
 * no permissions.
 * @module
 */

/** `api.InstanceStateNetworkAddress`. */
export interface InstanceStateNetworkAddress {
  family: "inet" | "inet6";
  address: string;
  /** The prefix length, as a decimal string ("24"). */
  netmask: string;
  scope: "global" | "local" | "link";
}

/** `api.InstanceStateNetworkCounters`. */
export interface InstanceStateNetworkCounters {
  bytes_received: number;
  bytes_sent: number;
  packets_received: number;
  packets_sent: number;
  errors_received: number;
  errors_sent: number;
  packets_dropped_outbound: number;
  packets_dropped_inbound: number;
}

/** `api.InstanceStateNetwork`. */
export interface InstanceStateNetwork {
  addresses: InstanceStateNetworkAddress[];
  counters: InstanceStateNetworkCounters;
  hwaddr: string;
  host_name: string;
  mtu: number;
  state: "up" | "down";
  type: "broadcast" | "loopback" | "point-to-point" | "unknown";
}

/** `api.InstanceStateMemory`, in bytes. */
export interface InstanceStateMemory {
  usage: number;
  usage_peak: number;
  swap_usage: number;
  swap_usage_peak: number;
}

/** `api.InstanceState` (what `GET /1.0/state` answers). */
export interface InstanceState {
  status: string;
  status_code: number;
  disk: Record<string, { usage: number }> | null;
  memory: InstanceStateMemory;
  network: Record<string, InstanceStateNetwork> | null;
  pid: number;
  processes: number;
  /** `usage`: CPU time in nanoseconds, -1 when unknown. */
  cpu: { usage: number };
}

/** `api.InstanceExecPost`: the body of `POST /1.0/exec`. */
export interface InstanceExecPost {
  command: string[];
  "wait-for-websocket": boolean;
  interactive: boolean;
  environment: Record<string, string> | null;
  width: number;
  height: number;
  "record-output": boolean;
  user: number;
  group: number;
  cwd: string;
}

/** `api.InstanceExecControl`: a message on the exec control websocket. */
export interface InstanceExecControl {
  command: "window-resize" | "signal" | string;
  args?: Record<string, string>;
  signal?: number;
}

/** Operation status codes (`api.StatusCode`). */
export const STATUS_CODE = {
  OperationCreated: 100,
  Started: 101,
  Stopped: 102,
  Running: 103,
  Cancelling: 104,
  Pending: 105,
  Success: 200,
  Failure: 400,
  Cancelled: 401,
} as const;

/** `api.Operation`. */
export interface Operation {
  id: string;
  class: "task" | "websocket" | "token";
  description: string;
  created_at: string;
  updated_at: string;
  status: string;
  status_code: number;
  resources: Record<string, string[]> | null;
  metadata: Record<string, unknown> | null;
  may_cancel: boolean;
  err: string;
  location: string;
}

/** `metrics.Metrics`: what `GET /1.0/metrics` answers (LXD 5.0.2's lxd-agent). */
export interface AgentMetrics {
  cpu_seconds_total: Record<string, Record<string, number>>;
  disk: Record<string, Record<string, number>>;
  filesystem: Record<string, Record<string, number | string>>;
  memory: Record<string, number>;
  network: Record<string, Record<string, number>>;
  procs_total: number;
}

/**
 * Wire types shared by the host and the agent: the ring-buffer states, the
 * connection info the host announces (`PUT /1.0`, `agent.conf`), the host's
 * serial `CONNECT <cid>:<port>` line and devlxd event shapes. A leaf module:
 * it imports nothing and needs no permissions (see PROTOCOL.md).
 * @module
 */

/** vsock CID of "my immediate hypervisor" as seen from any guest. */
export const HOST_CID = 2;
/** vsock port of the in-VM agent API. */
export const AGENT_API_PORT = 8443;
/** Largest valid guest CID: 2^32 - 2 (2^32 - 1 is VMADDR_CID_ANY). */
export const MAX_CID = 0xfffffffe;

/** What the agent writes to its virtio-serial port, one line each. */
export const AGENT_STATES = ["STARTED", "CONNECTED", "STOPPED"] as const;
export type AgentState = typeof AGENT_STATES[number];

/** Serial port names known to LXD (≤ 5.0), newer LXD and Incus. */
export const SERIAL_PORT_NAMES = [
  "org.linuxcontainers.lxd",
  "com.canonical.lxd",
  "org.linuxcontainers.incus",
] as const;

/**
 * The state in a ring-buffer read: the last *complete* line (`entries[len-2]`
 * after splitting on `\n`, as LXD parses it). `undefined` when the text holds
 * no complete line naming a known state, so callers keep their last state.
 */
export function parseStatusLine(text: string): AgentState | undefined {
  const entries = text.split("\n");
  for (let i = entries.length - 2; i >= 0; i--) {
    const line = entries[i].trim();
    if ((AGENT_STATES as readonly string[]).includes(line)) return line as AgentState;
    if (line !== "") return undefined;
  }
  return undefined;
}

/** Body of `PUT /1.0` to the agent API and content of `agent.conf`. */
export interface ConnectionInfo {
  /** vsock CID the agent dials to reach the host (2 in production). */
  cid: number;
  /** vsock port the host listens on. */
  port: number;
  /** PEM of the host's server certificate, pinned by the agent. */
  certificate: string;
  /** Whether the agent serves `/dev/lxd/sock`. */
  devlxd: boolean;
}

/** Validates a port number: 1–65535. */
export function checkPort(port: unknown, what = "port"): number {
  if (typeof port !== "number" || !Number.isInteger(port)) {
    throw new TypeError(`Invalid ${what}: ${JSON.stringify(port)} is not an integer`);
  }
  if (port < 1 || port > 65535) {
    throw new RangeError(`Invalid ${what}: ${port} is outside 1-65535`);
  }
  return port;
}

/** Validates a vsock CID a peer can be reached at: 1–2^32-2. */
export function checkCid(cid: unknown, what = "CID"): number {
  if (typeof cid !== "number" || !Number.isInteger(cid)) {
    throw new TypeError(`Invalid ${what}: ${JSON.stringify(cid)} is not an integer`);
  }
  if (cid < 1 || cid > MAX_CID) {
    throw new RangeError(`Invalid ${what}: ${cid} is outside 1-${MAX_CID}`);
  }
  return cid;
}

/**
 * Parses and validates a `PUT /1.0` body or `agent.conf`. Throws TypeError
 * or RangeError naming the bad field. The certificate is checked for PEM
 * shape only; callers parse it.
 */
export function parseConnectionInfo(value: unknown): ConnectionInfo {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new TypeError("Invalid connection info: expected a JSON object");
  }
  const v = value as Record<string, unknown>;
  const cid = checkCid(v.cid, "cid");
  const port = checkPort(v.port, "port");
  if (typeof v.certificate !== "string" || !v.certificate.includes("-----BEGIN CERTIFICATE-----")) {
    throw new TypeError("Invalid connection info: certificate is not a PEM certificate");
  }
  if (v.devlxd !== undefined && typeof v.devlxd !== "boolean") {
    throw new TypeError("Invalid connection info: devlxd is not a boolean");
  }
  return { cid, port, certificate: v.certificate, devlxd: v.devlxd ?? true };
}

/** Longest host → agent serial line we accept, newline included. */
export const MAX_CONNECT_LINE = 64;

/** Formats the host → agent serial line `CONNECT <cid>:<port>\n`. */
export function formatConnectLine(cid: number, port: number): string {
  return `CONNECT ${checkCid(cid)}:${checkPort(port)}\n`;
}

/**
 * Parses one line (without its `\n`) of the form `CONNECT <cid>:<port>`.
 * Throws SyntaxError for any other shape, RangeError for a bad CID or port.
 */
export function parseConnectLine(line: string): { cid: number; port: number } {
  const m = /^CONNECT ([0-9]{1,10}):([0-9]{1,5})$/.exec(line.trim());
  if (m === null) throw new SyntaxError(`Not a CONNECT line: ${JSON.stringify(line.slice(0, 64))}`);
  return { cid: checkCid(Number(m[1])), port: checkPort(Number(m[2])) };
}

/** devlxd `GET /1.0` answer. */
export interface DevlxdInfo {
  api_version: "1.0";
  location: string;
  instance_type: "virtual-machine";
  state: "Started" | "Ready";
}

/** A devlxd event as streamed by `/1.0/events` and pushed by `POST /1.0/events`. */
export type DevlxdEvent =
  | {
    timestamp: string;
    type: "config";
    metadata: { key: string; old_value: string; value: string };
  }
  | {
    timestamp: string;
    type: "device";
    metadata: {
      name: string;
      action: "added" | "removed" | "updated";
      config: Record<string, string>;
    };
  };

/** Config keys a guest may read through devlxd. */
export function isGuestVisibleKey(key: string): boolean {
  return key.startsWith("user.") || key.startsWith("cloud-init.");
}

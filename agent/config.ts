/**
 * Command-line parsing of `lxd-vsock-agent`: a pure `parseConfig(args, env)`
 * that returns either a run configuration, a `--status` request, or help /
 * version, and throws `UsageError` for anything it cannot accept.
 * Needs no permissions.
 * @module
 */

import { parseArgs } from "node:util";
import { AGENT_API_PORT, checkPort, SERIAL_PORT_NAMES } from "../shared/api.ts";
import { type LogLevel, parseLogLevel } from "../shared/log.ts";

export const VERSION = "0.1.0";

/** How the agent reaches the host and exposes its API. */
export type TransportConfig =
  | { kind: "vsock" }
  /** Unix stand-in ("hybrid vsock"): the host at `<path>_<port>`, the agent API behind `<path>`. */
  | { kind: "hybrid"; path: string };

export interface AgentConfig {
  /** What to do. */
  command: "run" | "status" | "help" | "version";
  /** Directory holding agent.crt, agent.key, server.crt and optionally agent.conf. */
  configDir: string;
  /** Serial ports to try, first existing wins (one when `--serial-port` is given). */
  serialPorts: string[];
  /** vsock port of the agent API. */
  agentPort: number;
  /** Path of the devlxd unix socket. */
  devlxdSocket: string;
  /** File mode of the devlxd socket. */
  devlxdMode: number;
  /** State file the daemon rewrites for `--status`; `ready` lives beside it. */
  stateFile: string;
  /** Period of the serial state rewrite, in milliseconds. */
  rewriteInterval: number;
  /** How long an idle keep-alive connection to the host is kept, in ms; 0: one per request. */
  hostIdleTimeout: number;
  /** How long a guest request waits for the host's address when none is known yet, in ms. */
  hostWait: number;
  /** Bound on waiting for the host's answer head to a plain request, in milliseconds. */
  responseTimeout: number;
  transport: TransportConfig;
  logLevel: LogLevel;
  /** Output format of `--status`. */
  format: "text" | "json";
}

/** A command line the agent cannot accept; main exits 2 with the message and the usage. */
export class UsageError extends Error {
  override name = "UsageError";
}

export const USAGE = `Usage: lxd-vsock-agent [OPTIONS]
       lxd-vsock-agent --status [--format text|json] [--state-file PATH]

The in-VM agent of lxd-vsock: reports its state on the virtio-serial port, serves
the agent API on vsock port 8443 (mutual TLS) and /dev/lxd/sock for guest processes.

OPTIONS
  --config-dir DIR          identity files: agent.crt, agent.key, server.crt, agent.conf
                            (default /run/lxd_agent)
  --serial-port PATH        virtio-serial status port (default: the first present of
                            /dev/virtio-ports/{${SERIAL_PORT_NAMES.join(",")}})
  --agent-port PORT         vsock port of the agent API (default ${AGENT_API_PORT})
  --devlxd-socket PATH      devlxd socket (default /dev/lxd/sock)
  --devlxd-mode MODE        octal file mode of the devlxd socket (default 0600)
  --state-file PATH         state file read by --status (default /run/lxd-vsock-agent/state.json)
  --rewrite-interval DUR    rewrite the serial state this often: 5s, 500ms, 1m (default 5s)
  --host-idle-timeout DUR   keep an idle connection to the host this long for the next
                            request (keep-alive, at most 4 idle); 0 opens one per request
                            (default 2s)
  --host-wait DUR           how long a devlxd request waits for the host's address when none
                            is known yet (agent.conf without a port): 30s, 0 = answer 503 at
                            once (default 30s)
  --response-timeout DUR    give up on a host request without an answer head after this
                            long (default 10s; event streams wait as long as needed)
  --transport KIND          vsock (default) or hybrid:<uds_path> (Firecracker-style unix stand-in)
  --log-level LEVEL         debug, info, warn or error (default info)
  --status                  print the running agent's state; exit 0 if CONNECTED, 1 otherwise
  --format FORMAT           text (default) or json, for --status
  -h, --help                show this help
  --version                 print the version

ENVIRONMENT
  LXD_VSOCK_AGENT_LOG_LEVEL  default for --log-level
  NOTIFY_SOCKET              set by systemd (Type=notify): READY=1 is sent once serving
`;

const DEFAULTS = {
  configDir: "/run/lxd_agent",
  devlxdSocket: "/dev/lxd/sock",
  devlxdMode: 0o600,
  stateFile: "/run/lxd-vsock-agent/state.json",
  rewriteInterval: 5000,
  hostIdleTimeout: 2000,
  hostWait: 30_000,
  responseTimeout: 10_000,
};

/** Parses `5s`, `500ms`, `1m` or a bare number of seconds into milliseconds. */
export function parseDuration(value: string, what = "duration"): number {
  const m = /^([0-9]+(?:\.[0-9]+)?)(ms|s|m)?$/.exec(value.trim());
  if (m === null) {
    throw new UsageError(`Invalid ${what} "${value}": use a number with ms, s or m (e.g. 5s)`);
  }
  const factor = m[2] === "ms" ? 1 : m[2] === "m" ? 60_000 : 1000;
  const ms = Math.round(Number(m[1]) * factor);
  if (ms < 10 || ms > 3_600_000) {
    throw new UsageError(`Invalid ${what} "${value}": must be between 10ms and 1h`);
  }
  return ms;
}

function parseMode(value: string): number {
  if (!/^0?[0-7]{3}$/.test(value)) {
    throw new UsageError(`Invalid --devlxd-mode "${value}": use an octal mode such as 0600`);
  }
  return parseInt(value, 8);
}

function parseTransport(value: string): TransportConfig {
  if (value === "vsock") return { kind: "vsock" };
  if (value.startsWith("hybrid:") && value.length > "hybrid:".length) {
    return { kind: "hybrid", path: value.slice("hybrid:".length) };
  }
  throw new UsageError(`Invalid --transport "${value}": use vsock or hybrid:<uds_path>`);
}

function wrap<T>(f: () => T): T {
  try {
    return f();
  } catch (error) {
    if (error instanceof UsageError) throw error;
    throw new UsageError((error as Error).message);
  }
}

/** Parses the command line; throws `UsageError` (exit 2) on a bad one. */
export function parseConfig(
  args: string[],
  env: Record<string, string | undefined> = {},
): AgentConfig {
  const { values, positionals } = wrap(() =>
    parseArgs({
      args,
      strict: true,
      allowPositionals: true,
      options: {
        "config-dir": { type: "string" },
        "serial-port": { type: "string" },
        "agent-port": { type: "string" },
        "devlxd-socket": { type: "string" },
        "devlxd-mode": { type: "string" },
        "state-file": { type: "string" },
        "rewrite-interval": { type: "string" },
        "host-idle-timeout": { type: "string" },
        "host-wait": { type: "string" },
        "response-timeout": { type: "string" },
        "transport": { type: "string" },
        "log-level": { type: "string" },
        "status": { type: "boolean" },
        "format": { type: "string" },
        "help": { type: "boolean", short: "h" },
        "version": { type: "boolean" },
      },
    })
  );
  if (positionals.length > 0) {
    throw new UsageError(`Unexpected argument "${positionals[0]}"`);
  }
  const format = values.format ?? "text";
  if (format !== "text" && format !== "json") {
    throw new UsageError(`Invalid --format "${format}": use text or json`);
  }
  const serialPort = values["serial-port"];
  if (serialPort === "") throw new UsageError("Invalid --serial-port: empty path");
  return {
    command: values.help ? "help" : values.version ? "version" : values.status ? "status" : "run",
    configDir: values["config-dir"] ?? DEFAULTS.configDir,
    serialPorts: serialPort !== undefined
      ? [serialPort]
      : SERIAL_PORT_NAMES.map((name) => `/dev/virtio-ports/${name}`),
    agentPort: values["agent-port"] === undefined
      ? AGENT_API_PORT
      : wrap(() => checkPort(Number(values["agent-port"]), "--agent-port")),
    devlxdSocket: values["devlxd-socket"] ?? DEFAULTS.devlxdSocket,
    devlxdMode: values["devlxd-mode"] === undefined
      ? DEFAULTS.devlxdMode
      : parseMode(values["devlxd-mode"]),
    stateFile: values["state-file"] ?? DEFAULTS.stateFile,
    rewriteInterval: values["rewrite-interval"] === undefined
      ? DEFAULTS.rewriteInterval
      : parseDuration(values["rewrite-interval"], "--rewrite-interval"),
    hostIdleTimeout: values["host-idle-timeout"] === undefined
      ? DEFAULTS.hostIdleTimeout
      : /^0+(ms|s|m)?$/.test(values["host-idle-timeout"].trim())
      ? 0
      : parseDuration(values["host-idle-timeout"], "--host-idle-timeout"),
    hostWait: values["host-wait"] === undefined
      ? DEFAULTS.hostWait
      : values["host-wait"] === "0"
      ? 0
      : parseDuration(values["host-wait"], "--host-wait"),
    responseTimeout: values["response-timeout"] === undefined
      ? DEFAULTS.responseTimeout
      : parseDuration(values["response-timeout"], "--response-timeout"),
    transport: parseTransport(values.transport ?? "vsock"),
    logLevel: wrap(() =>
      parseLogLevel(values["log-level"] ?? env.LXD_VSOCK_AGENT_LOG_LEVEL ?? "info")
    ),
    format,
  };
}

/**
 * Command line of `lxd-vsock-host`: a pure {@linkcode parseConfig} that turns
 * arguments and environment into one {@linkcode Command}, and the help texts.
 * Usage errors throw {@linkcode UsageError} (exit status 2). Needs no
 * permissions: `main.ts` reads the environment and passes it in.
 * @module
 */

import { parseArgs } from "node:util";
import { LOG_LEVELS, type LogLevel, parseLogLevel } from "../shared/log.ts";
import type { StatusChannel } from "./instance.ts";
import { checkInstanceCid, checkInstanceName } from "./instance_validation.ts";
import { defaultStateDir } from "./state_dir.ts";
import { type AgentCommand, parseAgentCommand } from "./agent_cli.ts";
import { VERSION } from "./version.ts";

export const PROGRAM = "lxd-vsock-host";

/** A wrong command line: the message is shown with a hint, exit status 2. */
export class UsageError extends Error {
  override name = "UsageError";
  constructor(message: string, readonly help?: string) {
    super(message);
  }
}

/** What `parseConfig()` reads besides the arguments. */
export interface CliEnvironment {
  /** Effective user id (0 = root). */
  uid: number;
  /** Environment variables (`HOME`, `XDG_STATE_HOME`, `LXD_VSOCK_STATE_DIR`). */
  vars: Record<string, string | undefined>;
}

export type OutputFormat = "table" | "json";

export interface DaemonCommand {
  kind: "daemon";
  stateDir: string;
  /** vsock port to listen on; 0 = the last one used if free, else random. */
  port: number;
  logLevel: LogLevel;
  /** Listen on AF_VSOCK (and hybrid paths) or only on hybrid unix paths. */
  transport: "vsock" | "unix";
  imagesDir?: string;
  maxConnectionsPerInstance: number;
  /** How long in-flight requests may run after SIGTERM, in ms. */
  shutdownTimeout: number;
  /** Run the status monitor / announcer. */
  monitor: boolean;
  /** Status-channel poll periods by agent state, in ms (the monitor's defaults when unset). */
  intervals: { waiting?: number; stopped?: number; connected?: number };
}

export type Command =
  | { kind: "help"; text: string }
  | { kind: "version" }
  | DaemonCommand
  | {
    kind: "instance-add";
    stateDir: string;
    name: string;
    cid: number;
    status: StatusChannel;
    hybrid?: string;
    configDrive?: string;
    config: Record<string, string>;
    format: OutputFormat;
  }
  | { kind: "instance-list"; stateDir: string; format: OutputFormat }
  | { kind: "instance-show"; stateDir: string; name: string }
  | { kind: "instance-remove"; stateDir: string; name: string }
  | { kind: "config-set"; stateDir: string; name: string; key: string; value: string }
  | { kind: "config-unset"; stateDir: string; name: string; key: string }
  | { kind: "config-get"; stateDir: string; name: string; key: string }
  | {
    kind: "device-add";
    stateDir: string;
    name: string;
    device: string;
    config: Record<string, string>;
  }
  | { kind: "device-remove"; stateDir: string; name: string; device: string }
  | { kind: "status"; stateDir: string; format: OutputFormat; name?: string }
  | { kind: "events"; stateDir: string }
  | {
    kind: "wait";
    stateDir: string;
    name: string;
    for: "connected" | "ready";
    /** ms */
    timeout: number;
  }
  | AgentCommand;

const COMMON_OPTIONS = `  --state-dir DIR   state directory (default: /var/lib/lxd-vsock for root,
                    else $XDG_STATE_HOME/lxd-vsock or ~/.local/state/lxd-vsock;
                    env LXD_VSOCK_STATE_DIR overrides the default)
  -h, --help        show this help`;

export const HELP: Record<string, string> = {
  main: `${PROGRAM} ${VERSION}: the host side of LXD's devlxd protocol over vsock

USAGE
  ${PROGRAM} daemon [OPTIONS]
  ${PROGRAM} instance add|list|show|remove ...
  ${PROGRAM} config set|unset|get NAME KEY [VALUE]
  ${PROGRAM} device add|remove NAME DEVICE [KEY=VALUE...]
  ${PROGRAM} status [NAME]      (also: ${PROGRAM} --status [NAME])
  ${PROGRAM} events
  ${PROGRAM} wait NAME --for connected|ready [--timeout DUR]
  ${PROGRAM} exec NAME [-t|-T] [--env K=V]... [--cwd DIR] [--user N] -- COMMAND...
  ${PROGRAM} state NAME [--format json]
  ${PROGRAM} file push LOCAL NAME/PATH | file pull NAME/PATH LOCAL

Registry commands talk to the running daemon through <state-dir>/admin.sock,
or edit the store directly when no daemon runs.

OPTIONS
${COMMON_OPTIONS}
  --version         print the version

Run "${PROGRAM} COMMAND --help" for a command's options.`,
  daemon: `USAGE
  ${PROGRAM} daemon [OPTIONS]

Serves the devlxd API to registered VMs over vsock (TLS 1.3, mutual) and the
admin API on <state-dir>/admin.sock. SIGTERM or SIGINT stops it.

OPTIONS
${COMMON_OPTIONS}
  --port N                      vsock port (default: last used if free, else random 1024-65534)
  --transport vsock|unix        vsock: AF_VSOCK plus hybrid paths; unix: only the
                                <hybrid>_<port> listeners of hybrid instances (default: vsock)
  --images-dir DIR              image files for /1.0/images/{fp}/export (default: <state-dir>/images)
  --max-connections-per-instance N   concurrent connections per VM (default: 32)
  --shutdown-timeout MS         time in-flight requests get after SIGTERM (default: 5000)
  --no-monitor                  do not watch status channels nor announce the host to agents
  --poll-waiting MS             status-channel poll period while waiting for an agent that was
                                told to connect (default: 500)
  --poll-stopped MS             poll period while the agent is STOPPED (default: 3000)
  --poll-connected MS           poll period once CONNECTED (default: 10000); each ring-buffer
                                poll also runs after every QMP event
  --log-level ${LOG_LEVELS.join("|")}  (default: info)`,
  instance: `USAGE
  ${PROGRAM} instance add NAME --cid N [--qmp PATH [--chardev ID] [--ring-size N]
                          | --serial PATH | --status-file PATH] [--hybrid PATH]
                          [--config-drive DIR] [-c KEY=VALUE ...] [--format table|json]
  ${PROGRAM} instance list [--format table|json]
  ${PROGRAM} instance show NAME
  ${PROGRAM} instance remove NAME

"add" registers a VM, generates its agent key pair and the host's per-instance
client pair, and writes a config drive directory (agent.crt, agent.key,
server.crt, agent.conf) for the VM image, by default
<state-dir>/instances/NAME/config.

OPTIONS
${COMMON_OPTIONS}
  --cid N             the VM's vsock guest CID, 3-4294967294, unique
  --qmp PATH          QMP socket; the status ring buffer is read with ringbuf-read
  --chardev ID        the ringbuf chardev id (default: vserial)
  --ring-size N       the ringbuf size (default: 16)
  --serial PATH       a socket-backed virtserialport (lines both ways)
  --status-file PATH  a file the guest side appends states to (tests)
  --hybrid PATH       Firecracker/Cloud Hypervisor uds_path (hybrid vsock)
  --config-drive DIR  where to write the config drive: a new or empty directory
                      outside the state directory and no other instance's
                      drive; recorded, and deleted by "remove"
  -c, --config K=V    initial config (repeatable)
  --format F          output format (default: table)`,
  config: `USAGE
  ${PROGRAM} config set NAME KEY VALUE
  ${PROGRAM} config unset NAME KEY
  ${PROGRAM} config get NAME KEY

Keys: user.*, cloud-init.*, image.*, environment.*, limits.*,
security.devlxd, security.devlxd.images (true|false). Changes to user.* and
cloud-init.* reach the VM's /1.0/events streams.

OPTIONS
${COMMON_OPTIONS}`,
  device: `USAGE
  ${PROGRAM} device add NAME DEVICE type=TYPE [KEY=VALUE ...]
  ${PROGRAM} device remove NAME DEVICE

OPTIONS
${COMMON_OPTIONS}`,
  status: `USAGE
  ${PROGRAM} status [NAME] [--format table|json]

Shows whether the daemon runs, its vsock CID and port, its listeners and the
monitor's view of each instance. With NAME: that instance's agent state, and
its status channel as the daemon's monitor sees it (or, when no daemon runs,
one read of the channel: for QMP a ringbuf-read, which consumes the bytes).

OPTIONS
${COMMON_OPTIONS}
  --format F     output format (default: table)`,
  wait: `USAGE
  ${PROGRAM} wait NAME --for connected|ready [--timeout DUR]

Waits until the instance's agent is connected (it reached the host) or the
guest said it is ready (PATCH /1.0 {"state":"Ready"}). Exit status 0 once it
is, 1 on timeout (the message names the state seen) or without a daemon.

OPTIONS
${COMMON_OPTIONS}
  --for STATE      connected or ready
  --timeout DUR    how long to wait: 500ms, 30s, 5m, 1h, or seconds (default: 60s)`,
  events: `USAGE
  ${PROGRAM} events

Follows the daemon's lifecycle events (agent state, ready, instance and config
changes), one JSON object a line, until interrupted.

OPTIONS
${COMMON_OPTIONS}`,
};

type Spec = Record<string, { type: "string" | "boolean"; short?: string; multiple?: boolean }>;

const BASE = {
  "state-dir": { type: "string" },
  help: { type: "boolean", short: "h" },
} as const satisfies Spec;

/** `parseArgs` with `--state-dir` and `--help` besides `extra`; a parse error → UsageError. */
export function parse<const T extends Spec>(args: string[], extra: T, help: string) {
  try {
    return parseArgs({
      args,
      options: { ...BASE, ...extra },
      allowPositionals: true,
      strict: true,
    });
  } catch (error) {
    throw new UsageError((error as Error).message, help);
  }
}

/**
 * `GROUP ACTION [--state-dir DIR] ARGS…` for groups whose actions take no other
 * option: help when there is no action or `-h`; else the action, options, positionals.
 */
function subcommand(
  rest: string[],
  help: string,
):
  | { kind: "help"; text: string }
  | { action: string; values: { "state-dir"?: string }; pos: string[] } {
  const [action, ...more] = rest;
  if (action === undefined || action === "-h" || action === "--help") {
    return { kind: "help", text: help };
  }
  const { values, positionals: pos } = parse(more, {}, help);
  if (values.help) return { kind: "help", text: help };
  return { action, values, pos };
}

function integer(value: string, what: string, help: string): number {
  if (!/^[0-9]{1,10}$/.test(value)) {
    throw new UsageError(`Invalid ${what} "${value}": not an integer`, help);
  }
  return Number(value);
}

function keyValues(items: string[], what: string, help: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const item of items) {
    const eq = item.indexOf("=");
    if (eq <= 0) throw new UsageError(`Invalid ${what} "${item}": expected KEY=VALUE`, help);
    out[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return out;
}

/** A duration: `500ms`, `30s`, `5m`, `1h`, or a number of seconds; in ms. */
export function duration(value: string, help: string): number {
  const m = /^([0-9]{1,9})(ms|s|m|h)?$/.exec(value);
  if (!m) {
    throw new UsageError(`Invalid duration "${value}": use e.g. 500ms, 30s, 5m or 1h`, help);
  }
  const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] ?? "s"]!;
  return Number(m[1]) * unit;
}

function format(value: unknown, help: string): OutputFormat {
  if (value === undefined) return "table";
  if (value === "table" || value === "json") return value;
  throw new UsageError(`Invalid --format "${value}": use table or json`, help);
}

function positionals(got: string[], names: string[], help: string, rest = false): string[] {
  if (got.length < names.length) {
    throw new UsageError(`Missing ${names.slice(got.length).join(" ")}`, help);
  }
  if (!rest && got.length > names.length) {
    throw new UsageError(`Unexpected argument "${got[names.length]}"`, help);
  }
  return got;
}

function name(value: string, help: string): string {
  try {
    return checkInstanceName(value);
  } catch (error) {
    throw new UsageError((error as Error).message, help);
  }
}

/** Parses a command line (without the program name). Throws UsageError. */
export function parseConfig(args: string[], env: CliEnvironment): Command {
  const [group, ...rest] = args;
  if (group === undefined || group === "-h" || group === "--help" || group === "help") {
    return { kind: "help", text: HELP.main };
  }
  if (group === "--version" || group === "version") return { kind: "version" };
  // `--status [NAME]` is `status [NAME]`: the ring-buffer state as the host reads it.
  if (group === "--status") return parseConfig(["status", ...rest], env);
  const stateDirOf = (v: { "state-dir"?: string | boolean | (string | boolean)[] }) =>
    typeof v["state-dir"] === "string" ? v["state-dir"] : defaultStateDir(env);

  switch (group) {
    case "daemon": {
      const help = HELP.daemon;
      const { values, positionals: pos } = parse(rest, {
        port: { type: "string" },
        transport: { type: "string" },
        "images-dir": { type: "string" },
        "max-connections-per-instance": { type: "string" },
        "shutdown-timeout": { type: "string" },
        "log-level": { type: "string" },
        "no-monitor": { type: "boolean" },
        "poll-waiting": { type: "string" },
        "poll-stopped": { type: "string" },
        "poll-connected": { type: "string" },
      }, help);
      if (values.help) return { kind: "help", text: help };
      positionals(pos, [], help);
      const port = values.port === undefined ? 0 : integer(values.port, "--port", help);
      if (port !== 0 && (port < 1024 || port > 65535)) {
        throw new UsageError(`Invalid --port ${port}: use 1024-65535 (or 0 for random)`, help);
      }
      const transport = values.transport ?? "vsock";
      if (transport !== "vsock" && transport !== "unix") {
        throw new UsageError(`Invalid --transport "${transport}": use vsock or unix`, help);
      }
      let logLevel: LogLevel = "info";
      if (values["log-level"] !== undefined) {
        try {
          logLevel = parseLogLevel(values["log-level"]);
        } catch (error) {
          throw new UsageError((error as Error).message, help);
        }
      }
      const max = values["max-connections-per-instance"] === undefined
        ? 32
        : integer(values["max-connections-per-instance"], "--max-connections-per-instance", help);
      if (max < 1) throw new UsageError("Invalid --max-connections-per-instance: at least 1", help);
      const shutdownTimeout = values["shutdown-timeout"] === undefined
        ? 5000
        : integer(values["shutdown-timeout"], "--shutdown-timeout", help);
      const command: DaemonCommand = {
        kind: "daemon",
        stateDir: stateDirOf(values),
        port,
        logLevel,
        transport,
        maxConnectionsPerInstance: max,
        shutdownTimeout,
        monitor: !values["no-monitor"],
        intervals: {},
      };
      for (const state of ["waiting", "stopped", "connected"] as const) {
        const value = values[`poll-${state}`];
        if (value === undefined) continue;
        const ms = integer(value, `--poll-${state}`, help);
        if (ms < 50 || ms > 3_600_000) {
          throw new UsageError(`Invalid --poll-${state} ${ms}: use 50-3600000 ms`, help);
        }
        command.intervals[state] = ms;
      }
      if (values["images-dir"] !== undefined) command.imagesDir = values["images-dir"];
      return command;
    }
    case "instance": {
      const help = HELP.instance;
      const [action, ...more] = rest;
      if (action === undefined || action === "-h" || action === "--help") {
        return { kind: "help", text: help };
      }
      if (action === "add") {
        const { values, positionals: pos } = parse(more, {
          cid: { type: "string" },
          qmp: { type: "string" },
          chardev: { type: "string" },
          "ring-size": { type: "string" },
          serial: { type: "string" },
          "status-file": { type: "string" },
          hybrid: { type: "string" },
          "config-drive": { type: "string" },
          config: { type: "string", short: "c", multiple: true },
          format: { type: "string" },
        }, help);
        if (values.help) return { kind: "help", text: help };
        const [n] = positionals(pos, ["NAME"], help);
        if (values.cid === undefined) throw new UsageError("Missing --cid N", help);
        const cid = integer(values.cid, "--cid", help);
        try {
          checkInstanceCid(cid);
        } catch (error) {
          throw new UsageError((error as Error).message, help);
        }
        const channels = [values.qmp, values.serial, values["status-file"]].filter((v) =>
          v !== undefined
        );
        if (channels.length > 1) {
          throw new UsageError("Use at most one of --qmp, --serial, --status-file", help);
        }
        if (
          (values.chardev !== undefined || values["ring-size"] !== undefined) &&
          values.qmp === undefined
        ) {
          throw new UsageError("--chardev and --ring-size need --qmp", help);
        }
        let status: StatusChannel = { kind: "none" };
        if (values.qmp !== undefined) {
          status = {
            kind: "qmp",
            path: values.qmp,
            chardev: values.chardev ?? "vserial",
            size: values["ring-size"] === undefined
              ? 16
              : integer(values["ring-size"], "--ring-size", help),
          };
        } else if (values.serial !== undefined) {
          status = { kind: "socket", path: values.serial };
        } else if (values["status-file"] !== undefined) {
          status = { kind: "file", path: values["status-file"] };
        }
        const command: Command = {
          kind: "instance-add",
          stateDir: stateDirOf(values),
          name: name(n, help),
          cid,
          status,
          config: keyValues(values.config ?? [], "--config", help),
          format: format(values.format, help),
        };
        if (values.hybrid !== undefined) command.hybrid = values.hybrid;
        if (values["config-drive"] !== undefined) command.configDrive = values["config-drive"];
        return command;
      }
      if (action === "list" || action === "ls") {
        const { values, positionals: pos } = parse(more, { format: { type: "string" } }, help);
        if (values.help) return { kind: "help", text: help };
        positionals(pos, [], help);
        return {
          kind: "instance-list",
          stateDir: stateDirOf(values),
          format: format(values.format, help),
        };
      }
      if (action === "show" || action === "remove" || action === "rm") {
        const { values, positionals: pos } = parse(more, {}, help);
        if (values.help) return { kind: "help", text: help };
        const [n] = positionals(pos, ["NAME"], help);
        return {
          kind: action === "show" ? "instance-show" : "instance-remove",
          stateDir: stateDirOf(values),
          name: name(n, help),
        };
      }
      throw new UsageError(`Unknown instance command "${action}"`, help);
    }
    case "config": {
      const help = HELP.config;
      const sub = subcommand(rest, help);
      if ("kind" in sub) return sub;
      const { action, pos } = sub;
      const stateDir = stateDirOf(sub.values);
      if (action === "set") {
        const [n, key, value] = positionals(pos, ["NAME", "KEY", "VALUE"], help);
        return { kind: "config-set", stateDir, name: name(n, help), key, value };
      }
      if (action === "unset" || action === "get") {
        const [n, key] = positionals(pos, ["NAME", "KEY"], help);
        return {
          kind: action === "get" ? "config-get" : "config-unset",
          stateDir,
          name: name(n, help),
          key,
        };
      }
      throw new UsageError(`Unknown config command "${action}"`, help);
    }
    case "device": {
      const help = HELP.device;
      const sub = subcommand(rest, help);
      if ("kind" in sub) return sub;
      const { action, pos } = sub;
      const stateDir = stateDirOf(sub.values);
      if (action === "add") {
        const [n, device, ...pairs] = positionals(pos, ["NAME", "DEVICE", "type=TYPE"], help, true);
        return {
          kind: "device-add",
          stateDir,
          name: name(n, help),
          device,
          config: keyValues(pairs, "device setting", help),
        };
      }
      if (action === "remove" || action === "rm") {
        const [n, device] = positionals(pos, ["NAME", "DEVICE"], help);
        return { kind: "device-remove", stateDir, name: name(n, help), device };
      }
      throw new UsageError(`Unknown device command "${action}"`, help);
    }
    case "status": {
      const help = HELP.status;
      const { values, positionals: pos } = parse(rest, { format: { type: "string" } }, help);
      if (values.help) return { kind: "help", text: help };
      if (pos.length > 1) throw new UsageError(`Unexpected argument "${pos[1]}"`, help);
      const command: Command = {
        kind: "status",
        stateDir: stateDirOf(values),
        format: format(values.format, help),
      };
      if (pos.length === 1) command.name = name(pos[0], help);
      return command;
    }
    case "wait": {
      const help = HELP.wait;
      const { values, positionals: pos } = parse(rest, {
        for: { type: "string" },
        timeout: { type: "string" },
      }, help);
      if (values.help) return { kind: "help", text: help };
      const [n] = positionals(pos, ["NAME"], help);
      if (values.for === undefined) throw new UsageError("Missing --for connected|ready", help);
      if (values.for !== "connected" && values.for !== "ready") {
        throw new UsageError(`Invalid --for "${values.for}": use connected or ready`, help);
      }
      return {
        kind: "wait",
        stateDir: stateDirOf(values),
        name: name(n, help),
        for: values.for,
        timeout: values.timeout === undefined ? 60_000 : duration(values.timeout, help),
      };
    }
    case "exec":
    case "state":
    case "file":
      return parseAgentCommand(group, rest, env);
    case "events": {
      const help = HELP.events;
      const { values, positionals: pos } = parse(rest, {}, help);
      if (values.help) return { kind: "help", text: help };
      positionals(pos, [], help);
      return { kind: "events", stateDir: stateDirOf(values) };
    }
    default:
      throw new UsageError(`Unknown command "${group}"`, HELP.main);
  }
}

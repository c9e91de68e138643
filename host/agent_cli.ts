/**
 * Command line of the operator commands that act on a VM through its agent:
 * `exec NAME [-t|-T] [--env K=V]… [--cwd DIR] [--user N] [--group N] -- CMD…`,
 * `state NAME [--format json]` and `file push|pull`. A pure {@linkcode parseAgentCommand}
 * (called by `cli.ts`'s `parseConfig`) and the help texts; usage errors throw
 * `UsageError`. Needs no permissions.
 * @module
 */

import { checkInstanceName } from "./instance_validation.ts";
import { defaultStateDir } from "./state_dir.ts";
import type { CliEnvironment, OutputFormat } from "./cli.ts";
import { parse, PROGRAM, UsageError } from "./cli.ts";

/** `exec`: run a command in the VM. */
export interface ExecCommand {
  kind: "exec";
  stateDir: string;
  name: string;
  command: string[];
  /** `auto`: a PTY when stdin and stdout are terminals (as `lxc exec`). */
  mode: "auto" | "interactive" | "non-interactive";
  env: Record<string, string>;
  cwd?: string;
  user?: number;
  group?: number;
}

/** `state`: the VM's state as its agent reports it. */
export interface StateCommand {
  kind: "state";
  stateDir: string;
  name: string;
  format: OutputFormat;
}

/** `file push|pull`: copy one file (or symlink) to or from the VM, mode and owner kept. */
export interface FileCommand {
  kind: "file-push" | "file-pull";
  stateDir: string;
  name: string;
  /** The path in the VM (absolute). */
  path: string;
  /** The local path. */
  local: string;
  /** Push: mode and owner to set (default: the local file's). */
  mode?: number;
  uid?: number;
  gid?: number;
}

export type AgentCommand = ExecCommand | StateCommand | FileCommand;

/** `NAME/PATH` → the instance name and the absolute path in it. */
export function parseRemotePath(spec: string, help: string): { name: string; path: string } {
  const at = spec.indexOf("/");
  if (at <= 0 || at === spec.length - 1) {
    throw new UsageError(`Invalid "${spec}": expected NAME/PATH`, help);
  }
  let name: string;
  try {
    name = checkInstanceName(spec.slice(0, at));
  } catch (error) {
    throw new UsageError((error as Error).message, help);
  }
  return { name, path: spec.slice(at) };
}

/**
 * The help text of `exec` or `state` (a function: `cli.ts` imports this module,
 * and this one reads `PROGRAM` from it, so nothing here runs at import time).
 */
export function agentHelp(group: "exec" | "state" | "file"): string {
  const stateDirHelp = `  --state-dir DIR   state directory (see "${PROGRAM} --help")
  -h, --help        show this help`;
  if (group === "file") {
    return `USAGE
  ${PROGRAM} file push LOCAL NAME/PATH [--mode MODE] [--uid N] [--gid N]
  ${PROGRAM} file pull NAME/PATH LOCAL

Copies a file (or a symlink) to or from the VM through its agent's SFTP server (the
way LXD's lxc file does). push keeps the local file's mode and owner unless given;
pull keeps the VM file's mode, and its owner when run as root. A PATH or LOCAL
ending in / is a directory: the file keeps its name.

OPTIONS
  --mode MODE       push: octal permission bits (e.g. 0640)
  --uid N, --gid N  push: owner to set
${stateDirHelp}`;
  }
  return group === "exec"
    ? `USAGE
  ${PROGRAM} exec NAME [OPTIONS] -- COMMAND [ARG...]

Runs COMMAND in the VM through its agent (lxd-vsock-agent or a stock lxd-agent),
with a PTY when stdin and stdout are terminals; the exit status is COMMAND's.

OPTIONS
  -t, --force-interactive      always use a PTY
  -T, --force-noninteractive   never use a PTY
  --env KEY[=VALUE]            set an environment variable (repeatable)
  --cwd DIR                    working directory (default: the user's HOME, or /)
  --user N                     user id (default 0)
  --group N                    group id (default 0)
${stateDirHelp}`
    : `USAGE
  ${PROGRAM} state NAME [--format table|json]

Shows the VM's state as its agent reports it: addresses, memory, processes.

OPTIONS
  --format table|json   output format (default table)
${stateDirHelp}`;
}

function id(value: string | undefined, flag: string, help: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!/^\d+$/.test(value) || n > 0xffffffff) {
    throw new UsageError(`Invalid ${flag} "${value}": expected a number 0-4294967295`, help);
  }
  return n;
}

/** Parses `file push|pull …` (without the group word). */
function parseFileCommand(
  args: string[],
  env: CliEnvironment,
): FileCommand | { kind: "help"; text: string } {
  const help = agentHelp("file");
  const { values, positionals } = parse(args, {
    mode: { type: "string" },
    uid: { type: "string" },
    gid: { type: "string" },
  }, help);
  if (values.help) return { kind: "help", text: help };
  const [action, ...rest] = positionals;
  if (action !== "push" && action !== "pull") {
    throw new UsageError(`Unknown file command "${action ?? ""}": use push or pull`, help);
  }
  if (rest.length !== 2) throw new UsageError(`file ${action} takes two paths`, help);
  const stateDir = values["state-dir"] ?? defaultStateDir(env);
  if (action === "pull") {
    if (values.mode !== undefined || values.uid !== undefined || values.gid !== undefined) {
      throw new UsageError("--mode, --uid and --gid apply to push", help);
    }
    const { name, path } = parseRemotePath(rest[0], help);
    return { kind: "file-pull", stateDir, name, path, local: rest[1] };
  }
  const { name, path } = parseRemotePath(rest[1], help);
  const command: FileCommand = { kind: "file-push", stateDir, name, path, local: rest[0] };
  if (values.mode !== undefined) {
    const mode = parseInt(values.mode, 8);
    if (!/^[0-7]{1,4}$/.test(values.mode) || mode > 0o7777) {
      throw new UsageError(`Invalid --mode "${values.mode}": expected octal, e.g. 0640`, help);
    }
    command.mode = mode;
  }
  const uid = id(values.uid, "--uid", help);
  const gid = id(values.gid, "--gid", help);
  if (uid !== undefined) command.uid = uid;
  if (gid !== undefined) command.gid = gid;
  return command;
}

/** Parses `exec …`, `state …` or `file …` (without the group word). */
export function parseAgentCommand(
  group: "exec" | "state" | "file",
  args: string[],
  env: CliEnvironment,
): AgentCommand | { kind: "help"; text: string } {
  if (group === "file") return parseFileCommand(args, env);
  const help = agentHelp(group);
  const parsed = group === "exec"
    ? parse(args, {
      "force-interactive": { type: "boolean", short: "t" },
      "force-noninteractive": { type: "boolean", short: "T" },
      env: { type: "string", multiple: true },
      cwd: { type: "string" },
      user: { type: "string" },
      group: { type: "string" },
    }, help)
    : parse(args, { format: { type: "string" } }, help);
  const values = parsed.values as Record<string, string | boolean | string[] | undefined>;
  if (values.help) return { kind: "help", text: help };
  const [nameArg, ...rest] = parsed.positionals;
  if (nameArg === undefined) throw new UsageError("Missing the instance NAME", help);
  let name: string;
  try {
    name = checkInstanceName(nameArg);
  } catch (error) {
    throw new UsageError((error as Error).message, help);
  }
  const stateDir = typeof values["state-dir"] === "string"
    ? values["state-dir"]
    : defaultStateDir(env);
  if (group === "state") {
    if (rest.length > 0) throw new UsageError(`Unexpected argument "${rest[0]}"`, help);
    const format = (values.format as string | undefined) ?? "table";
    if (format !== "table" && format !== "json") {
      throw new UsageError(`Invalid --format "${format}": use table or json`, help);
    }
    return { kind: "state", stateDir, name, format };
  }
  if (rest.length === 0) throw new UsageError("Missing the COMMAND to run (after --)", help);
  if (values["force-interactive"] && values["force-noninteractive"]) {
    throw new UsageError("-t and -T exclude each other", help);
  }
  const environment: Record<string, string> = {};
  for (const entry of (values.env as string[] | undefined) ?? []) {
    // As lxc exec: KEY alone sets an empty value.
    const at = entry.indexOf("=");
    const key = at < 0 ? entry : entry.slice(0, at);
    if (key === "") throw new UsageError(`Invalid --env "${entry}": expected KEY=VALUE`, help);
    environment[key] = at < 0 ? "" : entry.slice(at + 1);
  }
  const command: ExecCommand = {
    kind: "exec",
    stateDir,
    name,
    command: rest,
    mode: values["force-interactive"]
      ? "interactive"
      : values["force-noninteractive"]
      ? "non-interactive"
      : "auto",
    env: environment,
  };
  if (typeof values.cwd === "string") command.cwd = values.cwd;
  const user = id(values.user as string | undefined, "--user", help);
  const gid = id(values.group as string | undefined, "--group", help);
  if (user !== undefined) command.user = user;
  if (gid !== undefined) command.group = gid;
  return command;
}

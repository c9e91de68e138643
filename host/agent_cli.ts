/**
 * Command line of the operator commands that act on a VM through its agent:
 * `exec NAME [-t|-T] [--env K=V]… [--cwd DIR] [--user N] [--group N] -- CMD…`
 * and `state NAME [--format json]`. A pure {@linkcode parseAgentCommand}
 * (called by `cli.ts`'s `parseConfig`) and the help texts; usage errors throw
 * `UsageError`. Needs no permissions.
 * @module
 */

import { parseArgs } from "node:util";
import { checkInstanceName } from "./registry.ts";
import { defaultStateDir } from "./state_dir.ts";
import type { CliEnvironment, OutputFormat } from "./cli.ts";
import { PROGRAM, UsageError } from "./cli.ts";

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

export type AgentCommand = ExecCommand | StateCommand;

/**
 * The help text of `exec` or `state` (a function: `cli.ts` imports this module,
 * and this one reads `PROGRAM` from it, so nothing here runs at import time).
 */
export function agentHelp(group: "exec" | "state"): string {
  const stateDirHelp = `  --state-dir DIR   state directory (see "${PROGRAM} --help")
  -h, --help        show this help`;
  return group === "exec"
    ? `USAGE
  ${PROGRAM} exec NAME [OPTIONS] -- COMMAND [ARG...]

Runs COMMAND in the VM through its agent (lxd-vsock-agent or a stock lxd-agent),
with a PTY when stdin and stdout are terminals; the exit status is COMMAND's.

OPTIONS
  -t, --force-interactive      always use a PTY
  -T, --force-noninteractive   never use a PTY
  --env KEY=VALUE              set an environment variable (repeatable)
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

/** Parses `exec …` or `state …` (without the group word). */
export function parseAgentCommand(
  group: "exec" | "state",
  args: string[],
  env: CliEnvironment,
): AgentCommand | { kind: "help"; text: string } {
  const help = agentHelp(group);
  let parsed;
  try {
    parsed = parseArgs({
      args,
      allowPositionals: true,
      strict: true,
      options: group === "exec"
        ? {
          "force-interactive": { type: "boolean", short: "t" },
          "force-noninteractive": { type: "boolean", short: "T" },
          env: { type: "string", multiple: true },
          cwd: { type: "string" },
          user: { type: "string" },
          group: { type: "string" },
          "state-dir": { type: "string" },
          help: { type: "boolean", short: "h" },
        }
        : {
          format: { type: "string" },
          "state-dir": { type: "string" },
          help: { type: "boolean", short: "h" },
        },
    });
  } catch (error) {
    throw new UsageError((error as Error).message, help);
  }
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
    const at = entry.indexOf("=");
    if (at <= 0) throw new UsageError(`Invalid --env "${entry}": expected KEY=VALUE`, help);
    environment[entry.slice(0, at)] = entry.slice(at + 1);
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

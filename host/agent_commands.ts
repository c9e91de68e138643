/**
 * Runs the operator commands that act on a VM through its agent (`exec`,
 * `state`, `file push|pull`), against our agent and the stock lxd-agent alike. While the daemon
 * runs they go through its admin socket (`/1.0/instances/<name>/agent/…`,
 * `agent_proxy.ts`); without a daemon the CLI reads the instance from the
 * registry and dials the agent itself.
 *
 * `exec` speaks LXD's exec protocol (`shared/exec_client.ts`): with a PTY when
 * stdin and stdout are terminals (or `-t`), the local terminal in raw mode,
 * its size sent at start and on SIGWINCH; in both modes the signals `lxc exec`
 * forwards (INT, TERM, HUP, QUIT, TSTP, TTIN, TTOU, USR1, USR2, CONT) go to
 * the command. The exit status is the command's (255 for
 * statuses outside 0–255). Terminal and signal access come in through
 * {@linkcode AgentCommandIO}; only `main.ts` touches the console.
 *
 * Permissions: those of `commands.ts`, and `--allow-ffi` (vsock) without a daemon.
 * @module
 */

import type { Duplex } from "node:stream";
import { ExecError, runExec } from "../shared/exec_client.ts";
import { httpRequest, unwrapEnvelope } from "../shared/http/mod.ts";
import type { InstanceExecControl, InstanceState } from "../shared/instance_api.ts";
import { connectUnix } from "../shared/vsock/mod.ts";
import type { AgentCommand, ExecCommand, FileCommand } from "./agent_cli.ts";
import {
  pullPath,
  type PushEntry,
  pushPath,
  type RemoteEntry,
  sftpErrorStatus,
} from "./agent_files.ts";
import { openSftp, SftpStatusError } from "../shared/sftp/client.ts";
import { dialAgent } from "./agent_proxy.ts";
import { CommandError, connectDaemon, openRegistryOffline } from "./commands.ts";
import { statePaths } from "./state_dir.ts";

/** The console, signals and environment an agent command may use. */
export interface AgentCommandIO {
  stdout: (bytes: Uint8Array) => void | Promise<void>;
  stderr: (bytes: Uint8Array) => void | Promise<void>;
  stdin?: AsyncIterable<Uint8Array>;
  stdinIsTerminal?: boolean;
  stdoutIsTerminal?: boolean;
  /** Puts the local terminal in raw mode (true) or back (false). */
  setRaw?: (raw: boolean) => void;
  /** The local terminal's size. */
  consoleSize?: () => { columns: number; rows: number } | undefined;
  /** Calls `handler` on SIGWINCH; returns the remover. */
  onResize?: (handler: () => void) => () => void;
  /** Calls `handler` with the number of each forwarded signal this process gets; returns the remover. */
  onSignal?: (handler: (signal: number) => void) => () => void;
  /** The effective uid (`file pull` keeps the owner only as root). */
  uid?: number;
  /** Local environment (TERM is passed on, as `lxc exec` does). */
  env?: Record<string, string | undefined>;
  signal?: AbortSignal;
}

/** How to reach one instance's agent API. */
interface AgentAccess {
  dial: () => Promise<Duplex>;
  prefix: string;
}

async function agentAccess(stateDir: string, name: string): Promise<AgentAccess> {
  const paths = statePaths(stateDir);
  const daemon = await connectDaemon(paths.adminSocket);
  if (daemon !== undefined) {
    const response = await daemon.fetch(`/1.0/instances/${encodeURIComponent(name)}`);
    const answer = unwrapEnvelope(await response.json());
    if (!answer.ok) throw new CommandError(answer.error);
    return {
      dial: () => connectUnix(paths.adminSocket, { timeout: 3000 }),
      prefix: `/1.0/instances/${encodeURIComponent(name)}/agent`,
    };
  }
  const registry = openRegistryOffline(paths);
  try {
    const instance = registry.get(name);
    if (instance === undefined) throw new CommandError(`Instance "${name}" not found`);
    return { dial: () => dialAgent(instance), prefix: "" };
  } finally {
    registry.close();
  }
}

/** One request to the agent API; its metadata, or a CommandError with the agent's message. */
async function agentGet(access: AgentAccess, path: string): Promise<unknown> {
  const socket = await access.dial();
  const response = await httpRequest(socket, new Request(`http://agent${access.prefix}${path}`), {
    timeout: 10_000,
  });
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new CommandError(`The agent answered ${path} with HTTP ${response.status}, not JSON`);
  }
  const answer = unwrapEnvelope(parsed);
  if (!answer.ok) throw new CommandError(answer.error);
  return answer.metadata;
}

/** The instance's state from its agent. */
export async function fetchState(stateDir: string, name: string): Promise<InstanceState> {
  return await agentGet(await agentAccess(stateDir, name), "/1.0/state") as InstanceState;
}

function bytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(2)} ${units[unit]}`;
}

/**
 * The IPv4 addresses `lxc list` shows: global ones of non-loopback interfaces,
 * as `ADDRESS (IFACE)`, in its (reverse-sorted) order.
 */
export function ipv4Addresses(state: Pick<InstanceState, "network">): string[] {
  const out: string[] = [];
  for (const [name, net] of Object.entries(state.network ?? {})) {
    if (net.type === "loopback") continue;
    for (const address of net.addresses) {
      if (address.scope === "link" || address.scope === "local") continue;
      if (address.family === "inet") out.push(`${address.address} (${name})`);
    }
  }
  return out.sort().reverse();
}

/**
 * The first IPv4 address (`lxc list`'s first line) of each instance whose
 * agent answers within `timeout`, asked through the daemon's admin API
 * (`fetch`), at most 8 at a time; instances that do not answer are left out.
 */
export async function firstIpv4ByInstance(
  fetch: (path: string, init?: RequestInit) => Promise<Response>,
  names: string[],
  timeout = 1500,
): Promise<Map<string, string>> {
  const result = new Map<string, string>();
  const queue = [...names];
  const worker = async () => {
    for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
      try {
        const response = await fetch(
          `/1.0/instances/${encodeURIComponent(name)}/agent/1.0/state`,
          { signal: AbortSignal.timeout(timeout) },
        );
        const answer = unwrapEnvelope(await response.json());
        if (!answer.ok) continue;
        const first = ipv4Addresses(answer.metadata as InstanceState)[0];
        if (first !== undefined) result.set(name, first);
      } catch {
        // Not answering: no address to show.
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(8, names.length) }, worker));
  return result;
}

/** The `state` text: processes, CPU, memory, disk and every interface with its addresses. */
export function formatState(name: string, state: InstanceState): string {
  const lines = [
    `Name:       ${name}`,
    `Processes:  ${state.processes}`,
    `CPU usage:  ${state.cpu.usage < 0 ? "unknown" : `${(state.cpu.usage / 1e9).toFixed(2)} s`}`,
    `Memory:     ${bytes(state.memory.usage)}` +
    (state.memory.usage_peak > 0 ? ` (peak ${bytes(state.memory.usage_peak)})` : ""),
    `Swap:       ${bytes(state.memory.swap_usage)}`,
  ];
  for (const [disk, usage] of Object.entries(state.disk ?? {})) {
    lines.push(`Disk ${disk}: ${bytes(usage.usage)}`);
  }
  lines.push("Network:");
  for (const [iface, net] of Object.entries(state.network ?? {}).sort()) {
    lines.push(
      `  ${iface}: ${net.type}, ${net.state}, mtu ${net.mtu}${
        net.hwaddr ? `, ${net.hwaddr}` : ""
      }` +
        (net.host_name ? `, host ${net.host_name}` : ""),
    );
    for (const a of net.addresses) {
      lines.push(`    ${a.family} ${a.address}/${a.netmask} ${a.scope}`);
    }
    const c = net.counters;
    lines.push(
      `    received ${bytes(c.bytes_received)} (${c.packets_received} packets), sent ${
        bytes(c.bytes_sent)
      } (${c.packets_sent} packets)`,
    );
  }
  return lines.join("\n") + "\n";
}

async function runExecCommand(command: ExecCommand, io: AgentCommandIO): Promise<number> {
  const access = await agentAccess(command.stateDir, command.name);
  const interactive = command.mode === "interactive" ||
    (command.mode === "auto" && io.stdinIsTerminal === true && io.stdoutIsTerminal === true);
  const environment = { ...command.env };
  const term = io.env?.TERM;
  if (term !== undefined && environment.TERM === undefined) environment.TERM = term;
  const size = interactive ? io.consoleSize?.() : undefined;
  const removers: (() => void)[] = [];
  let rawMode = false;
  try {
    if (interactive && io.stdinIsTerminal && io.setRaw) {
      io.setRaw(true);
      rawMode = true;
    }
    const result = await runExec(
      {
        command: command.command,
        interactive,
        environment,
        width: size?.columns ?? 0,
        height: size?.rows ?? 0,
        user: command.user ?? 0,
        group: command.group ?? 0,
        cwd: command.cwd ?? "",
      },
      {
        dial: access.dial,
        prefix: access.prefix,
        stdin: io.stdin,
        stdout: io.stdout,
        stderr: io.stderr,
        signal: io.signal,
        onControl: (send: (message: InstanceExecControl) => Promise<boolean>) => {
          if (interactive && io.onResize && io.consoleSize) {
            removers.push(io.onResize(() => {
              const now = io.consoleSize!();
              if (now === undefined) return;
              send({
                command: "window-resize",
                args: { width: String(now.columns), height: String(now.rows) },
              });
            }));
          }
          // As lxc exec, in both modes: signals this process gets go to the command.
          if (io.onSignal) {
            removers.push(io.onSignal((signal) => void send({ command: "signal", signal })));
          }
        },
      },
    );
    return result.status < 0 || result.status > 255 ? 255 : result.status;
  } catch (error) {
    if (error instanceof ExecError) throw new CommandError(error.message);
    throw error;
  } finally {
    for (const remove of removers) remove();
    if (rawMode) io.setRaw!(false);
  }
}

function basename(path: string): string {
  const parts = path.split("/").filter((p) => p !== "");
  return parts[parts.length - 1] ?? "";
}

/** The remote entry at `path`, through the daemon's files API or straight through SFTP. */
async function pullRemote(access: AgentAccess, name: string, path: string): Promise<RemoteEntry> {
  if (access.prefix === "") {
    const client = await openSftp(await access.dial());
    try {
      return await pullPath(client, path);
    } finally {
      client.close();
    }
  }
  const socket = await access.dial();
  const response = await httpRequest(
    socket,
    new Request(
      `http://lxd-vsock-host/1.0/instances/${encodeURIComponent(name)}/files?path=${
        encodeURIComponent(path)
      }`,
    ),
    { timeout: 30_000 },
  );
  const body = new Uint8Array(await response.arrayBuffer());
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try {
      message = JSON.parse(new TextDecoder().decode(body)).error ?? message;
    } catch {
      // not the envelope
    }
    throw new CommandError(message);
  }
  const type = response.headers.get("x-lxd-type") as RemoteEntry["type"];
  const entry: RemoteEntry = {
    type,
    uid: Number(response.headers.get("x-lxd-uid")),
    gid: Number(response.headers.get("x-lxd-gid")),
    mode: parseInt(response.headers.get("x-lxd-mode") ?? "644", 8),
  };
  if (type === "file") entry.content = body;
  else if (type === "symlink") entry.target = new TextDecoder().decode(body);
  else entry.entries = JSON.parse(new TextDecoder().decode(body)).metadata;
  return entry;
}

async function pushRemote(
  access: AgentAccess,
  name: string,
  path: string,
  entry: PushEntry,
): Promise<void> {
  if (access.prefix === "") {
    const client = await openSftp(await access.dial());
    try {
      return await pushPath(client, path, entry);
    } finally {
      client.close();
    }
  }
  const headers: Record<string, string> = { "X-LXD-type": entry.type };
  if (entry.mode !== undefined) headers["X-LXD-mode"] = entry.mode.toString(8).padStart(4, "0");
  if (entry.uid !== undefined) headers["X-LXD-uid"] = String(entry.uid);
  if (entry.gid !== undefined) headers["X-LXD-gid"] = String(entry.gid);
  const body = entry.type === "symlink"
    ? new TextEncoder().encode(entry.target)
    : entry.content ?? new Uint8Array(0);
  const response = await httpRequest(
    await access.dial(),
    new Request(
      `http://lxd-vsock-host/1.0/instances/${encodeURIComponent(name)}/files?path=${
        encodeURIComponent(path)
      }`,
      { method: "POST", headers, body: body as Uint8Array<ArrayBuffer> },
    ),
    { timeout: 60_000 },
  );
  const answer = unwrapEnvelope(await response.json());
  if (!answer.ok) throw new CommandError(answer.error);
}

async function runFileCommand(command: FileCommand, uid: number | undefined): Promise<number> {
  const access = await agentAccess(command.stateDir, command.name);
  try {
    if (command.kind === "file-push") {
      const info = await Deno.lstat(command.local);
      const path = command.path.endsWith("/")
        ? command.path + basename(command.local)
        : command.path;
      const entry: PushEntry = info.isSymlink
        ? { type: "symlink", target: await Deno.readLink(command.local) }
        : info.isFile
        ? { type: "file", content: await Deno.readFile(command.local) }
        : (() => {
          throw new CommandError(`${command.local} is not a file or a symlink`);
        })();
      entry.mode = command.mode ?? (info.mode ?? 0o644) & 0o7777;
      entry.uid = command.uid ?? info.uid ?? undefined;
      entry.gid = command.gid ?? info.gid ?? undefined;
      await pushRemote(access, command.name, path, entry);
      return 0;
    }
    const entry = await pullRemote(access, command.name, command.path);
    let local = command.local;
    try {
      if (local.endsWith("/") || (await Deno.stat(local)).isDirectory) {
        local = `${local.replace(/\/+$/, "")}/${basename(command.path)}`;
      }
    } catch {
      // A new file.
    }
    if (entry.type === "directory") {
      throw new CommandError(`${command.name}${command.path} is a directory`);
    }
    if (entry.type === "symlink") {
      await Deno.remove(local).catch(() => {});
      await Deno.symlink(entry.target!, local);
      return 0;
    }
    await Deno.writeFile(local, entry.content!, { mode: entry.mode });
    await Deno.chmod(local, entry.mode);
    if (uid === 0) await Deno.chown(local, entry.uid, entry.gid);
    return 0;
  } catch (error) {
    if (error instanceof SftpStatusError) {
      throw new CommandError(sftpErrorStatus(error) === 404 ? "Not Found" : error.message);
    }
    throw error;
  }
}

/** Runs `exec`, `state` or `file`; resolves with the exit status. Throws CommandError on failure. */
export async function runAgentCommand(command: AgentCommand, io: AgentCommandIO): Promise<number> {
  const encoder = new TextEncoder();
  switch (command.kind) {
    case "exec":
      return await runExecCommand(command, io);
    case "state": {
      const state = await fetchState(command.stateDir, command.name);
      await io.stdout(
        encoder.encode(
          command.format === "json"
            ? JSON.stringify(state, null, 2) + "\n"
            : formatState(command.name, state),
        ),
      );
      return 0;
    }
    case "file-push":
    case "file-pull":
      return await runFileCommand(command, io.uid);
  }
}

/**
 * Runs the registry commands of the CLI (`instance`, `config`, `device`,
 * `status`, `events`): through the running daemon's admin socket when it
 * answers, else directly on the store with the same admin app in-process.
 * Output goes to the writers the caller passes (only `main.ts` owns the
 * console). Needs read/write on the state directory and net (unix sockets).
 * @module
 */

import { resolve } from "node:path";
import { httpRequest, unwrapEnvelope } from "../shared/http/mod.ts";
import { connectUnix, randomPort } from "../shared/vsock/mod.ts";
import { createAdminApp, type DaemonStatus } from "./admin_app.ts";
import { firstIpv4ByInstance } from "./agent_commands.ts";
import type { Command } from "./cli.ts";
import { ensureServerCertificate, generateInstanceKeyPair } from "./certificates.ts";
import { InstanceService, type PublicInstance } from "./instance_service.ts";
import { type ChannelReading, readStatusChannel } from "./monitor/status_watcher.ts";
import { Registry } from "./registry.ts";
import { RegistryError } from "./registry_error.ts";
import {
  checkOwner,
  OwnershipError,
  prepareStateDir,
  type StatePaths,
  statePaths,
} from "./state_dir.ts";
import { VERSION } from "./version.ts";

export interface CommandIO {
  stdout: (text: string) => void;
  stderr: (text: string) => void;
  /** Ends `events`. */
  signal?: AbortSignal;
}

/** A failed command: the message is printed, exit status 1. */
export class CommandError extends Error {
  override name = "CommandError";
}

/** Sends admin API requests somewhere: the daemon's socket or an in-process app. */
interface AdminConnection extends AsyncDisposable {
  daemon: boolean;
  fetch(path: string, init?: RequestInit): Promise<Response>;
}

export async function connectDaemon(socketPath: string): Promise<AdminConnection | undefined> {
  try {
    const info = await Deno.lstat(socketPath);
    if (!info.isSocket) return undefined;
  } catch {
    return undefined;
  }
  // Before a byte goes to it: a socket another user put there could read our traffic.
  try {
    await checkOwner(socketPath, "to talk to", "Refusing");
  } catch (error) {
    if (error instanceof OwnershipError) throw new CommandError(error.message);
    throw error;
  }
  // One connection per request with the project's client (Deno's fetch over a
  // unix-socket HttpClient was seen to stall for seconds on a reused connection).
  const connection: AdminConnection = {
    daemon: true,
    fetch: async (path, init) => {
      const socket = await connectUnix(socketPath, {
        timeout: 3000,
        signal: init?.signal ?? undefined,
      });
      return await httpRequest(socket, new Request(`http://lxd-vsock-host${path}`, init), {
        timeout: 30_000,
        signal: init?.signal ?? undefined,
      });
    },
    [Symbol.asyncDispose]: () => Promise.resolve(),
  };
  try {
    const response = await connection.fetch("/1.0");
    await response.body?.cancel();
    return connection;
  } catch {
    return undefined;
  }
}

/**
 * Opens the registry for a command run without the daemon; a registry the
 * daemon holds (locked) while its admin socket does not answer → CommandError.
 */
export function openRegistryOffline(paths: StatePaths): Registry {
  try {
    return Registry.open(paths.registry);
  } catch (error) {
    if (error instanceof RegistryError && error.code === "LOCKED") {
      throw new CommandError(
        `The daemon holds ${paths.dir} but its admin socket ${paths.adminSocket} does not answer; ` +
          "is it still starting or stuck?",
      );
    }
    throw error;
  }
}

async function openLocal(stateDir: string): Promise<AdminConnection> {
  const paths = await prepareStateDir(stateDir);
  const registry = openRegistryOffline(paths);
  try {
    const { cert } = await ensureServerCertificate(paths);
    const service = new InstanceService({
      registry,
      paths,
      serverCert: cert,
      // A drive written before the daemon ever ran names the port it will use
      // (it listens on the registry's port when free, and rewrites drives if not).
      port: () => {
        let port = Number(registry.getMeta("port") ?? 0);
        if (!(port > 0)) {
          port = randomPort();
          registry.setMeta("port", String(port));
        }
        return port;
      },
      generateKeyPair: generateInstanceKeyPair,
    });
    const app = createAdminApp({
      service,
      status: () => ({
        running: false,
        version: VERSION,
        stateDir: paths.dir,
        instances: registry.size,
      }),
    });
    return {
      daemon: false,
      fetch: async (path, init) => await app.request(path, init),
      [Symbol.asyncDispose]: () => Promise.resolve(registry.close()),
    };
  } catch (error) {
    registry.close();
    throw error;
  }
}

async function call(
  admin: AdminConnection,
  method: string,
  path: string,
  body?: unknown,
): Promise<unknown> {
  const response = await admin.fetch(path, {
    method,
    body: body === undefined ? undefined : JSON.stringify(body),
    headers: body === undefined ? undefined : { "content-type": "application/json" },
  });
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new CommandError(`Unexpected answer from the admin API (HTTP ${response.status})`);
  }
  const result = unwrapEnvelope(parsed);
  if (!result.ok) throw new CommandError(result.error);
  return result.metadata;
}

/** What the admin API's `wait` long poll answers. */
interface WaitView {
  reached: boolean;
  agentState: string;
  ready: boolean;
}

/** `1500` → `1.5s`, `60000` → `60s`, `250` → `250ms`. */
function formatDuration(ms: number): string {
  return ms < 1000 ? `${ms}ms` : `${ms / 1000}s`;
}

function enc(s: string): string {
  return encodeURIComponent(s);
}

/** Formats rows as aligned columns. */
export function formatTable(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join("  ").trimEnd();
  return [line(header), ...rows.map(line)].join("\n") + "\n";
}

function channel(instance: PublicInstance): string {
  const s = instance.status;
  switch (s.kind) {
    case "qmp":
      return `qmp:${s.path}#${s.chardev}`;
    case "socket":
    case "file":
      return `${s.kind}:${s.path}`;
    default:
      return "none";
  }
}

/** The `instance list` table. */
export function formatInstances(
  instances: PublicInstance[],
  ipv4: Map<string, string> = new Map(),
): string {
  return formatTable(
    ["NAME", "CID", "TRANSPORT", "AGENT", "READY", "LAST SEEN", "STATUS CHANNEL", "IPV4"],
    instances.map((i) => [
      i.name,
      String(i.cid),
      i.hybrid === undefined ? "vsock" : `hybrid:${i.hybrid}`,
      i.runtime.agentState,
      i.runtime.ready ? "yes" : "no",
      i.runtime.lastSeen ?? "-",
      channel(i),
      ipv4.get(i.name) ?? "-",
    ]),
  );
}

/** The `status` text. */
export function formatStatus(status: DaemonStatus): string {
  if (!status.running) {
    return `daemon: not running\nstate dir: ${status.stateDir}\ninstances: ${
      status.instances ?? 0
    }\n`;
  }
  let text =
    `daemon: running (pid ${status.pid}, version ${status.version}, since ${status.startedAt})\n` +
    `state dir: ${status.stateDir}\n` +
    `transport: ${status.transport}\n`;
  if (status.vsock) {
    text += `vsock: listening on CID ${status.vsock.cid} port ${status.vsock.port}\n`;
  }
  text += `port: ${status.port}\ninstances: ${status.instances}\n`;
  for (const [name, path] of Object.entries(status.hybridListeners ?? {})) {
    text += `hybrid listener: ${name} ${path}\n`;
  }
  for (const [peer, n] of Object.entries(status.connections ?? {})) {
    text += `connections: ${peer} ${n}\n`;
  }
  if (status.monitor && status.monitor.length > 0) {
    text += "\n" + formatTable(
      ["INSTANCE", "CHANNEL", "UP", "AGENT", "LAST ANNOUNCE", "PORT", "QUEUED", "LAST ERROR"],
      status.monitor.map((m) => [
        m.name,
        m.channel,
        m.channelStalled ? "stalled" : m.channelUp ? "yes" : "no",
        m.agentState,
        m.lastAnnounce ?? "-",
        m.announcedPort === undefined ? "-" : String(m.announcedPort),
        String(m.queuedEvents),
        m.lastError ?? "",
      ]),
    );
  }
  return text;
}

/** The `status NAME` text. */
export function formatInstanceStatus(view: {
  instance: string;
  running: boolean;
  runtime: PublicInstance["runtime"];
  monitor?: NonNullable<DaemonStatus["monitor"]>[number];
  reading?: ChannelReading;
}): string {
  const r = view.runtime;
  let text = `instance: ${view.instance}\n` +
    `agent: ${r.agentState}${r.lastChange ? ` (since ${r.lastChange})` : ""}\n` +
    `ready: ${r.ready ? "yes" : "no"}\n` +
    `last seen: ${r.lastSeen ?? "-"}\n`;
  if (r.lastError) text += `last error: ${r.lastError}\n`;
  if (view.monitor) {
    const m = view.monitor;
    const stalled = m.channelStalled
      ? `, stalled since ${m.channelStalled}: the guest does not read it`
      : "";
    text += `channel: ${m.channel} (${m.channelUp ? "up" : "down"}${stalled})\n` +
      `last announce: ${m.lastAnnounce ?? "-"}${
        m.announcedPort ? ` (port ${m.announcedPort})` : ""
      }\n` +
      `queued events: ${m.queuedEvents}\n`;
  } else if (view.reading) {
    const c = view.reading;
    text += `channel: ${c.kind}, read once: ${c.state ?? "-"}${c.note ? ` (${c.note})` : ""}\n`;
  } else if (view.running) {
    text += "channel: not watched (daemon runs with --no-monitor)\n";
  }
  return text;
}

/** Runs a registry command. Throws CommandError (or a registry error) on failure. */
export async function runCommand(command: Command, io: CommandIO): Promise<void> {
  if (command.kind === "help" || command.kind === "version" || command.kind === "daemon") {
    throw new TypeError(`runCommand() does not run "${command.kind}"`);
  }
  const paths = statePaths(command.stateDir);
  await using admin = await connectDaemon(paths.adminSocket) ?? await openLocal(command.stateDir);
  const inst = (name: string) => `/1.0/instances/${enc(name)}`;
  switch (command.kind) {
    case "instance-add": {
      const body = {
        name: command.name,
        cid: command.cid,
        status: command.status,
        hybrid: command.hybrid,
        config: command.config,
        // The daemon's working directory is not ours.
        configDrive: command.configDrive === undefined ? undefined : resolve(command.configDrive),
      };
      const result = await call(admin, "POST", "/1.0/instances", body) as {
        instance: PublicInstance;
        configDrive: string;
      };
      if (command.format === "json") io.stdout(JSON.stringify(result, null, 2) + "\n");
      else {
        io.stdout(
          `Instance ${result.instance.name} added (CID ${result.instance.cid}); config drive: ${result.configDrive}\n`,
        );
      }
      return;
    }
    case "instance-list": {
      const list = await call(admin, "GET", "/1.0/instances") as PublicInstance[];
      // The address column asks each VM's agent (through the daemon), as `lxc list` does.
      const ipv4 = command.format === "json" || !admin.daemon
        ? undefined
        : await firstIpv4ByInstance(admin.fetch, list.map((i) => i.name));
      io.stdout(
        command.format === "json"
          ? JSON.stringify(list, null, 2) + "\n"
          : formatInstances(list, ipv4),
      );
      return;
    }
    case "instance-show":
      io.stdout(JSON.stringify(await call(admin, "GET", inst(command.name)), null, 2) + "\n");
      return;
    case "instance-remove": {
      const removed = await call(admin, "DELETE", inst(command.name)) as {
        configDrive?: string;
        driveKept?: string;
      } | null;
      io.stdout(`Instance ${command.name} removed\n`);
      if (removed?.configDrive !== undefined) {
        io.stdout(
          removed.driveKept === undefined
            ? `config drive ${removed.configDrive} removed\n`
            : `config drive ${removed.configDrive} not removed: ${removed.driveKept}\n`,
        );
      }
      return;
    }
    case "config-set":
      await call(admin, "PUT", `${inst(command.name)}/config/${enc(command.key)}`, {
        value: command.value,
      });
      return;
    case "config-unset":
      await call(admin, "DELETE", `${inst(command.name)}/config/${enc(command.key)}`);
      return;
    case "config-get":
      io.stdout(
        String(await call(admin, "GET", `${inst(command.name)}/config/${enc(command.key)}`)) + "\n",
      );
      return;
    case "device-add":
      await call(admin, "POST", `${inst(command.name)}/devices`, {
        name: command.device,
        config: command.config,
      });
      io.stdout(`Device ${command.device} added to ${command.name}\n`);
      return;
    case "device-remove":
      await call(admin, "DELETE", `${inst(command.name)}/devices/${enc(command.device)}`);
      io.stdout(`Device ${command.device} removed from ${command.name}\n`);
      return;
    case "status": {
      const status = await call(admin, "GET", "/1.0") as DaemonStatus;
      if (command.name !== undefined) {
        const instance = await call(admin, "GET", inst(command.name)) as PublicInstance;
        const monitor = status.monitor?.find((m) => m.name === command.name);
        // Without a daemon, read the channel once ourselves (nobody else consumes it).
        const reading = status.running
          ? undefined
          : await readStatusChannel(instance.status, { timeout: 3000 });
        const view = {
          instance: command.name,
          running: status.running,
          runtime: instance.runtime,
          monitor,
          reading,
        };
        io.stdout(
          command.format === "json"
            ? JSON.stringify(view, null, 2) + "\n"
            : formatInstanceStatus(view),
        );
        return;
      }
      io.stdout(
        command.format === "json" ? JSON.stringify(status, null, 2) + "\n" : formatStatus(status),
      );
      return;
    }
    case "wait": {
      const deadline = Date.now() + command.timeout;
      const describe = (v: WaitView) => `agent ${v.agentState}, ready ${v.ready ? "yes" : "no"}`;
      for (;;) {
        // Long polls of at most 20 s each, below the admin client's 30 s bound.
        const left = Math.max(0, Math.min(deadline - Date.now(), 20_000));
        const view = await call(
          admin,
          "GET",
          `${inst(command.name)}/wait?for=${command.for}&timeout=${left}`,
        ) as WaitView;
        if (view.reached) {
          io.stdout(`${command.name}: ${command.for} (${describe(view)})\n`);
          return;
        }
        if (!admin.daemon) {
          throw new CommandError(
            `The daemon is not running: ${command.name} is not ${command.for} (${describe(view)})`,
          );
        }
        if (Date.now() >= deadline) {
          throw new CommandError(
            `Timed out after ${
              formatDuration(command.timeout)
            } waiting for ${command.name} to be ${command.for}; it is: ${describe(view)}`,
          );
        }
      }
    }
    case "events": {
      if (!admin.daemon) throw new CommandError("The daemon is not running: no events to follow");
      const response = await admin.fetch("/1.0/events", { signal: io.signal });
      if (!response.ok || !response.body) {
        throw new CommandError(`Cannot follow events (HTTP ${response.status})`);
      }
      try {
        for await (const chunk of response.body.pipeThrough(new TextDecoderStream())) {
          io.stdout(chunk);
        }
      } catch (error) {
        if (!io.signal?.aborted) throw error;
      }
      return;
    }
  }
}

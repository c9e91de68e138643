/**
 * The config drive directory an instance's VM image consumes, in LXD's
 * layout (what `lxd-agent-setup` and our agent read): `agent.crt`,
 * `agent.key`, `server.crt` (the host's per-instance client certificate) and
 * `agent.conf` (the JSON body of `PUT /1.0`). The directory is 0700, every
 * file 0600 and written atomically (temporary file, fsync, rename).
 * Needs read/write permission on the directory.
 * @module
 */

import { basename, dirname, join, resolve } from "node:path";
import { type ConnectionInfo, HOST_CID, parseConnectionInfo } from "../shared/api.ts";
import { writeFileAtomic } from "../shared/write_file_atomic.ts";

/** What goes on a config drive. */
export interface ConfigDrive {
  /** The agent's certificate and key (PEM). */
  agentCert: string;
  agentKey: string;
  /** The host's per-instance client certificate, `server.crt` on the drive. */
  clientCert: string;
  /** Contents of `agent.conf`; `port` 0 means "host not running yet". */
  info: ConnectionInfo;
}

/** The `agent.conf` content for a host certificate and port (0 when unknown). */
export function agentConf(serverCert: string, port: number): ConnectionInfo {
  return { cid: HOST_CID, port, certificate: serverCert, devlxd: true };
}

/** Writes a config drive into `dir` (created 0700 if needed). */
export async function writeConfigDrive(dir: string, drive: ConfigDrive): Promise<void> {
  await Deno.mkdir(dir, { recursive: true, mode: 0o700 });
  await Deno.chmod(dir, 0o700);
  await writeFileAtomic(join(dir, "agent.crt"), drive.agentCert);
  await writeFileAtomic(join(dir, "agent.key"), drive.agentKey);
  await writeFileAtomic(join(dir, "server.crt"), drive.clientCert);
  await writeFileAtomic(join(dir, "agent.conf"), JSON.stringify(drive.info) + "\n");
}

/**
 * Reads a config drive back. `agent.conf` with port 0 (written before the
 * daemon first ran) is returned as is, without validating the port.
 */
export async function readConfigDrive(dir: string): Promise<ConfigDrive> {
  const read = (name: string) => Deno.readTextFile(join(dir, name));
  const raw = JSON.parse(await read("agent.conf"));
  const info = raw?.port === 0
    ? { ...parseConnectionInfo({ ...raw, port: 1 }), port: 0 }
    : parseConnectionInfo(raw);
  return {
    agentCert: await read("agent.crt"),
    agentKey: await read("agent.key"),
    clientCert: await read("server.crt"),
    info,
  };
}

/** The files a config drive holds (what {@linkcode removeConfigDrive} deletes). */
export const DRIVE_FILES = ["agent.crt", "agent.key", "server.crt", "agent.conf"] as const;

/**
 * `path` made absolute with symlinks resolved, for a path that may not exist
 * yet (its nearest existing ancestor is resolved, the rest appended).
 */
export async function canonicalPath(path: string): Promise<string> {
  const absolute = resolve(path);
  const rest: string[] = [];
  let at = absolute;
  for (;;) {
    try {
      return join(await Deno.realPath(at), ...rest.reverse());
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound) || at === "/") throw error;
      rest.push(basename(at));
      at = dirname(at);
    }
  }
}

/** Whether `inner` is `outer` or lies inside it (both canonical). */
export function isWithin(inner: string, outer: string): boolean {
  return inner === outer || inner.startsWith(outer.endsWith("/") ? outer : outer + "/");
}

/**
 * Throws a TypeError unless `dir` can take a new config drive: it does not
 * exist yet, or is an empty directory (not a symlink).
 */
export async function checkNewDriveDir(dir: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(dir);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  if (!info.isDirectory) {
    throw new TypeError(`Invalid config drive ${dir}: it exists and is not a directory`);
  }
  for await (const _ of Deno.readDir(dir)) {
    throw new TypeError(
      `Invalid config drive ${dir}: the directory is not empty (use a new or empty directory)`,
    );
  }
}

/**
 * Deletes a config drive: its four files (and leftover temporary files),
 * then the directory if that leaves it empty. Resolves to undefined when the
 * directory is gone, else to why it was kept.
 */
export async function removeConfigDrive(dir: string): Promise<string | undefined> {
  try {
    for await (const entry of Deno.readDir(dir)) {
      const ours = (DRIVE_FILES as readonly string[]).includes(entry.name) ||
        DRIVE_FILES.some((f) => entry.name.startsWith(`${f}.tmp-`));
      if (ours && entry.isFile) await Deno.remove(join(dir, entry.name));
    }
    await Deno.remove(dir);
    return undefined;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    return error instanceof Error && /not empty/i.test(error.message)
      ? "it holds files that are not the drive's; left in place"
      : `${(error as Error).message ?? error}`;
  }
}

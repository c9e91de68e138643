/**
 * The config drive directory an instance's VM image consumes, in LXD's
 * layout (what `lxd-agent-setup` and our agent read): `agent.crt`,
 * `agent.key`, `server.crt` (the host's per-instance client certificate) and
 * `agent.conf` (the JSON body of `PUT /1.0`). The directory is 0700, every
 * file 0600 and written atomically (temporary file, fsync, rename).
 * Needs read/write permission on the directory.
 * @module
 */

import { join } from "node:path";
import { type ConnectionInfo, HOST_CID, parseConnectionInfo } from "../shared/api.ts";

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

/** Writes `text` to `path` atomically with mode 0600. */
export async function writeFileAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp-${crypto.randomUUID()}`;
  try {
    using file = await Deno.open(tmp, { write: true, createNew: true, mode: 0o600 });
    const data = new TextEncoder().encode(text);
    let written = 0;
    while (written < data.length) written += await file.write(data.subarray(written));
    await file.sync();
  } catch (error) {
    await Deno.remove(tmp).catch(() => {});
    throw error;
  }
  await Deno.rename(tmp, path);
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

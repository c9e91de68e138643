/**
 * Files of a VM through its agent's SFTP server (`GET /1.0/sftp` upgraded, as
 * LXD 5.0.2's `lxc file` reaches lxd-agent; our agent serves the same):
 * {@linkcode pullPath} and {@linkcode pushPath} on an `SftpClient`, and the
 * admin API's `GET|POST /1.0/instances/{name}/files?path=…`, shaped like
 * LXD's (`lxd/instance_file.go`): a file's content with `X-LXD-uid`,
 * `X-LXD-gid`, `X-LXD-mode` (4 octal digits) and `X-LXD-type`
 * (`file`, `directory` with a JSON list of names, `symlink` with its target);
 * `POST` takes the same headers (`X-LXD-type` defaults to `file`) and writes,
 * then sets the mode and, when given, the owner — what `file push` needs
 * behind the daemon (the admin server cannot hand a raw upgraded connection
 * through). Bodies through the admin API are limited to 256 MiB.
 *
 * Owns: one SFTP session per admin request, closed when it is answered.
 * Needs no permissions of its own.
 * @module
 */

import type { Hono } from "hono";
import type { Duplex } from "node:stream";
import { errorResponse, syncResponse } from "../shared/http/mod.ts";
import { FX } from "../shared/sftp/codec.ts";
import { openSftp, type SftpClient, SftpStatusError } from "../shared/sftp/client.ts";

/** What a path in the VM is. */
export interface RemoteEntry {
  type: "file" | "directory" | "symlink";
  uid: number;
  gid: number;
  /** Permission bits (and setuid/setgid/sticky). */
  mode: number;
  /** A file's content. */
  content?: Uint8Array;
  /** A symlink's target. */
  target?: string;
  /** A directory's entry names. */
  entries?: string[];
}

/** The entry at `path`, with a file's content (at most `max` bytes). */
export async function pullPath(
  client: SftpClient,
  path: string,
  max?: number,
): Promise<RemoteEntry> {
  const attrs = await client.lstat(path);
  const format = (attrs.permissions ?? 0) & 0o170000;
  const base = {
    uid: attrs.uid ?? 0,
    gid: attrs.gid ?? 0,
    mode: (attrs.permissions ?? 0) & 0o7777,
  };
  if (format === 0o040000) {
    const entries = (await client.readdir(path)).map((e) => e.name).sort();
    return { ...base, type: "directory", entries };
  }
  if (format === 0o120000) return { ...base, type: "symlink", target: await client.readlink(path) };
  if (format !== 0o100000) throw new SftpStatusError(FX.FAILURE, `Bad file type of ${path}`);
  return { ...base, type: "file", content: await client.readFile(path, max) };
}

/** What {@linkcode pushPath} writes. */
export interface PushEntry {
  type: "file" | "directory" | "symlink";
  content?: Uint8Array;
  target?: string;
  mode?: number;
  uid?: number;
  gid?: number;
}

/** Writes `entry` at `path`, then sets its mode and (when both are given) its owner. */
export async function pushPath(client: SftpClient, path: string, entry: PushEntry): Promise<void> {
  const mode = entry.mode ?? (entry.type === "directory" ? 0o755 : 0o644);
  if (entry.type === "symlink") {
    if (entry.target === undefined) throw new TypeError("A symlink needs a target");
    await client.symlink(entry.target, path);
  } else if (entry.type === "directory") {
    try {
      await client.mkdir(path, mode);
    } catch (error) {
      const exists = await client.lstat(path).then(
        (a) => ((a.permissions ?? 0) & 0o170000) === 0o040000,
        () => false,
      );
      if (!exists) throw error;
    }
    await client.chmod(path, mode);
  } else {
    await client.writeFile(path, entry.content ?? new Uint8Array(0), mode);
    await client.chmod(path, mode);
  }
  if (entry.uid !== undefined && entry.gid !== undefined && entry.type !== "symlink") {
    await client.chown(path, entry.uid, entry.gid);
  }
}

/** The HTTP status of an SFTP failure (NO_SUCH_FILE → 404, PERMISSION_DENIED → 403). */
export function sftpErrorStatus(error: unknown): number {
  if (error instanceof SftpStatusError) {
    if (error.code === FX.NO_SUCH_FILE) return 404;
    if (error.code === FX.PERMISSION_DENIED) return 403;
  }
  return 500;
}

/** The admin API's answer to an SFTP failure: LXD's generic "Not Found"/"Forbidden", else the message. */
function sftpErrorResponse(error: unknown): Response {
  const status = sftpErrorStatus(error);
  const message = status === 404
    ? "Not Found"
    : status === 403
    ? "Forbidden"
    : (error as Error).message;
  return errorResponse(status, message);
}

const MAX_BODY = 256 * 1024 * 1024;

function id(value: string | undefined): number | undefined {
  if (value === undefined || value === "" || value === "-1") return undefined;
  if (!/^\d+$/.test(value)) throw new TypeError(`Invalid id "${value}"`);
  return Number(value);
}

/** Adds `GET|POST /1.0/instances/{name}/files?path=` to the admin app. */
export function mountFileRoutes(
  app: Hono,
  options: { dial: (name: string) => Promise<Duplex> },
): void {
  const session = async (name: string) => await openSftp(await options.dial(name));

  app.get("/1.0/instances/:name/files", async (c) => {
    const path = c.req.query("path");
    if (!path) return errorResponse(400, "Missing path argument");
    let client: SftpClient | undefined;
    try {
      client = await session(c.req.param("name"));
      const entry = await pullPath(client, path, MAX_BODY);
      const headers = {
        "X-LXD-uid": String(entry.uid),
        "X-LXD-gid": String(entry.gid),
        "X-LXD-mode": entry.mode.toString(8).padStart(4, "0"),
        "X-LXD-type": entry.type,
      };
      if (entry.type === "directory") {
        const response = syncResponse(entry.entries);
        for (const [k, v] of Object.entries(headers)) response.headers.set(k, v);
        return response;
      }
      const body = entry.type === "symlink"
        ? new TextEncoder().encode(entry.target)
        : entry.content!;
      return new Response(body as Uint8Array<ArrayBuffer>, {
        headers: { ...headers, "Content-Type": "application/octet-stream" },
      });
    } catch (error) {
      return sftpErrorResponse(error);
    } finally {
      client?.close();
    }
  });

  app.post("/1.0/instances/:name/files", async (c) => {
    const path = c.req.query("path");
    if (!path) return errorResponse(400, "Missing path argument");
    const type = c.req.header("x-lxd-type") ?? "file";
    if (type !== "file" && type !== "directory" && type !== "symlink") {
      return errorResponse(400, `Bad file type: ${type}`);
    }
    let entry: PushEntry;
    try {
      const length = Number(c.req.header("content-length") ?? 0);
      if (length > MAX_BODY) return errorResponse(413, "Request body too large");
      const body = new Uint8Array(await c.req.arrayBuffer());
      if (body.byteLength > MAX_BODY) return errorResponse(413, "Request body too large");
      const modeHeader = c.req.header("x-lxd-mode");
      const mode = modeHeader === undefined ? undefined : parseInt(modeHeader, 8);
      if (mode !== undefined && (!Number.isInteger(mode) || mode < 0 || mode > 0o7777)) {
        return errorResponse(400, `Bad mode: ${modeHeader}`);
      }
      entry = {
        type,
        content: type === "file" ? body : undefined,
        target: type === "symlink" ? new TextDecoder().decode(body) : undefined,
        mode,
        uid: id(c.req.header("x-lxd-uid")),
        gid: id(c.req.header("x-lxd-gid")),
      };
    } catch (error) {
      return errorResponse(400, (error as Error).message);
    }
    let client: SftpClient | undefined;
    try {
      client = await session(c.req.param("name"));
      await pushPath(client, path, entry);
      return syncResponse(null);
    } catch (error) {
      return sftpErrorResponse(error);
    } finally {
      client?.close();
    }
  });
}

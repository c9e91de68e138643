/**
 * The agent's SFTP server, behind `GET /1.0/sftp` upgraded to `sftp` (LXD
 * 5.0.2's lxd-agent embeds `github.com/pkg/sftp`'s server there; LXD's
 * `lxc file push/pull` for VMs and `lxc file mount` dial it through
 * `qemu.FileSFTPConn`). SFTP version 3 over the upgraded connection:
 * OPEN/READ/WRITE/CLOSE, LSTAT/STAT/FSTAT, SETSTAT/FSETSTAT (size, mode,
 * owner, times), OPENDIR/READDIR, MKDIR/RMDIR/REMOVE, RENAME (and
 * `posix-rename@openssh.com`), READLINK, SYMLINK (pkg/sftp's argument order:
 * target, then link path), REALPATH. Requests are served in order, one at a
 * time.
 *
 * Paths ({@linkcode guestPath}): resolved against `/`, `..` stops at `/`, so
 * every path names something under the guest's root, as root sees it; a NUL
 * byte or more than 4096 bytes is refused (FAILURE). Errors follow pkg/sftp's
 * mapping: not found → NO_SUCH_FILE, permission → PERMISSION_DENIED, other →
 * FAILURE with the message. Paths Deno refuses without `--allow-all`
 * (`/proc`, `/sys`, `/dev`) answer PERMISSION_DENIED.
 *
 * Bounds: packets up to 320 KiB, reads answered with at most 128 KiB
 * (pkg/sftp v1.13.5, which LXD 5.0.2's go.mod pins, asks for 32 KiB with up
 * to 64 requests in flight and refuses packets over 256 KiB), 256 open
 * handles per connection, directories listed up to 100,000 entries.
 *
 * Owns: the upgraded connection and every handle it opened, all closed when
 * the connection ends. Permissions: `--allow-read`, `--allow-write`.
 * @module
 */

import type { Duplex } from "node:stream";
import {
  type FileAttrs,
  FX,
  FXF,
  FXP,
  PacketReader,
  PacketSplitter,
  PacketWriter,
  SftpProtocolError,
} from "../shared/sftp/codec.ts";
import { type Logger, silentLogger } from "../shared/log.ts";

/** A path the SFTP server refuses (NUL byte, too long). */
export class SftpPathError extends Error {
  override name = "SftpPathError";
}

const MAX_PATH = 4096;

/**
 * The absolute, normalised guest path for `raw`: relative paths start at
 * `/`, `.` and empty segments go, `..` removes the previous segment and stops
 * at `/`. Throws {@linkcode SftpPathError} for a NUL byte or over 4096 bytes.
 */
export function guestPath(raw: string): string {
  if (raw.includes("\0")) throw new SftpPathError("Invalid path: contains a NUL byte");
  if (new TextEncoder().encode(raw).byteLength > MAX_PATH) {
    throw new SftpPathError(`Invalid path: longer than ${MAX_PATH} bytes`);
  }
  const parts: string[] = [];
  for (const segment of raw.split("/")) {
    if (segment === "" || segment === ".") continue;
    if (segment === "..") parts.pop();
    else parts.push(segment);
  }
  return "/" + parts.join("/");
}

/** Options of {@linkcode SftpServer}. */
export interface SftpServerOptions {
  /** @default {327680} (a write of 256 KiB plus headers, with room) */
  maxPacket?: number;
  /** @default {256} */
  maxHandles?: number;
  logger?: Logger;
}

type Handle =
  | { kind: "file"; path: string; file: Deno.FsFile }
  | { kind: "dir"; path: string; entries: string[]; next: number };

const MAX_READ = 128 * 1024;
const MAX_PACKET = 320 * 1024;
const MAX_DIR_ENTRIES = 100_000;
const DIR_BATCH = 100;

/** The SSH_FX status of a failed file system call, and its message. */
export function statusOf(error: unknown): { code: number; message: string } {
  const message = (error as Error)?.message ?? String(error);
  if (error instanceof SftpPathError) return { code: FX.FAILURE, message };
  if (error instanceof Deno.errors.NotFound) {
    return { code: FX.NO_SUCH_FILE, message: "No such file or directory" };
  }
  if (error instanceof Deno.errors.PermissionDenied || error instanceof Deno.errors.NotCapable) {
    return { code: FX.PERMISSION_DENIED, message: "Permission denied" };
  }
  return { code: FX.FAILURE, message };
}

function attrsOf(info: Deno.FileInfo): FileAttrs {
  return {
    size: info.size,
    uid: info.uid ?? 0,
    gid: info.gid ?? 0,
    permissions: info.mode ?? 0,
    atime: Math.floor((info.atime?.getTime() ?? 0) / 1000),
    mtime: Math.floor((info.mtime?.getTime() ?? 0) / 1000),
  };
}

function longName(name: string, a: FileAttrs): string {
  const mode = a.permissions ?? 0;
  const type = (mode & 0o170000) === 0o040000 ? "d" : (mode & 0o170000) === 0o120000 ? "l" : "-";
  let perms = "";
  for (let shift = 6; shift >= 0; shift -= 3) {
    const bits = (mode >> shift) & 7;
    perms += (bits & 4 ? "r" : "-") + (bits & 2 ? "w" : "-") + (bits & 1 ? "x" : "-");
  }
  return `${type}${perms} 1 ${a.uid} ${a.gid} ${a.size} ${name}`;
}

/** One SFTP session on an upgraded connection. */
export class SftpServer {
  #socket: Duplex;
  #head: Uint8Array;
  #splitter: PacketSplitter;
  #handles = new Map<string, Handle>();
  #nextHandle = 1;
  #maxHandles: number;
  #logger: Logger;

  constructor(socket: Duplex, head: Uint8Array, options: SftpServerOptions = {}) {
    this.#socket = socket;
    this.#head = head;
    this.#splitter = new PacketSplitter(options.maxPacket ?? MAX_PACKET);
    this.#maxHandles = options.maxHandles ?? 256;
    this.#logger = options.logger ?? silentLogger;
  }

  /** Serves until the peer ends the connection; then closes every handle and the connection. */
  async serve(): Promise<void> {
    const socket = this.#socket;
    socket.on("error", () => {});
    try {
      if (this.#head.byteLength > 0) await this.#onBytes(this.#head);
      socket.resume();
      for await (const chunk of socket) {
        await this.#onBytes(new Uint8Array(chunk as Uint8Array));
      }
    } catch (error) {
      this.#logger.debug("sftp session ended", { error: (error as Error).message });
    } finally {
      for (const handle of this.#handles.values()) {
        if (handle.kind === "file") {
          try {
            handle.file.close();
          } catch {
            // already closed
          }
        }
      }
      this.#handles.clear();
      socket.destroy();
    }
  }

  async #onBytes(chunk: Uint8Array): Promise<void> {
    for (const body of this.#splitter.push(chunk)) {
      const reply = await this.#handle(body);
      if (!this.#socket.write(reply)) {
        await new Promise<void>((resolve) => {
          this.#socket.once("drain", resolve);
          this.#socket.once("close", resolve);
        });
      }
    }
  }

  async #handle(body: Uint8Array): Promise<Uint8Array> {
    const reader = new PacketReader(body);
    const type = reader.u8();
    if (type === FXP.INIT) {
      return new PacketWriter().u8(FXP.VERSION).u32(3)
        .string("posix-rename@openssh.com").string("1").packet();
    }
    const id = reader.u32();
    try {
      return await this.#request(type, id, reader);
    } catch (error) {
      if (error instanceof SftpProtocolError) return status(id, FX.BAD_MESSAGE, error.message);
      const { code, message } = statusOf(error);
      return status(id, code, message);
    }
  }

  #handleOf(reader: PacketReader): Handle {
    const handle = this.#handles.get(reader.string());
    if (handle === undefined) throw new Error("Invalid handle");
    return handle;
  }

  #newHandle(handle: Handle): string {
    if (this.#handles.size >= this.#maxHandles) {
      if (handle.kind === "file") handle.file.close();
      throw new Error(`Too many open handles (at most ${this.#maxHandles})`);
    }
    const name = String(this.#nextHandle++);
    this.#handles.set(name, handle);
    return name;
  }

  async #request(type: number, id: number, r: PacketReader): Promise<Uint8Array> {
    switch (type) {
      case FXP.OPEN: {
        const path = guestPath(r.string());
        const pflags = r.u32();
        const attrs = r.attrs();
        const file = await Deno.open(path, {
          read: (pflags & FXF.READ) !== 0,
          write: (pflags & FXF.WRITE) !== 0 && (pflags & FXF.APPEND) === 0,
          append: (pflags & FXF.APPEND) !== 0,
          create: (pflags & FXF.CREAT) !== 0 && (pflags & FXF.EXCL) === 0,
          createNew: (pflags & FXF.CREAT) !== 0 && (pflags & FXF.EXCL) !== 0,
          truncate: (pflags & FXF.TRUNC) !== 0,
          mode: (attrs.permissions ?? 0o644) & 0o7777,
        });
        return handleReply(id, this.#newHandle({ kind: "file", path, file }));
      }
      case FXP.CLOSE: {
        const name = r.string();
        const handle = this.#handles.get(name);
        if (handle === undefined) throw new Error("Invalid handle");
        this.#handles.delete(name);
        if (handle.kind === "file") handle.file.close();
        return status(id, FX.OK, "");
      }
      case FXP.READ: {
        const handle = this.#handleOf(r);
        const offset = r.u64();
        const length = Math.min(r.u32(), MAX_READ);
        if (handle.kind !== "file") throw new Error("Not a file handle");
        await handle.file.seek(offset, Deno.SeekMode.Start);
        const buf = new Uint8Array(length);
        let filled = 0;
        while (filled < length) {
          const n = await handle.file.read(buf.subarray(filled));
          if (n === null) break;
          filled += n;
        }
        if (filled === 0 && length > 0) return status(id, FX.EOF, "EOF");
        return new PacketWriter().u8(FXP.DATA).u32(id).bytes(buf.subarray(0, filled)).packet();
      }
      case FXP.WRITE: {
        const handle = this.#handleOf(r);
        const offset = r.u64();
        const data = r.bytes();
        if (handle.kind !== "file") throw new Error("Not a file handle");
        await handle.file.seek(offset, Deno.SeekMode.Start);
        let written = 0;
        while (written < data.byteLength) {
          written += await handle.file.write(data.subarray(written));
        }
        return status(id, FX.OK, "");
      }
      case FXP.LSTAT:
        return attrsReply(id, attrsOf(await Deno.lstat(guestPath(r.string()))));
      case FXP.STAT:
        return attrsReply(id, attrsOf(await Deno.stat(guestPath(r.string()))));
      case FXP.FSTAT: {
        const handle = this.#handleOf(r);
        const info = handle.kind === "file"
          ? await handle.file.stat()
          : await Deno.stat(handle.path);
        return attrsReply(id, attrsOf(info));
      }
      case FXP.SETSTAT: {
        const path = guestPath(r.string());
        await setAttrs(path, r.attrs());
        return status(id, FX.OK, "");
      }
      case FXP.FSETSTAT: {
        const handle = this.#handleOf(r);
        const attrs = r.attrs();
        if (handle.kind === "file" && attrs.size !== undefined) {
          await handle.file.truncate(attrs.size);
          delete attrs.size;
        }
        await setAttrs(handle.path, attrs);
        return status(id, FX.OK, "");
      }
      case FXP.OPENDIR: {
        const path = guestPath(r.string());
        const info = await Deno.stat(path);
        if (!info.isDirectory) throw new Error("Not a directory");
        const entries: string[] = [];
        for await (const entry of Deno.readDir(path)) {
          if (entries.length >= MAX_DIR_ENTRIES) break;
          entries.push(entry.name);
        }
        return handleReply(id, this.#newHandle({ kind: "dir", path, entries, next: 0 }));
      }
      case FXP.READDIR: {
        const handle = this.#handleOf(r);
        if (handle.kind !== "dir") throw new Error("Not a directory handle");
        if (handle.next >= handle.entries.length) return status(id, FX.EOF, "EOF");
        const batch = handle.entries.slice(handle.next, handle.next + DIR_BATCH);
        handle.next += batch.length;
        const out = new PacketWriter().u8(FXP.NAME).u32(id);
        const named: [string, FileAttrs][] = [];
        for (const name of batch) {
          try {
            named.push([
              name,
              attrsOf(await Deno.lstat(`${handle.path === "/" ? "" : handle.path}/${name}`)),
            ]);
          } catch {
            // Gone since the listing: left out.
          }
        }
        out.u32(named.length);
        for (const [name, attrs] of named) {
          out.string(name).string(longName(name, attrs)).attrs(attrs);
        }
        return out.packet();
      }
      case FXP.REMOVE: {
        const path = guestPath(r.string());
        const info = await Deno.lstat(path);
        if (info.isDirectory) throw new Error("Is a directory");
        await Deno.remove(path);
        return status(id, FX.OK, "");
      }
      case FXP.MKDIR: {
        const path = guestPath(r.string());
        const attrs = r.attrs();
        await Deno.mkdir(path, { mode: (attrs.permissions ?? 0o755) & 0o7777 });
        return status(id, FX.OK, "");
      }
      case FXP.RMDIR: {
        const path = guestPath(r.string());
        const info = await Deno.lstat(path);
        if (!info.isDirectory) throw new Error("Not a directory");
        await Deno.remove(path);
        return status(id, FX.OK, "");
      }
      case FXP.REALPATH:
        return nameReply(id, guestPath(r.string()));
      case FXP.RENAME:
        await Deno.rename(guestPath(r.string()), guestPath(r.string()));
        return status(id, FX.OK, "");
      case FXP.READLINK:
        return nameReply(id, await Deno.readLink(guestPath(r.string())));
      case FXP.SYMLINK: {
        // pkg/sftp v1.13.5 (client.go Symlink, server.go): the target first, then the link's path.
        const target = r.string();
        if (target.includes("\0")) {
          throw new SftpPathError("Invalid symlink target: contains a NUL byte");
        }
        await Deno.symlink(target, guestPath(r.string()));
        return status(id, FX.OK, "");
      }
      case FXP.EXTENDED: {
        const name = r.string();
        if (name === "posix-rename@openssh.com") {
          await Deno.rename(guestPath(r.string()), guestPath(r.string()));
          return status(id, FX.OK, "");
        }
        return status(id, FX.OP_UNSUPPORTED, `Unsupported extension ${name}`);
      }
      default:
        return status(id, FX.OP_UNSUPPORTED, `Unsupported request type ${type}`);
    }
  }
}

async function setAttrs(path: string, attrs: FileAttrs): Promise<void> {
  if (attrs.size !== undefined) await Deno.truncate(path, attrs.size);
  if (attrs.permissions !== undefined) await Deno.chmod(path, attrs.permissions & 0o7777);
  if (attrs.uid !== undefined && attrs.gid !== undefined) {
    await Deno.chown(path, attrs.uid, attrs.gid);
  }
  if (attrs.atime !== undefined && attrs.mtime !== undefined) {
    await Deno.utime(path, attrs.atime, attrs.mtime);
  }
}

function status(id: number, code: number, message: string): Uint8Array {
  return new PacketWriter().u8(FXP.STATUS).u32(id).u32(code).string(message).string("").packet();
}

function handleReply(id: number, handle: string): Uint8Array {
  return new PacketWriter().u8(FXP.HANDLE).u32(id).string(handle).packet();
}

function attrsReply(id: number, attrs: FileAttrs): Uint8Array {
  return new PacketWriter().u8(FXP.ATTRS).u32(id).attrs(attrs).packet();
}

function nameReply(id: number, name: string): Uint8Array {
  return new PacketWriter().u8(FXP.NAME).u32(id).u32(1).string(name).string(name).attrs({})
    .packet();
}

/**
 * An SFTP version 3 client over one connection, as LXD 5.0.2 uses its
 * agent's SFTP server (`qemu.FileSFTPConn`: `GET /1.0/sftp` with
 * `Upgrade: sftp`, expecting `101` and `Upgrade: sftp`): {@linkcode openSftp}
 * performs that upgrade, {@linkcode SftpClient} makes one request at a time
 * (stat, read and write whole files in 32 KiB pieces as pkg/sftp does,
 * directories, links, mode and owner). Works with our agent and with a stock
 * lxd-agent.
 *
 * Owns: the connection; `close()` ends it. Needs no permissions of its own.
 * @module
 */

import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";
import { headEnd, parseResponseHead } from "../http/_codec.ts";
import {
  type FileAttrs,
  FX,
  FXF,
  FXP,
  PacketReader,
  PacketSplitter,
  PacketWriter,
  SftpProtocolError,
} from "./codec.ts";

/** A request the server answered with an error status. */
export class SftpStatusError extends Error {
  override name = "SftpStatusError";
  constructor(readonly code: number, message: string) {
    super(message);
  }
}

/** The upgrade was refused: `status` and the server's message. */
export class SftpUpgradeError extends Error {
  override name = "SftpUpgradeError";
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

const CHUNK = 32 * 1024;

/**
 * Sends `GET <path>` with `Upgrade: sftp` over `socket` and resolves with a
 * client once the server switched protocols; rejects with
 * {@linkcode SftpUpgradeError} (LXD's message: "Dialing failed: expected
 * status code 101 got N") otherwise. The socket is destroyed on failure.
 */
export function openSftp(
  socket: Duplex,
  options: { path?: string; timeout?: number } = {},
): Promise<SftpClient> {
  const { path = "/1.0/sftp", timeout = 10_000 } = options;
  return new Promise((resolve, reject) => {
    let buffer = Buffer.alloc(0);
    const done = (error?: Error) => {
      clearTimeout(timer);
      socket.off("data", onData);
      socket.off("close", onClose);
      if (error) {
        socket.destroy();
        reject(error);
      }
    };
    const onClose = () => done(new Error("The connection closed before the SFTP upgrade"));
    const onData = (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      const end = headEnd(buffer, 0);
      if (end < 0) {
        if (buffer.byteLength > 64 * 1024) done(new Error("Upgrade answer head too large"));
        return;
      }
      let head;
      try {
        head = parseResponseHead(buffer.subarray(0, end - 4).toString("latin1"));
      } catch (error) {
        done(error as Error);
        return;
      }
      if (head.status !== 101) {
        done(
          new SftpUpgradeError(
            head.status,
            `Dialing failed: expected status code 101 got ${head.status}`,
          ),
        );
        return;
      }
      const upgrade = head.fields.find(([n]) => n.toLowerCase() === "upgrade")?.[1].trim();
      if (upgrade !== "sftp") {
        done(new SftpUpgradeError(101, "Missing or unexpected Upgrade header in response"));
        return;
      }
      done();
      socket.pause();
      const client = new SftpClient(socket, new Uint8Array(buffer.subarray(end)));
      client.init().then(() => resolve(client), (error) => {
        client.close();
        reject(error);
      });
    };
    const timer = setTimeout(
      () => done(new Error(`No SFTP upgrade answer within ${timeout} ms`)),
      timeout,
    );
    socket.on("data", onData);
    socket.on("close", onClose);
    socket.on("error", () => {});
    socket.write(
      `GET ${path} HTTP/1.1\r\nHost: custom.socket\r\nUpgrade: sftp\r\nConnection: Upgrade\r\n\r\n`,
    );
  });
}

/** One SFTP session; requests are sent one at a time. */
export class SftpClient {
  #socket: Duplex;
  #splitter = new PacketSplitter(1 << 20);
  #nextId = 1;
  #pending: { resolve: (body: PacketReader) => void; reject: (e: Error) => void } | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;
  #failure: Error | undefined;

  constructor(socket: Duplex, head: Uint8Array) {
    this.#socket = socket;
    socket.on("data", (chunk: Uint8Array) => this.#onData(new Uint8Array(chunk)));
    socket.on("close", () => this.#fail(new Error("The SFTP connection closed")));
    socket.on("error", () => {});
    if (head.byteLength > 0) this.#onData(head);
    socket.resume();
  }

  #onData(chunk: Uint8Array): void {
    let bodies: Uint8Array[];
    try {
      bodies = this.#splitter.push(chunk);
    } catch (error) {
      this.#fail(error as Error);
      this.#socket.destroy();
      return;
    }
    for (const body of bodies) {
      const pending = this.#pending;
      this.#pending = undefined;
      pending?.resolve(new PacketReader(body));
    }
  }

  #fail(error: Error): void {
    this.#failure ??= error;
    const pending = this.#pending;
    this.#pending = undefined;
    pending?.reject(error);
  }

  /** Sends one packet and resolves with the answer (its type byte first). */
  #exchange(packet: Uint8Array): Promise<PacketReader> {
    const run = () =>
      new Promise<PacketReader>((resolve, reject) => {
        if (this.#failure) return reject(this.#failure);
        this.#pending = { resolve, reject };
        this.#socket.write(packet);
      });
    const result = this.#queue.then(run, run);
    this.#queue = result.catch(() => {});
    return result;
  }

  /** @internal INIT → VERSION. */
  async init(): Promise<void> {
    const reply = await this.#exchange(new PacketWriter().u8(FXP.INIT).u32(3).packet());
    if (reply.u8() !== FXP.VERSION) throw new SftpProtocolError("Expected VERSION");
    if (reply.u32() < 3) throw new SftpProtocolError("SFTP version below 3");
  }

  async #request(build: (w: PacketWriter) => PacketWriter, type: number): Promise<PacketReader> {
    const id = this.#nextId++ >>> 0;
    const reply = await this.#exchange(build(new PacketWriter().u8(type).u32(id)).packet());
    const replyType = reply.u8();
    if (reply.u32() !== id) throw new SftpProtocolError("Answer to another request");
    if (replyType === FXP.STATUS) {
      const code = reply.u32();
      const message = reply.string();
      if (code === FX.OK) return reply;
      throw new SftpStatusError(code, message || `SFTP status ${code}`);
    }
    // Hand the rest back with the type consumed: callers read the payload.
    (reply as PacketReader & { type?: number }).type = replyType;
    return reply;
  }

  async #attrs(type: number, path: string): Promise<FileAttrs> {
    return (await this.#request((w) => w.string(path), type)).attrs();
  }

  /** LSTAT: the attributes of `path` itself (a symlink is not followed). */
  lstat(path: string): Promise<FileAttrs> {
    return this.#attrs(FXP.LSTAT, path);
  }

  /** STAT: the attributes of what `path` names. */
  stat(path: string): Promise<FileAttrs> {
    return this.#attrs(FXP.STAT, path);
  }

  async #open(path: string, pflags: number, attrs: FileAttrs = {}): Promise<string> {
    return (await this.#request((w) => w.string(path).u32(pflags).attrs(attrs), FXP.OPEN)).string();
  }

  async #close(handle: string): Promise<void> {
    await this.#request((w) => w.string(handle), FXP.CLOSE);
  }

  /** The whole content of a file, at most `max` bytes (more throws). */
  async readFile(path: string, max = 1 << 30): Promise<Uint8Array> {
    const handle = await this.#open(path, FXF.READ);
    const chunks: Uint8Array[] = [];
    let total = 0;
    try {
      for (;;) {
        let reply: PacketReader;
        try {
          reply = await this.#request((w) => w.string(handle).u64(total).u32(CHUNK), FXP.READ);
        } catch (error) {
          if (error instanceof SftpStatusError && error.code === FX.EOF) break;
          throw error;
        }
        const data = reply.bytes();
        total += data.byteLength;
        if (total > max) throw new RangeError(`${path} is larger than ${max} bytes`);
        chunks.push(data.slice());
      }
    } finally {
      await this.#close(handle).catch(() => {});
    }
    return new Uint8Array(Buffer.concat(chunks));
  }

  /** Creates or truncates `path` with `data`; new files get `mode` (then set exactly with chmod). */
  async writeFile(path: string, data: Uint8Array, mode = 0o644): Promise<void> {
    const handle = await this.#open(path, FXF.WRITE | FXF.CREAT | FXF.TRUNC, { permissions: mode });
    try {
      for (let offset = 0; offset < data.byteLength || offset === 0; offset += CHUNK) {
        const piece = data.subarray(offset, offset + CHUNK);
        if (piece.byteLength === 0) break;
        await this.#request((w) => w.string(handle).u64(offset).bytes(piece), FXP.WRITE);
      }
    } finally {
      await this.#close(handle);
    }
  }

  /** SETSTAT with `attrs` (mode, owner, size, times). */
  async setstat(path: string, attrs: FileAttrs): Promise<void> {
    await this.#request((w) => w.string(path).attrs(attrs), FXP.SETSTAT);
  }

  chmod(path: string, mode: number): Promise<void> {
    return this.setstat(path, { permissions: mode });
  }

  chown(path: string, uid: number, gid: number): Promise<void> {
    return this.setstat(path, { uid, gid });
  }

  async mkdir(path: string, mode = 0o755): Promise<void> {
    await this.#request((w) => w.string(path).attrs({ permissions: mode }), FXP.MKDIR);
  }

  async rmdir(path: string): Promise<void> {
    await this.#request((w) => w.string(path), FXP.RMDIR);
  }

  async remove(path: string): Promise<void> {
    await this.#request((w) => w.string(path), FXP.REMOVE);
  }

  async rename(from: string, to: string): Promise<void> {
    await this.#request((w) => w.string(from).string(to), FXP.RENAME);
  }

  /** SYMLINK in pkg/sftp's order (what lxd-agent and our agent expect): target, then link path. */
  async symlink(target: string, link: string): Promise<void> {
    await this.#request((w) => w.string(target).string(link), FXP.SYMLINK);
  }

  async #name(type: number, path: string): Promise<string> {
    const reply = await this.#request((w) => w.string(path), type);
    if (reply.u32() < 1) throw new SftpProtocolError("Empty NAME answer");
    return reply.string();
  }

  readlink(path: string): Promise<string> {
    return this.#name(FXP.READLINK, path);
  }

  realpath(path: string): Promise<string> {
    return this.#name(FXP.REALPATH, path);
  }

  /** A directory's entries (without `.` and `..`) with their attributes. */
  async readdir(path: string): Promise<{ name: string; attrs: FileAttrs }[]> {
    const handle = (await this.#request((w) => w.string(path), FXP.OPENDIR)).string();
    const entries: { name: string; attrs: FileAttrs }[] = [];
    try {
      for (;;) {
        let reply: PacketReader;
        try {
          reply = await this.#request((w) => w.string(handle), FXP.READDIR);
        } catch (error) {
          if (error instanceof SftpStatusError && error.code === FX.EOF) break;
          throw error;
        }
        const count = reply.u32();
        for (let i = 0; i < count; i++) {
          const name = reply.string();
          reply.string();
          const attrs = reply.attrs();
          if (name !== "." && name !== "..") entries.push({ name, attrs });
        }
      }
    } finally {
      await this.#close(handle).catch(() => {});
    }
    return entries;
  }

  /** Ends the session. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#socket.destroy();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * The SFTP version 3 wire format (draft-ietf-secsh-filexfer-02, as OpenSSH
 * and Go's `github.com/pkg/sftp` speak it; LXD's agent serves it on
 * `GET /1.0/sftp` upgraded to `sftp`): packet types, status codes, file
 * attributes, and a reader/writer for packet bodies. Pure; needs no
 * permissions.
 *
 * A packet is `uint32 length`, `byte type`, then (for everything but
 * INIT/VERSION) `uint32 request-id`, then its fields: big-endian integers and
 * `uint32`-length-prefixed strings.
 * @module
 */

/** Packet types. */
export const FXP = {
  INIT: 1,
  VERSION: 2,
  OPEN: 3,
  CLOSE: 4,
  READ: 5,
  WRITE: 6,
  LSTAT: 7,
  FSTAT: 8,
  SETSTAT: 9,
  FSETSTAT: 10,
  OPENDIR: 11,
  READDIR: 12,
  REMOVE: 13,
  MKDIR: 14,
  RMDIR: 15,
  REALPATH: 16,
  STAT: 17,
  RENAME: 18,
  READLINK: 19,
  SYMLINK: 20,
  STATUS: 101,
  HANDLE: 102,
  DATA: 103,
  NAME: 104,
  ATTRS: 105,
  EXTENDED: 200,
  EXTENDED_REPLY: 201,
} as const;

/** Status codes. */
export const FX = {
  OK: 0,
  EOF: 1,
  NO_SUCH_FILE: 2,
  PERMISSION_DENIED: 3,
  FAILURE: 4,
  BAD_MESSAGE: 5,
  NO_CONNECTION: 6,
  CONNECTION_LOST: 7,
  OP_UNSUPPORTED: 8,
} as const;

/** `pflags` of OPEN. */
export const FXF = {
  READ: 0x1,
  WRITE: 0x2,
  APPEND: 0x4,
  CREAT: 0x8,
  TRUNC: 0x10,
  EXCL: 0x20,
} as const;

/** Attribute flags. */
export const ATTR = {
  SIZE: 0x1,
  UIDGID: 0x2,
  PERMISSIONS: 0x4,
  ACMODTIME: 0x8,
  EXTENDED: 0x80000000,
} as const;

/** File attributes; absent fields are not sent. `permissions` carries the file type bits too. */
export interface FileAttrs {
  size?: number;
  uid?: number;
  gid?: number;
  permissions?: number;
  atime?: number;
  mtime?: number;
}

/** A malformed packet (answered with BAD_MESSAGE, or ending the connection). */
export class SftpProtocolError extends Error {
  override name = "SftpProtocolError";
}

const decoder = new TextDecoder();
const encoder = new TextEncoder();

/** Reads the fields of one packet body. */
export class PacketReader {
  #view: DataView;
  #bytes: Uint8Array;
  #offset = 0;

  constructor(bytes: Uint8Array) {
    this.#bytes = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  #need(n: number): void {
    if (this.#offset + n > this.#bytes.byteLength) throw new SftpProtocolError("Truncated packet");
  }

  u8(): number {
    this.#need(1);
    return this.#view.getUint8(this.#offset++);
  }

  u32(): number {
    this.#need(4);
    const v = this.#view.getUint32(this.#offset);
    this.#offset += 4;
    return v;
  }

  u64(): number {
    this.#need(8);
    const v = this.#view.getBigUint64(this.#offset);
    this.#offset += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new SftpProtocolError("Offset too large");
    return Number(v);
  }

  bytes(): Uint8Array {
    const n = this.u32();
    this.#need(n);
    const out = this.#bytes.subarray(this.#offset, this.#offset + n);
    this.#offset += n;
    return out;
  }

  string(): string {
    return decoder.decode(this.bytes());
  }

  attrs(): FileAttrs {
    const flags = this.u32();
    const attrs: FileAttrs = {};
    if (flags & ATTR.SIZE) attrs.size = this.u64();
    if (flags & ATTR.UIDGID) {
      attrs.uid = this.u32();
      attrs.gid = this.u32();
    }
    if (flags & ATTR.PERMISSIONS) attrs.permissions = this.u32();
    if (flags & ATTR.ACMODTIME) {
      attrs.atime = this.u32();
      attrs.mtime = this.u32();
    }
    if (flags & ATTR.EXTENDED) {
      const count = this.u32();
      for (let i = 0; i < count; i++) {
        this.string();
        this.string();
      }
    }
    return attrs;
  }

  get remaining(): number {
    return this.#bytes.byteLength - this.#offset;
  }
}

/** Builds one packet (the length prefix is added by `packet()`). */
export class PacketWriter {
  #parts: Uint8Array[] = [];
  #length = 0;

  #push(part: Uint8Array): this {
    this.#parts.push(part);
    this.#length += part.byteLength;
    return this;
  }

  u8(v: number): this {
    return this.#push(new Uint8Array([v]));
  }

  u32(v: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setUint32(0, v >>> 0);
    return this.#push(b);
  }

  u64(v: number): this {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(v));
    return this.#push(b);
  }

  bytes(v: Uint8Array): this {
    return this.u32(v.byteLength).#push(v);
  }

  string(v: string): this {
    return this.bytes(encoder.encode(v));
  }

  attrs(a: FileAttrs): this {
    let flags = 0;
    if (a.size !== undefined) flags |= ATTR.SIZE;
    if (a.uid !== undefined && a.gid !== undefined) flags |= ATTR.UIDGID;
    if (a.permissions !== undefined) flags |= ATTR.PERMISSIONS;
    if (a.atime !== undefined && a.mtime !== undefined) flags |= ATTR.ACMODTIME;
    this.u32(flags);
    if (flags & ATTR.SIZE) this.u64(a.size!);
    if (flags & ATTR.UIDGID) this.u32(a.uid!).u32(a.gid!);
    if (flags & ATTR.PERMISSIONS) this.u32(a.permissions!);
    if (flags & ATTR.ACMODTIME) this.u32(a.atime!).u32(a.mtime!);
    return this;
  }

  /** The whole packet: length, then everything written. */
  packet(): Uint8Array {
    const out = new Uint8Array(4 + this.#length);
    new DataView(out.buffer).setUint32(0, this.#length);
    let offset = 4;
    for (const part of this.#parts) {
      out.set(part, offset);
      offset += part.byteLength;
    }
    return out;
  }
}

/**
 * Splits a byte stream into packet bodies (type byte first); a packet longer
 * than `maxPacket` throws {@linkcode SftpProtocolError}.
 */
export class PacketSplitter {
  #buffer = new Uint8Array(0);
  #maxPacket: number;

  constructor(maxPacket: number) {
    this.#maxPacket = maxPacket;
  }

  push(chunk: Uint8Array): Uint8Array[] {
    const joined = new Uint8Array(this.#buffer.byteLength + chunk.byteLength);
    joined.set(this.#buffer);
    joined.set(chunk, this.#buffer.byteLength);
    const out: Uint8Array[] = [];
    let offset = 0;
    while (joined.byteLength - offset >= 4) {
      const length = new DataView(joined.buffer, offset, 4).getUint32(0);
      if (length === 0 || length > this.#maxPacket) {
        throw new SftpProtocolError(`Packet of ${length} bytes (at most ${this.#maxPacket})`);
      }
      if (joined.byteLength - offset - 4 < length) break;
      out.push(joined.slice(offset + 4, offset + 4 + length));
      offset += 4 + length;
    }
    this.#buffer = joined.slice(offset);
    return out;
  }
}

/**
 * `SocketAddress` and the pure encoding/decoding of the two kernel socket
 * addresses the transport uses: `struct sockaddr_vm` (AF_VSOCK) and
 * `struct sockaddr_un` (AF_UNIX), in host byte order (little-endian on every
 * Linux target Deno supports).
 *
 * Owns nothing; needs no permissions.
 *
 * @module
 */

/** A vsock (CID, port) or a unix socket path. */
export type SocketAddress =
  | { family: "vsock"; cid: number; port: number }
  | { family: "unix"; path: string };

/** `AF_UNIX`. */
export const AF_UNIX = 1;
/** `AF_VSOCK`. */
export const AF_VSOCK = 40;
/** `VMADDR_CID_ANY`: bind to any CID. */
export const VMADDR_CID_ANY = 0xFFFFFFFF;
/** `VMADDR_CID_HYPERVISOR`. */
export const VMADDR_CID_HYPERVISOR = 0;
/** `VMADDR_CID_LOCAL`: the local loopback CID (needs `vsock_loopback`). */
export const VMADDR_CID_LOCAL = 1;
/** `VMADDR_CID_HOST`: "my hypervisor", seen from inside any guest. */
export const VMADDR_CID_HOST = 2;
/** `VMADDR_PORT_ANY`. */
export const VMADDR_PORT_ANY = 0xFFFFFFFF;
/** `sizeof(struct sockaddr_vm)`. */
export const SOCKADDR_VM_SIZE = 16;
/** `sizeof(struct sockaddr_un)`. */
export const SOCKADDR_UN_SIZE = 110;
/** `sizeof(sun_path)`: a path must fit with its NUL terminator. */
export const UNIX_PATH_MAX = 108;
/** Large enough for any address this module decodes. */
export const SOCKADDR_MAX_SIZE = 128;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Throws a `RangeError` unless `value` is an integer in 0‥0xFFFFFFFF. */
export function checkU32(value: number, what: string): number {
  if (typeof value !== "number" || !Number.isInteger(value) || value < 0 || value > 0xFFFFFFFF) {
    throw new RangeError(`Invalid ${what} ${value}: expected an integer in 0..4294967295`);
  }
  return value;
}

/**
 * Encodes a `struct sockaddr_vm`:
 * `{ u16 svm_family; u16 svm_reserved1; u32 svm_port; u32 svm_cid; u8 svm_flags; u8 svm_zero[3]; }`.
 */
export function encodeSockaddrVm(cid: number, port: number, flags = 0): Uint8Array {
  checkU32(cid, "vsock CID");
  checkU32(port, "vsock port");
  if (!Number.isInteger(flags) || flags < 0 || flags > 0xFF) {
    throw new RangeError(`Invalid sockaddr_vm flags ${flags}: expected an integer in 0..255`);
  }
  const bytes = new Uint8Array(SOCKADDR_VM_SIZE);
  const view = new DataView(bytes.buffer);
  view.setUint16(0, AF_VSOCK, true);
  view.setUint32(4, port, true);
  view.setUint32(8, cid, true);
  bytes[12] = flags;
  return bytes;
}

/** Decodes a `struct sockaddr_vm`; throws a `TypeError` for another family or a short buffer. */
export function decodeSockaddrVm(
  bytes: Uint8Array,
  length = bytes.byteLength,
): { family: "vsock"; cid: number; port: number } {
  if (length < 12 || bytes.byteLength < 12) {
    throw new TypeError(`A sockaddr_vm needs 12 bytes at least, got ${length}`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const family = view.getUint16(0, true);
  if (family !== AF_VSOCK) throw new TypeError(`Not an AF_VSOCK address (family ${family})`);
  return { family: "vsock", cid: view.getUint32(8, true), port: view.getUint32(4, true) };
}

/**
 * Encodes a `struct sockaddr_un` `{ u16 sun_family; char sun_path[108]; }` for
 * a filesystem path (NUL-terminated; the returned length is what bind/connect
 * take), or for an abstract name when `path` starts with `"\0"`.
 * Throws a `TypeError` for an empty path or an embedded NUL, a `RangeError`
 * when the path does not fit in `sun_path`.
 */
export function encodeSockaddrUn(path: string): Uint8Array {
  if (typeof path !== "string" || path.length === 0) {
    throw new TypeError("A unix socket path must be a non-empty string");
  }
  const abstract = path.startsWith("\0");
  if (path.indexOf("\0", abstract ? 1 : 0) !== -1) {
    throw new TypeError(`A unix socket path cannot contain NUL bytes: ${JSON.stringify(path)}`);
  }
  const name = encoder.encode(path);
  const room = abstract ? UNIX_PATH_MAX : UNIX_PATH_MAX - 1;
  if (name.byteLength > room) {
    throw new RangeError(
      `Unix socket path too long (${name.byteLength} bytes, at most ${room}): ${path}`,
    );
  }
  const bytes = new Uint8Array(2 + name.byteLength + (abstract ? 0 : 1));
  new DataView(bytes.buffer).setUint16(0, AF_UNIX, true);
  bytes.set(name, 2);
  return bytes;
}

/**
 * Decodes a `struct sockaddr_un` of `length` bytes (as returned by
 * getsockname/getpeername/accept). An unnamed socket decodes to path `""`,
 * an abstract one to a path starting with `"\0"`.
 */
export function decodeSockaddrUn(
  bytes: Uint8Array,
  length = bytes.byteLength,
): { family: "unix"; path: string } {
  if (length < 2 || bytes.byteLength < 2) {
    throw new TypeError(`A sockaddr_un needs 2 bytes at least, got ${length}`);
  }
  const family = bytes[0] | (bytes[1] << 8);
  if (family !== AF_UNIX) throw new TypeError(`Not an AF_UNIX address (family ${family})`);
  const end = Math.min(length, bytes.byteLength, SOCKADDR_UN_SIZE);
  let name = bytes.subarray(2, end);
  if (name.byteLength > 0 && name[0] !== 0) {
    const nul = name.indexOf(0);
    if (nul !== -1) name = name.subarray(0, nul);
  }
  return { family: "unix", path: decoder.decode(name) };
}

/** Decodes an AF_VSOCK or AF_UNIX address by its family field. */
export function decodeSockaddr(bytes: Uint8Array, length = bytes.byteLength): SocketAddress {
  if (length < 2 || bytes.byteLength < 2) {
    throw new TypeError(`A socket address needs 2 bytes at least, got ${length}`);
  }
  const family = bytes[0] | (bytes[1] << 8);
  switch (family) {
    case AF_VSOCK:
      return decodeSockaddrVm(bytes, length);
    case AF_UNIX:
      return decodeSockaddrUn(bytes, length);
    default:
      throw new TypeError(`Unsupported address family ${family}`);
  }
}

/** Formats an address for messages: `vsock 3:1024`, `unix /run/x.sock`. */
export function formatAddress(address: SocketAddress): string {
  return address.family === "vsock"
    ? `vsock ${address.cid}:${address.port}`
    : `unix ${address.path === "" ? "(unnamed)" : address.path}`;
}

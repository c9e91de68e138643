/**
 * `SocketError`, the error every failing socket call of `shared/vsock/` throws,
 * and the pure errno → name → readable reason mapping behind its messages.
 *
 * Owns nothing; needs no permissions.
 *
 * @module
 */

/** Linux errno numbers (asm-generic: the same on x86_64 and aarch64) by name. */
export const ERRNO = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ENOTTY: 25,
  ENOSPC: 28,
  EROFS: 30,
  EPIPE: 32,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOTEMPTY: 39,
  ELOOP: 40,
  EPROTO: 71,
  ENOTSOCK: 88,
  EDESTADDRREQ: 89,
  EMSGSIZE: 90,
  EPROTOTYPE: 91,
  ENOPROTOOPT: 92,
  EPROTONOSUPPORT: 93,
  ESOCKTNOSUPPORT: 94,
  EOPNOTSUPP: 95,
  EPFNOSUPPORT: 96,
  EAFNOSUPPORT: 97,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
  ENETDOWN: 100,
  ENETUNREACH: 101,
  ENETRESET: 102,
  ECONNABORTED: 103,
  ECONNRESET: 104,
  ENOBUFS: 105,
  EISCONN: 106,
  ENOTCONN: 107,
  ESHUTDOWN: 108,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EHOSTDOWN: 112,
  EHOSTUNREACH: 113,
  EALREADY: 114,
  EINPROGRESS: 115,
  ECANCELED: 125,
} as const;

/** An errno name such as `"ECONNREFUSED"`. */
export type ErrnoName = keyof typeof ERRNO;

const NAMES = new Map<number, ErrnoName>(
  Object.entries(ERRNO).map(([name, value]) => [value, name as ErrnoName]),
);

const REASONS: Partial<Record<ErrnoName, string>> = {
  EPERM: "operation not permitted",
  ENOENT: "no such file or directory",
  EINTR: "interrupted",
  EIO: "input/output error",
  ENXIO: "no such device or address",
  EBADF: "bad file descriptor",
  EAGAIN: "resource temporarily unavailable",
  ENOMEM: "out of memory",
  EACCES: "permission denied",
  EFAULT: "bad address",
  EBUSY: "device or resource busy",
  EEXIST: "file exists",
  ENODEV: "no such device",
  ENOTDIR: "not a directory",
  EISDIR: "is a directory",
  EINVAL: "invalid argument",
  ENFILE: "too many open files in system",
  EMFILE: "too many open files",
  ENOTTY: "inappropriate ioctl for device",
  ENOSPC: "no space left on device",
  EROFS: "read-only file system",
  EPIPE: "broken pipe",
  ENAMETOOLONG: "name too long",
  ENOSYS: "function not implemented",
  ENOTEMPTY: "directory not empty",
  ELOOP: "too many levels of symbolic links",
  EPROTO: "protocol error",
  ENOTSOCK: "not a socket",
  EDESTADDRREQ: "destination address required",
  EMSGSIZE: "message too long",
  EPROTOTYPE: "wrong protocol type for socket",
  ENOPROTOOPT: "protocol not available",
  EPROTONOSUPPORT: "protocol not supported",
  ESOCKTNOSUPPORT: "socket type not supported",
  EOPNOTSUPP: "operation not supported",
  EPFNOSUPPORT: "protocol family not supported",
  EAFNOSUPPORT: "address family not supported",
  EADDRINUSE: "address in use",
  EADDRNOTAVAIL: "address not available",
  ENETDOWN: "network is down",
  ENETUNREACH: "network is unreachable",
  ENETRESET: "connection reset by network",
  ECONNABORTED: "connection aborted",
  ECONNRESET: "connection reset by peer",
  ENOBUFS: "no buffer space available",
  EISCONN: "already connected",
  ENOTCONN: "not connected",
  ESHUTDOWN: "socket is shut down",
  ETIMEDOUT: "timed out",
  ECONNREFUSED: "connection refused",
  EHOSTDOWN: "host is down",
  EHOSTUNREACH: "no route to host",
  EALREADY: "operation already in progress",
  EINPROGRESS: "operation in progress",
  ECANCELED: "operation canceled",
};

/** The message of every error caused by a missing AF_VSOCK transport. */
export const VSOCK_UNAVAILABLE =
  "AF_VSOCK is not available: load the vsock (host: vhost_vsock) kernel module";

/** The name of a Linux errno (`111` → `"ECONNREFUSED"`), or `"E<n>"` when unknown. */
export function errnoName(errno: number): string {
  return NAMES.get(errno) ?? `E${errno}`;
}

/** The errno number of a name (`"ECONNREFUSED"` → `111`), or `undefined`. */
export function errnoNumber(name: string): number | undefined {
  return Object.hasOwn(ERRNO, name) ? ERRNO[name as ErrnoName] : undefined;
}

/** A short human reason for an errno (`111` → `"connection refused"`). */
export function errnoReason(errno: number): string {
  const name = NAMES.get(errno);
  return (name && REASONS[name]) ?? `error ${errnoName(errno)}`;
}

/** Whether an errno means the kernel has no usable AF_VSOCK (transport). */
export function isVsockUnavailable(errno: number): boolean {
  return errno === ERRNO.EAFNOSUPPORT || errno === ERRNO.ENODEV;
}

/** Options of {@linkcode SocketError}. */
export interface SocketErrorOptions {
  /** The underlying error, if any. */
  cause?: unknown;
}

/**
 * A failed socket operation: `code` is the errno name (`"ECONNREFUSED"`,
 * `"ETIMEDOUT"`, `"EADDRINUSE"`, `"EAFNOSUPPORT"`, …), `syscall` the system
 * call (or step) that failed and `errno` its number.
 */
export class SocketError extends Error {
  /** The errno name, such as `"ECONNREFUSED"`. */
  readonly code: string;
  /** The system call that failed, such as `"connect"`. */
  readonly syscall: string;
  /** The errno number. */
  readonly errno: number;

  constructor(
    message: string,
    init: { code: string; syscall: string; errno: number },
    options: SocketErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "SocketError";
    this.code = init.code;
    this.syscall = init.syscall;
    this.errno = init.errno;
  }
}

/**
 * Builds the `SocketError` of a failed call: `"<what>: <reason>"`, for example
 * `socketError("bind", 98, "Cannot bind vsock port 1024")` →
 * `Cannot bind vsock port 1024: address in use`. With `vsock: true`, an errno
 * meaning "no AF_VSOCK" gives {@linkcode VSOCK_UNAVAILABLE} instead.
 */
export function socketError(
  syscall: string,
  errno: number,
  what: string,
  options: { vsock?: boolean; cause?: unknown } = {},
): SocketError {
  const code = errnoName(errno);
  const message = options.vsock && isVsockUnavailable(errno)
    ? VSOCK_UNAVAILABLE
    : `${what}: ${errnoReason(errno)}`;
  return new SocketError(message, { code, syscall, errno }, { cause: options.cause });
}

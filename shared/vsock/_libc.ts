/**
 * The only unsafe module of the project: the libc symbol table, `Deno.dlopen`,
 * `UnsafePointerView` and errno handling.
 *
 * Provides thin synchronous wrappers over the socket, epoll and eventfd system
 * calls used by `shared/vsock/`, and the few path calls (`mkdir`, `chmod`,
 * `unlink`, `rmdir`, `statx`) a unix socket under `/dev` needs: Deno 2.9's
 * own file system API refuses most paths under `/dev` without `--allow-all`.
 * Every wrapper returns the call's result, or `-errno` when the call failed:
 * errno is read synchronously, on the calling thread, right after the failing
 * call. The only `nonblocking` symbol is
 * `epoll_wait`, used by the single waiter in `_reactor.ts`; it reports failure
 * as `-1` only, since its errno belongs to another thread. (`epoll_poll` is
 * the same function called synchronously with a zero timeout.)
 *
 * Owns: the `libc.so.6` handle, opened on first use (never at import time) and
 * kept for the life of the process.
 *
 * Permissions: `--allow-ffi` (which, like any FFI, bypasses Deno's net/read/write
 * permission checks for the sockets and paths used through it).
 *
 * @module
 */

/** The address families: defined with the sockaddr encodings. */
export { AF_UNIX, AF_VSOCK } from "./sockaddr.ts";

/** Linux socket, epoll and vsock constants (the same on x86_64 and aarch64). */
export const SOCK_STREAM = 1;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const O_RDONLY = 0;
export const O_NONBLOCK = 0o4000;
export const O_CLOEXEC = 0o2000000;
export const F_GETFL = 3;
export const F_GETFD = 1;
export const FD_CLOEXEC = 1;
export const SOL_SOCKET = 1;
export const SO_ERROR = 4;
export const SO_RCVBUF = 8;
export const SO_SNDBUF = 7;
/** `SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD`: a `struct timeval` (two `long`s). */
export const SO_VM_SOCKETS_CONNECT_TIMEOUT = 6;
/** `_IO(7, 0xb9)`. */
export const IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7b9;
export const SHUT_RD = 0;
export const SHUT_WR = 1;
export const SHUT_RDWR = 2;
export const MSG_NOSIGNAL = 0x4000;
export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLIN = 0x001;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;
/** `statx(2)`: relative to the working directory, do not follow a last symlink. */
export const AT_FDCWD = -100;
export const AT_SYMLINK_NOFOLLOW = 0x100;
export const STATX_TYPE = 0x1;
export const STATX_MODE = 0x2;
export const STATX_INO = 0x100;
/** File type bits of `st_mode`. */
export const S_IFMT = 0o170000;
export const S_IFSOCK = 0o140000;
export const S_IFDIR = 0o040000;

/** errno values used by the callers (asm-generic, same on x86_64 and aarch64). */
export const ENOENT = 2;
export const EINTR = 4;
export const EEXIST = 17;
export const ENOTDIR = 20;
export const ENOTEMPTY = 39;
export const ECONNREFUSED = 111;
export const EAGAIN = 11;
export const EINPROGRESS = 115;
export const EADDRINUSE = 98;
export const ECONNABORTED = 103;
export const ENOTCONN = 107;
export const EPROTO = 71;

/**
 * `struct epoll_event` is packed on x86_64 (12 bytes: u32 events, u64 data) and
 * naturally aligned elsewhere (16 bytes, data at offset 8).
 */
export const EPOLL_EVENT_SIZE = Deno.build.arch === "x86_64" ? 12 : 16;
export const EPOLL_EVENT_DATA_OFFSET = Deno.build.arch === "x86_64" ? 4 : 8;

const SYMBOLS = {
  /** int socket(int domain, int type, int protocol); */
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  /** int bind(int sockfd, const struct sockaddr *addr, socklen_t addrlen); */
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  /** int listen(int sockfd, int backlog); */
  listen: { parameters: ["i32", "i32"], result: "i32" },
  /** int accept4(int sockfd, struct sockaddr *addr, socklen_t *addrlen, int flags); */
  accept4: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  /** int connect(int sockfd, const struct sockaddr *addr, socklen_t addrlen); */
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  /** int getsockname(int sockfd, struct sockaddr *addr, socklen_t *addrlen); */
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  /** int getpeername(int sockfd, struct sockaddr *addr, socklen_t *addrlen); */
  getpeername: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  /** ssize_t recv(int sockfd, void *buf, size_t len, int flags); */
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  /** ssize_t send(int sockfd, const void *buf, size_t len, int flags); */
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  /** ssize_t read(int fd, void *buf, size_t count); */
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  /** ssize_t write(int fd, const void *buf, size_t count); */
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  /** int shutdown(int sockfd, int how); */
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  /** int close(int fd); */
  close: { parameters: ["i32"], result: "i32" },
  /** int open(const char *pathname, int flags, ...); */
  open: { parameters: ["buffer", "i32"], result: "i32" },
  /** int fcntl(int fd, int cmd, ...); called with one int argument */
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  /** int ioctl(int fd, unsigned long request, ...); called with one pointer argument */
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  /** int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen); */
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  /** int getsockopt(int sockfd, int level, int optname, void *optval, socklen_t *optlen); */
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  /** int epoll_create1(int flags); */
  epoll_create1: { parameters: ["i32"], result: "i32" },
  /** int epoll_ctl(int epfd, int op, int fd, struct epoll_event *event); */
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  /**
   * int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);
   * Runs on Deno's blocking pool: the one call that waits.
   */
  epoll_wait: {
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  /**
   * int epoll_wait(int epfd, struct epoll_event *events, int maxevents, int timeout);
   * The same function called synchronously, with timeout 0 only (a poll).
   */
  epoll_poll: { name: "epoll_wait", parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  /** int eventfd(unsigned int initval, int flags); */
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  /** int mkdir(const char *pathname, mode_t mode); */
  mkdir: { parameters: ["buffer", "u32"], result: "i32" },
  /** int rmdir(const char *pathname); */
  rmdir: { parameters: ["buffer"], result: "i32" },
  /** int chmod(const char *pathname, mode_t mode); */
  chmod: { parameters: ["buffer", "u32"], result: "i32" },
  /** int unlink(const char *pathname); */
  unlink: { parameters: ["buffer"], result: "i32" },
  /**
   * int statx(int dirfd, const char *pathname, int flags, unsigned int mask,
   *           struct statx *statxbuf);  (glibc 2.28+; the layout is the same on every arch)
   */
  statx: { parameters: ["i32", "buffer", "i32", "u32", "buffer"], result: "i32" },
  /** int *__errno_location(void); */
  __errno_location: { parameters: [], result: "pointer" },

  // Guest facts, PTYs and child processes (agent exec/state; see shared/sys/).
  /** int statfs(const char *path, struct statfs *buf); */
  statfs: { parameters: ["buffer", "buffer"], result: "i32" },
  /** int uname(struct utsname *buf); */
  uname: { parameters: ["buffer"], result: "i32" },
  /** DIR *opendir(const char *name); */
  opendir: { parameters: ["buffer"], result: "pointer" },
  /** struct dirent *readdir(DIR *dirp); */
  readdir: { parameters: ["pointer"], result: "pointer" },
  /** int closedir(DIR *dirp); */
  closedir: { parameters: ["pointer"], result: "i32" },
  /** int posix_openpt(int flags); */
  posix_openpt: { parameters: ["i32"], result: "i32" },
  /** int grantpt(int fd); */
  grantpt: { parameters: ["i32"], result: "i32" },
  /** int unlockpt(int fd); */
  unlockpt: { parameters: ["i32"], result: "i32" },
  /** int ptsname_r(int fd, char *buf, size_t buflen);  (returns an error number) */
  ptsname_r: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  /** int chown(const char *pathname, uid_t owner, gid_t group); */
  chown: { parameters: ["buffer", "u32", "u32"], result: "i32" },
  /** int pipe2(int pipefd[2], int flags); */
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  /** uid_t getuid(void); */
  getuid: { parameters: [], result: "u32" },
  /** gid_t getgid(void); */
  getgid: { parameters: [], result: "u32" },
  /** int kill(pid_t pid, int sig); */
  kill: { parameters: ["i32", "i32"], result: "i32" },
  /** pid_t waitpid(pid_t pid, int *wstatus, int options);  called with WNOHANG only */
  waitpid: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  /** long syscall(long number, ...);  called as syscall(SYS_pidfd_open, pid, flags) */
  syscall_pidfd_open: { name: "syscall", parameters: ["i64", "i32", "u32"], result: "i64" },
  /** int posix_spawn_file_actions_init(posix_spawn_file_actions_t *fa); */
  posix_spawn_file_actions_init: { parameters: ["buffer"], result: "i32" },
  /** int posix_spawn_file_actions_destroy(posix_spawn_file_actions_t *fa); */
  posix_spawn_file_actions_destroy: { parameters: ["buffer"], result: "i32" },
  /** int posix_spawn_file_actions_addopen(fa, int fd, const char *path, int oflag, mode_t mode); */
  posix_spawn_file_actions_addopen: {
    parameters: ["buffer", "i32", "buffer", "i32", "u32"],
    result: "i32",
  },
  /** int posix_spawn_file_actions_adddup2(posix_spawn_file_actions_t *fa, int fd, int newfd); */
  posix_spawn_file_actions_adddup2: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  /** int posix_spawn_file_actions_addchdir_np(fa, const char *path);  (glibc 2.29+) */
  posix_spawn_file_actions_addchdir_np: { parameters: ["buffer", "buffer"], result: "i32" },
  /** int posix_spawnattr_init(posix_spawnattr_t *attr); */
  posix_spawnattr_init: { parameters: ["buffer"], result: "i32" },
  /** int posix_spawnattr_destroy(posix_spawnattr_t *attr); */
  posix_spawnattr_destroy: { parameters: ["buffer"], result: "i32" },
  /** int posix_spawnattr_setflags(posix_spawnattr_t *attr, short flags); */
  posix_spawnattr_setflags: { parameters: ["buffer", "i16"], result: "i32" },
  /** int posix_spawnattr_setsigmask(posix_spawnattr_t *attr, const sigset_t *sigmask); */
  posix_spawnattr_setsigmask: { parameters: ["buffer", "buffer"], result: "i32" },
  /** int posix_spawnattr_setsigdefault(posix_spawnattr_t *attr, const sigset_t *sigdefault); */
  posix_spawnattr_setsigdefault: { parameters: ["buffer", "buffer"], result: "i32" },
  /** int sigemptyset(sigset_t *set); */
  sigemptyset: { parameters: ["buffer"], result: "i32" },
  /** int sigaddset(sigset_t *set, int signum); */
  sigaddset: { parameters: ["buffer", "i32"], result: "i32" },
  /**
   * int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
   *                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[]);
   * (returns an error number)
   */
  posix_spawn: {
    parameters: ["buffer", "buffer", "buffer", "buffer", "buffer", "buffer"],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

type Symbols = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let lib: { symbols: Symbols; errno: Deno.UnsafePointerView } | undefined;

function open(): { symbols: Symbols; errno: Deno.UnsafePointerView } {
  if (lib === undefined) {
    const handle = Deno.dlopen("libc.so.6", SYMBOLS);
    // errno is thread-local; every synchronous call of this isolate runs on its
    // own thread, so the address is stable for the life of the isolate.
    const pointer = handle.symbols.__errno_location();
    if (pointer === null) throw new Error("__errno_location() returned NULL");
    lib = { symbols: handle.symbols, errno: new Deno.UnsafePointerView(pointer) };
  }
  return lib;
}

/** The raw symbols (for `epoll_wait`, the only `nonblocking` one). */
function sym(): Symbols {
  return (lib ?? open()).symbols;
}

/** Returns `result`, or `-errno` when `result` is -1 (read right after the call). */
function check(result: number | bigint): number {
  const n = Number(result);
  return n === -1 ? -(lib ?? open()).errno.getInt32() : n;
}

/** socket(2): a new fd or -errno. */
export function socket(domain: number, type: number, protocol = 0): number {
  return check(sym().socket(domain, type, protocol));
}

/** bind(2): 0 or -errno. */
export function bind(fd: number, addr: Uint8Array): number {
  return check(sym().bind(fd, addr, addr.byteLength));
}

/** listen(2): 0 or -errno. */
export function listen(fd: number, backlog: number): number {
  return check(sym().listen(fd, backlog));
}

/**
 * accept4(2) with SOCK_NONBLOCK|SOCK_CLOEXEC: a new fd or -errno. The peer's
 * address is written to `addr`; `addrLen` (one u32) carries its length.
 */
export function accept4(fd: number, addr: Uint8Array, addrLen: Uint32Array): number {
  addrLen[0] = addr.byteLength;
  return check(sym().accept4(fd, addr, addrLen, SOCK_NONBLOCK | SOCK_CLOEXEC));
}

/** connect(2): 0 or -errno (`-EINPROGRESS` for a non-blocking connect under way). */
export function connect(fd: number, addr: Uint8Array): number {
  return check(sym().connect(fd, addr, addr.byteLength));
}

/** getsockname(2) into `addr`: the address length or -errno. */
export function getsockname(fd: number, addr: Uint8Array): number {
  const len = new Uint32Array([addr.byteLength]);
  const r = check(sym().getsockname(fd, addr, len));
  return r < 0 ? r : len[0];
}

/** getpeername(2) into `addr`: the address length or -errno. */
export function getpeername(fd: number, addr: Uint8Array): number {
  const len = new Uint32Array([addr.byteLength]);
  const r = check(sym().getpeername(fd, addr, len));
  return r < 0 ? r : len[0];
}

/** recv(2) into `buf`: bytes read (0 at EOF) or -errno. */
export function recv(fd: number, buf: Uint8Array): number {
  return check(sym().recv(fd, buf, BigInt(buf.byteLength), 0));
}

/** send(2) with MSG_NOSIGNAL: bytes written or -errno. */
export function send(fd: number, buf: Uint8Array): number {
  return check(sym().send(fd, buf, BigInt(buf.byteLength), MSG_NOSIGNAL));
}

/** read(2) into `buf`: bytes read or -errno. */
export function read(fd: number, buf: Uint8Array): number {
  return check(sym().read(fd, buf, BigInt(buf.byteLength)));
}

/** write(2): bytes written or -errno. */
export function write(fd: number, buf: Uint8Array): number {
  return check(sym().write(fd, buf, BigInt(buf.byteLength)));
}

/** shutdown(2): 0 or -errno. */
export function shutdown(fd: number, how: number): number {
  return check(sym().shutdown(fd, how));
}

/** close(2): 0 or -errno. */
export function close(fd: number): number {
  return check(sym().close(fd));
}

const encoder = new TextEncoder();

/** `path` as a NUL-terminated C string; a `TypeError` for an embedded NUL. */
function cPath(path: string): Uint8Array {
  if (path.includes("\0")) {
    throw new TypeError(`A path cannot contain NUL bytes: ${JSON.stringify(path)}`);
  }
  return encoder.encode(path + "\0");
}

/** open(2) without O_CREAT: a new fd or -errno. */
export function openPath(path: string, flags: number): number {
  return check(sym().open(cPath(path), flags));
}

/** mkdir(2): 0 or -errno (the umask applies to `mode`). */
export function mkdir(path: string, mode: number): number {
  return check(sym().mkdir(cPath(path), mode));
}

/** rmdir(2): 0 or -errno (`-ENOTEMPTY` for a directory with entries). */
export function rmdir(path: string): number {
  return check(sym().rmdir(cPath(path)));
}

/** chmod(2): 0 or -errno. */
export function chmod(path: string, mode: number): number {
  return check(sym().chmod(cPath(path), mode));
}

/** unlink(2): 0 or -errno. */
export function unlink(path: string): number {
  return check(sym().unlink(cPath(path)));
}

/** What {@linkcode lstat} reports of a file: `st_mode` (type and permission bits) and inode. */
export interface FileStat {
  mode: number;
  ino: bigint;
}

/** `struct statx` is 256 bytes; `stx_mode` (u16) is at offset 28, `stx_ino` (u64) at 32. */
const STATX_SIZE = 256;
const STATX_MODE_OFFSET = 28;
const STATX_INO_OFFSET = 32;

/** statx(2) without following a last symlink (an lstat): the file's mode and inode, or -errno. */
export function lstat(path: string): FileStat | number {
  const buf = new Uint8Array(STATX_SIZE);
  const r = check(
    sym().statx(
      AT_FDCWD,
      cPath(path),
      AT_SYMLINK_NOFOLLOW,
      STATX_TYPE | STATX_MODE | STATX_INO,
      buf,
    ),
  );
  if (r < 0) return r;
  const view = new DataView(buf.buffer);
  return {
    mode: view.getUint16(STATX_MODE_OFFSET, true),
    ino: view.getBigUint64(STATX_INO_OFFSET, true),
  };
}

/** fcntl(2) with an int argument: the result or -errno. */
export function fcntl(fd: number, cmd: number, arg = 0): number {
  return check(sym().fcntl(fd, cmd, arg));
}

/** ioctl(2) with a pointer argument: the result or -errno. */
export function ioctl(fd: number, request: number, arg: Uint8Array): number {
  return check(sym().ioctl(fd, BigInt(request), arg));
}

/** setsockopt(2): 0 or -errno. */
export function setsockopt(fd: number, level: number, name: number, value: Uint8Array): number {
  return check(sym().setsockopt(fd, level, name, value, value.byteLength));
}

/** getsockopt(2) of an int option: the value (>= 0) or -errno. */
export function getsockoptInt(fd: number, level: number, name: number): number {
  const value = new Int32Array(1);
  const len = new Uint32Array([4]);
  const r = check(sym().getsockopt(fd, level, name, value, len));
  return r < 0 ? r : value[0];
}

/** epoll_create1(2): a new fd or -errno. */
export function epollCreate1(flags: number): number {
  return check(sym().epoll_create1(flags));
}

/** epoll_ctl(2): 0 or -errno. `event` is one `struct epoll_event` (or empty for DEL). */
export function epollCtl(epfd: number, op: number, fd: number, event: Uint8Array): number {
  return check(sym().epoll_ctl(epfd, op, fd, event));
}

/**
 * epoll_wait(2) on Deno's blocking pool. Resolves to the number of events, or
 * -1 on failure (errno is not readable: it belongs to the pool thread). The
 * caller must keep `events` untouched until the promise settles.
 */
export function epollWait(epfd: number, events: Uint8Array, timeoutMs: number): Promise<number> {
  return sym().epoll_wait(
    epfd,
    events,
    Math.floor(events.byteLength / EPOLL_EVENT_SIZE),
    timeoutMs,
  );
}

/** epoll_wait(2) with timeout 0, synchronously: the number of ready events or -errno. */
export function epollPoll(epfd: number, events: Uint8Array): number {
  return check(
    sym().epoll_poll(epfd, events, Math.floor(events.byteLength / EPOLL_EVENT_SIZE), 0),
  );
}

/** eventfd(2): a new fd or -errno. */
export function eventfd(initval: number, flags: number): number {
  return check(sym().eventfd(initval, flags));
}

// ---- Guest facts, PTYs and child processes (safe API in shared/sys/) ----

export const O_RDWR = 2;
export const O_NOCTTY = 0o400;
export const F_SETFL = 4;
/** `TIOCSWINSZ` / `TIOCGWINSZ` (asm-generic ioctls; x86_64 and aarch64). */
export const TIOCSWINSZ = 0x5414;
export const TIOCGWINSZ = 0x5413;
export const WNOHANG = 1;
/** `POSIX_SPAWN_SETSIGDEF`, `POSIX_SPAWN_SETSIGMASK`, `POSIX_SPAWN_SETSID` (glibc 2.26+). */
export const POSIX_SPAWN_SETSIGDEF = 0x04;
export const POSIX_SPAWN_SETSIGMASK = 0x08;
export const POSIX_SPAWN_SETSID = 0x80;
/** `SYS_pidfd_open` (the same number on every architecture, Linux 5.3+). */
export const SYS_PIDFD_OPEN = 434;

/** Reads errno now (right after a failing synchronous call). */
function errno(): number {
  return (lib ?? open()).errno.getInt32();
}

/** `struct statfs` (64-bit Linux): 120 bytes, `f_type`, `f_bsize`, `f_blocks`, `f_bfree`, `f_bavail` first. */
export interface StatFs {
  type: bigint;
  bsize: bigint;
  blocks: bigint;
  bfree: bigint;
  bavail: bigint;
}

/** statfs(2): the file system's type and block counts, or -errno. */
export function statfs(path: string): StatFs | number {
  const buf = new BigUint64Array(16);
  const r = check(sym().statfs(cPath(path), buf));
  if (r < 0) return r;
  return { type: buf[0], bsize: buf[1], blocks: buf[2], bfree: buf[3], bavail: buf[4] };
}

/** uname(2): `sysname`, `nodename`, `release`, `version`, `machine` (65-byte fields); throws on failure. */
export function uname(): Record<
  "sysname" | "nodename" | "release" | "version" | "machine",
  string
> {
  const buf = new Uint8Array(65 * 6);
  const r = check(sym().uname(buf));
  if (r < 0) throw new Error(`uname() failed: errno ${-r}`);
  const field = (i: number) => {
    const bytes = buf.subarray(i * 65, (i + 1) * 65);
    const end = bytes.indexOf(0);
    return new TextDecoder().decode(bytes.subarray(0, end < 0 ? 65 : end));
  };
  return {
    sysname: field(0),
    nodename: field(1),
    release: field(2),
    version: field(3),
    machine: field(4),
  };
}

/** One directory entry: its name and `d_type` (4 = directory, 8 = regular file, 10 = symlink). */
export interface DirEntry {
  name: string;
  type: number;
}

/**
 * The entries of a directory (without `.` and `..`) through opendir/readdir,
 * or -errno. `struct dirent` (glibc, 64-bit): `d_type` at offset 18, `d_name` at 19.
 */
export function readDir(path: string): DirEntry[] | number {
  const s = sym();
  const dir = s.opendir(cPath(path));
  if (dir === null) return -errno();
  const entries: DirEntry[] = [];
  try {
    for (;;) {
      const entry = s.readdir(dir);
      if (entry === null) break;
      const view = new Deno.UnsafePointerView(entry);
      const name = view.getCString(19);
      if (name !== "." && name !== "..") entries.push({ name, type: view.getUint8(18) });
    }
  } finally {
    s.closedir(dir);
  }
  return entries;
}

/** posix_openpt(3): a PTY master fd or -errno. */
export function posixOpenpt(flags: number): number {
  return check(sym().posix_openpt(flags));
}

/** grantpt(3): 0 or -errno. */
export function grantpt(fd: number): number {
  return check(sym().grantpt(fd));
}

/** unlockpt(3): 0 or -errno. */
export function unlockpt(fd: number): number {
  return check(sym().unlockpt(fd));
}

/** ptsname_r(3): the slave's path, or -errno. */
export function ptsname(fd: number): string | number {
  const buf = new Uint8Array(128);
  const r = sym().ptsname_r(fd, buf, BigInt(buf.byteLength));
  if (r !== 0) return -r;
  return new TextDecoder().decode(buf.subarray(0, buf.indexOf(0)));
}

/** chown(2): 0 or -errno. */
export function chown(path: string, uid: number, gid: number): number {
  return check(sym().chown(cPath(path), uid, gid));
}

/** pipe2(2): `[readFd, writeFd]` or -errno. */
export function pipe2(flags: number): [number, number] | number {
  const fds = new Int32Array(2);
  const r = check(sym().pipe2(fds, flags));
  return r < 0 ? r : [fds[0], fds[1]];
}

/** getuid(2) and getgid(2). */
export function getuid(): number {
  return sym().getuid();
}
export function getgid(): number {
  return sym().getgid();
}

/** kill(2): 0 or -errno. */
export function kill(pid: number, signal: number): number {
  return check(sym().kill(pid, signal));
}

/** waitpid(2) with WNOHANG: `{pid, status}` (pid 0 while the child runs), or -errno. */
export function waitpidNohang(pid: number): { pid: number; status: number } | number {
  const status = new Int32Array(1);
  const r = check(sym().waitpid(pid, status, WNOHANG));
  return r < 0 ? r : { pid: r, status: status[0] };
}

/** pidfd_open(2) through syscall(2): an fd readable once the child exits, or -errno. */
export function pidfdOpen(pid: number): number {
  return check(sym().syscall_pidfd_open(BigInt(SYS_PIDFD_OPEN), pid, 0));
}

/** What the child does with its fds before exec, in order. */
export type SpawnFileAction =
  | { open: { fd: number; path: string; flags: number; mode?: number } }
  | { dup2: { from: number; to: number } };

/** A posix_spawn(3) request; `path` is absolute (no PATH search). */
export interface SpawnRequest {
  path: string;
  argv: string[];
  /** `NAME=value` strings. */
  env: string[];
  cwd?: string;
  /** Make the child a session leader (POSIX_SPAWN_SETSID), before the file actions run. */
  setsid?: boolean;
  fileActions?: SpawnFileAction[];
  /** Signals reset to their default action in the child (an ignored SIGPIPE would be inherited). */
  defaultSignals?: number[];
}

/** A NULL-terminated `char *[]` over `strings`; the returned buffers must stay referenced. */
function cStringArray(strings: string[]): { array: BigUint64Array; keep: Uint8Array[] } {
  const keep = strings.map((s) => cPath(s));
  const array = new BigUint64Array(keep.length + 1);
  keep.forEach((buf, i) => {
    array[i] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
  });
  return { array, keep };
}

/**
 * posix_spawn(3) with an empty signal mask: the child's pid, or -errno (the
 * error number posix_spawn returns: ENOENT, EACCES, … for a failed exec).
 * Every buffer handed to libc is referenced until the call returns, and the
 * attribute and file-action objects are destroyed on every path.
 */
export function posixSpawn(request: SpawnRequest): number {
  const s = sym();
  // glibc: posix_spawnattr_t is 336 bytes, posix_spawn_file_actions_t 80 (x86_64); room to spare.
  const attr = new Uint8Array(1024);
  const actions = new Uint8Array(1024);
  const mask = new Uint8Array(128);
  const defaults = new Uint8Array(128);
  const keep: Uint8Array[] = [];
  let r = s.posix_spawnattr_init(attr);
  if (r !== 0) return -r;
  try {
    r = s.posix_spawn_file_actions_init(actions);
    if (r !== 0) return -r;
    try {
      s.sigemptyset(mask);
      s.sigemptyset(defaults);
      for (const signal of request.defaultSignals ?? []) s.sigaddset(defaults, signal);
      let flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
      if (request.setsid) flags |= POSIX_SPAWN_SETSID;
      for (
        const step of [
          () => s.posix_spawnattr_setflags(attr, flags),
          () => s.posix_spawnattr_setsigmask(attr, mask),
          () => s.posix_spawnattr_setsigdefault(attr, defaults),
        ]
      ) {
        r = step();
        if (r !== 0) return -r;
      }
      for (const action of request.fileActions ?? []) {
        if ("open" in action) {
          const path = cPath(action.open.path);
          keep.push(path);
          r = s.posix_spawn_file_actions_addopen(
            actions,
            action.open.fd,
            path,
            action.open.flags,
            action.open.mode ?? 0,
          );
        } else {
          r = s.posix_spawn_file_actions_adddup2(actions, action.dup2.from, action.dup2.to);
        }
        if (r !== 0) return -r;
      }
      if (request.cwd !== undefined) {
        const cwd = cPath(request.cwd);
        keep.push(cwd);
        r = s.posix_spawn_file_actions_addchdir_np(actions, cwd);
        if (r !== 0) return -r;
      }
      const path = cPath(request.path);
      const argv = cStringArray(request.argv);
      const envp = cStringArray(request.env);
      const pid = new Int32Array(1);
      r = s.posix_spawn(pid, path, actions, attr, argv.array, envp.array);
      // The strings must outlive the call: referenced here until it returned.
      keep.push(path, ...argv.keep, ...envp.keep);
      return r !== 0 ? -r : pid[0];
    } finally {
      s.posix_spawn_file_actions_destroy(actions);
    }
  } finally {
    s.posix_spawnattr_destroy(attr);
  }
}

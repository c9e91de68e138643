/**
 * `spawnChild`: a command started with `posix_spawn` (libc, FFI), because
 * `Deno.Command` cannot give a child a controlling terminal. The child is a
 * session leader (`POSIX_SPAWN_SETSID`, as lxd-agent's `Setsid`); with a
 * {@linkcode Pty} it opens the PTY's slave as its stdin/stdout/stderr, which
 * makes it its controlling terminal (lxd-agent's `Setctty`), otherwise it gets
 * three pipes. It starts with an empty signal mask and the default action for
 * the signals a runtime commonly ignores (SIGPIPE, …), in `cwd`, with exactly
 * `env`. The command is looked up on the `PATH` of `env` (not the agent's).
 *
 * Another user or group than the agent's own is reached through util-linux
 * `setpriv --reuid --regid --clear-groups` (posix_spawn cannot change
 * credentials; lxd-agent sets uid/gid with no supplementary groups). An
 * agent that is not root (tests) runs a request for uid/gid 0 as itself and
 * refuses any other identity.
 *
 * The exit is awaited on a pidfd (`pidfd_open`, Linux 5.3+) woken by the
 * shared epoll waiter, then reaped with `waitpid(WNOHANG)`; without pidfd
 * support it polls every 50 ms. The status follows lxd-agent: the exit code,
 * or 128 + the signal number when a signal ended the child.
 *
 * Owns: the child's pipes (`stdin`/`stdout`/`stderr`) and its pidfd, closed by
 * `close()`; the child itself is only killed by `kill()`. Permissions:
 * `--allow-ffi`, `--allow-read` (the PATH lookup).
 * @module
 */

import * as libc from "../vsock/_libc.ts";
import { forget, waitReadable } from "../vsock/_reactor.ts";
import { ERRNO, socketError } from "../vsock/socket_error.ts";
import { FdStream } from "./fd_stream.ts";
import type { Pty } from "./pty.ts";

/** Signal numbers (x86_64 and aarch64). */
export const SIGNALS = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGKILL: 9,
  SIGUSR1: 10,
  SIGUSR2: 12,
  SIGPIPE: 13,
  SIGTERM: 15,
  SIGCHLD: 17,
  SIGTSTP: 20,
  SIGTTIN: 21,
  SIGTTOU: 22,
  SIGXFSZ: 25,
  SIGWINCH: 28,
} as const;

const RESET_SIGNALS = Object.values(SIGNALS).filter((s) => s !== SIGNALS.SIGKILL);

/** Why a command could not be started; `status` is what lxd-agent reports (127 not found, 126 not executable, -1 other). */
export class SpawnError extends Error {
  override name = "SpawnError";
  constructor(readonly status: number, message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

/** Options of {@linkcode spawnChild}. */
export interface SpawnOptions {
  /** `argv`; the first word is looked up on `env.PATH` unless it contains a slash. */
  command: string[];
  /** The child's whole environment. */
  env: Record<string, string>;
  /** @default {"/"} */
  cwd?: string;
  /** @default {the agent's own uid} */
  uid?: number;
  /** @default {the agent's own gid} */
  gid?: number;
  /** Run on this PTY (interactive); otherwise on three pipes. */
  pty?: Pty;
}

const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** `name` resolved on `path` (a `:`-separated list); throws `SpawnError` 127/126. */
export function resolveCommand(name: string, path: string): string {
  const check = (candidate: string): "ok" | "missing" | "not-executable" => {
    try {
      const info = Deno.statSync(candidate);
      if (!info.isFile) return "not-executable";
      return ((info.mode ?? 0) & 0o111) !== 0 ? "ok" : "not-executable";
    } catch {
      return "missing";
    }
  };
  if (name === "") throw new SpawnError(127, "No command given");
  if (name.includes("/")) {
    const result = check(name);
    if (result === "ok") return name;
    if (result === "missing") throw new SpawnError(127, `${name}: no such file or directory`);
    throw new SpawnError(126, `${name}: permission denied`);
  }
  let denied: string | undefined;
  for (const dir of path.split(":")) {
    if (dir === "") continue;
    const candidate = `${dir}/${name}`;
    const result = check(candidate);
    if (result === "ok") return candidate;
    if (result === "not-executable") denied ??= candidate;
  }
  if (denied !== undefined) throw new SpawnError(126, `${denied}: permission denied`);
  throw new SpawnError(127, `${name}: executable file not found in $PATH`);
}

/** lxd-agent's exit status of a `waitpid` status: the code, or 128 + the signal. */
export function exitStatus(status: number): number {
  const signal = status & 0x7f;
  if (signal === 0) return (status >> 8) & 0xff;
  return 128 + signal;
}

/** A running (or finished) child process. */
export class ChildProcess {
  readonly pid: number;
  /** The pipe to the child's stdin (absent on a PTY). */
  readonly stdin: FdStream | undefined;
  readonly stdout: FdStream | undefined;
  readonly stderr: FdStream | undefined;
  /** Resolves with lxd-agent's exit status once the child is reaped. */
  readonly status: Promise<number>;
  #exited = false;

  constructor(pid: number, pipes: [FdStream, FdStream, FdStream] | undefined) {
    this.pid = pid;
    [this.stdin, this.stdout, this.stderr] = pipes ?? [undefined, undefined, undefined];
    this.status = this.#wait();
  }

  /** Whether the child has been reaped. */
  get exited(): boolean {
    return this.#exited;
  }

  /**
   * Sends `signal` to the child (not once it has been reaped); with `group`,
   * to its whole process group too (the child leads its own session, so the
   * group is what it started that did not move away). False when it could not be sent.
   */
  kill(signal: number = SIGNALS.SIGKILL, options: { group?: boolean } = {}): boolean {
    if (this.#exited) return false;
    if (options.group) libc.kill(-this.pid, signal);
    return libc.kill(this.pid, signal) === 0;
  }

  async #wait(): Promise<number> {
    const pidfd = libc.pidfdOpen(this.pid);
    try {
      for (;;) {
        const r = libc.waitpidNohang(this.pid);
        if (typeof r === "number") {
          if (r === -ERRNO.EINTR) continue;
          this.#exited = true;
          return -1; // ECHILD: reaped elsewhere; the status is lost.
        }
        if (r.pid === this.pid) {
          this.#exited = true;
          return exitStatus(r.status);
        }
        if (pidfd >= 0) await waitReadable(pidfd);
        else await new Promise((resolve) => setTimeout(resolve, 50));
      }
    } finally {
      if (pidfd >= 0) {
        forget(pidfd);
        libc.close(pidfd);
      }
    }
  }

  /** Closes the pipes (the child keeps running if it has not exited). Idempotent. */
  close(): void {
    this.stdin?.close();
    this.stdout?.close();
    this.stderr?.close();
  }
}

function findSetpriv(path: string): string {
  try {
    return resolveCommand("setpriv", `${path}:${DEFAULT_PATH}`);
  } catch {
    throw new SpawnError(
      -1,
      "Running a command as another user needs setpriv (util-linux), which is not installed",
    );
  }
}

/**
 * The identity a command asked to run as `uid`/`gid` (default: the agent's
 * own) gets: as asked, except that an agent which is not root (a test run)
 * runs a request for root as itself.
 */
export function effectiveIdentity(uid?: number, gid?: number): { uid: number; gid: number } {
  const self = { uid: libc.getuid(), gid: libc.getgid() };
  const wanted = { uid: uid ?? self.uid, gid: gid ?? self.gid };
  return self.uid !== 0 && wanted.uid === 0 && wanted.gid === 0 ? self : wanted;
}

/**
 * Starts `options.command`. Throws `SpawnError` when it cannot be found or
 * executed (`status` 127/126), or a `SocketError` for a failing system call.
 */
export function spawnChild(options: SpawnOptions): ChildProcess {
  const path = options.env.PATH ?? DEFAULT_PATH;
  const program = resolveCommand(options.command[0] ?? "", path);
  let argv = [options.command[0], ...options.command.slice(1)];
  let executable = program;
  const self = { uid: libc.getuid(), gid: libc.getgid() };
  const { uid, gid } = effectiveIdentity(options.uid, options.gid);
  if (uid !== self.uid || gid !== self.gid) {
    if (self.uid !== 0) {
      throw new SpawnError(-1, `Cannot run as uid ${uid} gid ${gid}: the agent is not root`);
    }
    executable = findSetpriv(path);
    argv = [
      "setpriv",
      `--reuid=${uid}`,
      `--regid=${gid}`,
      "--clear-groups",
      "--",
      program,
      ...options.command.slice(1),
    ];
  }
  const env = Object.entries(options.env).map(([k, v]) => `${k}=${v}`);
  const cwd = options.cwd ?? "/";

  // A new session, default signal dispositions, fds 0–2 from `fileActions`.
  const spawn = (fileActions: Parameters<typeof libc.posixSpawn>[0]["fileActions"]): number => {
    const pid = libc.posixSpawn({
      path: executable,
      argv,
      env,
      cwd,
      setsid: true,
      defaultSignals: RESET_SIGNALS,
      fileActions,
    });
    if (pid < 0) throw spawnFailure(-pid, program, cwd);
    return pid;
  };

  if (options.pty !== undefined) {
    const pid = spawn([
      // Opened after setsid(), without O_NOCTTY: the PTY becomes the controlling terminal.
      { open: { fd: 0, path: options.pty.path, flags: libc.O_RDWR } },
      { dup2: { from: 0, to: 1 } },
      { dup2: { from: 0, to: 2 } },
    ]);
    return new ChildProcess(pid, undefined);
  }

  const pipes: number[] = [];
  try {
    for (let i = 0; i < 3; i++) {
      const pair = libc.pipe2(libc.O_CLOEXEC);
      if (typeof pair === "number") throw socketError("pipe2", -pair, "Cannot create a pipe");
      pipes.push(...pair);
    }
    // pipes: [stdin r, stdin w, stdout r, stdout w, stderr r, stderr w]
    const pid = spawn([
      { dup2: { from: pipes[0], to: 0 } },
      { dup2: { from: pipes[3], to: 1 } },
      { dup2: { from: pipes[5], to: 2 } },
    ]);
    for (const fd of [pipes[0], pipes[3], pipes[5]]) libc.close(fd);
    const streams: [FdStream, FdStream, FdStream] = [
      new FdStream(pipes[1], "the command's stdin"),
      new FdStream(pipes[2], "the command's stdout"),
      new FdStream(pipes[4], "the command's stderr"),
    ];
    pipes.length = 0;
    return new ChildProcess(pid, streams);
  } finally {
    for (const fd of pipes) libc.close(fd);
  }
}

function spawnFailure(errno: number, program: string, cwd: string): Error {
  if (errno === ERRNO.ENOENT) {
    return new SpawnError(127, `${program} or the directory ${cwd}: no such file or directory`);
  }
  if (errno === ERRNO.EACCES) return new SpawnError(126, `${program}: permission denied`);
  return new SpawnError(-1, `Cannot start ${program}`, {
    cause: socketError("posix_spawn", errno, `Cannot start ${program}`),
  });
}

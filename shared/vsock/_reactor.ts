/**
 * The single waiter that wakes every non-blocking socket of `shared/vsock/`.
 *
 * One epoll instance and ONE outstanding `epoll_wait` call (on Deno's blocking
 * pool) for the whole isolate, looping while any fd has a waiter. An fd is in
 * the epoll set only while somebody awaits it ({@linkcode waitReadable},
 * {@linkcode waitWritable}), level-triggered; it leaves the set as soon as its
 * waiters are woken. When the last fd leaves while `epoll_wait` is under way,
 * an eventfd interrupts it, so the loop stops and nothing keeps the process (or
 * a test's op sanitizer) alive once no socket is waited on.
 *
 * Before each blocking `epoll_wait`, the loop lets the continuations of the
 * waiters it just woke run (a few microtask turns) and polls with a zero
 * timeout, synchronously: events those continuations caused (an in-process
 * peer's reply, a quick answer) are handled without a hop to Deno's blocking
 * pool. At most 64 polls in a row, then it blocks again, which also lets
 * timers and other I/O run.
 *
 * Wake-ups are hints: a woken caller retries its non-blocking call and waits
 * again on `EAGAIN` (a stale event for a closed and reused fd number is
 * therefore harmless).
 *
 * Owns: the epoll fd and the eventfd, created on first use and kept for the
 * life of the isolate. Permissions: `--allow-ffi`.
 *
 * @module
 */

import * as libc from "./_libc.ts";
import { socketError } from "./socket_error.ts";

type Waiter = { resolve: () => void; reject: (error: Error) => void };

type FdState = {
  /** The mask the fd is registered with in the epoll set; 0 = not in the set. */
  mask: number;
  readers: Waiter[];
  writers: Waiter[];
};

const MAX_EVENTS = 256;
/**
 * Non-blocking polls in a row before the loop blocks in `epoll_wait` again
 * (which also lets timers and other I/O of the event loop run).
 */
const MAX_POLLS = 64;
/** Microtask turns given to woken waiters before the non-blocking poll. */
const YIELD_TURNS = 4;

async function yieldOnce(): Promise<void> {
  for (let i = 0; i < YIELD_TURNS; i++) await null;
}
const READ_EVENTS = libc.EPOLLIN | libc.EPOLLRDHUP | libc.EPOLLHUP | libc.EPOLLERR;
const WRITE_EVENTS = libc.EPOLLOUT | libc.EPOLLHUP | libc.EPOLLERR;

class Reactor {
  #epfd: number;
  #wakeFd: number;
  #fds = new Map<number, FdState>();
  /** fds currently in the epoll set (the eventfd excluded). */
  #registered = 0;
  #running = false;
  #inFlight = false;
  #wakePending = false;
  /** Written only by the kernel while `epoll_wait` is in flight. */
  #events = new Uint8Array(MAX_EVENTS * libc.EPOLL_EVENT_SIZE);
  #eventView = new DataView(this.#events.buffer);
  #ctl = new Uint8Array(libc.EPOLL_EVENT_SIZE);
  #ctlView = new DataView(this.#ctl.buffer);
  #scratch = new Uint8Array(8);
  #one = new Uint8Array(new BigUint64Array([1n]).buffer);
  #loops = 0;
  #waits = 0;
  #polls = 0;

  constructor() {
    const epfd = libc.epollCreate1(libc.EPOLL_CLOEXEC);
    if (epfd < 0) throw socketError("epoll_create1", -epfd, "Cannot create the epoll instance");
    const wakeFd = libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC);
    if (wakeFd < 0) {
      libc.close(epfd);
      throw socketError("eventfd", -wakeFd, "Cannot create the waiter's eventfd");
    }
    this.#epfd = epfd;
    this.#wakeFd = wakeFd;
    const r = this.#epollCtl(libc.EPOLL_CTL_ADD, wakeFd, libc.EPOLLIN);
    if (r < 0) throw socketError("epoll_ctl", -r, "Cannot watch the waiter's eventfd");
  }

  /** Whether the `epoll_wait` loop is running. */
  get running(): boolean {
    return this.#running;
  }

  /** How many times the loop was started (a figure for tests and benchmarks). */
  get loops(): number {
    return this.#loops;
  }

  /** How many blocking `epoll_wait` calls were made. */
  get waits(): number {
    return this.#waits;
  }

  /** How many non-blocking polls were made. */
  get polls(): number {
    return this.#polls;
  }

  /** How many fds are in the epoll set now. */
  get registered(): number {
    return this.#registered;
  }

  wait(fd: number, write: boolean): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let state = this.#fds.get(fd);
      if (state === undefined) {
        state = { mask: 0, readers: [], writers: [] };
        this.#fds.set(fd, state);
      }
      (write ? state.writers : state.readers).push({ resolve, reject });
      this.#update(fd, state);
    });
  }

  /** Wakes every waiter of `fd` and removes it from the set (call before close). */
  forget(fd: number): void {
    const state = this.#fds.get(fd);
    if (state === undefined) return;
    const waiters = [...state.readers, ...state.writers];
    state.readers = [];
    state.writers = [];
    this.#update(fd, state);
    this.#fds.delete(fd);
    for (const waiter of waiters) waiter.resolve();
  }

  #epollCtl(op: number, fd: number, mask: number): number {
    this.#ctlView.setUint32(0, mask, true);
    this.#ctlView.setUint32(libc.EPOLL_EVENT_DATA_OFFSET, fd, true);
    this.#ctlView.setUint32(libc.EPOLL_EVENT_DATA_OFFSET + 4, 0, true);
    return libc.epollCtl(this.#epfd, op, fd, this.#ctl);
  }

  #update(fd: number, state: FdState): void {
    const want = (state.readers.length > 0 ? libc.EPOLLIN | libc.EPOLLRDHUP : 0) |
      (state.writers.length > 0 ? libc.EPOLLOUT : 0);
    if (want === state.mask) return;
    let r: number;
    if (state.mask === 0) {
      r = this.#epollCtl(libc.EPOLL_CTL_ADD, fd, want);
      if (r === 0) this.#registered++;
    } else if (want === 0) {
      r = this.#epollCtl(libc.EPOLL_CTL_DEL, fd, 0);
      // Whatever DEL says (EBADF, ENOENT after a close), the fd is out of the set.
      r = 0;
      this.#registered--;
    } else {
      r = this.#epollCtl(libc.EPOLL_CTL_MOD, fd, want);
    }
    if (r < 0) {
      // Cannot watch this fd (closed, or not pollable): fail its waiters rather
      // than leave them hanging.
      this.#failFd(fd, state, socketError("epoll_ctl", -r, `Cannot wait on fd ${fd}`));
      this.#fds.delete(fd);
      this.#afterChange();
      return;
    }
    state.mask = want;
    if (want === 0) this.#fds.delete(fd);
    this.#afterChange();
  }

  #afterChange(): void {
    if (this.#registered > 0) {
      if (!this.#running) {
        this.#running = true;
        this.#loops++;
        this.#loop();
      }
    } else if (this.#inFlight && !this.#wakePending) {
      // Nothing left to wait for: interrupt the outstanding epoll_wait so the
      // loop ends and the pending call no longer keeps the isolate alive.
      this.#wakePending = true;
      libc.write(this.#wakeFd, this.#one);
    }
  }

  async #loop(): Promise<void> {
    let failures = 0;
    let polls = 0;
    try {
      while (this.#registered > 0) {
        if (polls < MAX_POLLS) {
          // Let the continuations of the waiters just woken run, then poll
          // without blocking: what they caused (an in-process peer's reply,
          // a quick answer) is picked up without a hop to the blocking pool.
          await yieldOnce();
          if (this.#registered === 0) break;
          const n = libc.epollPoll(this.#epfd, this.#events);
          this.#polls++;
          if (n > 0) {
            polls++;
            this.#dispatch(n);
            continue;
          }
        }
        polls = 0;
        this.#inFlight = true;
        this.#waits++;
        let n: number;
        try {
          n = await libc.epollWait(this.#epfd, this.#events, -1);
        } finally {
          this.#inFlight = false;
        }
        if (n < 0) {
          // EINTR, most likely; errno is not ours to read.
          if (++failures < 100) continue;
          this.#failAll(new Error("epoll_wait keeps failing"));
          break;
        }
        failures = 0;
        this.#dispatch(n);
      }
    } catch (error) {
      this.#failAll(error instanceof Error ? error : new Error(String(error)));
    } finally {
      this.#running = false;
    }
  }

  #dispatch(n: number): void {
    const woken: Waiter[] = [];
    for (let i = 0; i < n; i++) {
      const base = i * libc.EPOLL_EVENT_SIZE;
      const events = this.#eventView.getUint32(base, true);
      const fd = this.#eventView.getInt32(base + libc.EPOLL_EVENT_DATA_OFFSET, true);
      if (fd === this.#wakeFd) {
        libc.read(this.#wakeFd, this.#scratch);
        this.#wakePending = false;
        continue;
      }
      const state = this.#fds.get(fd);
      if (state === undefined) continue;
      let changed = false;
      if (events & READ_EVENTS && state.readers.length > 0) {
        woken.push(...state.readers);
        state.readers = [];
        changed = true;
      }
      if (events & WRITE_EVENTS && state.writers.length > 0) {
        woken.push(...state.writers);
        state.writers = [];
        changed = true;
      }
      if (changed) this.#update(fd, state);
    }
    for (const waiter of woken) waiter.resolve();
  }

  #failAll(error: Error): void {
    for (const [fd, state] of this.#fds) this.#failFd(fd, state, error);
    this.#fds.clear();
  }

  /** Unregisters `fd` from epoll and rejects everything waiting on it. */
  #failFd(fd: number, state: FdState, error: Error): void {
    const waiters = [...state.readers, ...state.writers];
    state.readers = [];
    state.writers = [];
    if (state.mask !== 0) {
      this.#epollCtl(libc.EPOLL_CTL_DEL, fd, 0);
      this.#registered--;
    }
    state.mask = 0;
    for (const waiter of waiters) waiter.reject(error);
  }
}

let reactor: Reactor | undefined;

function instance(): Reactor {
  return reactor ??= new Reactor();
}

/** Resolves when `fd` is readable (or has hung up, or failed), or when it is forgotten. */
export function waitReadable(fd: number): Promise<void> {
  return instance().wait(fd, false);
}

/** Resolves when `fd` is writable (or has hung up, or failed), or when it is forgotten. */
export function waitWritable(fd: number): Promise<void> {
  return instance().wait(fd, true);
}

/** Wakes the waiters of `fd` and drops it from the epoll set; call before closing it. */
export function forget(fd: number): void {
  reactor?.forget(fd);
}

/** The waiter's state, for tests and benchmarks. */
export function reactorStats(): ReactorStats {
  return {
    running: reactor?.running ?? false,
    registered: reactor?.registered ?? 0,
    loops: reactor?.loops ?? 0,
    waits: reactor?.waits ?? 0,
    polls: reactor?.polls ?? 0,
  };
}

/** Counters of the waiter. */
export interface ReactorStats {
  /** Whether the loop is running (an `epoll_wait` is outstanding or about to be). */
  running: boolean;
  /** fds in the epoll set now. */
  registered: number;
  /** Times the loop was started. */
  loops: number;
  /** Blocking `epoll_wait` calls made (each one hop to Deno's blocking pool). */
  waits: number;
  /** Non-blocking polls made. */
  polls: number;
}

/**
 * `ConnectionPool`: idle keep-alive connections of the mutual-TLS client
 * (`mtls_client.ts`), so that a burst of requests to one peer (the agent's
 * guest requests to the host: cloud-init's boot reads, a config-management
 * run) pays one handshake instead of one per request, while an idle client
 * holds nothing: a connection left idle for `idleTimeout` ms is closed.
 *
 * Connections are kept per key (the peer's address and pinned certificate:
 * new connection info never reuses a connection made for the old one), at
 * most `maxIdle` of them, newest first. A connection the peer closes while
 * idle leaves the pool at once. Each pooled connection still holds its slot
 * of the caller's bound on open connections (it is open); a connection
 * returned while requests wait for a slot is closed instead, so that the
 * waiter gets its slot now and no request waits for an idle timer.
 *
 * Owns the idle connections and their timers: `close()` destroys both.
 * Needs no permissions.
 * @module
 */

import type { Duplex } from "node:stream";
import type { Slots } from "../slots.ts";

/** Options of {@linkcode ConnectionPool}. */
export interface ConnectionPoolOptions {
  /**
   * Milliseconds an idle connection is kept; 0 closes every connection after
   * its response (one connection per request).
   * @default 2000
   */
  idleTimeout?: number;
  /**
   * Idle connections kept at most (over all addresses).
   * @default 4
   */
  maxIdle?: number;
}

interface Idle {
  key: string;
  socket: Duplex;
  timer: ReturnType<typeof setTimeout>;
  onGone: () => void;
}

export class ConnectionPool implements Disposable {
  readonly idleTimeout: number;
  readonly maxIdle: number;
  /** Idle connections, oldest first. */
  #idle: Idle[] = [];
  #closed = false;

  constructor(options: ConnectionPoolOptions = {}) {
    this.idleTimeout = Math.max(0, options.idleTimeout ?? 2000);
    this.maxIdle = Math.max(0, Math.floor(options.maxIdle ?? 4));
  }

  /** Idle connections held now. */
  get size(): number {
    return this.#idle.length;
  }

  /** Takes the newest idle connection kept under `key`, if one is open. */
  take(key: string): Duplex | undefined {
    for (let i = this.#idle.length - 1; i >= 0; i--) {
      const entry = this.#idle[i];
      if (entry.key !== key) continue;
      this.#remove(entry);
      if (entry.socket.destroyed || !entry.socket.writable) {
        entry.socket.destroy();
        continue;
      }
      return entry.socket;
    }
    return undefined;
  }

  /**
   * Keeps `socket` (a connection whose last response is complete) under
   * `key` for the next request, or closes it: when pooling is off, the pool
   * is closed or full of newer ones, or `slots` has waiters.
   */
  give(key: string, socket: Duplex, slots?: Slots): void {
    if (
      this.#closed || this.idleTimeout === 0 || this.maxIdle === 0 || socket.destroyed ||
      (slots !== undefined && slots.waiting > 0)
    ) {
      socket.destroy();
      return;
    }
    while (this.#idle.length >= this.maxIdle) {
      const oldest = this.#idle[0];
      this.#remove(oldest);
      oldest.socket.destroy();
    }
    const entry: Idle = {
      key,
      socket,
      timer: setTimeout(() => {
        this.#remove(entry);
        socket.destroy();
      }, this.idleTimeout),
      onGone: () => {
        this.#remove(entry);
        socket.destroy();
      },
    };
    // The peer closing an idle connection (its idle timeout, a restart) ends it here too.
    socket.on("end", entry.onGone);
    socket.on("close", entry.onGone);
    socket.on("error", entry.onGone);
    // Bytes the peer sends unasked on an idle connection have no request: drop it.
    socket.on("data", entry.onGone);
    socket.resume();
    this.#idle.push(entry);
  }

  /** Closes every idle connection except those kept under `key` (new connection info). */
  retain(key: string): void {
    for (const entry of this.#idle.filter((e) => e.key !== key)) {
      this.#remove(entry);
      entry.socket.destroy();
    }
  }

  #remove(entry: Idle): void {
    const at = this.#idle.indexOf(entry);
    if (at < 0) return;
    this.#idle.splice(at, 1);
    clearTimeout(entry.timer);
    entry.socket.off("end", entry.onGone);
    entry.socket.off("close", entry.onGone);
    entry.socket.off("error", entry.onGone);
    entry.socket.off("data", entry.onGone);
    entry.socket.pause();
  }

  /** Closes the idle connections; later `give()`s close theirs at once. Idempotent. */
  close(): void {
    this.#closed = true;
    for (const entry of [...this.#idle]) {
      this.#remove(entry);
      entry.socket.destroy();
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

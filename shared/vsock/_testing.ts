/**
 * Helpers for the tests of `shared/vsock/`: temporary socket directories,
 * bounded waits on events, reading a stream to its end, and what an fd number refers to.
 *
 * Owns: the temporary directories it creates (removed on dispose).
 * Permissions: `--allow-read`, `--allow-write` (temporary directory).
 *
 * @module
 */

import type { EventEmitter } from "node:events";
import type { Readable } from "node:stream";
import { Buffer } from "node:buffer";
import { socketAddress } from "./_fd.ts";
import { SocketError } from "./socket_error.ts";

/** A temporary directory for socket files, removed on dispose. */
export class TempDir implements Disposable {
  readonly path: string;
  constructor() {
    this.path = Deno.makeTempDirSync({ prefix: "vsock-test-" });
  }
  /** A path inside the directory. */
  join(name: string): string {
    return `${this.path}/${name}`;
  }
  [Symbol.dispose](): void {
    Deno.removeSync(this.path, { recursive: true });
  }
}

/** Resolves as `promise` does, or rejects when `ms` pass first. */
export async function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`Timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/** Resolves once `condition()` holds (checked every millisecond), or rejects after `ms`. */
export async function until(condition: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!condition()) {
    if (performance.now() > deadline) throw new Error(`Timed out after ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

/** The first emission of `event` (its first argument), bounded by `ms`. */
export function nextEvent<T = unknown>(
  emitter: EventEmitter,
  event: string,
  ms = 5000,
): Promise<T> {
  let listener: (value: T) => void = () => {};
  const fired = new Promise<T>((resolve) => {
    listener = resolve;
    emitter.once(event, listener);
  });
  return within(fired, ms, `'${event}' event`).finally(() => {
    emitter.removeListener(event, listener);
  });
}

/** Every byte `stream` yields until its end, bounded by `ms`. */
export function readToEnd(stream: Readable, ms = 10000): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const done = new Promise<Buffer>((resolve, reject) => {
    stream.on("data", (chunk: Buffer) => chunks.push(chunk));
    stream.once("end", () => resolve(Buffer.concat(chunks)));
    stream.once("error", reject);
    stream.resume();
  });
  return within(done, ms, "stream end");
}

/**
 * What this process's fd number `fd` is now: the local and peer addresses of
 * the socket it holds, or why it has none (EBADF once closed). Test files run
 * in parallel in one process, so a number one test closes may be reused by
 * another at once: compare this before and after a close, not whether the
 * number is open. (Each test's sockets live in its own temporary directory.)
 */
export function fdIdentity(fd: number): string {
  try {
    return JSON.stringify([socketAddress(fd, false), socketAddress(fd, true)]);
  } catch (error) {
    return error instanceof SocketError ? error.code : String(error);
  }
}

/** `length` bytes of a deterministic, non-repeating-per-64KiB pattern. */
export function pattern(length: number, seed = 1): Uint8Array {
  const bytes = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    bytes[i] = x & 0xff;
  }
  return bytes;
}

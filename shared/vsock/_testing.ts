/**
 * Helpers for the tests of `shared/vsock/`: temporary socket directories,
 * bounded waits on events, and reading a stream to its end.
 *
 * Owns: the temporary directories it creates (removed on dispose).
 * Permissions: `--allow-read`, `--allow-write` (temporary directory).
 *
 * @module
 */

import type { EventEmitter } from "node:events";
import type { Readable } from "node:stream";
import { Buffer } from "node:buffer";

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

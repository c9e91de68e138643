/**
 * Test helpers: a connected pair of unix sockets in a temporary directory,
 * as `node:net` sockets or as the `FdSocket`s the daemon and the agent use.
 * Needs `--allow-read --allow-write --allow-net` (and `--allow-ffi` for
 * `FdSocket`s).
 *
 * @module
 */

import * as net from "node:net";
import type { Duplex } from "node:stream";
import { connectUnix, type FdSocket, listenUnix } from "../vsock/mod.ts";

/** Both ends of one unix-socket connection; disposing destroys both and waits for their close. */
export interface SocketPair extends AsyncDisposable {
  client: net.Socket;
  server: net.Socket;
}

/** Opens a unix-socket connection to a throwaway listener and returns both ends. */
export async function unixSocketPair(): Promise<SocketPair> {
  const dir = await Deno.makeTempDir({ prefix: "lxd-vsock-test-" });
  const path = `${dir}/pair.sock`;
  const listener = net.createServer();
  // close() stops listening at once; its "close" event waits for the connection to end.
  const listenerClosed = new Promise<void>((resolve) => listener.once("close", () => resolve()));
  try {
    await new Promise<void>((resolve, reject) => {
      listener.once("error", reject);
      listener.listen(path, resolve);
    });
    const accepted = new Promise<net.Socket>((resolve) => listener.once("connection", resolve));
    const client = net.connect(path);
    await new Promise<void>((resolve, reject) => {
      client.once("connect", resolve);
      client.once("error", reject);
    });
    const server = await accepted;
    return {
      client,
      server,
      async [Symbol.asyncDispose]() {
        await Promise.all([closed(client), closed(server), listenerClosed]);
      },
    };
  } finally {
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Both ends of one `FdSocket` unix connection; disposing destroys both and waits for their close. */
export interface FdSocketPair extends AsyncDisposable {
  client: FdSocket;
  server: FdSocket;
}

/** Opens an `FdSocket` unix connection to a throwaway listener and returns both ends. */
export async function fdSocketPair(): Promise<FdSocketPair> {
  const dir = await Deno.makeTempDir({ prefix: "lxd-vsock-test-" });
  const listener = listenUnix(`${dir}/pair.sock`);
  try {
    const [client, server] = await Promise.all([
      connectUnix(`${dir}/pair.sock`),
      listener.accept(),
    ]);
    return {
      client,
      server,
      async [Symbol.asyncDispose]() {
        await Promise.all([closed(client), closed(server)]);
      },
    };
  } finally {
    listener.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Destroys `socket` (if not yet) and resolves once it has emitted `close`. */
export function closed(
  socket: { destroy(): void; closed?: boolean; once(e: "close", f: () => void): unknown },
): Promise<void> {
  if (socket.closed) return Promise.resolve();
  const done = new Promise<void>((resolve) => socket.once("close", () => resolve()));
  socket.destroy();
  return done;
}

/** Resolves once `socket` emits `close` (without destroying it); errors are swallowed. */
export function whenClosed(socket: Duplex): Promise<void> {
  socket.on("error", () => {});
  if (socket.closed) return Promise.resolve();
  return new Promise<void>((resolve) => socket.once("close", () => resolve()));
}

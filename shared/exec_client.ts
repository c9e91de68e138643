/**
 * The client side of LXD's exec protocol against an agent API (ours or the
 * stock lxd-agent 5.0.2), as LXD's Go client (`client/lxd_instances.go`
 * `ExecInstance`) speaks it: `POST /1.0/exec` with `wait-for-websocket`,
 * then one WebSocket per stream named in the operation's `fds`
 * (`/1.0/operations/<id>/websocket?secret=…`, control first), binary messages
 * for data and an empty text message to end a stream; finally the operation's
 * `metadata.return` once it is final. lxd-agent 5.0.2 has no
 * `/operations/<id>/wait`, so the end is awaited as LXD's client does: the
 * `/1.0/events` WebSocket (`operation` events) plus a `GET` of the operation.
 *
 * Every request and stream uses a new connection from `dial` (a TLS
 * connection to the agent API, or a unix socket in tests). Owns those
 * connections; all are closed when {@linkcode runExec} settles.
 * Needs no permissions of its own.
 * @module
 */

import type { Duplex } from "node:stream";
import { unwrapEnvelope } from "./http/envelope.ts";
import { httpRequest } from "./http/http_request.ts";
import { connectWebSocket, type WebSocketConnection } from "./http/websocket_conn.ts";
import type { InstanceExecControl, InstanceExecPost, Operation } from "./instance_api.ts";

/** An exec that could not run: the agent refused it, or the operation failed without a status. */
export class ExecError extends Error {
  override name = "ExecError";
  constructor(message: string, readonly status?: number) {
    super(message);
  }
}

/** Options of {@linkcode runExec}. */
export interface ExecClientOptions {
  /** Opens a new connection to the agent API. */
  dial: () => Promise<Duplex>;
  /**
   * Put before every path: the agent API behind a proxy, such as the host's
   * admin API (`/1.0/instances/<name>/agent`).
   * @default {""}
   */
  prefix?: string;
  /** Input for the command; its end ends the command's stdin. @default {no input} */
  stdin?: AsyncIterable<Uint8Array>;
  /** Receives the command's output (with a PTY: all of it). */
  stdout: (chunk: Uint8Array) => void | Promise<void>;
  /** Receives stderr (non-interactive). @default {stdout} */
  stderr?: (chunk: Uint8Array) => void | Promise<void>;
  /** Called once the control stream is open, with a function sending control messages. */
  onControl?: (send: (message: InstanceExecControl) => Promise<boolean>) => void;
  /**
   * Milliseconds for each answer head.
   * @default {10000}
   */
  timeout?: number;
  /** Aborting closes every stream: the agent then kills the command. */
  signal?: AbortSignal;
}

/** What an exec ended with. */
export interface ExecResult {
  /** lxd-agent's status: the exit code, 128 + signal, 127 not found, 126 not executable. */
  status: number;
  operation: Operation;
}

const HOST = "http://custom.socket";

async function request(
  options: ExecClientOptions,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; metadata: unknown }> {
  const socket = await options.dial();
  const response = await httpRequest(
    socket,
    new Request(`${HOST}${options.prefix ?? ""}${path}`, {
      method,
      body: body === undefined ? undefined : JSON.stringify(body),
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
    }),
    { timeout: options.timeout ?? 10_000, signal: options.signal },
  );
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new ExecError(`${method} ${path}: the agent answered ${response.status} without JSON`);
  }
  const unwrapped = unwrapEnvelope(parsed);
  if (!unwrapped.ok) throw new ExecError(unwrapped.error, unwrapped.status);
  return { status: response.status, metadata: unwrapped.metadata };
}

async function websocket(
  options: ExecClientOptions,
  path: string,
): Promise<WebSocketConnection> {
  const socket = await options.dial();
  return connectWebSocket(socket, `${HOST}${options.prefix ?? ""}${path}`, {
    timeout: options.timeout ?? 10_000,
    signal: options.signal,
  });
}

/** Sends `stdin` to `ws` as binary messages, then the end-of-stream barrier. */
async function pumpIn(ws: WebSocketConnection, stdin: AsyncIterable<Uint8Array> | undefined) {
  if (stdin !== undefined) {
    for await (const chunk of stdin) {
      if (chunk.byteLength > 0 && !await ws.send(chunk)) return;
    }
  }
  await ws.send("");
}

/** Hands `ws`'s binary messages to `sink` until the barrier or the end. */
async function pumpOut(ws: WebSocketConnection, sink: (chunk: Uint8Array) => void | Promise<void>) {
  for (;;) {
    const message = await ws.receive();
    if (message === null || message.type === "text") return;
    await sink(message.data);
  }
}

function isFinal(operation: Operation): boolean {
  return operation.status_code >= 200;
}

/**
 * Runs `post.command` through the agent: resolves with the status once the
 * operation is final and the output delivered. Rejects with an
 * {@linkcode ExecError} when the agent refuses the exec or the operation fails
 * without a status.
 */
export async function runExec(
  post: Partial<InstanceExecPost> & { command: string[] },
  options: ExecClientOptions,
): Promise<ExecResult> {
  const body: InstanceExecPost = {
    "wait-for-websocket": true,
    interactive: false,
    environment: {},
    width: 0,
    height: 0,
    "record-output": false,
    user: 0,
    group: 0,
    cwd: "",
    ...post,
  };
  const created = await request(options, "POST", "/1.0/exec", body);
  const operation = created.metadata as Operation;
  const fds = (operation.metadata?.fds ?? {}) as Record<string, string>;
  const base = `/1.0/operations/${encodeURIComponent(operation.id)}/websocket?secret=`;
  const sockets: WebSocketConnection[] = [];
  const onAbort = () => sockets.forEach((ws) => ws.close(1000));
  options.signal?.addEventListener("abort", onAbort, { once: true });
  try {
    const open = async (name: string) => {
      if (fds[name] === undefined) return undefined;
      const ws = await websocket(options, base + encodeURIComponent(fds[name]));
      sockets.push(ws);
      return ws;
    };
    const control = await open("control");
    const stdio = await open("0");
    const stdout = await open("1");
    const stderr = await open("2");
    if (control !== undefined) {
      options.onControl?.((message) => control.send(JSON.stringify(message)));
    }
    // Events first, so the final event cannot slip between a GET and the subscription.
    const events = await websocket(options, "/1.0/events?type=operation");
    sockets.push(events);
    const outputs: Promise<void>[] = [];
    if (stdio !== undefined) {
      pumpIn(stdio, options.stdin).catch(() => {});
      if (body.interactive) outputs.push(pumpOut(stdio, options.stdout));
    }
    if (stdout !== undefined) outputs.push(pumpOut(stdout, options.stdout));
    if (stderr !== undefined) outputs.push(pumpOut(stderr, options.stderr ?? options.stdout));
    const final = waitFinal(events, operation.id);
    final.catch(() => {}); // Settled below when needed; the stream closes at the end.
    await Promise.all(outputs);
    let result = (await request(options, "GET", `/1.0/operations/${operation.id}`))
      .metadata as Operation;
    if (!isFinal(result)) result = await final;
    const status = result.metadata?.return;
    if (typeof status !== "number") {
      throw new ExecError(
        result.err || `The exec operation ended ${result.status} without a status`,
      );
    }
    return { status, operation: result };
  } finally {
    options.signal?.removeEventListener("abort", onAbort);
    for (const ws of sockets) ws.close(1000);
  }
}

/** The first final `operation` event for `id` on the events stream. */
async function waitFinal(events: WebSocketConnection, id: string): Promise<Operation> {
  for (;;) {
    const message = await events.receive();
    if (message === null) {
      throw new ExecError("The agent's event stream closed before the exec ended");
    }
    try {
      const event = JSON.parse(new TextDecoder().decode(message.data));
      if (event?.type === "operation" && event.metadata?.id === id && isFinal(event.metadata)) {
        return event.metadata as Operation;
      }
    } catch {
      // Not an event.
    }
  }
}

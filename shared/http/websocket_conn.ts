/**
 * A full-duplex WebSocket (RFC 6455) on an already-open connection, for both
 * ends: {@linkcode WebSocketConnection} sends and receives text and binary
 * messages (fragments reassembled, pings answered, the close handshake done),
 * {@linkcode acceptWebSocket} answers a handshake inside a `serveHttp`
 * handler, and {@linkcode connectWebSocket} performs the client handshake over
 * a socket the caller opened (unix, vsock, TLS). This is what LXD's exec and
 * event streams need; {@linkcode upgradeWebSocket} is the one-way server
 * channel of devlxd's `/1.0/events` (what the client sends is discarded).
 * The frame codec is `websocket.ts`.
 *
 * Receiving is pull-based (`receive()` or `for await`): the socket is paused
 * while more than a few messages wait unread, so a slow consumer slows the
 * peer instead of growing memory. Sending resolves once the socket took the
 * frame (after a drain when its buffer is full).
 *
 * Owns: the connection it is given; it is destroyed once both close frames
 * are exchanged, the peer goes away, or `closeTimeout` passes after ours.
 * Needs no permissions.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import type { Duplex } from "node:stream";
import { drained } from "./_drain.ts";
import { headEnd, parseResponseHead } from "./_codec.ts";
import { upgradeResponse } from "./serve_http.ts";
import {
  CLOSE_ABNORMAL,
  CLOSE_NORMAL,
  CLOSE_PROTOCOL_ERROR,
  type CloseInfo,
  closePayload,
  encodeFrame,
  type Frame,
  FrameDecoder,
  isWebSocketRequest,
  OPCODE,
  websocketAccept,
  WebSocketProtocolError,
} from "./websocket.ts";

/** One received message. */
export interface WebSocketMessage {
  type: "text" | "binary";
  data: Uint8Array;
}

/** Options of {@linkcode WebSocketConnection}. */
export interface WebSocketConnectionOptions {
  /** Which end this is: a client masks its frames and expects unmasked ones. */
  role: "server" | "client";
  /**
   * Largest message (and frame) accepted, in bytes; larger → close 1009.
   * @default {4194304}
   */
  maxMessageSize?: number;
  /**
   * Milliseconds to wait for the peer's close frame after ours.
   * @default {2000}
   */
  closeTimeout?: number;
}

/** Unread messages beyond which the socket is paused. */
const HIGH_WATER = 16;

/** An open WebSocket, either end. */
export class WebSocketConnection implements AsyncIterable<WebSocketMessage> {
  #socket: Duplex;
  #role: "server" | "client";
  #decoder: FrameDecoder;
  #maxMessageSize: number;
  #closeTimeout: number;
  #queue: WebSocketMessage[] = [];
  #waiter: (() => void) | undefined;
  #fragments: Uint8Array[] = [];
  #fragmentType: "text" | "binary" | undefined;
  #fragmentSize = 0;
  #closeSent = false;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #info: CloseInfo | undefined;
  #closed = Promise.withResolvers<CloseInfo>();

  /** Takes over `socket` (paused or flowing), with `head` already read from it. */
  constructor(socket: Duplex, head: Uint8Array, options: WebSocketConnectionOptions) {
    this.#socket = socket;
    this.#role = options.role;
    this.#maxMessageSize = options.maxMessageSize ?? 4 * 1024 * 1024;
    this.#decoder = new FrameDecoder({
      maxFrameSize: this.#maxMessageSize,
      masked: options.role === "server",
    });
    this.#closeTimeout = options.closeTimeout ?? 2000;
    socket.on("data", this.#onData);
    socket.on("error", () => {});
    socket.on("end", () => this.#finish({ code: CLOSE_ABNORMAL, reason: "" }));
    socket.on("close", () => this.#finish({ code: CLOSE_ABNORMAL, reason: "" }));
    if (head.byteLength > 0) this.#onData(head);
    socket.resume();
  }

  /** Whether messages can still be sent (no close frame sent or received). */
  get open(): boolean {
    return !this.#closeSent && this.#info === undefined;
  }

  /** Resolves once the connection is closed, with the peer's close code (1006 if none). */
  get closed(): Promise<CloseInfo> {
    return this.#closed.promise;
  }

  /** The next message, or `null` once the connection is closing or closed. */
  async receive(): Promise<WebSocketMessage | null> {
    for (;;) {
      const message = this.#queue.shift();
      if (message !== undefined) {
        if (this.#queue.length < HIGH_WATER / 2 && this.#socket.isPaused()) this.#socket.resume();
        return message;
      }
      if (this.#info !== undefined) return null;
      await new Promise<void>((resolve) => this.#waiter = resolve);
    }
  }

  async *[Symbol.asyncIterator](): AsyncIterator<WebSocketMessage> {
    for (;;) {
      const message = await this.receive();
      if (message === null) return;
      yield message;
    }
  }

  /**
   * Sends one message: a string as text, bytes as binary. Resolves true once
   * the socket took it, false when the connection is closing.
   */
  async send(data: Uint8Array | string): Promise<boolean> {
    if (!this.open) return false;
    const text = typeof data === "string";
    const payload = text ? new TextEncoder().encode(data) : data;
    const frame = this.#frame(text ? OPCODE.text : OPCODE.binary, payload);
    if (this.#socket.write(frame)) return true;
    await drained(this.#socket);
    return this.open;
  }

  /**
   * Sends a close frame with `code` (once) and ends our side; the connection
   * is destroyed when the peer answers or after `closeTimeout`. Idempotent.
   */
  close(code = CLOSE_NORMAL, reason = ""): void {
    if (this.#closeSent || this.#socket.destroyed) return;
    this.#closeSent = true;
    this.#socket.write(this.#frame(OPCODE.close, closePayload(code, reason)));
    if (this.#role === "server") this.#socket.end();
    if (this.#info === undefined) {
      this.#timer = setTimeout(() => this.#socket.destroy(), this.#closeTimeout);
    }
  }

  /** Destroys the connection at once (no close handshake). */
  destroy(): void {
    this.#socket.destroy();
    this.#finish({ code: CLOSE_ABNORMAL, reason: "" });
  }

  #frame(opcode: number, payload: Uint8Array): Uint8Array {
    if (this.#role === "server") return encodeFrame(opcode, payload);
    return encodeFrame(opcode, payload, { mask: crypto.getRandomValues(new Uint8Array(4)) });
  }

  #push(message: WebSocketMessage): void {
    this.#queue.push(message);
    if (this.#queue.length >= HIGH_WATER) this.#socket.pause();
    this.#wake();
  }

  #wake(): void {
    const waiter = this.#waiter;
    this.#waiter = undefined;
    waiter?.();
  }

  #fail(code: number, reason: string): void {
    this.close(code, reason);
    this.#finish({ code, reason });
  }

  #onData = (chunk: Uint8Array | string) => {
    if (this.#info !== undefined) return;
    let frames: Frame[];
    try {
      frames = this.#decoder.push(
        typeof chunk === "string" ? Buffer.from(chunk, "latin1") : new Uint8Array(chunk),
      );
    } catch (error) {
      const code = error instanceof WebSocketProtocolError ? error.code : CLOSE_PROTOCOL_ERROR;
      this.#fail(code, (error as Error).message);
      return;
    }
    for (const frame of frames) {
      if (this.#info !== undefined) return;
      this.#onFrame(frame);
    }
  };

  #onFrame(frame: Frame): void {
    switch (frame.opcode) {
      case OPCODE.ping:
        if (this.open) this.#socket.write(this.#frame(OPCODE.pong, frame.payload));
        return;
      case OPCODE.pong:
        return;
      case OPCODE.close: {
        const p = frame.payload;
        const info = p.byteLength >= 2
          ? { code: (p[0] << 8) | p[1], reason: new TextDecoder().decode(p.subarray(2)) }
          : { code: 1005, reason: "" };
        this.close(p.byteLength >= 2 ? info.code : CLOSE_NORMAL);
        this.#finish(info);
        return;
      }
      case OPCODE.continuation:
        if (this.#fragmentType === undefined) {
          this.#fail(CLOSE_PROTOCOL_ERROR, "Continuation frame without a message");
          return;
        }
        break;
      default:
        if (this.#fragmentType !== undefined) {
          this.#fail(CLOSE_PROTOCOL_ERROR, "New message inside a fragmented one");
          return;
        }
        this.#fragmentType = frame.opcode === OPCODE.text ? "text" : "binary";
    }
    this.#fragmentSize += frame.payload.byteLength;
    if (this.#fragmentSize > this.#maxMessageSize) {
      this.#fail(1009, "Message too large");
      return;
    }
    this.#fragments.push(frame.payload);
    if (!frame.fin) return;
    const data = this.#fragments.length === 1
      ? this.#fragments[0]
      : new Uint8Array(Buffer.concat(this.#fragments));
    const type = this.#fragmentType!;
    this.#fragments = [];
    this.#fragmentType = undefined;
    this.#fragmentSize = 0;
    this.#push({ type, data });
  }

  #finish(info: CloseInfo): void {
    if (this.#socket.destroyed) clearTimeout(this.#timer);
    if (this.#info !== undefined) return;
    this.#info = info;
    if (this.#closeSent) {
      const cut = () => {
        clearTimeout(this.#timer);
        this.#socket.destroy();
      };
      if (this.#socket.writableFinished || this.#socket.destroyed) cut();
      else if (this.#role === "client") this.#socket.end(cut);
      else this.#socket.once("finish", cut);
    } else this.#socket.destroy();
    this.#socket.resume();
    this.#wake();
    this.#closed.resolve(info);
  }
}

/** The `Sec-WebSocket-Key` of a valid opening handshake; a `TypeError` saying what is wrong otherwise. */
export function handshakeKey(request: Request): string {
  if (request.method !== "GET") throw new TypeError("A WebSocket handshake must be a GET");
  if (!isWebSocketRequest(request)) throw new TypeError("Missing Upgrade: websocket");
  const connection = request.headers.get("connection") ?? "";
  if (!connection.split(",").some((t) => t.trim().toLowerCase() === "upgrade")) {
    throw new TypeError("Missing Connection: Upgrade");
  }
  if (request.headers.get("sec-websocket-version")?.trim() !== "13") {
    throw new TypeError("Unsupported Sec-WebSocket-Version (13 expected)");
  }
  const key = request.headers.get("sec-websocket-key")?.trim() ?? "";
  if (!/^[A-Za-z0-9+/]{22}==$/.test(key)) {
    throw new TypeError("Invalid Sec-WebSocket-Key (16 base64-encoded bytes expected)");
  }
  return key;
}

/**
 * Answers a WebSocket opening handshake inside a `serveHttp` handler: `onOpen`
 * gets the server end once the 101 head is written. Throws a `TypeError`
 * (answer 400) when `request` is not a valid handshake.
 */
export function acceptWebSocket(
  request: Request,
  onOpen: (ws: WebSocketConnection) => void,
  options: Omit<WebSocketConnectionOptions, "role"> = {},
): Response {
  const key = handshakeKey(request);
  return upgradeResponse(
    (socket, head) => onOpen(new WebSocketConnection(socket, head, { ...options, role: "server" })),
    { Upgrade: "websocket", Connection: "Upgrade", "Sec-WebSocket-Accept": websocketAccept(key) },
  );
}

/** The server end of devlxd's one-way `/1.0/events` channel. */
export type ServerWebSocket = WebSocketConnection;

/** Options of {@linkcode upgradeWebSocket}. */
export interface ServerWebSocketOptions {
  /**
   * Largest message (and frame) accepted from the client, in bytes; larger → close 1009.
   * @default {1048576}
   */
  maxFrameSize?: number;
  /**
   * Milliseconds to wait for the client's close frame after ours.
   * @default {2000}
   */
  closeTimeout?: number;
}

/**
 * {@linkcode acceptWebSocket} for a one-way channel out: the client's data
 * messages are read and discarded (its pings and close are answered), so a
 * client that writes cannot stall the socket.
 */
export function upgradeWebSocket(
  request: Request,
  onOpen: (ws: ServerWebSocket) => void,
  options: ServerWebSocketOptions = {},
): Response {
  return acceptWebSocket(request, (ws) => {
    (async () => {
      for await (const _ of ws) { /* discarded */ }
    })();
    onOpen(ws);
  }, { maxMessageSize: options.maxFrameSize ?? 1 << 20, closeTimeout: options.closeTimeout });
}

/** A refused client handshake: the HTTP status and the server's message (LXD's `error`). */
export class WebSocketHandshakeError extends Error {
  override name = "WebSocketHandshakeError";
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/** Options of {@linkcode connectWebSocket}. */
export interface ConnectWebSocketOptions extends Omit<WebSocketConnectionOptions, "role"> {
  /** Extra request headers. */
  headers?: Record<string, string>;
  /**
   * Milliseconds for the server's answer head.
   * @default {10000}
   */
  timeout?: number;
  signal?: AbortSignal;
}

const MAX_HEAD = 64 * 1024;

/**
 * The client handshake for `url` (its path and query; `Host` from its host)
 * over `socket`, which the caller opened (and which this owns from then on).
 * Resolves with the client end, or rejects with a `WebSocketHandshakeError`
 * (a non-101 answer, with LXD's error message when the body carries one) or
 * an `Error` (timeout, closed connection, bad accept key); the socket is
 * destroyed on failure.
 */
export function connectWebSocket(
  socket: Duplex,
  url: string,
  options: ConnectWebSocketOptions = {},
): Promise<WebSocketConnection> {
  const { timeout = 10_000, signal, headers = {} } = options;
  const target = new URL(url);
  const key = Buffer.from(crypto.getRandomValues(new Uint8Array(16))).toString("base64");
  let head = `GET ${target.pathname}${target.search} HTTP/1.1\r\nHost: ${target.host}\r\n` +
    `Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: ${key}\r\n` +
    `Sec-WebSocket-Version: 13\r\n`;
  for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
  head += "\r\n";

  return new Promise<WebSocketConnection>((resolve, reject) => {
    let buffer = Buffer.alloc(0);
    let parsed: ReturnType<typeof parseResponseHead> | undefined;
    let bodyStart = 0;
    let settled = false;
    const cleanup = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      socket.off("data", onData);
      socket.off("end", onEnd);
      socket.off("close", onEnd);
      socket.off("error", onError);
    };
    const fail = (error: Error) => {
      if (settled) return;
      settled = true;
      cleanup();
      socket.destroy();
      reject(error);
    };
    const refused = () => {
      const body = buffer.subarray(bodyStart).toString("utf8");
      let message = `${parsed!.status} ${parsed!.statusText}`.trim();
      try {
        const json = JSON.parse(body);
        if (typeof json?.error === "string" && json.error !== "") message = json.error;
      } catch {
        if (body.trim() !== "") message = body.trim().slice(0, 200);
      }
      fail(new WebSocketHandshakeError(parsed!.status, message));
    };
    const onData = (chunk: Buffer) => {
      buffer = Buffer.concat([buffer, chunk]);
      if (parsed === undefined) {
        const end = headEnd(buffer, 0);
        if (end < 0) {
          if (buffer.byteLength > MAX_HEAD) fail(new Error("WebSocket answer head too large"));
          return;
        }
        try {
          parsed = parseResponseHead(buffer.subarray(0, end - 4).toString("latin1"));
        } catch (error) {
          fail(error as Error);
          return;
        }
        bodyStart = end;
        const field = (name: string) =>
          parsed!.fields.find(([n]) => n.toLowerCase() === name)?.[1].trim();
        if (parsed.status === 101) {
          if (field("sec-websocket-accept") !== websocketAccept(key)) {
            fail(new Error("The server's Sec-WebSocket-Accept does not match"));
            return;
          }
          settled = true;
          cleanup();
          socket.pause();
          resolve(
            new WebSocketConnection(socket, new Uint8Array(buffer.subarray(end)), {
              ...options,
              role: "client",
            }),
          );
          return;
        }
        const length = Number(field("content-length"));
        if (Number.isInteger(length) && buffer.byteLength - bodyStart >= length) refused();
        return;
      }
      const length = Number(
        parsed.fields.find(([n]) => n.toLowerCase() === "content-length")?.[1],
      );
      if (Number.isInteger(length) && buffer.byteLength - bodyStart >= length) refused();
    };
    const onEnd = () => {
      if (parsed !== undefined) refused();
      else fail(new Error("The connection closed before the WebSocket handshake completed"));
    };
    const onError = (error: Error) => fail(error);
    const onAbort = () =>
      fail(signal!.reason instanceof Error ? signal!.reason : new Error("aborted"));
    const timer = setTimeout(
      () =>
        parsed !== undefined
          ? refused()
          : fail(new Error(`No WebSocket answer within ${timeout} ms`)),
      timeout,
    );
    if (signal?.aborted) {
      onAbort();
      return;
    }
    signal?.addEventListener("abort", onAbort, { once: true });
    socket.on("data", onData);
    socket.on("end", onEnd);
    socket.on("close", onEnd);
    socket.on("error", onError);
    socket.write(Buffer.from(head, "latin1"));
  });
}

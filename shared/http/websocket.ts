/**
 * The server side of a WebSocket (RFC 6455) on a connection `serveHttp`
 * hands over: the opening handshake ({@linkcode upgradeWebSocket}, answered
 * with `Sec-WebSocket-Accept`), text messages out as single unmasked frames,
 * and the client's control frames answered (ping → pong, close → close).
 * Data messages from the client are read and discarded: this is the one-way
 * channel devlxd's `/1.0/events` needs, not a general WebSocket. The frame
 * codec ({@linkcode encodeFrame}, {@linkcode FrameDecoder}) is pure.
 *
 * Owns (`ServerWebSocket`): the upgraded connection; `close()` ends it.
 * Needs no permissions.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import type { Duplex } from "node:stream";
import { drained } from "./_drain.ts";
import { upgradeResponse } from "./serve_http.ts";

/** The GUID RFC 6455 appends to the client's key. */
export const WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/** Frame opcodes. */
export const OPCODE = {
  continuation: 0x0,
  text: 0x1,
  binary: 0x2,
  close: 0x8,
  ping: 0x9,
  pong: 0xa,
} as const;

/** Close codes used here. */
export const CLOSE_NORMAL = 1000;
export const CLOSE_GOING_AWAY = 1001;
export const CLOSE_PROTOCOL_ERROR = 1002;
export const CLOSE_TOO_BIG = 1009;
/** Reported (never sent) when the connection ended without a close frame. */
export const CLOSE_ABNORMAL = 1006;

/** `Sec-WebSocket-Accept` for the client's `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)). */
export function websocketAccept(key: string): string {
  return createHash("sha1").update(key + WEBSOCKET_GUID).digest("base64");
}

/** Whether `request` asks for a WebSocket (`Upgrade: websocket`). */
export function isWebSocketRequest(request: Request): boolean {
  return request.headers.get("upgrade")?.trim().toLowerCase() === "websocket";
}

/** One decoded frame. */
export interface Frame {
  fin: boolean;
  opcode: number;
  payload: Uint8Array;
}

/** A frame the peer must not send; `code` is the close code to answer with. */
export class WebSocketProtocolError extends Error {
  override name = "WebSocketProtocolError";
  constructor(readonly code: number, message: string) {
    super(message);
  }
}

/** Encodes one frame; with `mask` (4 bytes, as a client sends) the payload is masked. */
export function encodeFrame(
  opcode: number,
  payload: Uint8Array,
  options: { fin?: boolean; mask?: Uint8Array } = {},
): Uint8Array {
  const { fin = true, mask } = options;
  const length = payload.byteLength;
  const extra = length < 126 ? 0 : length < 0x10000 ? 2 : 8;
  const headLength = 2 + extra + (mask === undefined ? 0 : 4);
  const frame = new Uint8Array(headLength + length);
  const view = new DataView(frame.buffer);
  frame[0] = (fin ? 0x80 : 0) | (opcode & 0x0f);
  frame[1] = (mask === undefined ? 0 : 0x80) | (extra === 0 ? length : extra === 2 ? 126 : 127);
  if (extra === 2) view.setUint16(2, length);
  if (extra === 8) view.setBigUint64(2, BigInt(length));
  frame.set(payload, headLength);
  if (mask !== undefined) {
    frame.set(mask.subarray(0, 4), 2 + extra);
    for (let i = 0; i < length; i++) frame[headLength + i] ^= mask[i & 3];
  }
  return frame;
}

/** The payload of a close frame: the code (big-endian) and a UTF-8 reason. */
export function closePayload(code: number, reason = ""): Uint8Array {
  const text = new TextEncoder().encode(reason);
  const payload = new Uint8Array(2 + text.byteLength);
  new DataView(payload.buffer).setUint16(0, code);
  payload.set(text, 2);
  return payload;
}

/**
 * Decodes the frames a client sends: masked (an unmasked frame is a protocol
 * error), control frames final and at most 125 bytes, data frames at most
 * `maxFrameSize` bytes.
 */
export class FrameDecoder {
  #buffer: Uint8Array = new Uint8Array(0);
  #maxFrameSize: number;
  #masked: boolean;

  /**
   * `masked: false` decodes what a server sends (unmasked frames; a masked
   * one is a protocol error), for a client (`websocket_conn.ts`).
   */
  constructor(options: { maxFrameSize?: number; masked?: boolean } = {}) {
    this.#maxFrameSize = options.maxFrameSize ?? 1 << 20;
    this.#masked = options.masked ?? true;
  }

  /** Adds received bytes; returns the frames now complete. Throws `WebSocketProtocolError`. */
  push(bytes: Uint8Array): Frame[] {
    this.#buffer = this.#buffer.byteLength === 0 ? bytes : Buffer.concat([this.#buffer, bytes]);
    const frames: Frame[] = [];
    for (;;) {
      const frame = this.#next();
      if (frame === undefined) return frames;
      frames.push(frame);
    }
  }

  #next(): Frame | undefined {
    const b = this.#buffer;
    if (b.byteLength < 2) return undefined;
    const fin = (b[0] & 0x80) !== 0;
    const opcode = b[0] & 0x0f;
    if ((b[0] & 0x70) !== 0) throw new WebSocketProtocolError(1002, "Reserved bits set");
    if (![0x0, 0x1, 0x2, 0x8, 0x9, 0xa].includes(opcode)) {
      throw new WebSocketProtocolError(1002, `Unknown opcode ${opcode}`);
    }
    const masked = (b[1] & 0x80) !== 0;
    if (masked !== this.#masked) {
      throw new WebSocketProtocolError(
        1002,
        masked ? "Masked server frame" : "Unmasked client frame",
      );
    }
    let length = b[1] & 0x7f;
    let offset = 2;
    if (length === 126) {
      if (b.byteLength < 4) return undefined;
      length = (b[2] << 8) | b[3];
      offset = 4;
    } else if (length === 127) {
      if (b.byteLength < 10) return undefined;
      const big = new DataView(b.buffer, b.byteOffset + 2, 8).getBigUint64(0);
      length = big > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(big);
      offset = 10;
    }
    if (opcode >= 0x8 && (!fin || length > 125)) {
      throw new WebSocketProtocolError(1002, "Fragmented or long control frame");
    }
    if (length > this.#maxFrameSize) throw new WebSocketProtocolError(1009, "Frame too large");
    const maskLength = masked ? 4 : 0;
    if (b.byteLength < offset + maskLength + length) return undefined;
    const payload = new Uint8Array(
      b.subarray(offset + maskLength, offset + maskLength + length),
    );
    if (masked) {
      const mask = b.subarray(offset, offset + 4);
      for (let i = 0; i < length; i++) payload[i] ^= mask[i & 3];
    }
    this.#buffer = b.subarray(offset + maskLength + length);
    return { fin, opcode, payload };
  }
}

/** How the connection ended: the close code (1006 without a close frame) and reason. */
export interface CloseInfo {
  code: number;
  reason: string;
}

/** Options of {@linkcode ServerWebSocket}. */
export interface ServerWebSocketOptions {
  /**
   * Largest frame accepted from the client, in bytes; larger → close 1009.
   * @default {1048576}
   */
  maxFrameSize?: number;
  /**
   * Milliseconds to wait for the client's close frame after ours before the
   * connection is cut.
   * @default {2000}
   */
  closeTimeout?: number;
}

/** The server end of an open WebSocket connection. */
export class ServerWebSocket {
  #socket: Duplex;
  #decoder: FrameDecoder;
  #closeTimeout: number;
  #closeSent = false;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #info: CloseInfo | undefined;
  #closed = Promise.withResolvers<CloseInfo>();

  /** Takes over `socket` (as `serveHttp` hands it, paused), with `head` already read. */
  constructor(socket: Duplex, head: Uint8Array, options: ServerWebSocketOptions = {}) {
    this.#socket = socket;
    this.#decoder = new FrameDecoder({ maxFrameSize: options.maxFrameSize });
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

  /** Resolves once the connection is closed, with the client's close code (1006 if none). */
  get closed(): Promise<CloseInfo> {
    return this.#closed.promise;
  }

  /**
   * Sends `text` as one text message. Resolves true once the socket took it
   * (after a drain when its buffer is full), false when the WebSocket is closing.
   */
  async send(text: string): Promise<boolean> {
    if (!this.open) return false;
    if (this.#socket.write(encodeFrame(OPCODE.text, new TextEncoder().encode(text)))) return true;
    await drained(this.#socket);
    return this.open;
  }

  /**
   * Sends a close frame with `code` (once) and ends our side; the connection
   * is destroyed when the client answers or after `closeTimeout`. Idempotent.
   */
  close(code = CLOSE_NORMAL, reason = ""): void {
    if (this.#closeSent || this.#socket.destroyed) return;
    this.#closeSent = true;
    this.#socket.write(encodeFrame(OPCODE.close, closePayload(code, reason)));
    this.#socket.end();
    if (this.#info === undefined) {
      this.#timer = setTimeout(() => this.#socket.destroy(), this.#closeTimeout);
    }
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
      this.close(code, (error as Error).message);
      this.#finish({ code, reason: (error as Error).message });
      return;
    }
    for (const frame of frames) {
      if (frame.opcode === OPCODE.ping && this.open) {
        this.#socket.write(encodeFrame(OPCODE.pong, frame.payload));
      } else if (frame.opcode === OPCODE.close) {
        const p = frame.payload;
        const info = p.byteLength >= 2
          ? {
            code: (p[0] << 8) | p[1],
            reason: new TextDecoder().decode(p.subarray(2)),
          }
          : { code: 1005, reason: "" };
        // Echo the code (RFC 6455 5.5.1), then the server closes the connection.
        this.close(p.byteLength >= 2 ? info.code : CLOSE_NORMAL);
        this.#finish(info);
        return;
      }
    }
  };

  #finish(info: CloseInfo): void {
    if (this.#socket.destroyed) clearTimeout(this.#timer);
    if (this.#info !== undefined) return;
    this.#info = info;
    if (this.#closeSent) {
      // Both close frames are exchanged (or the peer left): cut once ours is flushed.
      const cut = () => {
        clearTimeout(this.#timer);
        this.#socket.destroy();
      };
      if (this.#socket.writableFinished || this.#socket.destroyed) cut();
      else this.#socket.once("finish", cut);
    } else this.#socket.destroy();
    this.#closed.resolve(info);
  }
}

/**
 * Answers a WebSocket opening handshake: `onOpen` gets the `ServerWebSocket`
 * once `serveHttp` has written the 101 head. Throws a `TypeError` saying what
 * is wrong when `request` is not a valid handshake (answer it with a 400).
 */
export function upgradeWebSocket(
  request: Request,
  onOpen: (socket: ServerWebSocket) => void,
  options: ServerWebSocketOptions = {},
): Response {
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
  return upgradeResponse((socket, head) => onOpen(new ServerWebSocket(socket, head, options)), {
    Upgrade: "websocket",
    Connection: "Upgrade",
    "Sec-WebSocket-Accept": websocketAccept(key),
  });
}

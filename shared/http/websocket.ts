/**
 * The WebSocket (RFC 6455) frame codec, pure: {@linkcode encodeFrame},
 * {@linkcode FrameDecoder}, close payloads, the handshake's accept key.
 * The connection that uses it, for either end, is `websocket_conn.ts`.
 *
 * Owns nothing. Needs no permissions.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";

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

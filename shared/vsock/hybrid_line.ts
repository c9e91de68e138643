/**
 * The pure parser and encoder of the two "hybrid vsock" handshake lines
 * (Firecracker / Cloud Hypervisor): `CONNECT <port>\n`, sent by whoever
 * connects to the VMM's unix socket, and `OK <port>\n`, its answer.
 *
 * Owns nothing; needs no permissions.
 *
 * @module
 */

import { checkU32 } from "./sockaddr.ts";

/** The longest handshake line accepted, newline included (`CONNECT 4294967295\n` is 19). */
export const HYBRID_LINE_MAX = 32;

/** The verb of a handshake line. */
export type HybridVerb = "CONNECT" | "OK";

/** A complete handshake line. */
export interface HybridLine {
  /** The line's verb. */
  verb: HybridVerb;
  /** The port it carries. */
  port: number;
  /** Bytes the line takes, newline included: what follows belongs to the stream. */
  length: number;
}

const encoder = new TextEncoder();
const NEWLINE = 0x0a;
const DIGIT_0 = 0x30;
const DIGIT_9 = 0x39;

function show(bytes: Uint8Array): string {
  return JSON.stringify(new TextDecoder().decode(bytes.subarray(0, HYBRID_LINE_MAX)));
}

/**
 * Parses the `verb` line at the start of `bytes`: the line, or `null` while it
 * is incomplete (a prefix of a valid line). Throws a `SyntaxError` as soon as
 * the bytes cannot start a valid line (garbage, another verb, a bad port) or
 * no newline comes within {@linkcode HYBRID_LINE_MAX} bytes (oversized).
 * Bytes after the newline are not looked at.
 */
export function parseHybridLine(bytes: Uint8Array, verb: HybridVerb): HybridLine | null {
  const prefix = encoder.encode(`${verb} `);
  const end = bytes.indexOf(NEWLINE);
  const limit = end === -1 ? bytes.byteLength : end;
  // Every byte before the newline must fit the shape "<verb> <digits>".
  for (let i = 0; i < Math.min(limit, prefix.byteLength); i++) {
    if (bytes[i] !== prefix[i]) {
      throw new SyntaxError(`Expected "${verb} <port>\\n", got ${show(bytes)}`);
    }
  }
  for (let i = prefix.byteLength; i < limit; i++) {
    if (bytes[i] < DIGIT_0 || bytes[i] > DIGIT_9) {
      throw new SyntaxError(`Expected "${verb} <port>\\n", got ${show(bytes)}`);
    }
  }
  if (limit - prefix.byteLength > 10) {
    throw new SyntaxError(`Port too long in handshake line ${show(bytes)}`);
  }
  if (end === -1) {
    if (bytes.byteLength >= HYBRID_LINE_MAX) {
      throw new SyntaxError(`Handshake line longer than ${HYBRID_LINE_MAX} bytes: ${show(bytes)}`);
    }
    return null;
  }
  if (end + 1 > HYBRID_LINE_MAX) {
    throw new SyntaxError(`Handshake line longer than ${HYBRID_LINE_MAX} bytes: ${show(bytes)}`);
  }
  const digits = end - prefix.byteLength;
  if (digits < 1 || digits > 10) {
    throw new SyntaxError(`Expected "${verb} <port>\\n", got ${show(bytes)}`);
  }
  let port = 0;
  for (let i = prefix.byteLength; i < end; i++) port = port * 10 + (bytes[i] - DIGIT_0);
  if (port > 0xFFFFFFFF) {
    throw new SyntaxError(`Port out of range in handshake line ${show(bytes)}`);
  }
  return { verb, port, length: end + 1 };
}

/** Encodes `CONNECT <port>\n` or `OK <port>\n`; throws a `RangeError` for a bad port. */
export function encodeHybridLine(verb: HybridVerb, port: number): Uint8Array {
  checkU32(port, "hybrid vsock port");
  return encoder.encode(`${verb} ${port}\n`);
}

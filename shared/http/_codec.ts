/**
 * The HTTP/1.1 wire format (RFC 9112) shared by the server and the client:
 * head parsing with size limits, header validation, body framing and an
 * incremental chunked decoder. Pure functions over bytes and the
 * {@linkcode SocketReader}; no timers. Internal to shared/http.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import type { SocketReader } from "./_reader.ts";
import { HttpError } from "./http_error.ts";

/** A protocol violation is an {@linkcode HttpError} with the status a server answers it with. */
export { HttpError };

export const STATUS_TEXT: Record<number, string> = {
  100: "Continue",
  101: "Switching Protocols",
  200: "OK",
  201: "Created",
  202: "Accepted",
  204: "No Content",
  206: "Partial Content",
  301: "Moved Permanently",
  302: "Found",
  304: "Not Modified",
  307: "Temporary Redirect",
  308: "Permanent Redirect",
  400: "Bad Request",
  401: "Unauthorized",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  408: "Request Timeout",
  409: "Conflict",
  411: "Length Required",
  412: "Precondition Failed",
  413: "Content Too Large",
  415: "Unsupported Media Type",
  429: "Too Many Requests",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
  505: "HTTP Version Not Supported",
};

const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// Field values: visible ASCII, obs-text, SP and HTAB (RFC 9110 5.5).
// deno-lint-ignore no-control-regex -- matching control characters is the point
const BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]/;
const REQUEST_LINE = /^([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) HTTP\/1\.([01])$/;
const STATUS_LINE = /^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/;
const DIGITS = /^\d{1,15}$/;

/** Where the head ends in `buffer` (index just past CRLFCRLF), or -1. */
export function headEnd(buffer: Buffer, from: number): number {
  const at = buffer.indexOf("\r\n\r\n", from, "latin1");
  return at < 0 ? -1 : at + 4;
}

/** Header name/value pairs in wire order, names as sent. */
export type RawHeaders = [string, string][];

function parseFields(lines: string[]): RawHeaders {
  const fields: RawHeaders = [];
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    if (line === "") continue; // the final CRLFCRLF
    const colon = line.indexOf(":");
    if (colon <= 0) throw new HttpError(400, "Malformed header line");
    const name = line.slice(0, colon);
    if (!TOKEN.test(name)) throw new HttpError(400, "Invalid header name");
    const value = line.slice(colon + 1).trim();
    if (BAD_VALUE.test(value)) throw new HttpError(400, "Invalid header value");
    fields.push([name, value]);
  }
  return fields;
}

export interface RequestHead {
  method: string;
  target: string;
  minor: number;
  fields: RawHeaders;
}

/** Parses a request head (request line and header fields, without the final CRLFCRLF). */
export function parseRequestHead(text: string): RequestHead {
  const lines = text.split("\r\n");
  const match = REQUEST_LINE.exec(lines[0]);
  if (match === null) {
    if (/^\S+ \S+ HTTP\/\d/.test(lines[0])) {
      throw new HttpError(505, "HTTP version not supported");
    }
    throw new HttpError(400, "Malformed request line");
  }
  return {
    method: match[1],
    target: match[2],
    minor: Number(match[3]),
    fields: parseFields(lines),
  };
}

export interface ResponseHead {
  status: number;
  statusText: string;
  minor: number;
  fields: RawHeaders;
}

/** Parses a response head (status line and header fields). */
export function parseResponseHead(text: string): ResponseHead {
  const lines = text.split("\r\n");
  const match = STATUS_LINE.exec(lines[0]);
  if (match === null) throw new HttpError(502, "Malformed status line");
  return {
    minor: Number(match[1]),
    status: Number(match[2]),
    statusText: match[3] ?? "",
    fields: parseFields(lines),
  };
}

/** How a message body is delimited. */
export type Framing =
  | { kind: "none" }
  | { kind: "length"; length: number }
  | { kind: "chunked" }
  | { kind: "close" };

/** The framing headers of a message, and whether the peer asked to close. */
export interface FieldSummary {
  framing: Framing;
  /** `Connection: close` was present. */
  close: boolean;
  /** `Connection: keep-alive` was present. */
  keepAlive: boolean;
  /** `Expect: 100-continue` was present. */
  expectContinue: boolean;
  host: string | undefined;
}

/**
 * Reads the framing of a message from its fields (RFC 9112 6.3).
 * `untilClose` is the framing when neither length nor chunked is given
 * (none for requests, read-until-close for responses).
 */
export function summarize(fields: RawHeaders, untilClose: boolean): FieldSummary {
  let length: string | undefined;
  let transferEncoding: string | undefined;
  let close = false;
  let keepAlive = false;
  let expectContinue = false;
  let host: string | undefined;
  for (const [name, value] of fields) {
    switch (name.length) {
      case 4:
        if (name.toLowerCase() === "host") {
          if (host !== undefined) throw new HttpError(400, "Duplicate Host header");
          host = value;
        }
        break;
      case 6:
        if (name.toLowerCase() === "expect" && value.toLowerCase() === "100-continue") {
          expectContinue = true;
        }
        break;
      case 10:
        if (name.toLowerCase() === "connection") {
          for (const option of value.toLowerCase().split(",")) {
            const trimmed = option.trim();
            if (trimmed === "close") close = true;
            else if (trimmed === "keep-alive") keepAlive = true;
          }
        }
        break;
      case 14:
        if (name.toLowerCase() === "content-length") {
          // Identical repeats ("5, 5" or two fields) are tolerated, as RFC 9110 8.6 allows.
          for (const part of value.split(",")) {
            const trimmed = part.trim();
            if (!DIGITS.test(trimmed)) throw new HttpError(400, "Invalid Content-Length");
            if (length !== undefined && length !== trimmed) {
              throw new HttpError(400, "Conflicting Content-Length");
            }
            length = trimmed;
          }
        }
        break;
      case 17:
        if (name.toLowerCase() === "transfer-encoding") {
          transferEncoding = transferEncoding === undefined
            ? value
            : `${transferEncoding},${value}`;
        }
        break;
    }
  }
  let framing: Framing;
  if (transferEncoding !== undefined) {
    // A message with both is a smuggling vector: refuse it (RFC 9112 6.3 allows this).
    if (length !== undefined) throw new HttpError(400, "Both Transfer-Encoding and Content-Length");
    const codings = transferEncoding.toLowerCase().split(",").map((coding) => coding.trim());
    if (codings.length !== 1 || codings[0] !== "chunked") {
      throw new HttpError(501, "Unsupported Transfer-Encoding");
    }
    framing = { kind: "chunked" };
  } else if (length !== undefined) {
    const n = Number(length);
    framing = n === 0 ? { kind: "none" } : { kind: "length", length: n };
  } else {
    framing = untilClose ? { kind: "close" } : { kind: "none" };
  }
  return { framing, close, keepAlive, expectContinue, host };
}

/** Longest chunk-size line (size, extensions) accepted. */
const MAX_CHUNK_LINE = 4096;
/** Longest trailer section accepted. */
const MAX_TRAILERS = 16 * 1024;

/**
 * Incremental decoder of a chunked body read from a {@linkcode SocketReader}.
 * `next()` returns the next piece of body data, or null after the last chunk
 * (its trailers are read and discarded).
 */
export class ChunkedDecoder {
  #reader: SocketReader;
  /** Data bytes left in the current chunk; -1 between chunks. */
  #left = -1;
  #finished = false;

  constructor(reader: SocketReader) {
    this.#reader = reader;
  }

  get finished(): boolean {
    return this.#finished;
  }

  /** The next data bytes (a view into the reader's buffer), or null at the end. */
  async next(): Promise<Buffer | null> {
    const reader = this.#reader;
    for (;;) {
      if (this.#finished) return null;
      if (this.#left > 0) {
        if (reader.buffer.length === 0) {
          if (reader.done) throw truncated();
          await reader.wait();
          continue;
        }
        const data = reader.take(this.#left);
        this.#left -= data.length;
        if (this.#left === 0) this.#left = -2; // expect the CRLF after the data
        return data;
      }
      if (this.#left === -2) {
        if (reader.buffer.length < 2) {
          if (reader.done) throw truncated();
          await reader.wait();
          continue;
        }
        if (reader.buffer[0] !== 0x0d || reader.buffer[1] !== 0x0a) {
          throw new HttpError(400, "Malformed chunk: missing CRLF after data");
        }
        reader.consume(2);
        this.#left = -1;
        continue;
      }
      // A size line.
      const eol = reader.buffer.indexOf("\r\n", 0, "latin1");
      if (eol < 0) {
        if (reader.buffer.length > MAX_CHUNK_LINE) throw new HttpError(400, "Chunk line too long");
        if (reader.done) throw truncated();
        await reader.wait();
        continue;
      }
      const line = reader.buffer.toString("latin1", 0, eol);
      const semicolon = line.indexOf(";");
      const sizeText = (semicolon < 0 ? line : line.slice(0, semicolon)).trim();
      if (!/^[0-9a-fA-F]{1,12}$/.test(sizeText)) throw new HttpError(400, "Malformed chunk size");
      const size = parseInt(sizeText, 16);
      reader.consume(eol + 2);
      if (size > 0) {
        this.#left = size;
        continue;
      }
      await this.#skipTrailers();
      this.#finished = true;
      return null;
    }
  }

  async #skipTrailers(): Promise<void> {
    const reader = this.#reader;
    for (;;) {
      // No trailers: the last-chunk line is followed directly by CRLF.
      if (reader.buffer.length >= 2 && reader.buffer[0] === 0x0d && reader.buffer[1] === 0x0a) {
        reader.consume(2);
        return;
      }
      const end = headEnd(reader.buffer, 0);
      if (end >= 0) {
        reader.consume(end);
        return;
      }
      if (reader.buffer.length > MAX_TRAILERS) throw new HttpError(431, "Trailers too large");
      if (reader.done) throw truncated();
      await reader.wait();
    }
  }
}

function truncated(): HttpError {
  return new HttpError(400, "Connection closed in the middle of a chunked body");
}

/** Frames `data` as one chunk. */
export function chunkHeader(size: number): Buffer {
  return Buffer.from(`${size.toString(16)}\r\n`, "latin1");
}

export const CRLF: Buffer = Buffer.from("\r\n", "latin1");
export const LAST_CHUNK: Buffer = Buffer.from("0\r\n\r\n", "latin1");

/** Whether a `Connection` header value holds the `close` option (RFC 9110 7.6.1). */
export function hasCloseToken(value: string | null): boolean {
  if (value === null) return false;
  return value.split(",").some((option) => option.trim().toLowerCase() === "close");
}

/**
 * Pure, synchronous helpers over X.509 certificates: PEM → DER, SHA-256
 * fingerprints, validity dates and a constant-time comparison. The validity
 * reader is a minimal bounds-checked DER walker (no ASN.1 library on the hot
 * path). Owns nothing; needs no permissions.
 *
 * @module
 */

import { createHash, timingSafeEqual } from "node:crypto";
import { Buffer } from "node:buffer";

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----/;

/** The validity period of a certificate. */
export interface CertificateValidity {
  notBefore: Date;
  notAfter: Date;
}

/**
 * Decodes the first `CERTIFICATE` block of a PEM string to DER bytes.
 *
 * @throws {SyntaxError} when `pem` holds no PEM certificate block.
 */
export function certificateDer(pem: string): Uint8Array<ArrayBuffer> {
  if (typeof pem !== "string") {
    throw new TypeError("Cannot decode certificate: PEM must be a string");
  }
  const match = PEM_CERTIFICATE.exec(pem);
  if (match === null) {
    throw new SyntaxError("Cannot decode certificate: no PEM CERTIFICATE block found");
  }
  const der = Buffer.from(match[1].replace(/\s+/g, ""), "base64");
  if (der.length < 2 || der[0] !== 0x30) {
    throw new SyntaxError("Cannot decode certificate: PEM block is not a DER certificate");
  }
  return new Uint8Array(der.buffer as ArrayBuffer, der.byteOffset, der.byteLength);
}

function toDer(pemOrDer: string | Uint8Array): Uint8Array {
  return typeof pemOrDer === "string" ? certificateDer(pemOrDer) : pemOrDer;
}

/** SHA-256 of the certificate's DER bytes, as lowercase hex (as LXD prints fingerprints). */
export function certificateFingerprint(pemOrDer: string | Uint8Array): string {
  return createHash("sha256").update(toDer(pemOrDer)).digest("hex");
}

/** Constant-time equality of two DER certificates (lengths are compared first). */
export function sameCertificate(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && timingSafeEqual(a, b);
}

/**
 * Reads `notBefore`/`notAfter` from a certificate.
 *
 * @throws {SyntaxError} when the bytes are not a DER X.509 certificate.
 */
export function certificateValidity(pemOrDer: string | Uint8Array): CertificateValidity {
  const der = toDer(pemOrDer);
  const reader = new DerReader(der);
  const certificate = reader.enter(0x30); // Certificate ::= SEQUENCE
  const tbs = certificate.enter(0x30); // TBSCertificate ::= SEQUENCE
  if (tbs.peekTag() === 0xa0) tbs.skip(); // [0] EXPLICIT version
  tbs.skip(); // serialNumber
  tbs.skip(); // signature AlgorithmIdentifier
  tbs.skip(); // issuer Name
  const validity = tbs.enter(0x30); // Validity ::= SEQUENCE
  return { notBefore: validity.time(), notAfter: validity.time() };
}

/** A cursor over one DER TLV level; every read is bounds-checked. */
class DerReader {
  #bytes: Uint8Array;
  #offset: number;
  #end: number;

  constructor(bytes: Uint8Array, offset = 0, end = bytes.length) {
    this.#bytes = bytes;
    this.#offset = offset;
    this.#end = end;
  }

  peekTag(): number {
    if (this.#offset >= this.#end) throw malformed("unexpected end of data");
    return this.#bytes[this.#offset];
  }

  /** Reads one TLV header; returns the tag and the content's [start, end). */
  #header(): { tag: number; start: number; end: number } {
    const bytes = this.#bytes;
    let offset = this.#offset;
    if (offset + 2 > this.#end) throw malformed("truncated header");
    const tag = bytes[offset++];
    let length = bytes[offset++];
    if (length & 0x80) {
      const count = length & 0x7f;
      if (count === 0 || count > 4 || offset + count > this.#end) {
        throw malformed("bad length");
      }
      length = 0;
      for (let i = 0; i < count; i++) length = length * 256 + bytes[offset++];
    }
    const end = offset + length;
    if (end > this.#end) throw malformed("length past end of data");
    return { tag, start: offset, end };
  }

  skip(): void {
    this.#offset = this.#header().end;
  }

  enter(tag: number): DerReader {
    const header = this.#header();
    if (header.tag !== tag) {
      throw malformed(`expected tag 0x${tag.toString(16)}, got 0x${header.tag.toString(16)}`);
    }
    this.#offset = header.end;
    return new DerReader(this.#bytes, header.start, header.end);
  }

  /** UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ). */
  time(): Date {
    const { tag, start, end } = this.#header();
    this.#offset = end;
    const text = String.fromCharCode(...this.#bytes.subarray(start, end));
    let match: RegExpExecArray | null;
    let year: number;
    if (tag === 0x17 && (match = /^(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(text))) {
      year = Number(match[1]);
      year += year < 50 ? 2000 : 1900; // RFC 5280 4.1.2.5.1
    } else if (tag === 0x18 && (match = /^(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)Z$/.exec(text))) {
      year = Number(match[1]);
    } else {
      throw malformed(`bad time ${JSON.stringify(text)}`);
    }
    const [, , month, day, hour, minute, second] = match.map(Number);
    return new Date(Date.UTC(year, month - 1, day, hour, minute, second));
  }
}

function malformed(why: string): SyntaxError {
  return new SyntaxError(`Cannot parse certificate: ${why}`);
}

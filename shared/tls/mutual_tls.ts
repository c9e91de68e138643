/**
 * Mutual TLS 1.3 over any already-open `node:stream` Duplex (a vsock or unix
 * `FdSocket`, a `net.Socket`), with certificate pinning instead of chains:
 * each side compares the peer's exact DER certificate (constant time) and its
 * validity dates.
 *
 * Built on `node:tls` (`new tls.TLSSocket(duplex, { isServer })` and
 * `tls.connect({ socket })`). In Deno 2.9.6 that is rustls underneath; with
 * `rejectUnauthorized: false` it skips chain validation but still verifies
 * the peer's handshake signature (CertificateVerify), so a peer that presents
 * a pinned certificate without its private key fails the handshake (checked
 * against a Go peer that signs with the wrong key). Owns the sockets it is
 * given: on any failure both the TLS socket and the underlying Duplex are
 * destroyed. Needs no permissions beyond what opened the socket.
 *
 * @module
 */

import * as tls from "node:tls";
import type { Duplex } from "node:stream";
import type * as net from "node:net";
import {
  certificateDer,
  certificateFingerprint,
  type CertificateValidity,
  certificateValidity,
  sameCertificate,
} from "./certificate.ts";
import { SecureContextCache, type SecureContextCacheStats } from "./context_cache.ts";

/** Why a peer's certificate was refused. */
export type CertificateErrorCode = "NO_CERTIFICATE" | "EXPIRED" | "NOT_YET_VALID" | "NOT_PINNED";

/** The peer's certificate was missing, out of its validity period, or not a pinned one. */
export class CertificateError extends Error {
  override name = "CertificateError";
  readonly code: CertificateErrorCode;

  constructor(code: CertificateErrorCode, message: string, options?: ErrorOptions) {
    super(message, options);
    this.code = code;
  }
}

/** The certificate a peer presented. */
export interface PeerCertificate {
  der: Uint8Array;
  /** SHA-256 of `der`, lowercase hex. */
  fingerprint: string;
}

/** Options for {@linkcode acceptTls}. */
export interface AcceptTlsOptions {
  /** Our certificate, PEM. */
  cert: string;
  /** Our private key, PEM. */
  key: string;
  /** When given, the peer must present exactly one of these certificates (PEM). */
  pinned?: string | string[];
  /**
   * Milliseconds for the whole handshake before the connection is destroyed.
   * @default 5000
   */
  handshakeTimeout?: number;
  /** Aborting destroys the connection and rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** Options for {@linkcode connectTls}. */
export interface ConnectTlsOptions {
  /** Our client certificate, PEM. */
  cert: string;
  /** Our private key, PEM. */
  key: string;
  /** The exact certificate the server must present, PEM. */
  pinned: string;
  /**
   * Milliseconds for the whole handshake before the connection is destroyed.
   * @default 5000
   */
  handshakeTimeout?: number;
  /** Aborting destroys the connection and rejects with the signal's reason. */
  signal?: AbortSignal;
}

interface Pin extends CertificateValidity {
  der: Uint8Array;
}

// Pinned PEMs are few and long-lived (one per instance); parse each once.
const PIN_CACHE_LIMIT = 4096;
const pinCache = new Map<string, Pin>();

function pin(pem: string): Pin {
  let cached = pinCache.get(pem);
  if (cached === undefined) {
    const der = certificateDer(pem);
    cached = { der, ...certificateValidity(der) };
    if (pinCache.size >= PIN_CACHE_LIMIT) pinCache.clear();
    pinCache.set(pem, cached);
  }
  return cached;
}

// Building a SecureContext validates and re-encodes the key in JavaScript: reusing one
// per (cert, key) halves the CPU of a handshake (tests/bench/tls.ts). One cache per
// role, so that a context never serves both ends; each holds a whole fleet (one
// client identity per instance on the host) and evicts the least recently used.
const serverContexts = new SecureContextCache();
const clientContexts = new SecureContextCache();

/** Counters of the server-side and client-side `SecureContext` caches. */
export function secureContextCacheStats(): {
  server: SecureContextCacheStats;
  client: SecureContextCacheStats;
} {
  return { server: serverContexts.stats(), client: clientContexts.stats() };
}

/**
 * Server side of a mutual TLS 1.3 handshake on `socket`. Requires a client
 * certificate; refuses (destroying the connection, rejecting with
 * {@linkcode CertificateError}) a missing one, one outside its validity
 * period, or, when `pinned` is given, one that is not pinned. Without
 * `pinned` the caller decides who the peer is from `peer`.
 */
export function acceptTls(
  socket: Duplex,
  options: AcceptTlsOptions,
): Promise<{ socket: tls.TLSSocket; peer: PeerCertificate }> {
  let pins: Pin[] | undefined;
  let context: tls.SecureContext;
  try {
    if (options.pinned !== undefined) {
      pins = (Array.isArray(options.pinned) ? options.pinned : [options.pinned]).map(pin);
    }
    context = serverContexts.get(options.cert, options.key);
  } catch (error) {
    socket.destroy();
    return Promise.reject(error);
  }
  const secure = new tls.TLSSocket(socket as net.Socket, {
    isServer: true,
    secureContext: context,
    requestCert: true,
    rejectUnauthorized: false,
  });
  guardStart(secure);
  return handshake(secure, socket, "secure", options, () => {
    const der = peerDer(secure);
    let validity: CertificateValidity | undefined;
    if (pins !== undefined) {
      validity = pins.find((candidate) => sameCertificate(candidate.der, der));
      if (validity === undefined) {
        throw new CertificateError("NOT_PINNED", "Client certificate is not a pinned certificate");
      }
    }
    checkValidity(validity ?? certificateValidity(der), "Client");
    return { socket: secure, peer: { der, fingerprint: certificateFingerprint(der) } };
  });
}

/**
 * Client side of a mutual TLS 1.3 handshake on `socket`: presents our
 * certificate and accepts only the exact `pinned` server certificate within
 * its validity period; otherwise destroys the connection and rejects with
 * {@linkcode CertificateError}.
 *
 * In TLS 1.3 the server judges our certificate after this resolves: a
 * refusal shows as an error or end on the first read.
 */
export function connectTls(socket: Duplex, options: ConnectTlsOptions): Promise<tls.TLSSocket> {
  let expected: Pin;
  let context: tls.SecureContext;
  try {
    expected = pin(options.pinned);
    context = clientContexts.get(options.cert, options.key);
  } catch (error) {
    socket.destroy();
    return Promise.reject(error);
  }
  const secure = tls.connect({
    socket: socket as net.Socket,
    secureContext: context,
    rejectUnauthorized: false,
    checkServerIdentity: () => undefined,
  });
  return handshake(secure, socket, "secureConnect", options, () => {
    if (!sameCertificate(expected.der, peerDer(secure))) {
      throw new CertificateError("NOT_PINNED", "Server certificate is not the pinned certificate");
    }
    checkValidity(expected, "Server");
    return secure;
  });
}

/**
 * A server-side `TLSSocket` in Deno 2.9.6 starts its handshake in a nextTick
 * (`TLSSocket._start`). When bytes the Duplex already holds (or the kernel
 * hands over synchronously, as an `FdSocket` does) make the handshake fail
 * inside `start()` — garbage, a TLS 1.2 ClientHello — the socket is destroyed
 * there, and `_start` goes on to use the handle it just lost: a TypeError
 * thrown from the nextTick queue, which would end the process. Whatever
 * `_start` throws becomes the socket's error instead, which the handshake
 * reports as a refused connection.
 */
function guardStart(secure: tls.TLSSocket): void {
  const socket = secure as tls.TLSSocket & { _start?: () => void };
  const start = socket._start;
  if (typeof start !== "function") return;
  socket._start = function (this: tls.TLSSocket) {
    try {
      start.call(this);
    } catch (error) {
      if (!this.destroyed) this.destroy(error as Error);
    }
  };
}

function peerDer(secure: tls.TLSSocket): Uint8Array {
  // getPeerX509Certificate() costs a fifth of getPeerCertificate() in Deno 2.9.6.
  const raw = secure.getPeerX509Certificate()?.raw ?? secure.getPeerCertificate(true)?.raw;
  if (raw === undefined || raw.length === 0) {
    throw new CertificateError("NO_CERTIFICATE", "Peer presented no certificate");
  }
  return new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength);
}

function checkValidity(validity: CertificateValidity, who: string): void {
  const now = Date.now();
  if (now < validity.notBefore.getTime()) {
    throw new CertificateError(
      "NOT_YET_VALID",
      `${who} certificate is not valid before ${validity.notBefore.toISOString()}`,
    );
  }
  if (now > validity.notAfter.getTime()) {
    throw new CertificateError(
      "EXPIRED",
      `${who} certificate expired at ${validity.notAfter.toISOString()}`,
    );
  }
}

function ignore(): void {}

/**
 * Waits for `event` on `secure`, then runs `verify`; destroys both sockets on
 * a handshake error, close, timeout, abort or a throwing `verify`.
 */
function handshake<T>(
  secure: tls.TLSSocket,
  raw: Duplex,
  event: "secure" | "secureConnect",
  options: { handshakeTimeout?: number; signal?: AbortSignal },
  verify: () => T,
): Promise<T> {
  const { handshakeTimeout = 5000, signal } = options;
  return new Promise<T>((resolve, reject) => {
    const fail = (error: unknown) => {
      cleanup();
      // Late errors from the torn-down sockets must not become uncaught.
      secure.on("error", ignore);
      raw.on("error", ignore);
      secure.destroy();
      raw.destroy();
      reject(error);
    };
    const onSecure = () => {
      let result: T;
      try {
        result = verify();
      } catch (error) {
        fail(error);
        return;
      }
      cleanup();
      // The TLS socket reports transport failures itself; an "error" the raw
      // Duplex emits besides must not become an uncaught exception.
      raw.on("error", ignore);
      resolve(result);
    };
    const onError = (error: Error) =>
      fail(new Error(`TLS handshake failed: ${error.message}`, { cause: error }));
    const onClose = () => fail(new Error("TLS handshake failed: connection closed"));
    const onAbort = () => fail(signal!.reason);
    const timer = setTimeout(
      () => fail(new Error(`TLS handshake timed out after ${handshakeTimeout} ms`)),
      handshakeTimeout,
    );
    function cleanup() {
      clearTimeout(timer);
      secure.off(event, onSecure);
      secure.off("error", onError);
      secure.off("close", onClose);
      raw.off("error", onError);
      signal?.removeEventListener("abort", onAbort);
    }
    if (signal?.aborted) {
      onAbort();
      return;
    }
    secure.once(event, onSecure);
    secure.on("error", onError);
    secure.on("close", onClose);
    raw.on("error", onError);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

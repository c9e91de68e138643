/**
 * Certificates and mutual TLS 1.3 with pinning, over any `node:stream` Duplex.
 *
 * - {@linkcode generateKeyPair}, {@linkcode writeKeyPair}, {@linkcode readKeyPair}: self-signed ECDSA identities and their files.
 * - {@linkcode certificateDer}, {@linkcode certificateFingerprint}, {@linkcode certificateValidity}, {@linkcode sameCertificate}: pure helpers.
 * - {@linkcode acceptTls}, {@linkcode connectTls}: the two ends of a pinned mutual-TLS handshake.
 *
 * @module
 */

export * from "./certificate.ts";
export * from "./context_cache.ts";
export * from "./key_pair.ts";
export * from "./mutual_tls.ts";

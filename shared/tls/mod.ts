/**
 * Certificates and mutual TLS 1.3 with pinning, over any `node:stream` Duplex.
 *
 * - {@linkcode certificateDer}, {@linkcode certificateFingerprint}, {@linkcode certificateValidity}, {@linkcode sameCertificate}: pure helpers.
 * - {@linkcode acceptTls}, {@linkcode connectTls}: the two ends of a pinned mutual-TLS handshake.
 *
 * Key generation and key files (`generateKeyPair`, `writeKeyPair`, `readKeyPair`)
 * are their own door, `key_pair.ts`: it loads `@peculiar/x509`, which only the
 * host needs and the agent's binary must not carry.
 *
 * @module
 */

export * from "./certificate.ts";
export * from "./context_cache.ts";
export * from "./mutual_tls.ts";

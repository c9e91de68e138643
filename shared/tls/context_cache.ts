/**
 * A bounded, least-recently-used cache of `node:tls` `SecureContext`s, one per
 * (certificate, key) pair.
 *
 * Building a `SecureContext` parses and re-encodes the private key (≈ 1–2 ms of
 * CPU in Deno 2.9.6), about half of what a whole handshake costs; a host with one
 * client identity per instance needs one context per instance, so the cache must
 * hold a whole fleet and must not be emptied when it fills (the old cache of 256,
 * cleared when full, rebuilt every context of a 1,000-instance fleet). Evicts the
 * least recently used context beyond `limit`. Needs no permissions.
 *
 * @module
 */

import * as tls from "node:tls";

/** Counters of a {@linkcode SecureContextCache}. */
export interface SecureContextCacheStats {
  /** Contexts held now (never above `limit`). */
  size: number;
  /** Most contexts held at once. */
  limit: number;
  /** Lookups answered from the cache. */
  hits: number;
  /** Lookups that built a context. */
  misses: number;
  /** Contexts dropped to stay within `limit`. */
  evictions: number;
}

/** Options for {@linkcode SecureContextCache}. */
export interface SecureContextCacheOptions {
  /**
   * Most contexts held at once; the least recently used goes beyond it.
   * @default 8192
   */
  limit?: number;
}

/** Least-recently-used `SecureContext`s keyed by (PEM certificate, PEM key). */
export class SecureContextCache {
  readonly #limit: number;
  // Map iteration order is insertion order: a hit re-inserts, so the first key is the oldest.
  readonly #entries = new Map<string, { key: string; context: tls.SecureContext }>();
  #hits = 0;
  #misses = 0;
  #evictions = 0;

  constructor(options: SecureContextCacheOptions = {}) {
    const { limit = 8192 } = options;
    if (!Number.isInteger(limit) || limit < 1) {
      throw new RangeError(
        `Cannot create SecureContextCache: limit must be a positive integer, got ${limit}`,
      );
    }
    this.#limit = limit;
  }

  /** The TLS 1.3-only context for `cert` and `key`, built on the first call and reused after. */
  get(cert: string, key: string): tls.SecureContext {
    const cached = this.#entries.get(cert);
    if (cached !== undefined && cached.key === key) {
      this.#hits++;
      this.#entries.delete(cert);
      this.#entries.set(cert, cached);
      return cached.context;
    }
    this.#misses++;
    // minVersion must live in the context: Deno reads the protocol range from it.
    const context = tls.createSecureContext({ cert, key, minVersion: "TLSv1.3" });
    this.#entries.delete(cert);
    while (this.#entries.size >= this.#limit) {
      this.#entries.delete(this.#entries.keys().next().value!);
      this.#evictions++;
    }
    this.#entries.set(cert, { key, context });
    return context;
  }

  /** Current size and counters. */
  stats(): SecureContextCacheStats {
    return {
      size: this.#entries.size,
      limit: this.#limit,
      hits: this.#hits,
      misses: this.#misses,
      evictions: this.#evictions,
    };
  }
}

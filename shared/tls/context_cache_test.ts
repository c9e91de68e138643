import assert from "node:assert/strict";
import { SecureContextCache } from "./context_cache.ts";
import { generateKeyPair, type KeyPair } from "./key_pair.ts";

// More distinct identities than the old cache held (256, cleared when full).
const pairs: KeyPair[] = await Promise.all(
  Array.from(
    { length: 300 },
    (_, i) => generateKeyPair({ commonName: `instance-${i}`, curve: "P-256" }),
  ),
);

Deno.test("SecureContextCache reuses a pair's context after more distinct pairs than the old limit", () => {
  const cache = new SecureContextCache();
  const first = cache.get(pairs[0].cert, pairs[0].key);
  for (const pair of pairs) cache.get(pair.cert, pair.key);
  for (const pair of pairs) cache.get(pair.cert, pair.key);
  assert.equal(cache.get(pairs[0].cert, pairs[0].key), first);
  const stats = cache.stats();
  assert.equal(stats.misses, pairs.length);
  assert.equal(stats.hits, pairs.length + 2);
  assert.equal(stats.size, pairs.length);
  assert.equal(stats.evictions, 0);
});

Deno.test("SecureContextCache stays within its limit and evicts the least recently used", () => {
  const cache = new SecureContextCache({ limit: 100 });
  const kept = cache.get(pairs[0].cert, pairs[0].key);
  for (const pair of pairs.slice(1)) {
    cache.get(pair.cert, pair.key);
    cache.get(pairs[0].cert, pairs[0].key); // keeps pair 0 the most recently used
    assert.ok(cache.stats().size <= 100);
  }
  assert.equal(cache.get(pairs[0].cert, pairs[0].key), kept);
  const stats = cache.stats();
  assert.equal(stats.size, 100);
  assert.equal(stats.evictions, pairs.length - 100);
  const missesBefore = stats.misses;
  cache.get(pairs[1].cert, pairs[1].key); // evicted long ago: built again
  assert.equal(cache.stats().misses, missesBefore + 1);
});

Deno.test("SecureContextCache builds a new context when a certificate comes with another key", () => {
  const cache = new SecureContextCache();
  const a = cache.get(pairs[0].cert, pairs[0].key);
  const b = cache.get(pairs[0].cert, pairs[1].key);
  assert.notEqual(b, a);
  assert.equal(cache.stats().misses, 2);
  assert.equal(cache.stats().size, 1);
});

Deno.test("SecureContextCache refuses a limit that is not a positive integer", () => {
  assert.throws(() => new SecureContextCache({ limit: 0 }), RangeError);
  assert.throws(() => new SecureContextCache({ limit: 1.5 }), RangeError);
});

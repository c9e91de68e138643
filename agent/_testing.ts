/**
 * Helpers for the agent's tests (not shipped behaviour): bounded waits and
 * test certificates. Needs no permissions.
 * @module
 */

import { generateKeyPair, type KeyPair } from "../shared/tls/key_pair.ts";

/** Resolves with `promise`, or rejects after `ms` naming `what`. */
export async function within<T>(promise: Promise<T>, what: string, ms = 5000): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`Timed out waiting for ${what}`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `check` every 10 ms until it returns a value other than undefined/false, at most `ms`. */
export async function until<T>(
  check: () => T | undefined | false | Promise<T | undefined | false>,
  what: string,
  ms = 5000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** A PEM certificate and its PEM key. */
export type TestPair = KeyPair;

/** A self-signed ECDSA P-256 certificate, valid from a minute ago for a day unless told. */
export function makeTestPair(
  commonName: string,
  validity: { notBefore?: Date; notAfter?: Date } = {},
): Promise<TestPair> {
  return generateKeyPair({
    commonName,
    curve: "P-256",
    days: 1,
    notBefore: validity.notBefore,
    notAfter: validity.notAfter,
  });
}

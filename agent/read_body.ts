/**
 * `readBody()`: reads a request or response body into memory with a bound,
 * so a huge or endless body is refused instead of buffered.
 * Needs no permissions.
 * @module
 */

/** The body went past the bound; the apps answer 413. */
export class BodyTooLargeError extends Error {
  override name = "BodyTooLargeError";
  constructor(readonly limit: number) {
    super(`Request body too large (more than ${limit} bytes)`);
  }
}

/** Reads `body` whole; throws `BodyTooLargeError` past `max` bytes (cancelling the rest). */
export async function readBody(
  body: ReadableStream<Uint8Array> | null,
  max: number,
): Promise<Uint8Array> {
  if (body === null) return new Uint8Array();
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = body.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      size += value.byteLength;
      if (size > max) {
        await reader.cancel().catch(() => {});
        throw new BodyTooLargeError(max);
      }
      chunks.push(value);
    }
  } finally {
    reader.releaseLock();
  }
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return out;
}

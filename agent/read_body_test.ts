import assert from "node:assert/strict";
import { BodyTooLargeError, readBody } from "./read_body.ts";

function stream(chunks: number[]): ReadableStream<Uint8Array> {
  return new ReadableStream({
    start(controller) {
      for (const n of chunks) controller.enqueue(new Uint8Array(n).fill(7));
      controller.close();
    },
  });
}

Deno.test("readBody() joins the chunks of a body within the bound", async () => {
  const bytes = await readBody(stream([3, 4, 5]), 12);
  assert.equal(bytes.byteLength, 12);
  assert.ok(bytes.every((b) => b === 7));
  assert.equal((await readBody(null, 10)).byteLength, 0);
});

Deno.test("readBody() refuses a body past the bound and cancels an endless one", async () => {
  await assert.rejects(readBody(stream([8, 8]), 12), BodyTooLargeError);
  let cancelled = false;
  const endless = new ReadableStream<Uint8Array>({
    pull: (controller) => controller.enqueue(new Uint8Array(1024)),
    cancel: () => void (cancelled = true),
  });
  await assert.rejects(readBody(endless, 4096), (e: unknown) => {
    assert.ok(e instanceof BodyTooLargeError);
    assert.match(e.message, /more than 4096 bytes/);
    return true;
  });
  assert.equal(cancelled, true);
});

import assert from "node:assert/strict";
import { LineBuffer } from "./line_buffer.ts";

const encoder = new TextEncoder();

Deno.test("LineBuffer joins a line split across chunks", () => {
  const lines = new LineBuffer(64);
  assert.deepEqual(lines.push(encoder.encode("CONN")), []);
  assert.deepEqual(lines.push(encoder.encode("ECT 2:1")), []);
  assert.deepEqual(lines.push(encoder.encode("234\nA\nB")), ["CONNECT 2:1234", "A"]);
  assert.deepEqual(lines.push(encoder.encode("\n")), ["B"]);
});

Deno.test("LineBuffer drops an oversized line whole and keeps the next good one", () => {
  const lines = new LineBuffer(16);
  assert.deepEqual(lines.push(encoder.encode("x".repeat(40))), []);
  assert.deepEqual(lines.push(encoder.encode("y".repeat(40) + "\nok\n")), ["ok"]);
  assert.deepEqual(lines.push(encoder.encode("z".repeat(16) + "\n")), []);
  assert.deepEqual(lines.push(encoder.encode("z".repeat(15) + "\n")), ["z".repeat(15)]);
});

Deno.test("LineBuffer.reset() forgets a partial line", () => {
  const lines = new LineBuffer(64);
  lines.push(encoder.encode("CONNECT 2:"));
  lines.reset();
  assert.deepEqual(lines.push(encoder.encode("99\n")), ["99"]);
});

Deno.test("LineBuffer counts each dropped line once, as soon as it is too long", () => {
  const lines = new LineBuffer(8);
  assert.equal(lines.dropped, 0);
  lines.push(encoder.encode("a".repeat(20)));
  assert.equal(lines.dropped, 1, "a partial line over the bound counts at once");
  lines.push(encoder.encode("a".repeat(20) + "\n"));
  assert.equal(lines.dropped, 1, "its rest does not count again");
  assert.deepEqual(lines.push(encoder.encode("b".repeat(12) + "\nok\n")), ["ok"]);
  assert.equal(lines.dropped, 2, "a complete line over the bound in one chunk counts too");
});

Deno.test("LineBuffer decodes a UTF-8 character split across chunks; Infinity keeps any length", () => {
  const lines = new LineBuffer(Infinity);
  const bytes = encoder.encode("é".repeat(3) + "x".repeat(100_000) + "\n");
  assert.deepEqual(lines.push(bytes.subarray(0, 3)), []);
  assert.deepEqual(lines.push(bytes.subarray(3)), ["é".repeat(3) + "x".repeat(100_000)]);
  assert.equal(lines.dropped, 0);
});

import assert from "node:assert/strict";
import { encodeHybridLine, HYBRID_LINE_MAX, parseHybridLine } from "./hybrid_line.ts";

const bytes = (text: string) => new TextEncoder().encode(text);

Deno.test("parseHybridLine() parses a complete CONNECT line", () => {
  assert.deepEqual(parseHybridLine(bytes("CONNECT 8443\n"), "CONNECT"), {
    verb: "CONNECT",
    port: 8443,
    length: 13,
  });
});

Deno.test("parseHybridLine() parses an OK line and leaves the bytes after it", () => {
  const input = bytes("OK 1073741824\nHTTP/1.1 200 OK\r\n");
  const line = parseHybridLine(input, "OK");
  assert.deepEqual(line, { verb: "OK", port: 1073741824, length: 14 });
  assert.equal(new TextDecoder().decode(input.subarray(line!.length)), "HTTP/1.1 200 OK\r\n");
});

Deno.test("parseHybridLine() accepts the largest port", () => {
  assert.equal(parseHybridLine(bytes("CONNECT 4294967295\n"), "CONNECT")?.port, 0xFFFFFFFF);
});

Deno.test("parseHybridLine() returns null for every prefix of a valid line", () => {
  const line = "CONNECT 52\n";
  for (let i = 0; i < line.length; i++) {
    assert.equal(parseHybridLine(bytes(line.slice(0, i)), "CONNECT"), null, `prefix ${i}`);
  }
});

Deno.test("parseHybridLine() throws a SyntaxError on garbage as soon as it shows", () => {
  for (
    const input of [
      "GET / HTTP/1.1\r\n",
      "X",
      "CONNEcT 1\n",
      "CONNECT  1\n",
      "CONNECT -1\n",
      "CONNECT 1x",
      "CONNECT \n",
      "CONNECT 12\r\n",
      "\n",
    ]
  ) {
    assert.throws(() => parseHybridLine(bytes(input), "CONNECT"), SyntaxError, input);
  }
});

Deno.test("parseHybridLine() rejects the other verb", () => {
  assert.throws(() => parseHybridLine(bytes("OK 5\n"), "CONNECT"), SyntaxError);
  assert.throws(() => parseHybridLine(bytes("CONNECT 5\n"), "OK"), SyntaxError);
});

Deno.test("parseHybridLine() rejects oversized lines and ports before the newline comes", () => {
  assert.throws(() => parseHybridLine(bytes("CONNECT 4294967296\n"), "CONNECT"), SyntaxError);
  assert.throws(() => parseHybridLine(bytes("CONNECT 12345678901"), "CONNECT"), SyntaxError);
  assert.throws(
    () => parseHybridLine(bytes("CONNECT " + "1".repeat(HYBRID_LINE_MAX)), "CONNECT"),
    SyntaxError,
  );
  assert.throws(() => parseHybridLine(bytes("OK " + "0".repeat(40) + "\n"), "OK"), SyntaxError);
});

Deno.test("parseHybridLine() allows leading zeros within ten digits", () => {
  assert.equal(parseHybridLine(bytes("OK 0000000042\n"), "OK")?.port, 42);
});

Deno.test("encodeHybridLine() writes the line parseHybridLine() reads", () => {
  assert.equal(new TextDecoder().decode(encodeHybridLine("CONNECT", 52)), "CONNECT 52\n");
  assert.equal(new TextDecoder().decode(encodeHybridLine("OK", 1 << 30)), "OK 1073741824\n");
  for (const port of [0, 1, 1024, 0xFFFFFFFF]) {
    assert.equal(parseHybridLine(encodeHybridLine("OK", port), "OK")?.port, port);
  }
});

Deno.test("encodeHybridLine() rejects out-of-range ports with a RangeError", () => {
  assert.throws(() => encodeHybridLine("CONNECT", -1), RangeError);
  assert.throws(() => encodeHybridLine("CONNECT", 2 ** 32), RangeError);
});

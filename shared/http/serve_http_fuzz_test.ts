import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { duplexPair } from "node:stream";
import { serveHttp } from "./serve_http.ts";

/** A deterministic PRNG (mulberry32), so that a failure can be replayed. */
function random(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const PIECES = [
  "GET ",
  "POST ",
  "/1.0",
  " HTTP/1.1",
  " HTTP/1.0",
  "\r\n",
  "\r\n\r\n",
  "\n",
  "Host: h",
  "Content-Length: ",
  "Transfer-Encoding: chunked",
  "5",
  "ffffffffffff",
  "0\r\n\r\n",
  ":",
  " ",
  "\x00",
  "\xff",
  "Connection: close",
  "Expect: 100-continue",
  "a",
  "-1",
  ";ext",
  "\t",
];

Deno.test("serveHttp() survives mangled input: every connection ends, with a valid status line if any", async () => {
  const next = random(42);
  for (let round = 0; round < 200; round++) {
    const [client, server] = duplexPair();
    let handled = 0;
    const served = serveHttp(server, async (request) => {
      handled++;
      await request.arrayBuffer();
      return new Response("ok");
    }, { headersTimeout: 20, idleTimeout: 20, maxHeaderSize: 512, maxBodySize: 64 });
    let received = "";
    client.on("data", (chunk: Buffer) => received += chunk.toString("latin1"));
    client.on("error", () => {});
    let input = "";
    const count = 1 + Math.floor(next() * 30);
    for (let i = 0; i < count; i++) input += PIECES[Math.floor(next() * PIECES.length)];
    client.write(Buffer.from(input, "latin1"));
    if (next() < 0.5) client.end();
    await served;
    client.destroy();
    const context = `round ${round}: ${JSON.stringify(input)} → ${JSON.stringify(received)}`;
    if (received !== "") assert.match(received, /^HTTP\/1\.1 [1-5]\d\d /, context);
    assert.ok(handled <= (received.match(/HTTP\/1\.1 200 /g) ?? []).length + 1, context);
  }
});

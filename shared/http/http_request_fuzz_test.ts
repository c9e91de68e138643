import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { duplexPair } from "node:stream";
import { httpRequest } from "./http_request.ts";

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
  "HTTP/1.1 ",
  "200 OK",
  "204 No Content",
  "100 Continue",
  "101 Switching",
  "999",
  "\r\n",
  "\r\n\r\n",
  "\n",
  "Content-Length: ",
  "Transfer-Encoding: chunked",
  "3",
  "abc",
  "0\r\n\r\n",
  "ffffffff",
  ":",
  " ",
  "\x00",
  "\xff",
  "Connection: close",
  ";x",
  "-5",
];

Deno.test("httpRequest() settles on mangled responses: rejects, or gives a body that ends or errors", async () => {
  const next = random(7);
  const seen = new Set<string>();
  for (let round = 0; round < 200; round++) {
    const [client, server] = duplexPair();
    server.on("error", () => {});
    server.resume();
    // Mostly a plausible head (status line, a few fields, CRLFCRLF), then anything.
    const piece = () => PIECES[Math.floor(next() * PIECES.length)];
    let reply = next() < 0.7 ? "HTTP/1.1 200 OK\r\n" : "";
    for (let i = Math.floor(next() * 4); i > 0; i--) reply += piece() + piece() + "\r\n";
    if (next() < 0.7) reply += "\r\n";
    for (let i = Math.floor(next() * 8); i > 0; i--) reply += piece();
    server.end(Buffer.from(reply, "latin1"));
    const context = `round ${round}: ${JSON.stringify(reply)}`;
    let outcome: string;
    try {
      const response = await httpRequest(client, new Request("http://h/"), { timeout: 50 });
      outcome = await response.arrayBuffer().then(() => "body ended", () => "body errored");
    } catch (error) {
      assert.ok(error instanceof Error, context);
      outcome = "rejected";
    }
    seen.add(outcome);
    assert.equal(client.destroyed, true, context); // the connection never outlives the exchange
    server.destroy();
  }
  // The inputs reach every outcome, so the rounds above exercised each path.
  assert.deepEqual([...seen].sort(), ["body ended", "body errored", "rejected"]);
});

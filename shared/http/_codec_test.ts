import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { headEnd, HttpError, parseRequestHead, parseResponseHead, summarize } from "./_codec.ts";

function status(fn: () => unknown): number {
  try {
    fn();
  } catch (error) {
    if (error instanceof HttpError) return error.status;
    throw error;
  }
  return 0;
}

Deno.test("headEnd() finds the end of a head, from a resumed scan position", () => {
  const buffer = Buffer.from("GET / HTTP/1.1\r\nHost: h\r\n\r\nbody", "latin1");
  assert.equal(headEnd(buffer, 0), 27);
  assert.equal(headEnd(buffer, 23), 27); // the CRLFCRLF starts at 23
  assert.equal(headEnd(buffer, 24), -1);
  assert.equal(headEnd(Buffer.from("GET / HTTP/1.1\r\n", "latin1"), 0), -1);
});

Deno.test("parseRequestHead() keeps header names as sent and trims values", () => {
  assert.deepEqual(parseRequestHead("PATCH /1.0?x=1 HTTP/1.1\r\nHost: h\r\nX-A:  v w  "), {
    method: "PATCH",
    target: "/1.0?x=1",
    minor: 1,
    fields: [["Host", "h"], ["X-A", "v w"]],
  });
});

Deno.test("parseRequestHead() refuses bad lines with 400 and other versions with 505", () => {
  assert.equal(status(() => parseRequestHead("GET /  HTTP/1.1")), 400);
  assert.equal(status(() => parseRequestHead("GET / HTTP/3")), 505);
  assert.equal(status(() => parseRequestHead("GET / HTTP/1.1\r\nX: a\x00b")), 400);
  assert.equal(status(() => parseRequestHead("GET / HTTP/1.1\r\n: empty name")), 400);
});

Deno.test("parseResponseHead() reads status, reason and fields", () => {
  assert.deepEqual(parseResponseHead("HTTP/1.1 404 Not Found\r\nContent-Length: 0"), {
    minor: 1,
    status: 404,
    statusText: "Not Found",
    fields: [["Content-Length", "0"]],
  });
  assert.equal(parseResponseHead("HTTP/1.0 200").statusText, "");
});

Deno.test("summarize() derives framing, connection options and host", () => {
  const s = summarize([["content-length", "5, 5"], ["Connection", "Keep-Alive, Close"]], false);
  assert.deepEqual(s.framing, { kind: "length", length: 5 });
  assert.equal(s.close, true);
  assert.equal(s.keepAlive, true);
  assert.deepEqual(summarize([["Transfer-Encoding", "Chunked"]], false).framing, {
    kind: "chunked",
  });
  assert.deepEqual(summarize([], false).framing, { kind: "none" });
  assert.deepEqual(summarize([], true).framing, { kind: "close" });
  assert.deepEqual(summarize([["Content-Length", "0"]], true).framing, { kind: "none" });
  assert.equal(summarize([["HOST", "a"]], false).host, "a");
  assert.equal(summarize([["Expect", "100-Continue"]], false).expectContinue, true);
});

Deno.test("summarize() refuses smuggling-prone framing", () => {
  assert.equal(
    status(() => summarize([["Content-Length", "1"], ["Content-Length", "2"]], false)),
    400,
  );
  assert.equal(
    status(() => summarize([["Content-Length", "1"], ["Transfer-Encoding", "chunked"]], false)),
    400,
  );
  assert.equal(status(() => summarize([["Content-Length", "0x10"]], false)), 400);
  assert.equal(status(() => summarize([["Transfer-Encoding", "gzip, chunked"]], false)), 501);
  assert.equal(status(() => summarize([["Host", "a"], ["Host", "b"]], false)), 400);
});

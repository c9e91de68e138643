import assert from "node:assert/strict";
import { unixSocketPair } from "../tls/_testing.ts";
import { errorResponse } from "./envelope.ts";
import { serveHttp } from "./serve_http.ts";
import { encodeFrame, FrameDecoder, OPCODE } from "./websocket.ts";
import {
  acceptWebSocket,
  connectWebSocket,
  WebSocketConnection,
  WebSocketHandshakeError,
} from "./websocket_conn.ts";

/** serveHttp on one unix connection; `handler` may accept a WebSocket. */
async function server(handler: (request: Request) => Response | Promise<Response>) {
  const pair = await unixSocketPair();
  const served = serveHttp(pair.server, handler);
  return {
    client: pair.client,
    async [Symbol.asyncDispose]() {
      pair.client.destroy();
      pair.server.destroy();
      await served;
      await pair[Symbol.asyncDispose]();
    },
  };
}

Deno.test("connectWebSocket() and acceptWebSocket() exchange text and binary both ways", async () => {
  const opened = Promise.withResolvers<WebSocketConnection>();
  await using s = await server((request) => acceptWebSocket(request, opened.resolve));
  const client = await connectWebSocket(
    s.client,
    "http://agent/1.0/operations/x/websocket?secret=a",
  );
  const peer = await opened.promise;
  assert.ok(await client.send("hello"));
  assert.ok(await client.send(new Uint8Array([1, 2, 3])));
  const big = new Uint8Array(200_000).map((_, i) => i * 7);
  assert.ok(await peer.send(big));
  assert.ok(await peer.send(""));
  assert.deepEqual(await peer.receive(), { type: "text", data: new TextEncoder().encode("hello") });
  assert.deepEqual(await peer.receive(), { type: "binary", data: new Uint8Array([1, 2, 3]) });
  assert.deepEqual(await client.receive(), { type: "binary", data: big });
  assert.deepEqual(await client.receive(), { type: "text", data: new Uint8Array(0) });
  client.close(1000, "bye");
  assert.equal(await peer.receive(), null);
  assert.deepEqual(await peer.closed, { code: 1000, reason: "bye" });
  assert.equal((await client.closed).code, 1000);
});

Deno.test("WebSocketConnection reassembles a fragmented message and answers a ping", async () => {
  const opened = Promise.withResolvers<WebSocketConnection>();
  await using s = await server((request) => acceptWebSocket(request, opened.resolve));
  const client = await connectWebSocket(s.client, "http://agent/events");
  const peer = await opened.promise;
  const mask = new Uint8Array([1, 2, 3, 4]);
  const raw = s.client;
  const pong = Promise.withResolvers<Uint8Array>();
  // Decode the raw bytes the server sends, looking for the pong.
  const decoder = new FrameDecoder({ masked: false });
  raw.on("data", (chunk: Uint8Array) => {
    for (const frame of decoder.push(new Uint8Array(chunk))) {
      if (frame.opcode === OPCODE.pong) pong.resolve(frame.payload);
    }
  });
  raw.write(encodeFrame(OPCODE.binary, new Uint8Array([1]), { fin: false, mask }));
  raw.write(encodeFrame(OPCODE.ping, new TextEncoder().encode("p"), { mask }));
  raw.write(encodeFrame(OPCODE.continuation, new Uint8Array([2, 3]), { mask }));
  assert.deepEqual(await peer.receive(), { type: "binary", data: new Uint8Array([1, 2, 3]) });
  assert.deepEqual(await pong.promise, new TextEncoder().encode("p"));
  client.close();
  await peer.closed;
});

Deno.test("connectWebSocket() rejects a refused handshake with LXD's error message", async () => {
  await using s = await server(() => errorResponse(403, "Forbidden"));
  await assert.rejects(
    connectWebSocket(s.client, "http://agent/1.0/operations/x/websocket?secret=bad"),
    (error) =>
      error instanceof WebSocketHandshakeError && error.status === 403 &&
      error.message === "Forbidden",
  );
});

Deno.test("a server end closes with 1002 when the client sends an unmasked frame", async () => {
  const opened = Promise.withResolvers<WebSocketConnection>();
  await using s = await server((request) => acceptWebSocket(request, opened.resolve));
  const client = await connectWebSocket(s.client, "http://agent/x");
  const peer = await opened.promise;
  s.client.write(encodeFrame(OPCODE.text, new TextEncoder().encode("x")));
  assert.equal((await peer.closed).code, 1002);
  assert.equal(await client.receive(), null);
});

Deno.test("acceptWebSocket() throws a TypeError for a request that is not a handshake", () => {
  assert.throws(
    () => acceptWebSocket(new Request("http://a/"), () => {}),
    (e) => e instanceof TypeError && /Upgrade/.test(e.message),
  );
});

import assert from "node:assert/strict";
import type * as net from "node:net";
import { httpRequest } from "./http_request.ts";
import { unixSocketPair, whenClosed } from "../tls/_testing.ts";

/** Reads one request (head and, given Content-Length, body) as text from the raw server end. */
function readRequest(socket: net.Socket): Promise<string> {
  return new Promise((resolve) => {
    let text = "";
    const onData = (chunk: Buffer) => {
      text += chunk.toString("latin1");
      const end = text.indexOf("\r\n\r\n");
      if (end < 0) return;
      const length = Number(/\r\ncontent-length: (\d+)/i.exec(text)?.[1] ?? 0);
      if (text.length >= end + 4 + length) {
        socket.off("data", onData);
        resolve(text);
      }
    };
    socket.on("data", onData);
  });
}

Deno.test("httpRequest() sends Host, Connection: close and a Content-Length body, and reads a sized response", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(
    pair.client,
    new Request("http://lxd-agent/1.0?recursion=1", {
      method: "PUT",
      headers: { "content-type": "application/json", "x-extra": "1" },
      body: '{"cid":2}',
    }),
  );
  const request = await sent;
  assert.match(request, /^PUT \/1\.0\?recursion=1 HTTP\/1\.1\r\nHost: lxd-agent\r\n/);
  assert.match(request, /\r\ncontent-type: application\/json\r\n/);
  assert.match(request, /\r\nConnection: close\r\n/);
  assert.match(request, /\r\nContent-Length: 9\r\n\r\n\{"cid":2\}$/);
  pair.server.write(
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
  );
  const response = await responding;
  assert.equal(response.status, 200);
  assert.equal(response.statusText, "OK");
  assert.equal(response.headers.get("content-type"), "text/plain");
  assert.equal(await response.text(), "hello");
  await whenClosed(pair.client); // the response owns the connection and closes it when read
});

Deno.test("httpRequest() decodes a chunked response incrementally", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/1.0/events"));
  await sent;
  pair.server.write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nevent1\r\n");
  const response = await responding;
  const reader = response.body!.getReader();
  assert.equal(new TextDecoder().decode((await reader.read()).value), "event1");
  pair.server.write("6;x=y\r\nevent2\r\n0\r\nTrailer: 1\r\n\r\n");
  assert.equal(new TextDecoder().decode((await reader.read()).value), "event2");
  assert.equal((await reader.read()).done, true);
  await whenClosed(pair.client);
});

Deno.test("httpRequest() reads a body delimited by the connection closing", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/"));
  await sent;
  pair.server.end("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it");
  assert.equal(await (await responding).text(), "all of it");
});

Deno.test("httpRequest() skips 100 Continue and gives a 204 a null body", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/", { method: "DELETE" }));
  await sent;
  pair.server.write("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n");
  const response = await responding;
  assert.equal(response.status, 204);
  assert.equal(response.body, null);
  await whenClosed(pair.client);
});

Deno.test("httpRequest() errors the body when the peer closes in the middle of it", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/"));
  await sent;
  pair.server.write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial");
  const response = await responding;
  const reader = response.body!.getReader();
  assert.equal(new TextDecoder().decode((await reader.read()).value), "partial");
  pair.server.destroy();
  await assert.rejects(reader.read(), /closed before the HTTP response body was complete/);
});

Deno.test("httpRequest() errors a chunked body cut before its last chunk", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/"));
  await sent;
  pair.server.end("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel");
  const response = await responding;
  await assert.rejects(response.text(), /chunked body/);
  await whenClosed(pair.client);
});

Deno.test("httpRequest() closes the connection when the body is cancelled", async () => {
  await using pair = await unixSocketPair();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/"));
  await sent;
  pair.server.write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
  const response = await responding;
  const serverSawClose = whenClosed(pair.server);
  await response.body!.cancel();
  await serverSawClose;
});

Deno.test("httpRequest() rejects when no response head comes within the timeout", async () => {
  await using pair = await unixSocketPair();
  const serverSawClose = whenClosed(pair.server);
  pair.server.resume();
  await assert.rejects(
    httpRequest(pair.client, new Request("http://h/"), { timeout: 50 }),
    /No HTTP response head within 50 ms/,
  );
  await serverSawClose;
});

Deno.test("httpRequest() rejects with the abort reason before the head", async () => {
  await using pair = await unixSocketPair();
  const controller = new AbortController();
  const sent = readRequest(pair.server);
  const responding = httpRequest(pair.client, new Request("http://h/"), {
    signal: controller.signal,
  });
  await sent;
  controller.abort(new Error("stop"));
  await assert.rejects(responding, /stop/);
});

Deno.test("httpRequest() rejects a head that is too large or malformed, or a closed connection", async () => {
  for (
    const [reply, expected] of [
      [`HTTP/1.1 200 OK\r\nX: ${"a".repeat(300)}\r\n\r\n`, /larger than 256 bytes/],
      ["SSH-2.0-OpenSSH\r\n\r\n", /Malformed status line/],
      ["HTTP/1.1 200 OK\r\nContent-", /closed before a complete HTTP response head/],
    ] as const
  ) {
    await using pair = await unixSocketPair();
    const sent = readRequest(pair.server);
    const responding = httpRequest(pair.client, new Request("http://h/"), { maxHeaderSize: 256 });
    await sent;
    pair.server.end(reply);
    await assert.rejects(responding, expected);
  }
});

Deno.test("httpRequest() with reuse asks for keep-alive and hands back the connection after a complete response, for the next request", async () => {
  await using pair = await unixSocketPair();
  const reused: object[] = [];
  let sent = readRequest(pair.server);
  const first = httpRequest(pair.client, new Request("http://h/1.0"), {
    reuse: (socket) => reused.push(socket),
  });
  assert.doesNotMatch(await sent, /Connection: close/i);
  pair.server.write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
  assert.equal(await (await first).text(), "ok");
  assert.equal(reused.length, 1);
  assert.equal(reused[0], pair.client);
  // The same connection carries a second request, chunked this time.
  sent = readRequest(pair.server);
  const second = httpRequest(pair.client, new Request("http://h/1.0/config"), {
    reuse: (socket) => reused.push(socket),
  });
  assert.match(await sent, /^GET \/1\.0\/config /);
  pair.server.write("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n");
  assert.equal(await (await second).text(), "[]");
  assert.equal(reused.length, 2);
  assert.equal(pair.client.destroyed, false);
});

Deno.test("httpRequest() with reuse closes instead when the server says close, the body is cut short or cancelled", async () => {
  for (
    const [answer, consume] of [
      ["HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", "text"],
      ["HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok", "cancel"],
      ["HTTP/1.1 200 OK\r\n\r\nuntil close", "none"],
    ] as const
  ) {
    await using pair = await unixSocketPair();
    const reused: object[] = [];
    const sent = readRequest(pair.server);
    const responding = httpRequest(pair.client, new Request("http://h/"), {
      reuse: (socket) => reused.push(socket),
    });
    await sent;
    pair.server.write(answer);
    const response = await responding;
    const closed = whenClosed(pair.client);
    if (consume === "text") await response.text();
    else if (consume === "cancel") await response.body!.cancel();
    else pair.server.end();
    if (consume === "none") await response.text();
    await closed;
    assert.equal(reused.length, 0, answer);
  }
});

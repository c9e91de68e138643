import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import { type HttpHandler, serveHttp, type ServeHttpOptions } from "./serve_http.ts";
import { httpRequest } from "./http_request.ts";
import { closed, fdSocketPair, unixSocketPair, whenClosed } from "../tls/_testing.ts";
import { acceptTls, connectTls } from "../tls/mod.ts";
import { generateKeyPair } from "../tls/key_pair.ts";
import { within } from "../vsock/_testing.ts";

/** Everything the peer receives, with a way to wait until a condition on it holds. */
class Received {
  text = "";
  closed = false;
  #waiters: (() => void)[] = [];

  constructor(socket: Duplex) {
    socket.setEncoding("latin1");
    socket.on("data", (chunk: string) => {
      this.text += chunk;
      this.#wake();
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      this.closed = true;
      this.#wake();
    });
  }

  #wake(): void {
    for (const waiter of this.#waiters.splice(0)) waiter();
  }

  /** Resolves once `predicate` holds; rejects if the connection closes first. */
  async until(predicate: (text: string) => boolean): Promise<string> {
    while (!predicate(this.text)) {
      if (this.closed) throw new Error(`Closed before the condition held; got ${this.text}`);
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
    return this.text;
  }

  /** Resolves with everything received once the connection is closed. */
  async all(): Promise<string> {
    while (!this.closed) await new Promise<void>((resolve) => this.#waiters.push(resolve));
    return this.text;
  }
}

function count(text: string, part: string): number {
  return text.split(part).length - 1;
}

async function echoHandler(request: Request): Promise<Response> {
  const url = new URL(request.url);
  const body = await request.text();
  return new Response(
    `${request.method} ${url.pathname}${url.search} host=${url.host} body=${body}`,
    {
      headers: { "x-seen-length": request.headers.get("content-length") ?? "none" },
    },
  );
}

/** Serves `handler` on one connection and gives the client end with a receive log. */
async function serving(handler: HttpHandler = echoHandler, options: ServeHttpOptions = {}) {
  const pair = await unixSocketPair();
  const served = serveHttp(pair.server, handler, options);
  const received = new Received(pair.client);
  return {
    client: pair.client,
    received,
    served,
    async [Symbol.asyncDispose]() {
      pair.client.destroy();
      await served;
      await pair[Symbol.asyncDispose]();
    },
  };
}

Deno.test("serveHttp() serves keep-alive requests one after another on one connection", async () => {
  await using s = await serving();
  s.client.write("GET /1.0?x=1 HTTP/1.1\r\nHost: lxd-agent\r\n\r\n");
  await s.received.until((text) => text.includes("host=lxd-agent body="));
  assert.match(s.received.text, /^HTTP\/1\.1 200 OK\r\n/);
  assert.match(s.received.text, /\r\nContent-Length: 33\r\n\r\n/);
  assert.ok(s.received.text.endsWith("GET /1.0?x=1 host=lxd-agent body="));
  assert.equal(s.received.closed, false);
  s.client.write("GET /second HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
  const all = await s.received.all();
  assert.equal(count(all, "HTTP/1.1 200 OK"), 2);
  assert.ok(all.endsWith("GET /second host=h body="));
  assert.match(all, /Connection: close\r\n/);
  await s.served;
});

Deno.test("serveHttp() answers pipelined requests in order", async () => {
  await using s = await serving();
  s.client.write(
    "GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n" +
      "GET /c HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
  );
  const all = await s.received.all();
  const paths = [...all.matchAll(/GET (\/\w) host/g)].map((match) => match[1]);
  assert.deepEqual(paths, ["/a", "/b", "/c"]);
});

Deno.test("serveHttp() reads Content-Length and chunked request bodies", async () => {
  await using s = await serving();
  s.client.write(
    'PUT /1.0 HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n{"cid":2}\r\n' +
      "POST /events HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n" +
      "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
  );
  const all = await s.received.all();
  assert.ok(all.includes('PUT /1.0 host=h body={"cid":2}\r\n'), all);
  assert.ok(all.endsWith("POST /events host=h body=hello world"), all);
});

Deno.test("serveHttp() sends 100 Continue when the client expects it", async () => {
  await using s = await serving();
  s.client.write(
    "PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
  );
  await s.received.until((text) => text.includes("\r\n\r\n"));
  assert.equal(s.received.text, "HTTP/1.1 100 Continue\r\n\r\n");
  s.client.write("ok");
  assert.ok((await s.received.all()).endsWith("PUT /x host=h body=ok"));
});

Deno.test("serveHttp() answers HEAD with headers only and HTTP/1.0 with close", async () => {
  await using s = await serving(() =>
    new Response("twelve bytes", { headers: { "content-length": "12" } })
  );
  s.client.write("HEAD / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.0\r\n\r\n");
  const all = await s.received.all();
  const [headResponse, getResponse] = all.split(/(?=HTTP\/1\.1 200)/);
  assert.match(headResponse, /Content-Length: 12\r\n\r\n$/i);
  assert.match(getResponse, /Connection: close\r\n/);
  assert.ok(getResponse.endsWith("\r\n\r\ntwelve bytes"));
});

Deno.test("serveHttp() streams a response body chunk by chunk as it is produced", async () => {
  let push!: (text: string | null) => void;
  await using s = await serving(() =>
    new Response(
      new ReadableStream<Uint8Array>({
        start(controller) {
          push = (text) =>
            text === null ? controller.close() : controller.enqueue(new TextEncoder().encode(text));
        },
      }),
      { headers: { "content-type": "application/json" } },
    )
  );
  s.client.write("GET /1.0/events HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
  // The head goes out before any event exists.
  await s.received.until((text) => text.includes("\r\n\r\n"));
  assert.match(s.received.text, /Transfer-Encoding: chunked\r\n/);
  push('{"type":"config"}\n');
  await s.received.until((text) => text.includes('12\r\n{"type":"config"}\n\r\n'));
  push('{"type":"device"}\n');
  await s.received.until((text) => text.includes('12\r\n{"type":"device"}\n\r\n'));
  push(null);
  assert.ok((await s.received.all()).endsWith("\r\n0\r\n\r\n"));
});

Deno.test("serveHttp() cancels a streaming body when the peer goes away", async () => {
  const { promise: cancelled, resolve } = Promise.withResolvers<unknown>();
  await using s = await serving(() =>
    new Response(
      new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(new TextEncoder().encode("first event\n"));
        },
        cancel: resolve,
      }),
    )
  );
  s.client.write("GET /1.0/events HTTP/1.1\r\nHost: h\r\n\r\n");
  await s.received.until((text) => text.includes("first event"));
  s.client.destroy();
  await cancelled;
  await s.served;
});

Deno.test("serveHttp() aborts the request signal when the connection closes during the handler", async () => {
  const { promise: aborted, resolve } = Promise.withResolvers<void>();
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  await using s = await serving((request) => {
    enter();
    return new Promise<Response>((done) =>
      request.signal.addEventListener("abort", () => {
        resolve();
        done(new Response("too late"));
      })
    );
  });
  s.client.write("GET /slow HTTP/1.1\r\nHost: h\r\n\r\n");
  await entered;
  s.client.destroy();
  await aborted;
  await s.served;
});

Deno.test("serveHttp() answers 431 and closes when the request head is too large", async () => {
  await using s = await serving(echoHandler, { maxHeaderSize: 1024 });
  s.client.write(`GET / HTTP/1.1\r\nHost: h\r\nX-Big: ${"a".repeat(2000)}\r\n\r\n`);
  assert.match(await s.received.all(), /^HTTP\/1\.1 431 Request Header Fields Too Large\r\n/);
});

Deno.test("serveHttp() answers 431 for a head that never ends", async () => {
  await using s = await serving(echoHandler, { maxHeaderSize: 1024 });
  s.client.write(`GET / HTTP/1.1\r\n`);
  for (let i = 0; i < 40; i++) s.client.write(`X-Header-${i}: ${"b".repeat(40)}\r\n`);
  assert.match(await s.received.all(), /^HTTP\/1\.1 431 /);
});

Deno.test("serveHttp() answers 413 and closes when a body is over the bound", async () => {
  for (
    const request of [
      "PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n",
      `PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n${
        "x".repeat(1000)
      }\r\n3e8\r\n${"y".repeat(1000)}\r\n0\r\n\r\n`,
    ]
  ) {
    let called = false;
    await using s = await serving(() => {
      called = true;
      return new Response("no");
    }, { maxBodySize: 1500 });
    s.client.write(request);
    assert.match(await s.received.all(), /^HTTP\/1\.1 413 Content Too Large\r\n/);
    assert.equal(called, false);
  }
});

Deno.test("serveHttp() closes a slow head (slowloris) after headersTimeout with 408", async () => {
  await using s = await serving(echoHandler, { headersTimeout: 50 });
  s.client.write("GET / HTTP/1.1\r\nHost: h\r\n");
  assert.match(await s.received.all(), /^HTTP\/1\.1 408 Request Timeout\r\n/);
  await s.served;
});

Deno.test("serveHttp() closes a connection that sends nothing within headersTimeout", async () => {
  await using s = await serving(echoHandler, { headersTimeout: 50 });
  assert.equal(await s.received.all(), "");
  await s.served;
});

Deno.test("serveHttp() closes a kept-alive connection after idleTimeout", async () => {
  await using s = await serving(echoHandler, { idleTimeout: 50, headersTimeout: 5000 });
  s.client.write("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
  const all = await s.received.all();
  assert.equal(count(all, "HTTP/1.1 200 OK"), 1);
  await s.served;
});

Deno.test("serveHttp() answers malformed requests with 400 and closes", async () => {
  for (
    const request of [
      "HELLO\r\n\r\n",
      "GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
      "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\n folded: x\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
      "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
      "GET nope HTTP/1.1\r\nHost: h\r\n\r\n",
    ]
  ) {
    await using s = await serving();
    s.client.write(request);
    const all = await s.received.all();
    assert.match(all, /^HTTP\/1\.1 400 Bad Request\r\n/, JSON.stringify(request));
    assert.match(all, /Connection: close\r\n/);
  }
});

Deno.test("serveHttp() refuses other HTTP versions and transfer codings", async () => {
  for (
    const [request, status] of [
      ["GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505],
      ["POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", 501],
    ] as const
  ) {
    await using s = await serving();
    s.client.write(request);
    assert.match(await s.received.all(), new RegExp(`^HTTP/1\\.1 ${status} `));
  }
});

Deno.test("serveHttp() answers 500 when the handler throws, and keeps the connection", async () => {
  await using s = await serving((request) => {
    if (new URL(request.url).pathname === "/boom") throw new Error("boom");
    return new Response("fine");
  });
  s.client.write(
    "GET /boom HTTP/1.1\r\nHost: h\r\n\r\nGET /ok HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
  );
  const all = await s.received.all();
  assert.match(all, /^HTTP\/1\.1 500 Internal Server Error\r\n/);
  assert.ok(all.endsWith("\r\n\r\nfine"));
});

Deno.test("serveHttp() closes the connection and resolves when its signal aborts", async () => {
  const controller = new AbortController();
  await using s = await serving(echoHandler, { signal: controller.signal });
  s.client.write("GET / HTTP/1.1\r\nHost: h\r\n\r\n");
  await s.received.until((text) => text.includes("body="));
  controller.abort();
  await s.served;
  assert.equal(count(await s.received.all(), "200 OK"), 1);
});

Deno.test("serveHttp() and httpRequest() exchange a large body both ways", async () => {
  await using pair = await unixSocketPair();
  const served = serveHttp(pair.server, async (request) => {
    const bytes = new Uint8Array(await request.arrayBuffer());
    return new Response(bytes.reverse());
  }, { maxBodySize: 4 << 20 });
  const body = crypto.getRandomValues(new Uint8Array(65536)).map((_, i) => i % 251);
  const big = new Uint8Array(3 << 20);
  for (let i = 0; i < big.length; i += body.length) big.set(body, i);
  const response = await httpRequest(
    pair.client,
    new Request("http://h/echo", { method: "POST", body: big }),
  );
  assert.equal(response.status, 200);
  const echoed = new Uint8Array(await response.arrayBuffer());
  assert.deepEqual(echoed, big.slice().reverse());
  await whenClosed(pair.client);
  await served;
});

Deno.test("serveHttp() over mutual TLS stops an endless stream when the peer's socket vanishes", async () => {
  const server = await generateKeyPair({ curve: "P-256" });
  const client = await generateKeyPair({ curve: "P-256" });
  await using pair = await unixSocketPair();
  const { promise: cancelled, resolve: onCancel } = Promise.withResolvers<void>();
  const chunk = new Uint8Array(16 * 1024).fill(0x65);
  const serving = acceptTls(pair.server, { ...server, pinned: client.cert }).then(({ socket }) =>
    serveHttp(socket, () =>
      new Response(
        new ReadableStream<Uint8Array>({
          pull: (controller) => controller.enqueue(chunk), // as fast as the socket takes it
          cancel: () => onCancel(),
        }),
      ))
  );
  const secure = await connectTls(pair.client, { ...client, pinned: server.cert });
  const response = await httpRequest(secure, new Request("http://h/1.0/events"));
  const reader = response.body!.getReader();
  let received = 0;
  while (received < 256 * 1024) received += (await reader.read()).value!.byteLength;
  pair.client.destroy(); // the raw transport goes away under TLS, mid-stream
  // What was already received is still delivered; then the cut chunked body errors.
  await assert.rejects(async () => {
    while (!(await reader.read()).done);
  }, /closed before the HTTP response body was complete|chunked body/);
  await cancelled;
  await serving;
});

Deno.test("serveHttp() resolves when the peer closes during a handler that never settles", async () => {
  const { promise: entered, resolve: enter } = Promise.withResolvers<void>();
  await using s = await serving(() => {
    enter();
    return new Promise<Response>(() => {});
  });
  s.client.write("GET /hang HTTP/1.1\r\nHost: h\r\n\r\n");
  await entered;
  s.client.destroy();
  await s.served;
});

/** A response body that sends one event, then nothing until cancelled (an event stream). */
function endlessEvents(onCancel: (reason: unknown) => void): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    start(controller) {
      controller.enqueue(new TextEncoder().encode("first event\n"));
    },
    cancel: onCancel,
  });
}

Deno.test("serveHttp() on a half-open socket aborts the request signal and cancels a stream as soon as the peer ends its side", async () => {
  await using pair = await fdSocketPair(); // FdSockets stay half open: 'end' without 'close'
  const cancelled = Promise.withResolvers<unknown>();
  const aborted = Promise.withResolvers<unknown>();
  const served = serveHttp(pair.server, (request) => {
    request.signal.addEventListener("abort", () => aborted.resolve(request.signal.reason));
    return new Response(endlessEvents(cancelled.resolve));
  });
  const received = new Received(pair.client);
  pair.client.write("GET /1.0/events HTTP/1.1\r\nHost: h\r\n\r\n");
  await received.until((text) => text.includes("first event"));
  pair.client.end();
  const reason = await within(aborted.promise, 5000, "the request signal to abort");
  assert.match(String(reason), /closed by the peer/);
  await within(cancelled.promise, 5000, "the stream to be cancelled");
  await within(served, 5000, "serveHttp() to resolve");
  assert.equal(pair.server.destroyed, true);
});

Deno.test("serveHttp() on a half-open socket aborts the request signal when the peer ends during the handler", async () => {
  await using pair = await fdSocketPair();
  const entered = Promise.withResolvers<void>();
  const served = serveHttp(pair.server, (request) => {
    entered.resolve();
    return new Promise<Response>((resolve) =>
      request.signal.addEventListener("abort", () => resolve(new Response("too late")))
    );
  });
  const received = new Received(pair.client);
  pair.client.write("GET /slow HTTP/1.1\r\nHost: h\r\n\r\n");
  await entered.promise;
  pair.client.end();
  await within(served, 5000, "serveHttp() to resolve");
  // The answer still reaches a peer that only ended its side, and says it closes.
  const text = await received.all();
  assert.match(text, /^HTTP\/1\.1 200 OK\r\n/);
  assert.match(text, /\r\n\r\ntoo late$/);
});

Deno.test("serveHttp() over mutual TLS on FdSockets stops an event stream when the peer's TLS side ends", async () => {
  const server = await generateKeyPair({ curve: "P-256" });
  const client = await generateKeyPair({ curve: "P-256" });
  await using pair = await fdSocketPair();
  const cancelled = Promise.withResolvers<unknown>();
  const aborted = Promise.withResolvers<void>();
  const serving = acceptTls(pair.server, { ...server, pinned: client.cert }).then(({ socket }) =>
    serveHttp(socket, (request) => {
      request.signal.addEventListener("abort", () => aborted.resolve());
      return new Response(endlessEvents(cancelled.resolve));
    })
  );
  const secure = await connectTls(pair.client, { ...client, pinned: server.cert });
  const response = await httpRequest(secure, new Request("http://h/1.0/events"));
  const reader = response.body!.getReader();
  assert.equal(new TextDecoder().decode((await reader.read()).value), "first event\n");
  secure.end(); // close_notify and FIN; the server's TLS socket sees 'end' only
  await within(aborted.promise, 5000, "the request signal to abort");
  await within(cancelled.promise, 5000, "the stream to be cancelled");
  await within(serving, 5000, "serveHttp() to resolve");
  await reader.cancel().catch(() => {});
  await closed(secure);
});

Deno.test("serveHttp() honours a handler's Connection: close: sends it and closes after the response", async () => {
  let calls = 0;
  await using s = await serving(() => {
    calls++;
    return new Response("bye", { headers: { connection: "close", "x-kept": "yes" } });
  });
  // A second request is already there: it must not be served on a closing connection.
  s.client.write("GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n");
  const text = await within(s.received.all(), 5000, "the connection to close");
  assert.equal(count(text, "HTTP/1.1 "), 1);
  assert.equal(count(text.toLowerCase(), "connection: close\r\n"), 1);
  assert.match(text, /x-kept: yes\r\n/);
  assert.ok(text.endsWith("\r\n\r\nbye"));
  assert.equal(calls, 1);
  await s.served;
});

Deno.test("serveHttp() honours Connection: close on a streamed response, after its last chunk", async () => {
  let push: (chunk: string | null) => void = () => {};
  await using s = await serving(() =>
    new Response(
      new ReadableStream<Uint8Array>({
        start(controller) {
          push = (chunk) =>
            chunk === null
              ? controller.close()
              : controller.enqueue(new TextEncoder().encode(chunk));
        },
      }),
      { headers: { Connection: "keep-alive, Close" } },
    )
  );
  s.client.write("GET /stream HTTP/1.1\r\nHost: h\r\n\r\n");
  await s.received.until((text) => text.includes("\r\n\r\n"));
  push("one\n");
  await s.received.until((text) => text.includes("one\n"));
  assert.equal(s.received.closed, false);
  push(null);
  const text = await within(s.received.all(), 5000, "the connection to close");
  assert.match(text, /transfer-encoding: chunked\r\n/i);
  assert.match(text, /connection: close\r\n/i);
  assert.ok(text.endsWith("\r\n0\r\n\r\n"));
  await s.served;
});

import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import type * as net from "node:net";
import { serveHttp, upgradeResponse } from "./serve_http.ts";
import {
  CLOSE_ABNORMAL,
  closePayload,
  encodeFrame,
  FrameDecoder,
  OPCODE,
  websocketAccept,
  WebSocketProtocolError,
} from "./websocket.ts";
import { type ServerWebSocket, upgradeWebSocket } from "./websocket_conn.ts";
import { unixSocketPair } from "../tls/_testing.ts";

const KEY = "dGhlIHNhbXBsZSBub25jZQ==";
const MASK = new Uint8Array([0x37, 0xfa, 0x21, 0x3d]);
const HANDSHAKE = `GET /events HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\n` +
  `Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: ${KEY}\r\n` +
  `Sec-WebSocket-Version: 13\r\n\r\n`;

/** The client end: everything received, the 101 head split off, server frames parsed. */
class Client {
  bytes = Buffer.alloc(0);
  ended = false;
  #waiters: (() => void)[] = [];

  constructor(readonly socket: net.Socket) {
    socket.on("data", (chunk: Buffer) => {
      this.bytes = Buffer.concat([this.bytes, chunk]);
      this.#wake();
    });
    socket.on("error", () => {});
    socket.on("end", () => {
      this.ended = true;
      this.#wake();
    });
    socket.on("close", () => {
      this.ended = true;
      this.#wake();
    });
  }

  #wake(): void {
    for (const waiter of this.#waiters.splice(0)) waiter();
  }

  async until<T>(take: () => T | undefined, what: string): Promise<T> {
    const deadline = Date.now() + 5000;
    for (;;) {
      const value = take();
      if (value !== undefined) return value;
      if (this.ended) throw new Error(`Connection ended before ${what}`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve, reject) => {
        this.#waiters.push(resolve);
        timer = setTimeout(
          () => reject(new Error(`Timed out waiting for ${what}`)),
          deadline - Date.now(),
        );
      }).finally(() => clearTimeout(timer));
    }
  }

  /** The response head (up to the blank line), removed from the buffer. */
  head(): Promise<string> {
    return this.until(() => {
      const end = this.bytes.indexOf("\r\n\r\n");
      if (end === -1) return undefined;
      const head = this.bytes.toString("latin1", 0, end);
      this.bytes = this.bytes.subarray(end + 4);
      return head;
    }, "the response head");
  }

  /** The next server frame (unmasked, short lengths only). */
  frame(): Promise<{ fin: boolean; opcode: number; masked: boolean; payload: Buffer }> {
    return this.until(() => {
      const b = this.bytes;
      if (b.length < 2) return undefined;
      let length = b[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (b.length < 4) return undefined;
        length = b.readUInt16BE(2);
        offset = 4;
      }
      if (b.length < offset + length) return undefined;
      this.bytes = b.subarray(offset + length);
      return {
        fin: (b[0] & 0x80) !== 0,
        opcode: b[0] & 0x0f,
        masked: (b[1] & 0x80) !== 0,
        payload: b.subarray(offset, offset + length),
      };
    }, "a frame");
  }

  /** Resolves once the server has closed the connection. */
  end(): Promise<void> {
    return this.until(() => this.ended ? true : undefined, "the end").catch((error) => {
      if (!this.ended) throw error;
    }).then(() => {});
  }
}

/** serveHttp on one connection with a WebSocket handler; `opened` gives the server end. */
async function websocketServer() {
  const pair = await unixSocketPair();
  const opened = Promise.withResolvers<ServerWebSocket>();
  const served = serveHttp(pair.server, (request) => {
    try {
      return upgradeWebSocket(request, opened.resolve, { closeTimeout: 1000 });
    } catch (error) {
      return new Response((error as Error).message, { status: 400 });
    }
  });
  const client = new Client(pair.client);
  return {
    client,
    opened: opened.promise,
    served,
    async [Symbol.asyncDispose]() {
      pair.client.destroy();
      pair.server.destroy();
      await served;
      await pair[Symbol.asyncDispose]();
    },
  };
}

Deno.test("websocketAccept() gives RFC 6455's example answer", () => {
  assert.equal(websocketAccept(KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
});

Deno.test("FrameDecoder reads masked frames of every length form, split anywhere", () => {
  for (const length of [0, 1, 125, 126, 65535, 65536]) {
    const payload = new Uint8Array(length).map((_, i) => i * 7);
    const frame = encodeFrame(OPCODE.binary, payload, { mask: MASK });
    const decoder = new FrameDecoder();
    const frames = [];
    const step = Math.max(1, Math.floor(frame.byteLength / 5));
    for (let i = 0; i < frame.byteLength; i += step) {
      frames.push(...decoder.push(frame.subarray(i, i + step)));
    }
    assert.equal(frames.length, 1, `length ${length}`);
    assert.equal(frames[0].opcode, OPCODE.binary);
    assert.equal(frames[0].fin, true);
    assert.deepEqual(frames[0].payload, payload, `length ${length}`);
  }
  const two = new FrameDecoder().push(
    Buffer.concat([
      encodeFrame(OPCODE.ping, new Uint8Array([1]), { mask: MASK }),
      encodeFrame(OPCODE.text, new TextEncoder().encode("hi"), { mask: MASK }),
    ]),
  );
  assert.deepEqual(two.map((f) => f.opcode), [OPCODE.ping, OPCODE.text]);
  assert.equal(new TextDecoder().decode(two[1].payload), "hi");
});

Deno.test("FrameDecoder refuses unmasked, reserved, long-control and oversized frames", () => {
  const cases: [Uint8Array, number][] = [
    [encodeFrame(OPCODE.text, new Uint8Array(3)), 1002],
    [encodeFrame(0x3, new Uint8Array(0), { mask: MASK }), 1002],
    [encodeFrame(OPCODE.ping, new Uint8Array(126), { mask: MASK }), 1002],
    [encodeFrame(OPCODE.close, new Uint8Array(2), { mask: MASK, fin: false }), 1002],
    [encodeFrame(OPCODE.binary, new Uint8Array(2048), { mask: MASK }), 1009],
  ];
  const reserved = encodeFrame(OPCODE.text, new Uint8Array(1), { mask: MASK });
  reserved[0] |= 0x40;
  cases.push([reserved, 1002]);
  for (const [frame, code] of cases) {
    assert.throws(
      () => new FrameDecoder({ maxFrameSize: 1024 }).push(frame),
      (error: unknown) => error instanceof WebSocketProtocolError && error.code === code,
    );
  }
});

Deno.test("encodeFrame() writes unmasked server frames with 7, 16 and 64-bit lengths", () => {
  assert.deepEqual([...encodeFrame(OPCODE.text, new TextEncoder().encode("ab"))], [
    0x81,
    2,
    0x61,
    0x62,
  ]);
  assert.deepEqual([...encodeFrame(OPCODE.text, new Uint8Array(300)).subarray(0, 4)], [
    0x81,
    126,
    1,
    44,
  ]);
  assert.deepEqual([...encodeFrame(OPCODE.binary, new Uint8Array(70000)).subarray(0, 10)], [
    0x82,
    127,
    0,
    0,
    0,
    0,
    0,
    1,
    0x11,
    0x70,
  ]);
});

Deno.test("upgradeWebSocket() over serveHttp: 101 with the accept key, text frames out, ping answered, close echoed", async () => {
  await using s = await websocketServer();
  s.client.socket.write(HANDSHAKE);
  const head = await s.client.head();
  assert.match(head, /^HTTP\/1\.1 101 Switching Protocols\r\n/);
  assert.match(head, /\r\nupgrade: websocket/i);
  assert.match(head, /\r\nconnection: upgrade/i);
  assert.match(head, /\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK\+xOo=/i);
  assert.doesNotMatch(head, /content-length|transfer-encoding/i);
  await s.served; // serveHttp is done with the connection once it is handed over

  const ws = await s.opened;
  assert.equal(await ws.send('{"type":"config"}'), true);
  assert.equal(await ws.send("x".repeat(200)), true);
  const first = await s.client.frame();
  assert.deepEqual({ fin: first.fin, opcode: first.opcode, masked: first.masked }, {
    fin: true,
    opcode: OPCODE.text,
    masked: false,
  });
  assert.equal(first.payload.toString(), '{"type":"config"}');
  assert.equal((await s.client.frame()).payload.toString(), "x".repeat(200));

  s.client.socket.write(encodeFrame(OPCODE.ping, new Uint8Array([9, 8, 7]), { mask: MASK }));
  const pong = await s.client.frame();
  assert.equal(pong.opcode, OPCODE.pong);
  assert.deepEqual([...pong.payload], [9, 8, 7]);

  // Client data messages are read and dropped.
  s.client.socket.write(encodeFrame(OPCODE.text, new TextEncoder().encode("hi"), { mask: MASK }));
  s.client.socket.write(encodeFrame(OPCODE.close, closePayload(1000, "bye"), { mask: MASK }));
  const close = await s.client.frame();
  assert.equal(close.opcode, OPCODE.close);
  assert.equal(close.payload.readUInt16BE(0), 1000);
  await s.client.end();
  assert.deepEqual(await ws.closed, { code: 1000, reason: "bye" });
  assert.equal(ws.open, false);
  assert.equal(await ws.send("late"), false);
});

Deno.test("a frame sent with the handshake is read from serveHttp's buffer", async () => {
  await using s = await websocketServer();
  s.client.socket.write(
    Buffer.concat([
      Buffer.from(HANDSHAKE, "latin1"),
      encodeFrame(OPCODE.ping, new Uint8Array([1, 2]), { mask: MASK }),
    ]),
  );
  await s.client.head();
  const pong = await s.client.frame();
  assert.equal(pong.opcode, OPCODE.pong);
  assert.deepEqual([...pong.payload], [1, 2]);
});

Deno.test("ServerWebSocket: the client leaving without a close frame closes it with 1006", async () => {
  await using s = await websocketServer();
  s.client.socket.write(HANDSHAKE);
  await s.client.head();
  const ws = await s.opened;
  s.client.socket.end();
  assert.deepEqual(await ws.closed, { code: CLOSE_ABNORMAL, reason: "" });
  await s.client.end();
});

Deno.test("ServerWebSocket.close() sends the code and ends the connection when the client answers", async () => {
  await using s = await websocketServer();
  s.client.socket.write(HANDSHAKE);
  await s.client.head();
  const ws = await s.opened;
  ws.close(1001);
  ws.close(1000); // idempotent
  assert.equal(await ws.send("after"), false);
  const close = await s.client.frame();
  assert.equal(close.opcode, OPCODE.close);
  assert.equal(close.payload.readUInt16BE(0), 1001);
  s.client.socket.write(encodeFrame(OPCODE.close, closePayload(1001), { mask: MASK }));
  assert.equal((await ws.closed).code, 1001);
  await s.client.end();
  assert.equal(s.client.bytes.length, 0, "nothing after the close frame");
});

Deno.test("ServerWebSocket closes with 1002 on an unmasked client frame", async () => {
  await using s = await websocketServer();
  s.client.socket.write(HANDSHAKE);
  await s.client.head();
  const ws = await s.opened;
  s.client.socket.write(encodeFrame(OPCODE.text, new TextEncoder().encode("plain")));
  const close = await s.client.frame();
  assert.equal(close.opcode, OPCODE.close);
  assert.equal(close.payload.readUInt16BE(0), 1002);
  assert.equal((await ws.closed).code, 1002);
  await s.client.end();
});

Deno.test("upgradeWebSocket() refuses an invalid handshake with a TypeError (answered 400 here)", async () => {
  const bad = [
    ["POST", { upgrade: "websocket", connection: "upgrade" }],
    ["GET", { connection: "upgrade", "sec-websocket-version": "13", "sec-websocket-key": KEY }],
    ["GET", { upgrade: "websocket", "sec-websocket-version": "13", "sec-websocket-key": KEY }],
    ["GET", { upgrade: "websocket", connection: "Upgrade", "sec-websocket-key": KEY }],
    ["GET", { upgrade: "websocket", connection: "Upgrade", "sec-websocket-version": "13" }],
    [
      "GET",
      {
        upgrade: "websocket",
        connection: "Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": "short",
      },
    ],
  ] as const;
  for (const [method, headers] of bad) {
    assert.throws(
      () => upgradeWebSocket(new Request("http://lxd/", { method, headers }), () => {}),
      TypeError,
      JSON.stringify(headers),
    );
  }
  await using s = await websocketServer();
  s.client.socket.write(
    "GET / HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
  );
  assert.match(await s.client.head(), /^HTTP\/1\.1 400 /);
});

Deno.test("upgradeResponse() hands the raw connection over after a 101 head", async () => {
  const pair = await unixSocketPair();
  const served = serveHttp(pair.server, () =>
    upgradeResponse((socket, head) => {
      socket.on("data", (chunk: Uint8Array) => socket.write(chunk));
      socket.write(head);
      socket.resume();
    }, { upgrade: "echo" }));
  const client = new Client(pair.client);
  pair.client.write("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: echo\r\n\r\nearly");
  assert.match(await client.head(), /^HTTP\/1\.1 101 Switching Protocols\r\nupgrade: echo$/);
  await served;
  pair.client.write("-late");
  await client.until(() => client.bytes.toString() === "early-late" || undefined, "the echo");
  await pair[Symbol.asyncDispose]();
});

Deno.test("Deno's own WebSocket client (over TCP) gets the messages and a clean close", async () => {
  const { createServer } = await import("node:net");
  const opened = Promise.withResolvers<ServerWebSocket>();
  const connections: Promise<void>[] = [];
  const server = createServer((socket) => {
    connections.push(serveHttp(socket, (request) => upgradeWebSocket(request, opened.resolve)));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as net.AddressInfo;
  const client = new WebSocket(`ws://127.0.0.1:${port}/1.0/events`);
  const messages: string[] = [];
  const got = Promise.withResolvers<void>();
  const closed = Promise.withResolvers<CloseEvent>();
  client.onmessage = (event) => {
    messages.push(event.data);
    if (messages.length === 2) got.resolve();
  };
  client.onclose = closed.resolve;
  try {
    const ws = await opened.promise;
    await ws.send("one");
    await ws.send("two ✓");
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      got.promise,
      new Promise((_, reject) => timer = setTimeout(() => reject(new Error("no messages")), 5000)),
    ]).finally(() => clearTimeout(timer));
    assert.deepEqual(messages, ["one", "two ✓"]);
    ws.close(1001, "stopping");
    const event = await closed.promise;
    assert.equal(event.code, 1001);
    assert.equal(event.reason, "stopping");
    assert.equal((await ws.closed).code, 1001);
  } finally {
    client.close();
    await Promise.all(connections);
    await new Promise<void>((resolve) => server.close(() => resolve()));
  }
});

import assert from "node:assert/strict";
import { Hono } from "hono";
import { createGuestDevlxdApp, GuestDevlxdServer, textError } from "./devlxd_server.ts";
import { EventRelay } from "./event_relay.ts";
import { errorResponse, MtlsError, syncResponse } from "../shared/http/mod.ts";
import type { HostFetch } from "./host_link.ts";
import { until, within } from "./_testing.ts";

/** A fake host devlxd API that records what it was asked. */
function fakeHost() {
  const asked: { method: string; path: string; body: string }[] = [];
  const host = new Hono();
  host.use(async (c, next) => {
    asked.push({
      method: c.req.method,
      path: new URL(c.req.url).pathname,
      body: await c.req.raw.clone().text(),
    });
    await next();
  });
  host.get(
    "/1.0",
    () =>
      syncResponse({
        api_version: "1.0",
        location: "h1",
        instance_type: "virtual-machine",
        state: "Started",
      }),
  );
  host.patch("/1.0", () => syncResponse({}));
  host.get(
    "/1.0/config",
    () =>
      syncResponse([
        "/1.0/config/user.foo",
        "/1.0/config/cloud-init.user-data",
        "/1.0/config/security.x",
      ]),
  );
  host.get(
    "/1.0/config/:key",
    (c) =>
      c.req.param("key") === "user.foo" ? syncResponse("bar") : errorResponse(404, "not found"),
  );
  host.get("/1.0/meta-data", () => syncResponse("instance-id: v1\nlocal-hostname: v1\n"));
  host.get("/1.0/devices", () => syncResponse({ eth0: { name: "eth0", type: "nic" } }));
  host.get("/1.0/images/:fp/export", () => errorResponse(403, "Forbidden"));
  const fetchHost: HostFetch = (request) => Promise.resolve(host.fetch(request));
  return { asked, fetchHost };
}

function app(
  fetchHost: HostFetch,
  extra: Partial<Parameters<typeof createGuestDevlxdApp>[0]> = {},
) {
  const events = new EventRelay();
  return { app: createGuestDevlxdApp({ host: { fetch: fetchHost }, events, ...extra }), events };
}

Deno.test("devlxd GET / answers locally", async () => {
  const host = fakeHost();
  const res = await app(host.fetchHost).app.request("/");
  assert.equal(res.status, 200);
  assert.deepEqual(await res.json(), ["/1.0"]);
  assert.equal(host.asked.length, 0);
});

Deno.test("devlxd GET /1.0 unwraps the host's envelope with one request", async () => {
  const host = fakeHost();
  const res = await app(host.fetchHost).app.request("/1.0");
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  assert.deepEqual(await res.json(), {
    api_version: "1.0",
    location: "h1",
    instance_type: "virtual-machine",
    state: "Started",
  });
  assert.equal(host.asked.length, 1);
});

Deno.test("devlxd JSON answers end with a newline, as LXD's agent's (Go's json.Encoder) do", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost);
  for (const path of ["/", "/1.0", "/1.0/config", "/1.0/devices"]) {
    const text = await (await a.request(path)).text();
    assert.ok(text.endsWith("}\n") || text.endsWith("]\n"), `${path}: ${JSON.stringify(text)}`);
    assert.ok(!text.endsWith("\n\n"), path);
  }
});

Deno.test("devlxd PATCH /1.0 to a host without a ready state (LXD 5.0.2 answers it like GET) gives the guest that /1.0 JSON, as the stock agent does, and keeps Ready", async () => {
  const info = {
    state: "",
    api_version: "1.0",
    instance_type: "virtual-machine",
    location: "none",
  };
  const asked: string[] = [];
  const fetchHost: HostFetch = (request) => {
    asked.push(request.method);
    return Promise.resolve(syncResponse(info));
  };
  const states: string[] = [];
  const { app: a } = app(fetchHost, { onReady: (s) => states.push(s) });
  const res = await a.request("/1.0", { method: "PATCH", body: '{"state":"Ready"}' });
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /application\/json/);
  assert.equal(await res.text(), JSON.stringify(info) + "\n");
  assert.deepEqual(asked, ["PATCH"], "still forwarded, for hosts that keep it");
  assert.deepEqual(states, ["Ready"], "and kept, to re-send after new connection info");
});

Deno.test("devlxd config: keys filtered to user.* and cloud-init.*, values raw", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost);
  const list = await a.request("/1.0/config");
  assert.deepEqual(await list.json(), ["/1.0/config/user.foo", "/1.0/config/cloud-init.user-data"]);
  const value = await a.request("/1.0/config/user.foo");
  assert.equal(value.status, 200);
  assert.equal(value.headers.get("content-type"), "application/octet-stream");
  assert.equal(await value.text(), "bar");
  const missing = await a.request("/1.0/config/user.nope");
  assert.equal(missing.status, 404);
  assert.equal(missing.headers.get("content-type"), "text/plain; charset=utf-8");
  assert.equal(await missing.text(), "not found\n");
});

Deno.test("devlxd refuses keys outside user.*/cloud-init.* without asking the host", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost);
  for (const path of ["/1.0/config/security.x", "/1.0/config/..%2Fmeta-data"]) {
    const res = await a.request(path);
    assert.equal(res.status, 403, path);
    assert.equal(await res.text(), "not authorized\n");
  }
  assert.equal(host.asked.length, 0);
});

Deno.test("devlxd keeps an encoded path-traversal key inside /1.0/config on the host", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost);
  const res = await a.request("/1.0/config/user.a%2F..%2F..%2Fmeta-data");
  assert.equal(res.status, 404);
  await res.body?.cancel();
  assert.deepEqual(host.asked.map((r) => r.path), ["/1.0/config/user.a%2F..%2F..%2Fmeta-data"]);
  const dotted = await a.request("http://localhost/1.0/../../etc/passwd");
  assert.equal(dotted.status, 404);
  assert.equal(await dotted.text(), "not found\n");
  assert.equal(host.asked.length, 1);
});

Deno.test("devlxd meta-data is raw text, devices JSON", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost);
  assert.equal(
    await (await a.request("/1.0/meta-data")).text(),
    "instance-id: v1\nlocal-hostname: v1\n",
  );
  assert.deepEqual(await (await a.request("/1.0/devices")).json(), {
    eth0: { name: "eth0", type: "nic" },
  });
});

Deno.test("devlxd PATCH /1.0 records Ready and forwards it; other states are 400", async () => {
  const host = fakeHost();
  const states: string[] = [];
  const { app: a } = app(host.fetchHost, { onReady: (s) => states.push(s) });
  const ok = await a.request("/1.0", { method: "PATCH", body: '{"state":"Ready"}' });
  assert.equal(ok.status, 200);
  assert.equal(await ok.text(), "");
  assert.deepEqual(states, ["Ready"]);
  assert.deepEqual(host.asked.map((r) => [r.method, r.body]), [["PATCH", '{"state":"Ready"}']]);
  for (const body of ['{"state":"Stopped"}', "{}", "not json", "[]"]) {
    const bad = await a.request("/1.0", { method: "PATCH", body });
    assert.equal(bad.status, 400, body);
    assert.match(await bad.text(), /^Invalid /);
  }
  assert.deepEqual(states, ["Ready"]);
  assert.equal(host.asked.length, 1);
});

Deno.test("devlxd refuses a huge body, declared or streamed, with 413", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost, { maxBodySize: 1024 });
  const declared = await a.request("/1.0", {
    method: "PATCH",
    body: "x".repeat(2048),
  });
  assert.equal(declared.status, 413);
  assert.equal(await declared.text(), "Request body too large\n");
  const chunks = new ReadableStream<Uint8Array>({
    pull(controller) {
      controller.enqueue(new Uint8Array(512).fill(32));
    },
  });
  const streamed = await a.request("/1.0", { method: "PATCH", body: chunks });
  assert.equal(streamed.status, 413);
  await streamed.body?.cancel();
  assert.equal(host.asked.length, 0);
});

Deno.test("devlxd answers a bad method with 405 and an unknown path with 404", async () => {
  const host = fakeHost();
  const { app: a } = app(host.fetchHost);
  for (const [method, path] of [["DELETE", "/1.0"], ["POST", "/1.0/config"], ["PUT", "/"]]) {
    const res = await a.request(path, { method });
    assert.equal(res.status, 405, `${method} ${path}`);
    assert.match(await res.text(), /not allowed\n$/);
  }
  const unknown = await a.request("/2.0");
  assert.equal(unknown.status, 404);
  assert.equal(await unknown.text(), "not found\n");
  assert.equal(host.asked.length, 0);
});

Deno.test("devlxd answers 503 with one sentence when the host is unreachable", async () => {
  const fetchHost: HostFetch = () =>
    Promise.reject(
      new MtlsError("The host at vsock 2:1234 refused the connection.", "refused"),
    );
  const res = await app(fetchHost).app.request("/1.0/config/user.foo");
  assert.equal(res.status, 503);
  assert.equal(await res.text(), "The host at vsock 2:1234 refused the connection.\n");
});

Deno.test("devlxd answers 503 when the host closes in the middle of its answer", async () => {
  const fetchHost: HostFetch = () => {
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"type":"sync","metad'));
        controller.error(new Error("connection reset"));
      },
    });
    return Promise.resolve(new Response(body));
  };
  const res = await app(fetchHost).app.request("/1.0/devices");
  assert.equal(res.status, 503);
  assert.match(await res.text(), /^The host closed the connection in the middle of its answer/);
});

Deno.test("devlxd answers 502 to a host answer that is not an LXD response", async () => {
  const fetchHost: HostFetch = () => Promise.resolve(new Response("<html>"));
  const res = await app(fetchHost).app.request("/1.0");
  assert.equal(res.status, 502);
  assert.match(await res.text(), /not JSON/);
});

Deno.test("devlxd image export: host errors as text, bodies streamed through", async () => {
  const host = fakeHost();
  const refused = await app(host.fetchHost).app.request("/1.0/images/abc123/export");
  assert.equal(refused.status, 403);
  assert.equal(await refused.text(), "Forbidden\n");
  assert.equal((await app(host.fetchHost).app.request("/1.0/images/..%2F/export")).status, 400);

  let hostBody: ReadableStreamDefaultController<Uint8Array> | undefined;
  const fetchHost: HostFetch = () =>
    Promise.resolve(
      new Response(
        new ReadableStream<Uint8Array>({ start: (c) => void (hostBody = c) }),
        { headers: { "content-type": "application/octet-stream", "content-disposition": "x" } },
      ),
    );
  const res = await app(fetchHost).app.request("/1.0/images/abc123/export");
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("content-disposition"), "x");
  const reader = res.body!.getReader();
  hostBody!.enqueue(new Uint8Array([1, 2, 3]));
  assert.deepEqual(
    (await within(reader.read(), "the first chunk")).value,
    new Uint8Array([1, 2, 3]),
  );
  hostBody!.enqueue(new Uint8Array([4]));
  hostBody!.close();
  assert.deepEqual((await reader.read()).value, new Uint8Array([4]));
  assert.equal((await reader.read()).done, true);
});

Deno.test("devlxd /1.0/events streams published events as JSON lines, filtered by type", async () => {
  const host = fakeHost();
  const { app: a, events } = app(host.fetchHost);
  const res = await a.request("/1.0/events?type=device");
  assert.equal(res.status, 200);
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  events.publish({ type: "config", timestamp: "t", metadata: { key: "user.a" } });
  events.publish({ type: "device", timestamp: "t", metadata: { name: "eth0" } });
  const { value } = await within(reader.read(), "an event");
  assert.equal(value, '{"type":"device","timestamp":"t","metadata":{"name":"eth0"}}\n');
  await reader.cancel();
  assert.equal(events.subscribers, 0);
  await events.close();
});

/** A raw HTTP/1.1 exchange over a unix socket (no client-side path normalisation). */
async function rawRequest(path: string, head: string): Promise<string> {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    await conn.write(new TextEncoder().encode(head));
    let out = "";
    const buf = new Uint8Array(4096);
    for (;;) {
      const n = await within(conn.read(buf), "the answer");
      if (n === null) break;
      out += new TextDecoder().decode(buf.subarray(0, n));
    }
    return out;
  } finally {
    conn.close();
  }
}

Deno.test("GuestDevlxdServer replaces a stale socket, sets its mode and serves the app", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/lxd/sock`;
  await Deno.mkdir(`${dir}/lxd`);
  // A stale socket left by a killed process.
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "eval",
      `const l = Deno.listen({transport:"unix",path:${JSON.stringify(path)}});` +
      `console.log("up"); await l.accept();`,
    ],
    stdout: "piped",
  }).spawn();
  const reader = child.stdout.getReader();
  await within(reader.read(), "the stale listener");
  child.kill("SIGKILL");
  await child.status;
  reader.releaseLock();
  await child.stdout.cancel();
  assert.ok((await Deno.lstat(path)).isSocket, "a stale socket file is there");

  const host = fakeHost();
  const server = new GuestDevlxdServer(path, { mode: 0o600 });
  try {
    await server.start((signal) =>
      createGuestDevlxdApp({ host: { fetch: host.fetchHost }, events: new EventRelay(), signal })
        .fetch
    );
    assert.equal(server.serving, true);
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o600);
    const answer = await rawRequest(
      path,
      "GET /1.0/config/user.foo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert.match(answer, /^HTTP\/1\.1 200 /);
    assert.match(answer, /\r\n\r\nbar$/);
    const traversal = await rawRequest(
      path,
      "GET /1.0/../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert.match(traversal, /^HTTP\/1\.1 404 /);
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
  assert.equal(server.serving, false);
});

Deno.test("GuestDevlxdServer.stop() ends open event streams and removes the socket", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/sock`;
  const events = new EventRelay();
  const server = new GuestDevlxdServer(path);
  const client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
  try {
    await server.start((signal) =>
      createGuestDevlxdApp({ host: { fetch: fakeHost().fetchHost }, events, signal }).fetch
    );
    const res = await fetch("http://lxd/1.0/events", { client });
    const reader = res.body!.getReader();
    events.publish({ type: "config", timestamp: "t", metadata: {} });
    assert.equal((await within(reader.read(), "an event")).done, false);
    const stopping = server.stop();
    assert.equal((await within(reader.read(), "the stream to end")).done, true);
    await within(stopping, "the server to stop");
    await assert.rejects(Deno.lstat(path), Deno.errors.NotFound);
  } finally {
    client.close();
    await server.stop();
    await events.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("textError() matches Go's http.Error", async () => {
  const res = textError(403, "Forbidden");
  assert.equal(res.status, 403);
  assert.equal(res.headers.get("content-type"), "text/plain; charset=utf-8");
  assert.equal(res.headers.get("x-content-type-options"), "nosniff");
  assert.equal(await res.text(), "Forbidden\n");
});

Deno.test("devlxd /1.0/events upgrades to a WebSocket when asked, one text message per event", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/sock`;
  const events = new EventRelay();
  const server = new GuestDevlxdServer(path);
  const conn = { current: undefined as Deno.UnixConn | undefined };
  try {
    await server.start((signal) =>
      createGuestDevlxdApp({ host: { fetch: fakeHost().fetchHost }, events, signal }).fetch
    );
    conn.current = await Deno.connect({ transport: "unix", path });
    await conn.current.write(
      new TextEncoder().encode(
        "GET /1.0/events?type=config HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\n" +
          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
          "Sec-WebSocket-Version: 13\r\n\r\n",
      ),
    );
    const buf = new Uint8Array(4096);
    let got = new Uint8Array();
    const readMore = async () => {
      const n = await within(conn.current!.read(buf), "bytes from the server");
      if (n === null) throw new Error("closed");
      got = new Uint8Array([...got, ...buf.subarray(0, n)]);
    };
    const headEnd = () => new TextDecoder().decode(got).indexOf("\r\n\r\n");
    while (headEnd() === -1) await readMore();
    assert.match(new TextDecoder().decode(got), /^HTTP\/1\.1 101 /);
    got = got.subarray(headEnd() + 4);
    await within(
      (async () => {
        while (events.subscribers === 0) await new Promise((r) => setTimeout(r, 5));
      })(),
      "the subscription",
    );
    events.publish({ type: "device", timestamp: "t", metadata: {} });
    events.publish({ type: "config", timestamp: "t", metadata: { key: "user.a" } });
    while (got.length < 2 || got.length < 2 + (got[1] & 0x7f)) await readMore();
    assert.equal(got[0], 0x81, "one final text frame");
    const text = new TextDecoder().decode(got.subarray(2, 2 + (got[1] & 0x7f)));
    assert.deepEqual(JSON.parse(text), {
      type: "config",
      timestamp: "t",
      metadata: { key: "user.a" },
    });
  } finally {
    conn.current?.close();
    await server.stop();
    await events.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/** A raw connection to `path` with a buffer of what it received and a way to wait on it. */
async function rawConnection(path: string) {
  const conn = await Deno.connect({ transport: "unix", path });
  let got: Uint8Array = new Uint8Array();
  let ended = false;
  const buf = new Uint8Array(4096);
  return {
    conn,
    get bytes() {
      return got;
    },
    set bytes(value: Uint8Array) {
      got = value;
    },
    get ended() {
      return ended;
    },
    write: (text: string) => conn.write(new TextEncoder().encode(text)),
    /** Reads until `check` holds on the bytes or the connection ends (then false). */
    async until(check: (bytes: Uint8Array) => boolean, what: string): Promise<boolean> {
      while (!check(got)) {
        if (ended) return false;
        const n = await within(conn.read(buf), what);
        if (n === null) ended = true;
        else got = new Uint8Array([...got, ...buf.subarray(0, n)]);
      }
      return true;
    },
    close() {
      try {
        conn.close();
      } catch {
        // closed
      }
    },
  };
}

const WS_HANDSHAKE = "GET /1.0/events HTTP/1.1\r\nHost: lxd\r\nUpgrade: websocket\r\n" +
  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" +
  "Sec-WebSocket-Version: 13\r\n\r\n";

function headLength(bytes: Uint8Array): number {
  const end = new TextDecoder().decode(bytes).indexOf("\r\n\r\n");
  return end === -1 ? -1 : end + 4;
}

Deno.test("GuestDevlxdServer creates the socket's directory and removes both on stop()", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/dev/lxd/sock`;
  const server = new GuestDevlxdServer(path);
  try {
    await server.start(() => () => new Response("ok"));
    assert.ok((await Deno.lstat(path)).isSocket);
    assert.equal((await Deno.lstat(path)).mode! & 0o777, 0o600);
    assert.ok((await Deno.lstat(`${dir}/dev/lxd`)).isDirectory);
    await server.stop();
    await assert.rejects(Deno.lstat(`${dir}/dev`), Deno.errors.NotFound);
    assert.equal(server.serving, false);
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("GuestDevlxdServer refuses to replace a file that is not a socket, leaving it", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/sock`;
  await Deno.writeTextFile(path, "mine");
  const server = new GuestDevlxdServer(path);
  try {
    await assert.rejects(
      server.start(() => () => new Response("ok")),
      /^Error: Cannot serve devlxd on .*sock: another process serves it, or a file that is not a socket is there$/,
    );
    assert.equal(server.serving, false);
    assert.equal(await Deno.readTextFile(path), "mine");
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("GuestDevlxdServer.stop() closes an idle keep-alive connection at once", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/sock`;
  const server = new GuestDevlxdServer(path);
  let client: Awaited<ReturnType<typeof rawConnection>> | undefined;
  try {
    await server.start(() => () => new Response("ok"));
    client = await rawConnection(path);
    await client.write("GET / HTTP/1.1\r\nHost: lxd\r\n\r\n");
    assert.ok(await client.until((b) => new TextDecoder().decode(b).endsWith("ok"), "answer"));
    await within(server.stop(), "stop() with an idle connection", 1000);
    assert.equal(await client.until(() => false, "the end"), false, "the connection ended");
  } finally {
    client?.close();
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("devlxd: a guest leaving in the middle of an event stream ends its subscription", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/sock`;
  const events = new EventRelay();
  const server = new GuestDevlxdServer(path);
  try {
    await server.start((signal) =>
      createGuestDevlxdApp({ host: { fetch: fakeHost().fetchHost }, events, signal }).fetch
    );
    const client = await rawConnection(path);
    await client.write("GET /1.0/events HTTP/1.1\r\nHost: lxd\r\n\r\n");
    assert.ok(await client.until((b) => headLength(b) !== -1, "the stream's head"));
    assert.equal(events.subscribers, 1);
    client.close();
    await until(() => events.subscribers === 0, "the subscription to end");
  } finally {
    await server.stop();
    await events.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("devlxd WebSocket events: stop() sends close 1001 and ends the subscription; a bad handshake is 400", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/sock`;
  const events = new EventRelay();
  const server = new GuestDevlxdServer(path);
  const clients: Awaited<ReturnType<typeof rawConnection>>[] = [];
  try {
    await server.start((signal) =>
      createGuestDevlxdApp({ host: { fetch: fakeHost().fetchHost }, events, signal }).fetch
    );
    const bad = await rawConnection(path);
    clients.push(bad);
    await bad.write(WS_HANDSHAKE.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"));
    assert.ok(await bad.until((b) => headLength(b) !== -1, "the 400"));
    assert.match(new TextDecoder().decode(bad.bytes), /^HTTP\/1\.1 400 .*Sec-WebSocket-Version/s);
    assert.equal(events.subscribers, 0);

    const ws = await rawConnection(path);
    clients.push(ws);
    await ws.write(WS_HANDSHAKE);
    assert.ok(await ws.until((b) => headLength(b) !== -1, "the 101"));
    assert.match(new TextDecoder().decode(ws.bytes), /^HTTP\/1\.1 101 /);
    ws.bytes = ws.bytes.subarray(headLength(ws.bytes));
    await until(() => events.subscribers === 1, "the subscription");
    // A ping is answered while the stream is idle.
    await ws.conn.write(new Uint8Array([0x89, 0x81, 1, 2, 3, 4, 0x61 ^ 1]));
    assert.ok(await ws.until((b) => b.length >= 3, "the pong"));
    assert.deepEqual([...ws.bytes.subarray(0, 3)], [0x8a, 1, 0x61]);
    ws.bytes = ws.bytes.subarray(3);

    const stopping = server.stop();
    assert.ok(await ws.until((b) => b.length >= 4, "the close frame"));
    assert.deepEqual([...ws.bytes.subarray(0, 4)], [0x88, 2, 0x03, 0xe9], "close 1001");
    // The client answers the close; the server then ends the connection.
    await ws.conn.write(new Uint8Array([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe9]));
    await within(stopping, "stop()");
    assert.equal(await ws.until(() => false, "the end"), false);
    assert.equal(events.subscribers, 0);
    await assert.rejects(Deno.lstat(path), Deno.errors.NotFound);
  } finally {
    for (const client of clients) client.close();
    await server.stop();
    await events.close();
    await Deno.remove(dir, { recursive: true });
  }
});

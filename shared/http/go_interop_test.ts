/**
 * Interoperability with Go's crypto/tls and net/http (the stock lxd-agent and
 * LXD are Go), through testdata/go_peer. Skipped when `go` is not installed.
 */

import assert from "node:assert/strict";
import * as net from "node:net";
import { acceptTls, connectTls } from "../tls/mod.ts";
import { generateKeyPair, writeKeyPair } from "../tls/key_pair.ts";
import { errorResponse, syncResponse, unwrapEnvelope } from "./envelope.ts";
import { httpRequest } from "./http_request.ts";
import { serveHttp } from "./serve_http.ts";
import { missingProgram, requires } from "../_requires.ts";

const noGo = missingProgram("go", "it builds the Go peer in testdata/go_peer");

/** Builds go_peer and writes server/client key pairs into a fresh directory. */
async function setUp(): Promise<
  { dir: string; peer: string; [Symbol.asyncDispose](): Promise<void> }
> {
  const dir = await Deno.makeTempDir({ prefix: "go-interop-" });
  const peer = `${dir}/go_peer`;
  const build = await new Deno.Command("go", {
    args: ["build", "-o", peer, "."],
    cwd: new URL("./testdata/go_peer/", import.meta.url).pathname,
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.ok(build.success, new TextDecoder().decode(build.stderr));
  await writeKeyPair(dir, "server", await generateKeyPair({ commonName: "lxd-vsock" }));
  await writeKeyPair(dir, "client", await generateKeyPair({ commonName: "agent" }));
  const forged = await generateKeyPair();
  await Deno.writeTextFile(`${dir}/forged.key`, forged.key);
  return { dir, peer, [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }) };
}

Deno.test(
  requires(noGo, {
    name: "serveHttp() behind acceptTls() serves Go's net/http client with LXD-style pinning",
  }),
  async () => {
    await using env = await setUp();
    const server = await Deno.readTextFile(`${env.dir}/server.crt`);
    const client = await Deno.readTextFile(`${env.dir}/client.crt`);
    const serverKey = await Deno.readTextFile(`${env.dir}/server.key`);
    const { promise: streamCancelled, resolve: onCancel } = Promise.withResolvers<void>();
    const handler = async (request: Request) => {
      const url = new URL(request.url);
      if (url.pathname === "/1.0/events") {
        let n = 0;
        return new Response(
          new ReadableStream<Uint8Array>({
            pull(controller) {
              if (n < 2) controller.enqueue(new TextEncoder().encode(`{"n":${n++}}\n`));
              // then nothing more: an endless stream the client walks away from
            },
            cancel: () => onCancel(),
          }, { highWaterMark: 0 }),
        );
      }
      if (url.pathname !== "/1.0") return errorResponse(404, "not found");
      return syncResponse({
        method: request.method,
        body: await request.text(),
        host: url.host,
        te: request.headers.get("transfer-encoding"),
      });
    };
    const path = `${env.dir}/deno.sock`;
    const connections: Promise<void>[] = [];
    const listener = net.createServer((socket) => {
      connections.push(
        acceptTls(socket, { cert: server, key: serverKey, pinned: client })
          .then(({ socket }) => serveHttp(socket, handler), () => {}),
      );
    });
    await new Promise<void>((resolve) => listener.listen(path, resolve));
    const listenerClosed = new Promise((resolve) => listener.once("close", resolve));
    const output = await new Deno.Command(env.peer, {
      args: ["client", path, env.dir],
      stdout: "piped",
      stderr: "piped",
    }).output();
    listener.close();
    assert.ok(output.success, new TextDecoder().decode(output.stderr));
    const results = Object.fromEntries(
      new TextDecoder().decode(output.stdout).trim().split("\n").map((line) => {
        const result = JSON.parse(line);
        return [result.name, result];
      }),
    );
    for (const name of ["get", "get-again"]) {
      assert.equal(results[name].status, 200, JSON.stringify(results[name]));
      assert.deepEqual(unwrapEnvelope(JSON.parse(results[name].body)), {
        ok: true,
        metadata: { method: "GET", body: "", host: "lxd-vsock", te: null },
      });
    }
    assert.equal(connections.length, 2, "get and get-again shared one kept-alive connection");
    assert.equal(JSON.parse(results["post-length"].body).metadata.body, '{"state":"Ready"}');
    const chunked = JSON.parse(results["post-chunked"].body).metadata;
    assert.deepEqual([chunked.body, chunked.te], ["chunked body", "chunked"]);
    assert.deepEqual(results.events, {
      name: "events",
      status: 200,
      body: '{"n":0}|{"n":1}',
      te: ["chunked"],
    });
    assert.equal(results.missing.status, 404);
    assert.deepEqual(unwrapEnvelope(JSON.parse(results.missing.body)), {
      ok: false,
      status: 404,
      error: "not found",
    });
    await streamCancelled;
    await Promise.all(connections);
    await listenerClosed;
  },
);

Deno.test(
  requires(noGo, {
    name: "httpRequest() over connectTls() talks to Go's net/http server with mutual TLS",
  }),
  async () => {
    await using env = await setUp();
    const server = await Deno.readTextFile(`${env.dir}/server.crt`);
    const client = {
      cert: await Deno.readTextFile(`${env.dir}/client.crt`),
      key: await Deno.readTextFile(`${env.dir}/client.key`),
    };
    const path = `${env.dir}/go.sock`;
    const child = new Deno.Command(env.peer, {
      args: ["server", path, env.dir],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    try {
      assert.equal((await lines.read()).value?.trim(), "ready");
      const send = async (request: Request) => {
        const socket = net.connect(path);
        const secure = await connectTls(socket, { ...client, pinned: server });
        return await httpRequest(secure, request);
      };

      const get = await send(new Request("http://lxd-vsock/1.0"));
      assert.equal(get.status, 200);
      assert.deepEqual(unwrapEnvelope(await get.json()), {
        ok: true,
        metadata: { method: "GET", body: "", te: null, length: 0, host: "lxd-vsock" },
      });

      const put = await send(
        new Request("http://lxd-vsock/1.0", { method: "PUT", body: '{"cid":2,"port":1234}' }),
      );
      assert.deepEqual(unwrapEnvelope(await put.json()), {
        ok: true,
        metadata: {
          method: "PUT",
          body: '{"cid":2,"port":1234}',
          te: null,
          length: 21,
          host: "lxd-vsock",
        },
      });

      const events = await send(new Request("http://lxd-vsock/1.0/events"));
      assert.equal(events.headers.get("transfer-encoding"), "chunked");
      assert.equal(await events.text(), '{"n":0}\n{"n":1}\n{"n":2}\n');

      const missing = await send(new Request("http://lxd-vsock/missing"));
      assert.equal(missing.status, 404);
      assert.equal(await missing.text(), "404 page not found\n");
    } finally {
      child.kill();
      await child.status;
      await lines.cancel();
    }
  },
);

Deno.test(
  requires(noGo, {
    name:
      "acceptTls() refuses a Go client presenting the pinned certificate without its private key",
  }),
  async () => {
    await using env = await setUp();
    const server = {
      cert: await Deno.readTextFile(`${env.dir}/server.crt`),
      key: await Deno.readTextFile(`${env.dir}/server.key`),
    };
    const pinned = await Deno.readTextFile(`${env.dir}/client.crt`);
    const path = `${env.dir}/deno.sock`;
    let served = false;
    const { promise: outcome, resolve } = Promise.withResolvers<unknown>();
    const listener = net.createServer((socket) => {
      acceptTls(socket, { ...server, pinned }).then(({ socket }) => {
        served = true;
        socket.destroy();
        resolve("accepted");
      }, resolve);
    });
    await new Promise<void>((resolve) => listener.listen(path, resolve));
    const listenerClosed = new Promise((resolve) => listener.once("close", resolve));
    const output = await new Deno.Command(env.peer, {
      args: ["forge-client", path, env.dir],
      stdout: "piped",
      stderr: "piped",
    }).output();
    listener.close();
    const refusal = await outcome;
    assert.equal(served, false);
    assert.ok(
      refusal instanceof Error && /TLS handshake failed/.test(refusal.message),
      String(refusal),
    );
    // Go's TLS 1.3 client learns of the refusal on its first read.
    assert.match(new TextDecoder().decode(output.stdout), /^read 0 bytes: |^handshake: /);
    await listenerClosed;
  },
);

Deno.test(
  requires(noGo, {
    name:
      "connectTls() refuses a Go server presenting the pinned certificate without its private key",
  }),
  async () => {
    await using env = await setUp();
    const client = {
      cert: await Deno.readTextFile(`${env.dir}/client.crt`),
      key: await Deno.readTextFile(`${env.dir}/client.key`),
    };
    const pinned = await Deno.readTextFile(`${env.dir}/server.crt`);
    const path = `${env.dir}/go.sock`;
    const child = new Deno.Command(env.peer, {
      args: ["forge-server", path, env.dir],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    try {
      assert.equal((await lines.read()).value?.trim(), "ready");
      await assert.rejects(
        connectTls(net.connect(path), { ...client, pinned }),
        /TLS handshake failed/,
      );
      let rest = "";
      for (let chunk = await lines.read(); !chunk.done; chunk = await lines.read()) {
        rest += chunk.value;
      }
      assert.match(rest, /handshake: .+/);
      assert.doesNotMatch(rest, /handshake: <nil>/);
    } finally {
      try {
        child.kill();
      } catch {
        // it has exited already, after its one handshake
      }
      await child.status;
      await lines.cancel();
    }
  },
);

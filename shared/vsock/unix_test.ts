import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as libc from "./_libc.ts";
import { reactorStats } from "./_reactor.ts";
import { fdIdentity, nextEvent, pattern, readToEnd, TempDir, until, within } from "./_testing.ts";
import { FdSocket } from "./fd_socket.ts";
import type { Listener } from "./listener.ts";
import { encodeSockaddrUn } from "./sockaddr.ts";
import { SocketError } from "./socket_error.ts";
import { connectUnix, listenUnix } from "./unix.ts";

/** A connected (client, server) pair over a fresh unix listener. */
async function pair(
  dir: TempDir,
): Promise<{ listener: Listener; client: FdSocket; server: FdSocket }> {
  const listener = listenUnix(dir.join("s.sock"));
  const [client, server] = await within(
    Promise.all([connectUnix(dir.join("s.sock")), listener.accept()]),
    5000,
    "connect and accept",
  );
  return { listener, client, server };
}

function closeAll(...things: Array<{ destroy(): void } | Listener>): void {
  for (const thing of things) "destroy" in thing ? thing.destroy() : thing.close();
}

Deno.test("connectUnix() and accept() exchange bytes both ways", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    server.on("data", (chunk: Buffer) => server.write(chunk));
    const reply = nextEvent<Buffer>(client, "data");
    client.write("hello over FFI");
    assert.equal(String(await reply), "hello over FFI");
    assert.deepEqual(client.remoteAddress, { family: "unix", path: dir.join("s.sock") });
    assert.deepEqual(server.localAddress, { family: "unix", path: dir.join("s.sock") });
    assert.deepEqual(client.localAddress, { family: "unix", path: "" });
    assert.deepEqual(listener.address, { family: "unix", path: dir.join("s.sock") });
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("sockets are non-blocking and close-on-exec, accepted ones too", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    for (const socket of [client, server]) {
      assert.ok(libc.fcntl(socket.fd, libc.F_GETFL) & libc.O_NONBLOCK);
      assert.ok(libc.fcntl(socket.fd, libc.F_GETFD) & libc.FD_CLOEXEC);
    }
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("a 32 MiB transfer arrives intact, with write() backpressure and 'drain'", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    const data = pattern(32 * 1024 * 1024, 7);
    const received = readToEnd(server, 30000);
    server.pause(); // nobody reads yet: the kernel buffer and then the stream fill up
    let sawBackpressure = false;
    let drains = 0;
    const sent = (async () => {
      for (let off = 0; off < data.byteLength; off += 64 * 1024) {
        if (!client.write(data.subarray(off, off + 64 * 1024))) {
          sawBackpressure = true;
          if (server.isPaused()) server.resume();
          await nextEvent(client, "drain", 10000);
          drains++;
        }
      }
      client.end();
    })();
    await within(sent, 30000, "sending 32 MiB");
    const got = await received;
    assert.ok(sawBackpressure, "write() never returned false");
    assert.ok(drains > 0);
    assert.equal(got.byteLength, data.byteLength);
    assert.ok(Buffer.from(data).equals(got), "the bytes differ");
    assert.equal(client.bytesWritten, data.byteLength);
    assert.equal(server.bytesRead, data.byteLength);
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("one 8 MiB write completes through partial sends", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    const data = pattern(8 * 1024 * 1024, 3);
    const received = readToEnd(server);
    let callbackCalled = false;
    const accepted = client.write(data, () => (callbackCalled = true));
    assert.equal(accepted, false, "an 8 MiB write is above the high-water mark");
    client.end();
    const got = await received;
    assert.ok(callbackCalled);
    assert.ok(Buffer.from(data).equals(got));
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("end() half-closes: the server reads EOF and still answers", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  const closed = within(
    Promise.all([nextEvent(client, "close"), nextEvent(server, "close")]),
    5000,
    "both sockets to close",
  );
  try {
    const request = readToEnd(server);
    client.end("question");
    assert.equal(String(await request), "question");
    assert.ok(!server.destroyed && server.writable);
    const answer = readToEnd(client);
    server.end("answer");
    assert.equal(String(await answer), "answer");
    await closed;
    assert.equal(client.fd, -1);
    assert.equal(server.fd, -1);
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("end() half-closes the other way: the client reads EOF and still writes", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    const pushed = readToEnd(client);
    server.end("server is done talking");
    assert.equal(String(await pushed), "server is done talking");
    const late = readToEnd(server);
    client.write("but the client ");
    client.end("is not");
    assert.equal(String(await late), "but the client is not");
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("200 concurrent connections each echo their own message", async () => {
  using dir = new TempDir();
  const listener = listenUnix(dir.join("many.sock"));
  const served: FdSocket[] = [];
  const serving = (async () => {
    for await (const socket of listener) {
      served.push(socket);
      socket.on("data", (chunk: Buffer) => socket.write(chunk));
      socket.on("end", () => socket.end());
    }
  })();
  const clients: FdSocket[] = [];
  try {
    const results = await within(
      Promise.all(Array.from({ length: 200 }, async (_, i) => {
        const client = await connectUnix(dir.join("many.sock"));
        clients.push(client);
        const echoed = readToEnd(client);
        client.end(`message ${i} `.repeat(50));
        return String(await echoed) === `message ${i} `.repeat(50);
      })),
      30000,
      "200 echoes",
    );
    assert.equal(results.filter(Boolean).length, 200);
    assert.equal(served.length, 200);
  } finally {
    listener.close();
    await within(serving, 5000, "the accept loop to end");
    closeAll(...clients, ...served);
  }
});

Deno.test("destroy() closes the fd once; the peer sees the end", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    const ended = readToEnd(server);
    const closed = nextEvent(client, "close");
    const fd = client.fd;
    const socket = fdIdentity(fd);
    assert.ok(socket.includes(dir.path), socket);
    client.destroy();
    client.destroy();
    client.close();
    await closed;
    assert.equal(client.fd, -1);
    assert.equal((await ended).byteLength, 0);
    // The fd number no longer refers to our socket (closed, or already reused by a parallel test).
    assert.notEqual(fdIdentity(fd), socket);
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("'using' disposes a socket and a listener", async () => {
  using dir = new TempDir();
  let fd: number;
  let socket: string;
  {
    using listener = listenUnix(dir.join("u.sock"));
    using client = await connectUnix(dir.join("u.sock"));
    using server = await listener.accept();
    fd = server.fd;
    assert.ok(client.fd >= 0 && fd >= 0);
    socket = fdIdentity(fd);
    assert.ok(socket.includes(dir.path), socket);
  }
  assert.notEqual(fdIdentity(fd), socket);
  assert.throws(() => Deno.lstatSync(dir.join("u.sock")), Deno.errors.NotFound);
});

Deno.test("connectUnix() to a missing path fails with ENOENT, named", async () => {
  using dir = new TempDir();
  const error = await connectUnix(dir.join("missing.sock")).catch((e) => e);
  assert.ok(error instanceof SocketError);
  assert.equal(error.code, "ENOENT");
  assert.equal(error.syscall, "connect");
  assert.equal(
    error.message,
    `Cannot connect to unix socket ${dir.join("missing.sock")}: no such file or directory`,
  );
});

Deno.test("connectUnix() to a socket nobody listens on fails with ECONNREFUSED", async () => {
  using dir = new TempDir();
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  assert.equal(libc.bind(fd, encodeSockaddrUn(dir.join("stale.sock"))), 0);
  try {
    const error = await connectUnix(dir.join("stale.sock")).catch((e) => e);
    assert.ok(error instanceof SocketError);
    assert.equal(error.code, "ECONNREFUSED");
    assert.match(error.message, /: connection refused$/);
  } finally {
    libc.close(fd);
  }
});

/** A listener whose backlog is full, so further connects cannot complete. */
async function fullListener(dir: TempDir): Promise<{ listener: Listener; fillers: FdSocket[] }> {
  const listener = listenUnix(dir.join("full.sock"), { backlog: 0 });
  const fillers: FdSocket[] = [];
  // Fill the backlog: connects succeed until the kernel says EAGAIN (then the
  // connect waits, and the bounded attempt below times out).
  for (let i = 0; i < 4; i++) {
    const attempt = await connectUnix(dir.join("full.sock"), { timeout: 50 }).catch(() => null);
    if (attempt === null) break;
    fillers.push(attempt);
  }
  return { listener, fillers };
}

Deno.test("connectUnix() gives up after its timeout with ETIMEDOUT", async () => {
  using dir = new TempDir();
  const { listener, fillers } = await fullListener(dir);
  try {
    const started = performance.now();
    const error = await connectUnix(dir.join("full.sock"), { timeout: 100 }).catch((e) => e);
    assert.ok(error instanceof SocketError, String(error));
    assert.equal(error.code, "ETIMEDOUT");
    assert.match(error.message, /timed out$/);
    assert.ok(performance.now() - started >= 90);
  } finally {
    closeAll(...fillers, listener);
  }
});

Deno.test("connectUnix() stops when its signal aborts, with the signal's reason", async () => {
  using dir = new TempDir();
  const { listener, fillers } = await fullListener(dir);
  try {
    const controller = new AbortController();
    const pending = connectUnix(dir.join("full.sock"), { signal: controller.signal, timeout: 0 });
    const reason = new Error("shutting down");
    controller.abort(reason);
    assert.equal(await pending.catch((e) => e), reason);
    const aborted = AbortSignal.abort();
    await assert.rejects(connectUnix(dir.join("full.sock"), { signal: aborted }), {
      name: "AbortError",
    });
  } finally {
    closeAll(...fillers, listener);
  }
});

Deno.test("listener close() rejects a pending accept() with an AbortError and is idempotent", async () => {
  using dir = new TempDir();
  const listener = listenUnix(dir.join("c.sock"));
  const pending = listener.accept();
  listener.close();
  listener.close();
  await assert.rejects(within(pending, 5000, "accept rejection"), { name: "AbortError" });
  await assert.rejects(listener.accept(), { name: "AbortError" });
  assert.throws(() => Deno.lstatSync(dir.join("c.sock")), Deno.errors.NotFound);
});

Deno.test("iterating a listener ends when it is closed", async () => {
  using dir = new TempDir();
  const listener = listenUnix(dir.join("i.sock"));
  const seen: FdSocket[] = [];
  const loop = (async () => {
    for await (const socket of listener) seen.push(socket);
    return "ended";
  })();
  const client = await connectUnix(dir.join("i.sock"));
  try {
    while (seen.length === 0) await nextEvent(client, "readable", 50).catch(() => {});
    listener.close();
    assert.equal(await within(loop, 5000, "iteration end"), "ended");
    assert.equal(seen.length, 1);
  } finally {
    closeAll(client, ...seen);
  }
});

Deno.test("listenUnix() fails on a live socket path with EADDRINUSE, even with replace", () => {
  using dir = new TempDir();
  using _first = listenUnix(dir.join("l.sock"));
  for (const replace of [false, true]) {
    assert.throws(() => listenUnix(dir.join("l.sock"), { replace }), (error: unknown) => {
      assert.ok(error instanceof SocketError);
      assert.equal(error.code, "EADDRINUSE");
      assert.equal(
        error.message,
        `Cannot listen on unix socket ${dir.join("l.sock")}: address in use`,
      );
      return true;
    });
  }
});

Deno.test("listenUnix({ replace: true }) removes a stale socket file, not other files", () => {
  using dir = new TempDir();
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  assert.equal(libc.bind(fd, encodeSockaddrUn(dir.join("stale.sock"))), 0);
  libc.close(fd);
  assert.throws(() => listenUnix(dir.join("stale.sock")), { code: "EADDRINUSE" });
  const listener = listenUnix(dir.join("stale.sock"), { replace: true, mode: 0o600 });
  assert.equal(Deno.lstatSync(dir.join("stale.sock")).mode! & 0o777, 0o600);
  listener.close();
  Deno.writeTextFileSync(dir.join("plain"), "not a socket");
  assert.throws(() => listenUnix(dir.join("plain"), { replace: true }), { code: "EADDRINUSE" });
  assert.equal(Deno.readTextFileSync(dir.join("plain")), "not a socket");
});

Deno.test("listenUnix({ mode }) sets the socket file's mode before anyone can connect", async () => {
  using dir = new TempDir();
  for (const mode of [0o600, 0o640, 0o666]) {
    using listener = listenUnix(dir.join(`m${mode}.sock`), { mode });
    assert.equal(Deno.lstatSync(dir.join(`m${mode}.sock`)).mode! & 0o7777, mode);
    const [client, server] = await within(
      Promise.all([connectUnix(dir.join(`m${mode}.sock`)), listener.accept()]),
      5000,
      "connect and accept",
    );
    closeAll(client, server);
  }
});

Deno.test("listenUnix({ createParent: true }) makes missing directories 0755, removed on close when empty", () => {
  using dir = new TempDir();
  const path = dir.join("a/b/s.sock");
  assert.throws(() => listenUnix(path), { code: "ENOENT" });
  const listener = listenUnix(path, { createParent: true, mode: 0o600 });
  for (const d of ["a", "a/b"]) {
    const info = Deno.lstatSync(dir.join(d));
    assert.ok(info.isDirectory, d);
    // 0755, less what the umask removes.
    assert.equal(info.mode! & 0o777 & ~0o755, 0, d);
    assert.equal(info.mode! & 0o700, 0o700, d);
  }
  assert.ok(Deno.lstatSync(path).isSocket);
  listener.close();
  assert.throws(() => Deno.lstatSync(dir.join("a")), Deno.errors.NotFound);

  // A directory that gained other entries stays, and so does one that existed.
  const again = listenUnix(path, { createParent: true });
  Deno.writeTextFileSync(dir.join("a/keep"), "x");
  again.close();
  assert.throws(() => Deno.lstatSync(dir.join("a/b")), Deno.errors.NotFound);
  assert.equal(Deno.readTextFileSync(dir.join("a/keep")), "x");
  listenUnix(dir.join("s.sock"), { createParent: true }).close();
  assert.ok(Deno.lstatSync(dir.path).isDirectory);
});

Deno.test("listenUnix({ createParent: true }) names the directory it cannot create, leaving nothing", () => {
  using dir = new TempDir();
  Deno.writeTextFileSync(dir.join("file"), "");
  assert.throws(
    () => listenUnix(dir.join("file/sub/s.sock"), { createParent: true }),
    (error: unknown) => {
      assert.ok(error instanceof SocketError);
      assert.equal(error.code, "ENOTDIR");
      assert.equal(error.syscall, "mkdir");
      assert.equal(
        error.message,
        `Cannot create directory ${dir.join("file/sub")}: not a directory`,
      );
      return true;
    },
  );
  assert.deepEqual([...Deno.readDirSync(dir.path)].map((e) => e.name), ["file"]);
});

Deno.test("listenUnix({ replace: true }) leaves a directory or a symlink to a socket alone", () => {
  using dir = new TempDir();
  Deno.mkdirSync(dir.join("d"));
  assert.throws(() => listenUnix(dir.join("d"), { replace: true }), { code: "EADDRINUSE" });
  assert.ok(Deno.lstatSync(dir.join("d")).isDirectory);
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  assert.equal(libc.bind(fd, encodeSockaddrUn(dir.join("stale.sock"))), 0);
  libc.close(fd);
  Deno.symlinkSync(dir.join("stale.sock"), dir.join("link"));
  assert.throws(() => listenUnix(dir.join("link"), { replace: true }), { code: "EADDRINUSE" });
  assert.ok(Deno.lstatSync(dir.join("link")).isSymlink);
});

Deno.test("listenUnix() needs only --allow-ffi: replace, mode, createParent and removal in a process without read/write", async () => {
  using dir = new TempDir();
  const path = dir.join("run/lxd/sock");
  Deno.mkdirSync(dir.join("run/lxd"), { recursive: true });
  // A stale socket to replace.
  const stale = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  assert.equal(libc.bind(stale, encodeSockaddrUn(path)), 0);
  libc.close(stale);
  const script = dir.join("child.ts");
  Deno.writeTextFileSync(
    script,
    `import { connectUnix, listenUnix } from ${
      JSON.stringify(new URL("./unix.ts", import.meta.url).href)
    };
const path = ${JSON.stringify(path)};
const nested = ${JSON.stringify(dir.join("run/new/dir/sock"))};
let denied = false;
try { Deno.lstatSync(path); } catch (e) { denied = e instanceof Deno.errors.NotCapable; }
const listener = listenUnix(path, { replace: true, mode: 0o600 });
const other = listenUnix(nested, { createParent: true, mode: 0o660 });
const [client, server] = await Promise.all([connectUnix(path), listener.accept()]);
client.destroy(); server.destroy();
console.log(JSON.stringify({ denied }));
await new Promise((resolve) => { Deno.stdin.readable.getReader().read().then(resolve); });
listener.close(); other.close();
`,
  );
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "--no-prompt", "--allow-ffi", script],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  try {
    const first = await within(lines.read(), 10_000, "the child to listen");
    assert.deepEqual(JSON.parse(first.value ?? "null"), { denied: true });
    assert.equal(Deno.lstatSync(path).mode! & 0o7777, 0o600);
    assert.ok(Deno.lstatSync(path).isSocket);
    assert.equal(Deno.lstatSync(dir.join("run/new/dir/sock")).mode! & 0o7777, 0o660);
    await writer.write(new Uint8Array([10]));
    await writer.close();
    const status = await within(child.status, 10_000, "the child to exit");
    assert.equal(
      status.code,
      0,
      new TextDecoder().decode((await child.stderr.getReader().read()).value),
    );
  } finally {
    try {
      child.kill();
    } catch {
      // exited
    }
    await child.status;
    await lines.cancel().catch(() => {});
    await child.stderr.cancel().catch(() => {});
  }
  assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
  assert.throws(() => Deno.lstatSync(dir.join("run/new")), Deno.errors.NotFound);
  assert.ok(Deno.lstatSync(dir.join("run/lxd")).isDirectory, "a directory it did not create stays");
});

Deno.test("listenUnix() and connectUnix() reject bad arguments with TypeError/RangeError", async () => {
  assert.throws(() => listenUnix(""), TypeError);
  assert.throws(() => listenUnix("/tmp/" + "x".repeat(200)), RangeError);
  assert.throws(() => listenUnix("/tmp/x.sock", { backlog: -1 }), RangeError);
  await assert.rejects(connectUnix("/tmp/a\0b"), TypeError);
});

Deno.test("setTimeout() emits 'timeout' after the socket idles, and 0 disables it", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    const started = performance.now();
    let fired = 0;
    client.setTimeout(80, () => fired++);
    await nextEvent(client, "timeout", 2000);
    assert.ok(performance.now() - started >= 70);
    assert.equal(fired, 1);
    assert.ok(!client.destroyed, "a timeout does not close the socket");
    client.setTimeout(0);
    assert.equal(client.listenerCount("timeout"), 0);
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("activity postpones the idle timeout", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    server.on("data", () => {});
    client.setTimeout(150);
    // The timeout must come 150 ms after the last activity, not after setTimeout():
    // a lower bound only, so a loaded machine (longer gaps) cannot make it fail.
    let lastWrite = performance.now();
    let firedAt: number | undefined;
    const timedOut = nextEvent(client, "timeout", 3000).then(() => firedAt = performance.now());
    const started = performance.now();
    // Keep writing for ~300 ms (on each read event of the server), then stop.
    while (performance.now() - started < 300 && firedAt === undefined) {
      lastWrite = performance.now();
      client.write("x");
      await nextEvent(server, "data", 1000);
    }
    await timedOut;
    const idle = firedAt! - lastWrite;
    assert.ok(
      idle >= 140,
      `timed out ${idle.toFixed(0)} ms after the last write (150 ms idle asked)`,
    );
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("FdSocket accepts the net.Socket calls node:http and node:tls make", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  try {
    assert.equal(client.setNoDelay(true), client);
    assert.equal(client.setKeepAlive(true, 1000), client);
    assert.equal(client.ref(), client);
    assert.equal(client.unref(), client);
    assert.equal(client.connecting, false);
    assert.equal(client.readyState, "open");
    assert.deepEqual(server.address(), server.localAddress);
  } finally {
    closeAll(client, server, listener);
  }
});

Deno.test("the epoll waiter stops once no socket is waited on", async () => {
  using dir = new TempDir();
  const { listener, client, server } = await pair(dir);
  const reading = nextEvent(server, "data");
  await until(() => reactorStats().registered >= 1, "the server to wait for data");
  assert.ok(reactorStats().running);
  client.write("x");
  await reading;
  closeAll(client, server, listener);
  assert.equal(reactorStats().registered, 0);
  await until(() => !reactorStats().running, "the waiter to stop");
  assert.equal(reactorStats().running, false);
});

/**
 * Denial of service and lost work against a daemon process (issue 13), over
 * the unix ("hybrid vsock") transport with real TLS: an attacker without the
 * agent's key, or a guest that misbehaves, must not starve its own agent or
 * other instances, and must not flood the log.
 */

import "reflect-metadata";
import assert from "node:assert/strict";
import { join } from "node:path";
import { httpRequest, serveHttp, syncResponse } from "../shared/http/mod.ts";
import { acceptTls, connectTls } from "../shared/tls/mod.ts";
import { readConfigDrive } from "../host/config_drive.ts";
import type { Duplex } from "node:stream";
import { connectUnix, type FdSocket, listenHybridMux } from "../shared/vsock/mod.ts";
import {
  agentConnection,
  type AgentIdentity,
  agentIdentity,
  agentRequest,
  bounded,
  cli,
  cliOk,
  connectHybridListener,
  DaemonProcess,
  tempDir,
  trickleBody,
} from "./host_harness.ts";

interface Setup extends AsyncDisposable {
  daemon: DaemonProcess;
  stateDir: string;
  hybrid: string;
  id: AgentIdentity;
}

/** vm1 (hybrid, CID 10, `user.foo=bar`) and a daemon serving it. */
async function setup(extra: string[] = []): Promise<Setup> {
  const dir = await tempDir("host-hard-");
  const hybrid = join(dir.path, "vm1.vsock");
  await cliOk([
    "instance",
    "add",
    "vm1",
    "--cid",
    "10",
    "--hybrid",
    hybrid,
    "-c",
    "user.foo=bar",
    "--state-dir",
    dir.path,
  ]);
  const daemon = await DaemonProcess.start(dir.path, extra);
  return {
    daemon,
    stateDir: dir.path,
    hybrid,
    id: await agentIdentity(dir.path, "vm1"),
    [Symbol.asyncDispose]: async () => {
      await daemon[Symbol.asyncDispose]();
      await dir[Symbol.asyncDispose]();
    },
  };
}

Deno.test("40 connections that never finish a TLS handshake leave the agent's reads working and log one summary line", async () => {
  await using t = await setup();
  // The attacker: a guest process without the agent's key holds 40 connections
  // to the host port, each stuck in the handshake (a TLS record header, then nothing).
  const attack: FdSocket[] = [];
  try {
    for (let i = 0; i < 40; i++) {
      const socket = await connectHybridListener(t.hybrid, t.daemon.port);
      socket.on("error", () => {});
      socket.write(new Uint8Array([0x16, 0x03, 0x01]));
      attack.push(socket);
    }
    const logBefore = t.daemon.lines.length;
    let ok = 0;
    const failures: string[] = [];
    for (let i = 0; i < 10; i++) {
      try {
        const r = await agentRequest(t.hybrid, t.daemon.port, t.id, "/1.0/config/user.foo");
        if (r.status === 200 && r.body.metadata === "bar") ok++;
        else failures.push(`status ${r.status}`);
      } catch (error) {
        failures.push(String(error));
      }
    }
    assert.equal(ok, 10, `the agent's reads under attack: ${ok}/10 succeeded (${failures[0]})`);
    const refusalLines = t.daemon.lines.slice(logBefore).filter((l) =>
      /refused|evicted|too many/.test(l)
    );
    assert.ok(refusalLines.length <= 2, `log lines per refusal:\n${refusalLines.join("\n")}`);
  } finally {
    for (const socket of attack) socket.destroy();
  }
});

/** The guest end of a socket-backed virtserialport (QEMU's `server=on` side). */
interface Serial extends Disposable {
  name: string;
  conn: Deno.UnixConn;
}

async function serialPort(
  listener: Deno.UnixListener,
  name: string,
): Promise<Serial> {
  const conn = await bounded(listener.accept(), 10_000, `the daemon to open ${name}'s serial port`);
  return {
    name,
    conn,
    [Symbol.dispose]: () => {
      try {
        conn.close();
      } catch {
        // already closed
      }
    },
  };
}

Deno.test("16 guests that stop reading their serial port leave the announce to a 17th prompt, and status says they stall", async () => {
  await using dir = await tempDir("host-stall-");
  await using daemon = await DaemonProcess.start(dir.path);
  const names = ["good", ...Array.from({ length: 16 }, (_, i) => `stall${i}`)];
  const listeners = new Map<string, Deno.UnixListener>();
  const serials: Serial[] = [];
  try {
    for (const name of names) {
      listeners.set(
        name,
        Deno.listen({ transport: "unix", path: join(dir.path, `${name}.serial`) }),
      );
    }
    for (let i = 0; i < names.length; i += 4) {
      await Promise.all(
        names.slice(i, i + 4).map((name, j) =>
          cliOk([
            "instance",
            "add",
            name,
            "--cid",
            String(10 + i + j),
            "--hybrid",
            join(dir.path, `${name}.vsock`),
            "--serial",
            join(dir.path, `${name}.serial`),
            "--state-dir",
            dir.path,
          ])
        ),
      );
    }
    for (const name of names) serials.push(await serialPort(listeners.get(name)!, name));
    const [good, ...stallers] = serials;
    // Each staller restarts its agent (STOPPED, STARTED) after every announce
    // and never reads: the host's CONNECT lines fill its socket buffer.
    const encoder = new TextEncoder();
    await Promise.all(stallers.map(async (s) => {
      const done = new RegExp(
        `msg="(announced|announce failed|serial channel stalled)".* instance=${s.name}( |$)`,
      );
      for (let i = 1; i <= 1000; i++) {
        await s.conn.write(encoder.encode("STOPPED\nSTARTED\n"));
        let line: string;
        try {
          line = await daemon.waitForCount(done, i, 10_000);
        } catch {
          return; // the host's write to it blocks (no announce completes)
        }
        if (line.includes("serial channel stalled")) return;
      }
      throw new Error(`${s.name}'s serial port never filled up`);
    }));
    // The well-behaved guest: its agent starts; the host's CONNECT line must come promptly.
    const start = performance.now();
    await good.conn.write(encoder.encode("STARTED\n"));
    const buffer = new Uint8Array(256);
    let text = "";
    while (!text.includes("\n")) {
      const n = await bounded(
        good.conn.read(buffer),
        20_000,
        "the CONNECT line to the well-behaved guest while 16 others stall",
      );
      if (n === null) throw new Error("the daemon closed the good guest's serial port");
      text += new TextDecoder().decode(buffer.subarray(0, n));
    }
    const latency = performance.now() - start;
    assert.equal(text.split("\n")[0], `CONNECT 2:${daemon.port}`);
    assert.ok(latency < 5000, `announce latency ${latency.toFixed(0)} ms`);
    const status = await cliOk(["status", "stall3", "--state-dir", dir.path]);
    assert.match(status, /stalled/);
    const table = await cliOk(["status", "--state-dir", dir.path]);
    assert.equal(table.split("\n").filter((l) => /^stall\d+ .*stalled/.test(l)).length, 16, table);
  } finally {
    for (const s of serials) s[Symbol.dispose]();
    for (const l of listeners.values()) l.close();
  }
});

Deno.test("prototype names (constructor, __proto__, toString) are not instances' devices or config keys", async () => {
  await using t = await setup();
  using connection = await agentConnection(t.hybrid, t.daemon.port, t.id);
  const response = await httpRequest(connection, new Request("http://devlxd/1.0/events"), {
    timeout: 10_000,
  });
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  await t.daemon.waitFor(/msg="agent connected"/);
  const dir = ["--state-dir", t.stateDir];
  for (const name of ["constructor", "__proto__", "toString"]) {
    const removed = await cli(["device", "remove", "vm1", name, ...dir]);
    assert.deepEqual(
      [removed.code, /not found/.test(removed.stderr)],
      [1, true],
      `device remove vm1 ${name}: exit ${removed.code} ${removed.stdout}${removed.stderr}`,
    );
    const got = await cli(["config", "get", "vm1", name, ...dir]);
    assert.deepEqual(
      [got.code, got.stdout, /not set/.test(got.stderr)],
      [1, "", true],
      `config get vm1 ${name}: exit ${got.code} ${got.stdout}${got.stderr}`,
    );
  }
  const added = await cli(["device", "add", "vm1", "constructor", "type=disk", ...dir]);
  assert.equal(added.code, 0, added.stderr);
  // The first event the agent sees is that add: no bogus "removed" came before it.
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await bounded(reader.read(), 10_000, "the device event");
    assert.equal(done, false);
    text += value;
  }
  const event = JSON.parse(text.split("\n")[0]);
  assert.deepEqual(event.metadata, {
    name: "constructor",
    action: "added",
    config: { type: "disk" },
  });
  await reader.cancel();
  const devices = await agentRequest(t.hybrid, t.daemon.port, t.id, "/1.0/devices");
  assert.deepEqual(Object.keys(devices.body.metadata as object), ["constructor"]);
});

Deno.test("a request body trickled at one byte a second is cut off by the body deadline (host)", async () => {
  await using t = await setup();
  using connection = await agentConnection(t.hybrid, t.daemon.port, t.id);
  const start = performance.now();
  const text = await trickleBody(connection, "the host");
  assert.match(text, /^HTTP\/1\.1 408 /);
  assert.ok(performance.now() - start < 15_000);
  const ok = await agentRequest(t.hybrid, t.daemon.port, t.id, "/1.0/config/user.foo");
  assert.equal(ok.body.metadata, "bar");
});

/** Resident memory of a process, in MB (`ps`: Deno reads /proc only with --allow-all). */
async function rssMb(pid: number): Promise<number> {
  const out = await new Deno.Command("ps", { args: ["-o", "rss=", "-p", String(pid)] }).output();
  return Number(new TextDecoder().decode(out.stdout).trim()) / 1024;
}

/** One admin API request over `<state-dir>/admin.sock`. */
async function admin(stateDir: string, path: string, init: RequestInit): Promise<Response> {
  using socket = await connectUnix(join(stateDir, "admin.sock"));
  const response = await httpRequest(socket, new Request(`http://admin${path}`, init), {
    timeout: 20_000,
  });
  await response.body?.cancel();
  return response;
}

Deno.test("event followers that stop reading are dropped once their backlog passes its byte bound, and the host log says so", async () => {
  await using t = await setup();
  const followers: Duplex[] = [];
  try {
    for (let i = 0; i < 8; i++) {
      const raw = await connectHybridListener(t.hybrid, t.daemon.port);
      followers.push(raw);
      const secure = await connectTls(raw, {
        cert: t.id.cert,
        key: t.id.key,
        pinned: t.id.serverCert,
        handshakeTimeout: 5000,
      });
      followers.push(secure);
      secure.on("error", () => {});
      secure.write("GET /1.0/events HTTP/1.1\r\nHost: devlxd\r\n\r\n");
      raw.pause(); // never reads again: the kernel buffers fill, then the host's
    }
    await t.daemon.waitForCount(/msg="agent connected"/, 8);
    const before = await rssMb(t.daemon.process.pid);
    for (let i = 0; i < 20; i++) {
      const response = await admin(t.stateDir, "/1.0/instances/vm1/config/user.big", {
        method: "PUT",
        body: JSON.stringify({ value: String(i % 10).repeat(900 * 1024) }),
      });
      assert.equal(response.status, 200);
    }
    await t.daemon.waitForCount(/msg="event stream dropped: its reader is too slow"/, 8, 20_000);
    const after = await rssMb(t.daemon.process.pid);
    let open: unknown;
    for (let attempt = 0; attempt < 10; attempt++) {
      const status = JSON.parse(
        await cliOk(["status", "--format", "json", "--state-dir", t.stateDir]),
      );
      open = status.connections?.["hybrid:vm1"];
      if (open === undefined) break;
    }
    assert.equal(open, undefined, "the dropped followers' connections are closed");
    assert.ok(after - before < 200, `host RSS ${before.toFixed(0)} → ${after.toFixed(0)} MB`);
  } finally {
    for (const socket of followers) socket.destroy();
  }
});

Deno.test("wait NAME --for connected|ready returns 0 once the guest gets there, 1 on timeout with the state it saw; the admin API long-polls", async () => {
  await using t = await setup();
  const dir = ["--state-dir", t.stateDir];
  // Nothing connects: a timeout, exit 1, naming the state seen.
  const early = await cli(["wait", "vm1", "--for", "ready", "--timeout", "1s", ...dir]);
  assert.equal(early.code, 1, early.stdout + early.stderr);
  assert.match(
    early.stderr,
    /Timed out after 1s waiting for vm1 to be ready.*agent STOPPED, ready no/,
  );
  const poll = await admin(t.stateDir, "/1.0/instances/vm1/wait?for=connected&timeout=200", {});
  assert.equal(poll.status, 200);
  // A waiter started before the agent shows up returns once it has.
  const waiter = cli(["wait", "vm1", "--for", "connected", "--timeout", "30s", ...dir]);
  await t.daemon.waitForCount(/msg="waiting for an instance" instance=vm1 for=connected/, 2);
  const r = await agentRequest(t.hybrid, t.daemon.port, t.id, "/1.0", {
    method: "PATCH",
    body: JSON.stringify({ state: "Ready" }),
  });
  assert.equal(r.status, 200);
  const done = await bounded(waiter, 30_000, "wait --for connected to return");
  assert.equal(done.code, 0, done.stdout + done.stderr);
  assert.match(done.stdout, /^vm1: connected \(agent CONNECTED, ready (yes|no)\)$/m);
  const ready = await cli(["wait", "vm1", "--for", "ready", ...dir]);
  assert.equal(ready.code, 0, ready.stderr);
  const usage = await cli(["wait", "vm1", "--for", "asleep", ...dir]);
  assert.equal(usage.code, 2);
  assert.match(usage.stderr, /Invalid --for "asleep": use connected or ready/);
});

Deno.test("a state directory or admin socket owned by another user is refused by the daemon and the CLI", async () => {
  await using dir = await tempDir("host-owner-");
  const stateDir = join(dir.path, "state");
  await Deno.mkdir(stateDir, { mode: 0o700 });
  await Deno.chown(stateDir, 4242, 4242);
  await assert.rejects(
    DaemonProcess.start(stateDir),
    /owned by uid 4242, not by this process's user \(uid 0\)/,
  );
  const list = await cli(["instance", "list", "--state-dir", stateDir]);
  assert.equal(list.code, 1);
  assert.match(list.stderr, /owned by uid 4242, not by this process's user \(uid 0\)/);
  await Deno.chown(stateDir, 0, 0);
  await using daemon = await DaemonProcess.start(stateDir);
  const socket = join(stateDir, "admin.sock");
  assert.equal((await cli(["instance", "list", "--state-dir", stateDir])).code, 0);
  // Another user swapped (or owns) the admin socket: the CLI does not talk to it.
  await Deno.chown(socket, 4242, 4242);
  const swapped = await cli(["instance", "list", "--state-dir", stateDir]);
  assert.equal(swapped.code, 1, swapped.stdout);
  assert.match(swapped.stderr, /Refusing to talk to .*admin\.sock: it is owned by uid 4242/);
  // A daemon does not start over an admin socket another user left there either.
  await daemon.stop("SIGKILL");
  await assert.rejects(
    DaemonProcess.start(stateDir),
    /Refusing the admin socket .*admin\.sock: it is owned by uid 4242/,
  );
});

Deno.test("--config-drive refuses another instance's drive, a non-empty or state-dir directory; remove deletes the recorded drive", async () => {
  await using dir = await tempDir("host-drive-");
  const stateDir = join(dir.path, "state");
  const s = ["--state-dir", stateDir];
  const add = (name: string, cid: number, drive: string) =>
    cli(["instance", "add", name, "--cid", String(cid), "--config-drive", drive, ...s]);
  const d1 = join(dir.path, "drives", "vm1");
  assert.equal((await add("vm1", 10, d1)).code, 0);
  const key = await Deno.readTextFile(join(d1, "agent.key"));

  const taken = await add("vm2", 11, d1);
  assert.equal(taken.code, 1, taken.stdout);
  assert.match(taken.stderr, /config drive .* is the config drive of instance vm1/);
  assert.equal(await Deno.readTextFile(join(d1, "agent.key")), key, "vm1's key untouched");

  const home = join(dir.path, "home");
  await Deno.mkdir(home, { mode: 0o755 });
  await Deno.writeTextFile(join(home, ".profile"), "x");
  const busy = await add("vm2", 11, home);
  assert.equal(busy.code, 1);
  assert.match(busy.stderr, /not empty/);
  assert.equal((await Deno.stat(home)).mode! & 0o777, 0o755, "not chmodded");

  await Deno.mkdir(join(stateDir, "images"), { recursive: true });
  const inside = await add("vm2", 11, join(stateDir, "images"));
  assert.equal(inside.code, 1);
  assert.match(inside.stderr, /inside the state directory/);
  const list = JSON.parse(await cliOk(["instance", "list", "--format", "json", ...s]));
  assert.deepEqual(list.map((i: { name: string }) => i.name), ["vm1"]);

  const shown = JSON.parse(await cliOk(["instance", "show", "vm1", ...s]));
  assert.equal(shown.configDrive, d1);
  const removed = await cliOk(["instance", "remove", "vm1", ...s]);
  assert.match(removed, /config drive .*vm1 removed/);
  await assert.rejects(Deno.lstat(d1), Deno.errors.NotFound);
});

Deno.test("events queued for an offline agent survive a daemon restart and are delivered once", async () => {
  await using dir = await tempDir("host-queue-");
  const stateDir = dir.path;
  const s = ["--state-dir", stateDir];
  const hybrid = join(stateDir, "vm1.vsock");
  await cliOk(["instance", "add", "vm1", "--cid", "10", "--hybrid", hybrid, ...s]);
  const queued = async () => {
    const status = JSON.parse(await cliOk(["status", "--format", "json", ...s]));
    return status.monitor.find((m: { name: string }) => m.name === "vm1").queuedEvents;
  };
  {
    await using daemon = await DaemonProcess.start(stateDir);
    await cliOk(["config", "set", "vm1", "user.greeting", "hello", ...s]);
    assert.equal(await queued(), 1);
    assert.equal((await daemon.stop()).code, 0);
  }
  // The agent comes up while the host is down; the host restarts.
  const drive = await readConfigDrive(join(stateDir, "instances", "vm1", "config"));
  const pushed: { key: string; value: string }[] = [];
  const first = Promise.withResolvers<void>();
  using agentApi = listenHybridMux(hybrid, [8443], { replace: true });
  const serving = (async () => {
    for await (const socket of agentApi) {
      acceptTls(socket, { cert: drive.agentCert, key: drive.agentKey, pinned: drive.clientCert })
        .then(({ socket: secure }) =>
          serveHttp(secure, async (request) => {
            if (request.method === "POST" && new URL(request.url).pathname === "/1.0/events") {
              pushed.push((await request.json()).metadata);
              first.resolve();
            }
            return syncResponse(null);
          })
        )
        .catch(() => {});
    }
  })();
  {
    await using daemon = await DaemonProcess.start(stateDir);
    const id = await agentIdentity(stateDir, "vm1");
    assert.equal((await agentRequest(hybrid, daemon.port, id, "/1.0")).status, 200);
    await bounded(first.promise, 15_000, "the queued event to be pushed after the restart");
    await daemon.waitFor(/msg="event pushed" .*instance=vm1/);
    assert.equal((await daemon.stop()).code, 0);
  }
  {
    await using _daemon = await DaemonProcess.start(stateDir);
    assert.equal(await queued(), 0, "delivered events leave the registry");
  }
  assert.deepEqual(pushed, [{ key: "user.greeting", old_value: "", value: "hello" }]);
  agentApi.close();
  await serving;
});

Deno.test("instance add before any daemon ran writes the port the daemon then listens on; the daemon refreshes every drive it recorded", async () => {
  await using dir = await tempDir("host-port-");
  const stateDir = join(dir.path, "state");
  await cliOk([
    "instance",
    "add",
    "vm1",
    "--cid",
    "10",
    "--hybrid",
    join(dir.path, "vm1.vsock"),
    "--state-dir",
    stateDir,
  ]);
  const drive = await readConfigDrive(join(stateDir, "instances", "vm1", "config"));
  assert.ok(drive.info.port > 0, `agent.conf port ${drive.info.port}`);
  {
    await using daemon = await DaemonProcess.start(stateDir);
    assert.equal(daemon.port, drive.info.port);
  }
  // A drive in a custom place is refreshed too when the port changes.
  const custom = join(dir.path, "drives", "vm2");
  await cliOk([
    "instance",
    "add",
    "vm2",
    "--cid",
    "11",
    "--hybrid",
    join(dir.path, "vm2.vsock"),
    "--config-drive",
    custom,
    "--state-dir",
    stateDir,
  ]);
  const port = drive.info.port === 40999 ? 40998 : 40999;
  await using daemon = await DaemonProcess.start(stateDir, ["--port", String(port)]);
  await daemon.waitFor(/msg="config drives refreshed" rewritten=2 /);
  assert.equal((await readConfigDrive(custom)).info.port, port);
});

/**
 * Kept-alive agent connections on the host daemon (a process, hybrid
 * transport, real TLS): several requests ride on one connection, each checked
 * against the instance it was authenticated as; removing the instance or
 * turning its devlxd off closes an idle kept connection at once, well before
 * the host's 30 s idle timeout.
 * @module
 */

import assert from "node:assert/strict";
import type { Duplex } from "node:stream";
import { httpRequest } from "../shared/http/mod.ts";
import {
  addHybridInstance,
  agentConnection,
  agentIdentity,
  bounded,
  cliOk,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

/** One keep-alive request on `connection`; resolves with the status once the body is read. */
async function keptRequest(connection: Duplex, path: string): Promise<number> {
  let reused = false;
  const response = await httpRequest(connection, new Request(`http://devlxd${path}`), {
    timeout: 10_000,
    reuse: () => reused = true,
  });
  await response.arrayBuffer();
  assert.ok(reused, `the daemon kept the connection open after ${path}`);
  return response.status;
}

/** Resolves when the daemon ends the connection (TLS over a Duplex sees "end", not "close"). */
function closed(connection: Duplex): Promise<void> {
  return new Promise((resolve) => {
    if (connection.destroyed || connection.readableEnded) resolve();
    connection.once("end", () => resolve());
    connection.once("close", () => resolve());
    connection.on("error", () => {});
    connection.resume(); // an idle connection notices the peer's close only while reading
  });
}

for (
  const [what, change] of [
    ["removing the instance", ["instance", "remove", "vm1"]],
    ["security.devlxd=false", ["config", "set", "vm1", "security.devlxd", "false"]],
  ] as const
) {
  Deno.test(`the daemon serves several requests on one kept-alive agent connection and closes it at once on ${what}`, async () => {
    await using dir = await tempDir("host-keepalive-");
    const hybrid = await addHybridInstance(dir.path, ["-c", "user.foo=bar"]);
    await using daemon = await DaemonProcess.start(dir.path);
    const id = await agentIdentity(dir.path, "vm1");
    using connection = await agentConnection(hybrid, daemon.port, id);
    for (const path of ["/1.0", "/1.0/config", "/1.0/config/user.foo"]) {
      assert.equal(await keptRequest(connection, path), 200, path);
    }
    const gone = closed(connection);
    await cliOk([...change, "--state-dir", dir.path]);
    // The daemon's idle timeout is 30 s: a close within 10 s is the daemon's doing.
    await bounded(gone, 10_000, `the kept connection closed after ${what}`);
  });
}

Deno.test("at its cap, a VM's new connection is admitted by closing one of its idle kept-alive connections; busy streams are never closed for it", async () => {
  await using dir = await tempDir("host-keepalive-");
  const hybrid = await addHybridInstance(dir.path);
  await using daemon = await DaemonProcess.start(dir.path, ["--max-connections-per-instance", "2"]);
  const id = await agentIdentity(dir.path, "vm1");
  // Two connections: one follows events (busy), one is idle after a request.
  using stream = await agentConnection(hybrid, daemon.port, id);
  const events = await httpRequest(stream, new Request("http://devlxd/1.0/events"), {
    timeout: 10_000,
  });
  assert.equal(events.status, 200);
  using idle = await agentConnection(hybrid, daemon.port, id);
  assert.equal(await keptRequest(idle, "/1.0"), 200);
  const idleClosed = closed(idle);
  // A third: admitted, the idle one closed for it.
  using third = await agentConnection(hybrid, daemon.port, id);
  assert.equal(await keptRequest(third, "/1.0/config"), 200);
  await bounded(idleClosed, 10_000, "the idle connection closed to make room");
  // A fourth: the third is idle now and makes room; the stream is never the one closed.
  using fourth = await agentConnection(hybrid, daemon.port, id);
  assert.equal(await keptRequest(fourth, "/1.0"), 200);
  // The stream still delivers: a config change reaches it.
  await cliOk(["config", "set", "vm1", "user.after", "yes", "--state-dir", dir.path]);
  const reader = events.body!.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("user.after")) {
    const { value, done } = await bounded(reader.read(), 10_000, "the config event on the stream");
    assert.equal(done, false, "the events stream ended");
    text += value;
  }
  await reader.cancel();
});

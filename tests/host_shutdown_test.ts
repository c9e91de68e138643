/**
 * SIGTERM: the daemon stops listening, ends event streams, lets an in-flight
 * response finish, removes its sockets and exits 0.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { httpRequest } from "../shared/http/mod.ts";
import {
  addHybridInstance,
  agentConnection,
  agentIdentity,
  bounded,
  connectHybridListener,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

async function setup(prefix: string) {
  const dir = await tempDir(prefix);
  const hybrid = await addHybridInstance(dir.path, ["-c", "security.devlxd.images=true"]);
  return { dir, hybrid, id: await agentIdentity(dir.path, "vm1") };
}

Deno.test("SIGTERM ends open /1.0/events streams, removes the sockets and exits 0", async () => {
  const { dir, hybrid, id } = await setup("host-stop-");
  await using _dir = dir;
  await using daemon = await DaemonProcess.start(dir.path);
  using connection = await agentConnection(hybrid, daemon.port, id);
  const response = await bounded(
    httpRequest(connection, new Request("http://devlxd/1.0/events"), { timeout: 10_000 }),
    10_000,
    "the events response",
  );
  assert.equal(response.status, 200);
  const reader = response.body!.getReader();
  const ended = (async () => {
    while (!(await reader.read()).done) { /* drain */ }
  })();
  const status = await daemon.stop("SIGTERM");
  assert.equal(status.code, 0);
  await bounded(ended.catch(() => {}), 10_000, "the event stream to end");
  await daemon.waitFor(/msg="stopped"/);
  await assert.rejects(Deno.lstat(`${hybrid}_${daemon.port}`), Deno.errors.NotFound);
  await assert.rejects(Deno.lstat(join(dir.path, "admin.sock")), Deno.errors.NotFound);
  await assert.rejects(connectHybridListener(hybrid, daemon.port));
});

Deno.test("SIGTERM lets an in-flight image export finish before the daemon exits 0", async () => {
  const { dir, hybrid, id } = await setup("host-stop-");
  await using _dir = dir;
  const fingerprint = "c".repeat(64);
  const size = 8 << 20;
  await Deno.mkdir(join(dir.path, "images"), { recursive: true });
  await Deno.writeFile(join(dir.path, "images", fingerprint), new Uint8Array(size).fill(7));
  await using daemon = await DaemonProcess.start(dir.path);
  using connection = await agentConnection(hybrid, daemon.port, id);
  const response = await bounded(
    httpRequest(connection, new Request(`http://devlxd/1.0/images/${fingerprint}/export`), {
      timeout: 10_000,
    }),
    10_000,
    "the export response",
  );
  assert.equal(response.status, 200);
  const reader = response.body!.getReader();
  let received = (await reader.read()).value?.length ?? 0;
  daemon.process.kill("SIGTERM");
  await daemon.waitFor(/msg="shutting down"/);
  while (true) {
    const { value, done } = await bounded(reader.read(), 10_000, "the rest of the export");
    if (done) break;
    received += value.length;
  }
  assert.equal(received, size);
  assert.equal((await daemon.stop("SIGTERM")).code, 0);
});

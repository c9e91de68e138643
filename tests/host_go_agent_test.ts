/**
 * The daemon against a Go client configured as the stock lxd-agent is (LXD
 * pins the host certificate as its only root and checks its first DNS name;
 * Go's HTTP client keeps connections alive): tests/host_testdata/go_agent.
 * Skipped when `go` is not installed.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { addHybridInstance, DaemonProcess, tempDir } from "./host_harness.ts";

// Deno.Command throws synchronously (NotFound) when `go` is not installed: try/catch, not .then().
let hasGo = false;
try {
  hasGo = (await new Deno.Command("go", { args: ["version"], stdout: "null", stderr: "null" })
    .output()).success;
} catch {
  // no Go toolchain: the tests below are ignored
}

Deno.test({
  name: "a Go client with LXD's TLS pinning reaches the daemon, reusing one kept-alive connection",
  ignore: !hasGo,
}, async () => {
  await using dir = await tempDir("host-go-");
  const binary = join(dir.path, "go_agent");
  const build = await new Deno.Command("go", {
    args: ["build", "-o", binary, "."],
    cwd: new URL("./host_testdata/go_agent/", import.meta.url).pathname,
    stdout: "null",
    stderr: "piped",
  }).output();
  assert.ok(build.success, new TextDecoder().decode(build.stderr));
  const hybrid = await addHybridInstance(dir.path, ["-c", "user.foo=bar"]);
  await using daemon = await DaemonProcess.start(dir.path);
  const output = await new Deno.Command(binary, {
    args: [
      join(dir.path, "instances", "vm1", "config"),
      `${hybrid}_${daemon.port}`,
      "GET:/1.0",
      'PATCH:/1.0:{"state":"Ready"}',
      "GET:/1.0/config",
      "GET:/1.0/config/user.foo",
      "GET:/1.0/nope",
      "GET:/1.0",
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(output.success, new TextDecoder().decode(output.stderr));
  const lines = new TextDecoder().decode(output.stdout).trim().split("\n").map((l) =>
    JSON.parse(l)
  );
  assert.deepEqual(lines.map((l) => l.status), [200, 200, 200, 200, 404, 200, undefined]);
  assert.equal(lines[0].body.metadata.state, "Started");
  assert.deepEqual(lines[2].body.metadata, ["/1.0/config/user.foo"]);
  assert.equal(lines[3].body.metadata, "bar");
  assert.equal(lines[4].body.error_code, 404);
  assert.equal(lines[5].body.metadata.state, "Ready");
  assert.deepEqual(lines[6], { connections: 1 });
});

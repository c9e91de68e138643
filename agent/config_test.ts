import assert from "node:assert/strict";
import { parseConfig, parseDuration, UsageError } from "./config.ts";

Deno.test("parseConfig() gives LXD's defaults with no arguments", () => {
  const config = parseConfig([]);
  assert.equal(config.command, "run");
  assert.equal(config.configDir, "/run/lxd_agent");
  assert.equal(config.agentPort, 8443);
  assert.equal(config.devlxdSocket, "/dev/lxd/sock");
  assert.equal(config.devlxdMode, 0o600);
  assert.equal(config.rewriteInterval, 5000);
  assert.equal(config.responseTimeout, 10_000);
  assert.deepEqual(config.transport, { kind: "vsock" });
  assert.deepEqual(config.serialPorts, [
    "/dev/virtio-ports/org.linuxcontainers.lxd",
    "/dev/virtio-ports/com.canonical.lxd",
    "/dev/virtio-ports/org.linuxcontainers.incus",
  ]);
  assert.equal(config.logLevel, "info");
  assert.equal(config.format, "text");
});

Deno.test("parseConfig() reads every option", () => {
  const config = parseConfig([
    "--config-dir=/c",
    "--serial-port",
    "/dev/virtio-ports/com.canonical.lxd",
    "--agent-port=9000",
    "--devlxd-socket=/tmp/s",
    "--devlxd-mode=0660",
    "--state-file=/tmp/st.json",
    "--rewrite-interval=250ms",
    "--response-timeout=2s",
    "--transport=hybrid:/tmp/v.sock",
    "--log-level=debug",
  ]);
  assert.equal(config.configDir, "/c");
  assert.deepEqual(config.serialPorts, ["/dev/virtio-ports/com.canonical.lxd"]);
  assert.equal(config.agentPort, 9000);
  assert.equal(config.devlxdSocket, "/tmp/s");
  assert.equal(config.devlxdMode, 0o660);
  assert.equal(config.stateFile, "/tmp/st.json");
  assert.equal(config.rewriteInterval, 250);
  assert.equal(config.responseTimeout, 2000);
  assert.deepEqual(config.transport, { kind: "hybrid", path: "/tmp/v.sock" });
  assert.equal(config.logLevel, "debug");
});

Deno.test("parseConfig() recognises --status, --format, --help and --version", () => {
  const status = parseConfig(["--status", "--format", "json"]);
  assert.equal(status.command, "status");
  assert.equal(status.format, "json");
  assert.equal(parseConfig(["-h"]).command, "help");
  assert.equal(parseConfig(["--help"]).command, "help");
  assert.equal(parseConfig(["--version"]).command, "version");
});

Deno.test("parseConfig() takes the log level from the environment unless given", () => {
  assert.equal(parseConfig([], { LXD_VSOCK_AGENT_LOG_LEVEL: "warn" }).logLevel, "warn");
  assert.equal(
    parseConfig(["--log-level=error"], { LXD_VSOCK_AGENT_LOG_LEVEL: "warn" }).logLevel,
    "error",
  );
});

Deno.test("parseConfig() rejects bad input with a UsageError naming the problem", () => {
  const cases: [string[], RegExp][] = [
    [["--nope"], /nope/],
    [["extra"], /Unexpected argument "extra"/],
    [["--agent-port=0"], /--agent-port/],
    [["--agent-port=70000"], /--agent-port/],
    [["--agent-port=abc"], /--agent-port/],
    [["--devlxd-mode=999"], /--devlxd-mode/],
    [["--rewrite-interval=fast"], /--rewrite-interval/],
    [["--rewrite-interval=0s"], /--rewrite-interval/],
    [["--transport=tcp"], /--transport/],
    [["--transport=hybrid:"], /--transport/],
    [["--log-level=loud"], /log level/],
    [["--format=xml"], /--format/],
    [["--serial-port="], /--serial-port/],
  ];
  for (const [args, message] of cases) {
    assert.throws(() => parseConfig(args), (e: unknown) => {
      assert.ok(e instanceof UsageError, `${args}: ${e}`);
      assert.match(e.message, message);
      return true;
    });
  }
});

Deno.test("parseDuration() accepts ms, s, m and bare seconds", () => {
  assert.equal(parseDuration("500ms"), 500);
  assert.equal(parseDuration("5s"), 5000);
  assert.equal(parseDuration("1m"), 60000);
  assert.equal(parseDuration("2"), 2000);
  assert.equal(parseDuration("0.5s"), 500);
});

Deno.test("parseConfig() --host-wait: 30 s by default, a duration, or 0 to answer at once", () => {
  assert.equal(parseConfig([]).hostWait, 30_000);
  assert.equal(parseConfig(["--host-wait=5s"]).hostWait, 5000);
  assert.equal(parseConfig(["--host-wait", "0"]).hostWait, 0);
  assert.throws(() => parseConfig(["--host-wait=soon"]), UsageError);
});

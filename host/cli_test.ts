import assert from "node:assert/strict";
import { type CliEnvironment, HELP, parseConfig, UsageError } from "./cli.ts";
import { defaultStateDir } from "./state_dir.ts";

const user: CliEnvironment = { uid: 1000, vars: { HOME: "/home/u" } };

function usage(args: string[], message: RegExp): void {
  assert.throws(
    () => parseConfig(args, user),
    (e) => e instanceof UsageError && message.test(e.message),
  );
}

Deno.test("defaultStateDir() picks /var/lib for root, XDG or ~/.local/state otherwise, env override first", () => {
  assert.equal(defaultStateDir({ uid: 0, vars: { HOME: "/root" } }), "/var/lib/lxd-vsock");
  assert.equal(
    defaultStateDir({ uid: 5, vars: { HOME: "/h", XDG_STATE_HOME: "/x" } }),
    "/x/lxd-vsock",
  );
  assert.equal(
    defaultStateDir({ uid: 5, vars: { HOME: "/h", XDG_STATE_HOME: "rel" } }),
    "/h/.local/state/lxd-vsock",
  );
  assert.equal(defaultStateDir({ uid: 5, vars: { HOME: "/h" } }), "/h/.local/state/lxd-vsock");
  assert.equal(defaultStateDir({ uid: 0, vars: { LXD_VSOCK_STATE_DIR: "/s" } }), "/s");
});

Deno.test("parseConfig() daemon: defaults and every flag", () => {
  assert.deepEqual(parseConfig(["daemon"], user), {
    kind: "daemon",
    stateDir: "/home/u/.local/state/lxd-vsock",
    port: 0,
    logLevel: "info",
    transport: "vsock",
    maxConnectionsPerInstance: 32,
    shutdownTimeout: 5000,
    monitor: true,
    intervals: {},
  });
  assert.deepEqual(
    parseConfig([
      "daemon",
      "--state-dir",
      "./state",
      "--port",
      "4000",
      "--log-level",
      "debug",
      "--transport",
      "unix",
      "--images-dir",
      "/img",
      "--max-connections-per-instance",
      "4",
      "--shutdown-timeout",
      "100",
      "--no-monitor",
      "--poll-waiting",
      "250",
      "--poll-stopped",
      "2000",
      "--poll-connected",
      "30000",
    ], user),
    {
      kind: "daemon",
      stateDir: "./state",
      port: 4000,
      logLevel: "debug",
      transport: "unix",
      imagesDir: "/img",
      maxConnectionsPerInstance: 4,
      shutdownTimeout: 100,
      monitor: false,
      intervals: { waiting: 250, stopped: 2000, connected: 30000 },
    },
  );
});

Deno.test("parseConfig() daemon refuses bad ports, levels, transports and unknown flags", () => {
  usage(["daemon", "--port", "80"], /Invalid --port 80/);
  usage(["daemon", "--port", "70000"], /Invalid --port 70000/);
  usage(["daemon", "--port", "x"], /not an integer/);
  usage(["daemon", "--log-level", "loud"], /Invalid log level "loud"/);
  usage(["daemon", "--transport", "tcp"], /Invalid --transport/);
  usage(["daemon", "--bogus"], /bogus/);
  usage(["daemon", "extra"], /Unexpected argument "extra"/);
  usage(["daemon", "--poll-connected", "10"], /Invalid --poll-connected 10: use 50-3600000 ms/);
  usage(["daemon", "--poll-waiting", "soon"], /Invalid --poll-waiting "soon": not an integer/);
});

Deno.test("parseConfig() instance add: status channels, hybrid, config drive, initial config", () => {
  assert.deepEqual(
    parseConfig(
      ["instance", "add", "vm1", "--cid", "42", "--qmp", "/run/q", "-c", "user.a=b=c"],
      user,
    ),
    {
      kind: "instance-add",
      stateDir: "/home/u/.local/state/lxd-vsock",
      name: "vm1",
      cid: 42,
      status: { kind: "qmp", path: "/run/q", chardev: "vserial", size: 16 },
      config: { "user.a": "b=c" },
      format: "table",
    },
  );
  const hybrid = parseConfig(
    [
      "instance",
      "add",
      "fc",
      "--cid",
      "3",
      "--hybrid",
      "/v.sock",
      "--serial",
      "/s",
      "--config-drive",
      "/d",
    ],
    user,
  );
  assert.equal(hybrid.kind, "instance-add");
  if (hybrid.kind !== "instance-add") return;
  assert.deepEqual(hybrid.status, { kind: "socket", path: "/s" });
  assert.equal(hybrid.hybrid, "/v.sock");
  assert.equal(hybrid.configDrive, "/d");
});

Deno.test("parseConfig() instance add refuses bad names and CIDs <= 2 or > 2^32-2", () => {
  usage(["instance", "add", "vm1"], /Missing --cid/);
  usage(["instance", "add", "--cid", "5"], /Missing NAME/);
  usage(["instance", "add", "Bad_Name", "--cid", "5"], /Invalid instance name/);
  usage(["instance", "add", "../x", "--cid", "5"], /Invalid instance name/);
  usage(["instance", "add", "vm", "--cid", "2"], /Invalid CID 2/);
  usage(["instance", "add", "vm", "--cid", "4294967295"], /Invalid CID 4294967295/);
  usage(["instance", "add", "vm", "--cid", "-1"], /cid|CID/);
  usage(["instance", "add", "vm", "--cid", "5", "--qmp", "/a", "--serial", "/b"], /at most one/);
  usage(["instance", "add", "vm", "--cid", "5", "--chardev", "x"], /need --qmp/);
  usage(["instance", "add", "vm", "--cid", "5", "-c", "novalue"], /expected KEY=VALUE/);
});

Deno.test("parseConfig() registry subcommands", () => {
  const s = { stateDir: "/s" };
  const p = (...a: string[]) => parseConfig([...a, "--state-dir", "/s"], user);
  assert.deepEqual(p("instance", "list", "--format", "json"), {
    kind: "instance-list",
    ...s,
    format: "json",
  });
  assert.deepEqual(p("instance", "show", "vm"), { kind: "instance-show", ...s, name: "vm" });
  assert.deepEqual(p("instance", "remove", "vm"), { kind: "instance-remove", ...s, name: "vm" });
  assert.deepEqual(p("config", "set", "vm", "user.a", "x y"), {
    kind: "config-set",
    ...s,
    name: "vm",
    key: "user.a",
    value: "x y",
  });
  assert.deepEqual(p("config", "get", "vm", "user.a"), {
    kind: "config-get",
    ...s,
    name: "vm",
    key: "user.a",
  });
  assert.deepEqual(p("config", "unset", "vm", "user.a"), {
    kind: "config-unset",
    ...s,
    name: "vm",
    key: "user.a",
  });
  assert.deepEqual(p("device", "add", "vm", "eth0", "type=nic", "network=br0"), {
    kind: "device-add",
    ...s,
    name: "vm",
    device: "eth0",
    config: { type: "nic", network: "br0" },
  });
  assert.deepEqual(p("device", "remove", "vm", "eth0"), {
    kind: "device-remove",
    ...s,
    name: "vm",
    device: "eth0",
  });
  assert.deepEqual(p("status"), { kind: "status", ...s, format: "table" });
  assert.deepEqual(p("status", "vm"), { kind: "status", ...s, format: "table", name: "vm" });
  assert.deepEqual(p("events"), { kind: "events", ...s });
});

Deno.test("parseConfig() help and version; unknown commands are usage errors", () => {
  assert.deepEqual(parseConfig([], user), { kind: "help", text: HELP.main });
  assert.deepEqual(parseConfig(["--help"], user), { kind: "help", text: HELP.main });
  assert.deepEqual(parseConfig(["daemon", "-h"], user), { kind: "help", text: HELP.daemon });
  assert.deepEqual(parseConfig(["instance", "add", "--help"], user), {
    kind: "help",
    text: HELP.instance,
  });
  assert.deepEqual(parseConfig(["--version"], user), { kind: "version" });
  assert.match(HELP.main, /^lxd-vsock-host .*\n\nUSAGE\n/);
  for (const text of Object.values(HELP)) assert.match(text, /USAGE[\s\S]*OPTIONS/);
  usage(["frobnicate"], /Unknown command "frobnicate"/);
  usage(["instance", "frob"], /Unknown instance command/);
  usage(["config", "set", "vm", "user.a"], /Missing VALUE/);
  usage(["device", "add", "vm", "eth0"], /Missing type=TYPE/);
});

Deno.test("parseConfig() --status [NAME] is the status command", () => {
  assert.deepEqual(parseConfig(["--status", "vm1"], user), parseConfig(["status", "vm1"], user));
  assert.deepEqual(parseConfig(["--status"], user), parseConfig(["status"], user));
});

Deno.test("parseConfig() wait: --for connected|ready, --timeout durations, usage errors", () => {
  const p = (...a: string[]) => parseConfig([...a, "--state-dir", "/s"], user);
  assert.deepEqual(p("wait", "vm", "--for", "ready"), {
    kind: "wait",
    stateDir: "/s",
    name: "vm",
    for: "ready",
    timeout: 60_000,
  });
  for (
    const [text, ms] of [["500ms", 500], ["30s", 30_000], ["5m", 300_000], ["1h", 3_600_000], [
      "7",
      7000,
    ]] as const
  ) {
    assert.equal(
      (p("wait", "vm", "--for", "connected", "--timeout", text) as { timeout: number }).timeout,
      ms,
    );
  }
  usage(["wait", "vm"], /Missing --for/);
  usage(["wait", "vm", "--for", "up"], /Invalid --for "up": use connected or ready/);
  usage(["wait", "vm", "--for", "ready", "--timeout", "soon"], /Invalid duration "soon"/);
  usage(["wait", "--for", "ready"], /Missing NAME/);
});

import assert from "node:assert/strict";
import { parseConfig, UsageError } from "./cli.ts";

const env = { uid: 0, vars: {} };

Deno.test("parseConfig() reads exec NAME with -t, --env, --cwd, --user and the command after --", () => {
  assert.deepEqual(
    parseConfig(
      [
        "exec",
        "vm1",
        "-t",
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--env",
        "EMPTY",
        "--cwd",
        "/srv",
        "--user",
        "1000",
        "--",
        "ls",
        "-la",
      ],
      env,
    ),
    {
      kind: "exec",
      stateDir: "/var/lib/lxd-vsock",
      name: "vm1",
      command: ["ls", "-la"],
      mode: "interactive",
      env: { A: "1", B: "x=y", EMPTY: "" },
      cwd: "/srv",
      user: 1000,
    },
  );
  const plain = parseConfig(["exec", "vm1", "--", "true"], env);
  assert.equal(plain.kind === "exec" && plain.mode, "auto");
  const forced = parseConfig(["exec", "vm1", "-T", "--", "true"], env);
  assert.equal(forced.kind === "exec" && forced.mode, "non-interactive");
});

Deno.test("parseConfig() refuses exec without a command, with -t and -T, or a bad --env/--user", () => {
  for (
    const args of [
      ["exec", "vm1"],
      ["exec"],
      ["exec", "vm1", "-t", "-T", "--", "true"],
      ["exec", "vm1", "--env", "=value", "--", "true"],
      ["exec", "vm1", "--user", "-1", "--", "true"],
      ["exec", "Bad_Name", "--", "true"],
    ]
  ) {
    assert.throws(() => parseConfig(args, env), UsageError, args.join(" "));
  }
});

Deno.test("parseConfig() reads state NAME [--format json]", () => {
  assert.deepEqual(parseConfig(["state", "vm1", "--format", "json", "--state-dir", "/s"], env), {
    kind: "state",
    stateDir: "/s",
    name: "vm1",
    format: "json",
  });
  assert.throws(() => parseConfig(["state", "vm1", "--format", "yaml"], env), UsageError);
  const help = parseConfig(["exec", "--help"], env);
  assert.equal(help.kind, "help");
});

Deno.test("parseConfig() reads file push LOCAL NAME/PATH with --mode/--uid/--gid and file pull NAME/PATH LOCAL", () => {
  assert.deepEqual(
    parseConfig(["file", "push", "./a.txt", "vm1/etc/a.txt", "--mode", "0640", "--uid", "0"], env),
    {
      kind: "file-push",
      stateDir: "/var/lib/lxd-vsock",
      name: "vm1",
      path: "/etc/a.txt",
      local: "./a.txt",
      mode: 0o640,
      uid: 0,
    },
  );
  assert.deepEqual(parseConfig(["file", "pull", "vm1/etc/hosts", "."], env), {
    kind: "file-pull",
    stateDir: "/var/lib/lxd-vsock",
    name: "vm1",
    path: "/etc/hosts",
    local: ".",
  });
  for (
    const args of [
      ["file", "copy", "a", "vm1/b"],
      ["file", "push", "a"],
      ["file", "push", "a", "vm1"],
      ["file", "push", "a", "vm1/"],
      ["file", "push", "a", "vm1/b", "--mode", "999"],
      ["file", "pull", "vm1/b", "c", "--mode", "0644"],
    ]
  ) {
    assert.throws(() => parseConfig(args, env), UsageError, args.join(" "));
  }
});

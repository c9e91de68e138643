/**
 * The host's operator commands against our agent, as processes: the daemon
 * (unix transport), our agent in hybrid-vsock mode serving its agent API
 * behind `<uds>`, and `lxd-vsock-host exec|state` run as the operator would,
 * through the daemon's admin socket (exec's websockets relayed by the
 * daemon) and, with the daemon stopped, straight to the agent.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { addHybridInstance, bounded, cli, DaemonProcess, tempDir } from "./host_harness.ts";
import { missingProgram, requires } from "../shared/_requires.ts";

const ROOT = new URL("..", import.meta.url).pathname;

function startAgent(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "-P=agent", "agent/main.ts", ...args],
    cwd: ROOT,
    stdin: "null",
    stdout: "null",
    stderr: "piped",
    env: { NO_COLOR: "1" },
  }).spawn();
  let log = "";
  const done = (async () => {
    for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) log += chunk;
  })();
  return {
    log: () => log,
    async listening(): Promise<void> {
      const deadline = Date.now() + 30_000;
      while (!log.includes("agent API listening")) {
        if (Date.now() > deadline) throw new Error(`the agent did not start:\n${log}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    },
    async stop(): Promise<void> {
      try {
        child.kill("SIGTERM");
      } catch {
        // exited
      }
      await bounded(child.status, 15_000, "the agent to exit");
      await done;
    },
  };
}

/** Runs the host CLI with `input` on stdin. */
async function cliWithInput(args: string[], input: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-P=host", "host/main.ts", ...args],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
  }).spawn();
  const writer = child.stdin.getWriter();
  await writer.write(new TextEncoder().encode(input));
  await writer.close();
  const output = await bounded(child.output(), 30_000, `${args.join(" ")}`);
  return {
    code: output.code,
    stdout: new TextDecoder().decode(output.stdout),
    stderr: new TextDecoder().decode(output.stderr),
  };
}

/** Pushes a file with a mode and owner, checks it landed so, pulls it back and checks again. */
async function fileRoundTrip(p: (name: string) => string, sd: string[], tag: string) {
  const root = (await new Deno.Command("id", { args: ["-u"], stdout: "piped" }).output()).stdout;
  const asRoot = new TextDecoder().decode(root).trim() === "0";
  const local = p(`local-${tag}`);
  const content = `pushed ${tag}\n`.repeat(3000);
  await Deno.writeTextFile(local, content);
  await Deno.chmod(local, 0o640);
  const remote = p(`remote-${tag}`);
  const owner = asRoot ? ["--uid", "1234", "--gid", "5678"] : [];
  const push = await cli(["file", "push", local, `vm1${remote}`, ...owner, ...sd]);
  assert.equal(push.code, 0, push.stderr);
  const pushed = await Deno.lstat(remote);
  assert.equal(await Deno.readTextFile(remote), content);
  assert.equal(pushed.mode! & 0o7777, 0o640);
  if (asRoot) assert.deepEqual([pushed.uid, pushed.gid], [1234, 5678]);
  await Deno.chmod(remote, 0o604);
  const back = p(`back-${tag}`);
  const pull = await cli(["file", "pull", `vm1${remote}`, back, ...sd]);
  assert.equal(pull.code, 0, pull.stderr);
  const pulled = await Deno.lstat(back);
  assert.equal(await Deno.readTextFile(back), content);
  assert.equal(pulled.mode! & 0o7777, 0o604);
  if (asRoot) assert.deepEqual([pulled.uid, pulled.gid], [1234, 5678]);
  const missing = await cli(["file", "pull", `vm1${p("no-such-file")}`, p("x"), ...sd]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /Not Found/);
}

Deno.test("host exec/state/file through the daemon and straight to our agent: output, stdin, exit status, PTY, files", async () => {
  await using dir = await tempDir("host-exec-");
  const p = (name: string) => join(dir.path, name);
  const state = p("state");
  const daemon = await DaemonProcess.start(state);
  const hybrid = await addHybridInstance(state, ["--config-drive", p("lxd_agent")]);
  const agent = startAgent([
    `--config-dir=${p("lxd_agent")}`,
    `--serial-port=${p("no-serial")}`,
    `--transport=hybrid:${hybrid}`,
    `--devlxd-socket=${p("dev-lxd/sock")}`,
    `--state-file=${p("run/state.json")}`,
  ]);
  try {
    await agent.listening();
    const sd = ["--state-dir", state];
    // The default working directory is /root (user 0's HOME): "/" also suits an unprivileged run.
    const ex = [...sd, "--cwd", "/"];

    // Through the daemon's admin socket.
    const run = await cli([
      "exec",
      "vm1",
      ...ex,
      "--",
      "sh",
      "-c",
      "echo out; echo err >&2; exit 7",
    ]);
    assert.equal(run.code, 7, run.stderr);
    assert.equal(run.stdout, "out\n");
    assert.match(run.stderr, /err\n/);

    const piped = await cliWithInput(
      ["exec", "vm1", ...ex, "-T", "--", "tr", "a-z", "A-Z"],
      "hello\n",
    );
    assert.equal(piped.code, 0, piped.stderr);
    assert.equal(piped.stdout, "HELLO\n");

    const env = await cli([
      "exec",
      "vm1",
      ...sd,
      "--env",
      "GREETING=hi there",
      "--cwd",
      "/tmp",
      "--",
      "sh",
      "-c",
      'echo "$GREETING in $(pwd)"',
    ]);
    assert.equal(env.stdout, "hi there in /tmp\n", env.stderr);

    // -t without a local terminal: a PTY of the agent's default size (80x25).
    const pty = await cli(["exec", "vm1", ...ex, "-t", "--", "sh", "-c", "stty size; tty"]);
    assert.equal(pty.code, 0, pty.stderr);
    assert.match(pty.stdout, /^25 80\r\n\/dev\/pts\/\d+\r\n$/);

    // A signal the CLI gets goes to the command (as lxc exec forwards it).
    const trapped = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-P=host",
        "host/main.ts",
        "exec",
        "vm1",
        ...ex,
        "--",
        "sh",
        "-c",
        'trap "echo got-term; exit 9" TERM; echo ready; while :; do sleep 0.05; done',
      ],
      cwd: ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
    }).spawn();
    const reader = trapped.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let seen = "";
    while (!seen.includes("ready")) {
      const { value, done } = await bounded(reader.read(), 30_000, "the trapping command");
      if (done) throw new Error(`exec ended before ready: ${seen}`);
      seen += value;
    }
    trapped.kill("SIGTERM");
    for (;;) {
      const { value, done } = await bounded(reader.read(), 30_000, "got-term");
      if (done) break;
      seen += value;
    }
    const trappedStatus = await bounded(trapped.status, 30_000, "the exec to end");
    await trapped.stderr.cancel();
    assert.match(seen, /got-term/);
    assert.equal(trappedStatus.code, 9);

    const missing = await cli(["exec", "vm1", ...ex, "--", "no-such-command-xyz"]);
    assert.equal(missing.code, 127);

    const json = await cli(["state", "vm1", ...sd, "--format", "json"]);
    assert.equal(json.code, 0, json.stderr);
    const st = JSON.parse(json.stdout);
    assert.ok(st.processes > 1);
    assert.equal(st.network.lo.type, "loopback");
    const table = await cli(["state", "vm1", ...sd]);
    assert.match(table.stdout, /Processes: +\d+/);
    assert.match(table.stdout, /inet 127\.0\.0\.1\/8 local/);

    // `instance list` shows the first IPv4 address the agent reports, as `lxc list` does.
    const links = JSON.parse(
      new TextDecoder().decode(
        (await new Deno.Command("ip", { args: ["-j", "addr"], stdout: "piped" }).output()).stdout,
      ),
    ) as { ifname: string; link_type: string; addr_info: { family: string; local: string }[] }[];
    const expected = links.filter((l) =>
      l.link_type !== "loopback"
    ).flatMap((l) =>
      l.addr_info.filter((a) =>
        a.family === "inet" && !a.local.startsWith("127") && !a.local.startsWith("169.254")
      ).map((a) => `${a.local} (${l.ifname})`)
    ).sort().reverse()[0] ?? "-";
    const list = await cli(["instance", "list", ...sd]);
    assert.match(list.stdout, /IPV4/);
    assert.ok(list.stdout.split("\n")[1].trimEnd().endsWith(expected), list.stdout);

    // file push/pull through the daemon: content, mode and owner round-trip.
    await fileRoundTrip(p, sd, "daemon");

    const unknown = await cli(["exec", "vm2", ...sd, "--", "true"]);
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /vm2/);

    // Without a daemon: the CLI dials the agent itself.
    await daemon.stop();
    const direct = await cli(["exec", "vm1", ...ex, "--", "sh", "-c", "echo direct; exit 3"]);
    assert.equal(direct.code, 3, direct.stderr);
    assert.equal(direct.stdout, "direct\n");
    const directState = await cli(["state", "vm1", ...sd, "--format", "json"]);
    assert.equal(directState.code, 0, directState.stderr);
    await fileRoundTrip(p, sd, "direct");
  } finally {
    await agent.stop();
    await daemon[Symbol.asyncDispose]();
  }
});

Deno.test(requires(missingProgram("script", "it gives the CLI a real terminal"), {
  name: "host exec from a terminal: a PTY of the terminal's size, chosen without -t",
  async fn() {
    await using dir = await tempDir("host-exec-tty-");
    const p = (name: string) => join(dir.path, name);
    const state = p("state");
    const daemon = await DaemonProcess.start(state);
    const hybrid = await addHybridInstance(state, ["--config-drive", p("lxd_agent")]);
    const agent = startAgent([
      `--config-dir=${p("lxd_agent")}`,
      `--serial-port=${p("no-serial")}`,
      `--transport=hybrid:${hybrid}`,
      `--devlxd-socket=${p("dev-lxd/sock")}`,
      `--state-file=${p("run/state.json")}`,
    ]);
    try {
      await agent.listening();
      // From a real terminal (script(1) gives the CLI one): a PTY of the terminal's size, auto-detected.
      const deno = Deno.execPath();
      const line = `stty cols 101 rows 31; ${deno} run -q -P=host host/main.ts exec vm1 ` +
        `--state-dir ${state} --cwd / -- sh -c 'stty size; tty; exit 4'`;
      const out = await bounded(
        new Deno.Command("script", {
          args: ["-qefc", line, "/dev/null"],
          cwd: ROOT,
          stdin: "null",
          stdout: "piped",
          stderr: "piped",
          env: { NO_COLOR: "1", DENO_NO_UPDATE_CHECK: "1" },
        }).output(),
        30_000,
        "exec from a terminal",
      );
      const text = new TextDecoder().decode(out.stdout);
      assert.equal(out.code, 4, text);
      assert.match(text, /31 101\r*\n/);
      assert.match(text, /\/dev\/pts\/\d+/);
    } finally {
      await agent.stop();
      await daemon[Symbol.asyncDispose]();
    }
  },
}));

import assert from "node:assert/strict";
import { requires } from "../_requires.ts";
import { exitStatus, resolveCommand, SIGNALS, spawnChild, SpawnError } from "./child.ts";
import type { FdStream } from "./fd_stream.ts";
import { getuid } from "../vsock/_libc.ts";

const ENV = { PATH: "/usr/local/bin:/usr/bin:/bin", LANG: "C" };

async function readAll(stream: FdStream): Promise<string> {
  const buf = new Uint8Array(4096);
  let text = "";
  for (;;) {
    const n = await stream.read(buf);
    if (n === null) return text;
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
}

Deno.test("exitStatus() gives the exit code, or 128 + the signal", () => {
  assert.equal(exitStatus(3 << 8), 3);
  assert.equal(exitStatus(9), 137);
  assert.equal(exitStatus(0), 0);
});

Deno.test("resolveCommand() searches the given PATH: 127 when missing, 126 when not executable", () => {
  assert.equal(resolveCommand("sh", "/nonexistent:/bin"), "/bin/sh");
  assert.throws(
    () => resolveCommand("no-such-command-xyz", "/bin"),
    (e) => e instanceof SpawnError && e.status === 127,
  );
  const plain = Deno.makeTempFileSync();
  try {
    Deno.chmodSync(plain, 0o644);
    assert.throws(
      () => resolveCommand(plain, "/bin"),
      (e) => e instanceof SpawnError && e.status === 126,
    );
  } finally {
    Deno.removeSync(plain);
  }
});

Deno.test("spawnChild() on pipes: stdin in, stdout and stderr apart, exact env and cwd, exit code", async () => {
  const child = spawnChild({
    command: ["sh", "-c", 'cat; echo "err $FOO" >&2; pwd; env | sort; exit 7'],
    env: { ...ENV, FOO: "bar" },
    cwd: "/tmp",
  });
  try {
    await child.stdin!.write(new TextEncoder().encode("hello\n"));
    child.stdin!.close();
    const [out, err, status] = await Promise.all([
      readAll(child.stdout!),
      readAll(child.stderr!),
      child.status,
    ]);
    const lines = out.split("\n");
    assert.equal(lines[0], "hello");
    assert.equal(lines[1], "/tmp");
    assert.ok(lines.includes("FOO=bar"));
    assert.ok(!lines.some((l) => l.startsWith("HOME=")), "only the given environment");
    assert.equal(err, "err bar\n");
    assert.equal(status, 7);
  } finally {
    child.close();
  }
});

Deno.test("spawnChild() makes the child a session leader, and kill() ends it with 128 + signal", async () => {
  const child = spawnChild({ command: ["sh", "-c", "ps -o sid= -p $$; exec sleep 60"], env: ENV });
  try {
    const buf = new Uint8Array(64);
    const n = await child.stdout!.read(buf);
    assert.equal(Number(new TextDecoder().decode(buf.subarray(0, n!)).trim()), child.pid);
    assert.ok(child.kill(SIGNALS.SIGTERM));
    assert.equal(await child.status, 128 + SIGNALS.SIGTERM);
    assert.equal(child.kill(), false, "a reaped child is not signalled again");
  } finally {
    child.close();
  }
});

Deno.test("spawnChild() throws SpawnError 127 for a missing command and a missing cwd", () => {
  assert.throws(
    () => spawnChild({ command: ["no-such-command-xyz"], env: ENV }),
    (e) => e instanceof SpawnError && e.status === 127,
  );
  assert.throws(
    () => spawnChild({ command: ["true"], env: ENV, cwd: "/no/such/dir" }),
    (e) => e instanceof SpawnError && e.status === 127,
  );
});

Deno.test(requires(getuid() === 0 ? undefined : "not root (it runs a command as another user)", {
  name: "spawnChild() runs a command as another uid/gid through setpriv",
  async fn() {
    const child = spawnChild({
      command: ["sh", "-c", "id -u; id -g; id -G"],
      env: ENV,
      uid: 65534,
      gid: 65534,
    });
    try {
      const out = await readAll(child.stdout!);
      assert.deepEqual(out.trim().split("\n"), ["65534", "65534", "65534"]);
      assert.equal(await child.status, 0);
    } finally {
      child.close();
    }
  },
}));

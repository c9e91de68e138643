import assert from "node:assert/strict";
import { spawnChild } from "./child.ts";
import type { FdStream } from "./fd_stream.ts";
import { Pty } from "./pty.ts";

const ENV = { PATH: "/usr/local/bin:/usr/bin:/bin", TERM: "dumb", LANG: "C" };

/** Reads `stream` until the text read so far matches `pattern` (bounded by `ms`). */
async function readUntil(stream: FdStream, pattern: RegExp, ms = 5000): Promise<string> {
  let text = "";
  const buf = new Uint8Array(4096);
  const deadline = Date.now() + ms;
  while (!pattern.test(text)) {
    const left = deadline - Date.now();
    if (left <= 0) throw new Error(`Timed out waiting for ${pattern}; got ${JSON.stringify(text)}`);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const n = await Promise.race([
      stream.read(buf),
      new Promise<"timeout">((resolve) => timer = setTimeout(() => resolve("timeout"), left)),
    ]);
    clearTimeout(timer);
    if (n === "timeout") continue;
    if (n === null) throw new Error(`EOF before ${pattern}; got ${JSON.stringify(text)}`);
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  return text;
}

Deno.test("Pty: sh on a PTY reports its size with stty, sees a resize, and owns /dev/tty", async () => {
  using pty = Pty.open({ size: { cols: 80, rows: 25 } });
  const child = spawnChild({ command: ["sh"], env: ENV, pty });
  try {
    await pty.master.write(new TextEncoder().encode("stty size; echo ctty-$(tty)\n"));
    const first = await readUntil(pty.master, /ctty-\/dev/);
    assert.match(first, /25 80\r?\n/);
    assert.match(first, new RegExp(`ctty-${pty.path}`));
    pty.resize({ cols: 132, rows: 43 });
    assert.deepEqual(pty.size(), { cols: 132, rows: 43 });
    await pty.master.write(
      new TextEncoder().encode('stty size; echo hi >/dev/tty && echo do""ne\n'),
    );
    const second = await readUntil(pty.master, /done\r?\n/);
    assert.match(second, /43 132\r?\n/);
    await pty.master.write(new TextEncoder().encode("exit 3\n"));
    assert.equal(await child.status, 3);
  } finally {
    child.kill();
    await child.status;
  }
});

Deno.test("Pty: the child is a session leader and the PTY its controlling terminal", async () => {
  using pty = Pty.open();
  const child = spawnChild({
    command: ["sh", "-c", 'echo "pid=$$ $(ps -o sid=,tpgid=,tty= -p $$)"'],
    env: ENV,
    pty,
  });
  const text = await readUntil(pty.master, /pid=\d+\s+\d+\s+\d+\s+\S+/);
  const [, pid, sid, tpgid] = /pid=(\d+)\s+(\d+)\s+(\d+)/.exec(text)!;
  assert.equal(Number(pid), child.pid);
  assert.equal(Number(sid), child.pid, "setsid: the child leads its session");
  assert.equal(Number(tpgid), child.pid, "it is the terminal's foreground process group");
  assert.equal(await child.status, 0);
});

Deno.test("Pty.resize() rejects sizes outside a terminal's range", () => {
  using pty = Pty.open();
  assert.throws(() => pty.resize({ cols: -1, rows: 2 }), RangeError);
  assert.throws(() => pty.resize({ cols: 1.5, rows: 2 }), TypeError);
});

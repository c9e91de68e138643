import assert from "node:assert/strict";
import { notifySystemd } from "./systemd_notify.ts";
import { within } from "./_testing.ts";
import { missingProgram, requires } from "../shared/_requires.ts";

Deno.test("notifySystemd() without NOTIFY_SOCKET does nothing and says so", () => {
  assert.equal(notifySystemd("READY=1", undefined), false);
  assert.equal(notifySystemd("READY=1", ""), false);
});

// A datagram receiver: python3 (Deno has no stable unix datagram API).
const noPython = missingProgram("python3", "it receives the datagram");

Deno.test(
  requires(noPython, {
    name: "notifySystemd() sends READY=1 as one datagram to the notify socket",
  }),
  async () => {
    const dir = await Deno.makeTempDir();
    const path = `${dir}/notify`;
    const child = new Deno.Command("python3", {
      args: [
        "-c",
        "import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\n" +
        "print('bound',flush=True)\nprint(s.recv(100).decode(),flush=True)",
        path,
      ],
      stdout: "piped",
    }).spawn();
    try {
      const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
      let out = "";
      while (!out.includes("bound\n")) out += (await within(reader.read(), "python to bind")).value;
      assert.equal(notifySystemd("READY=1", path), true);
      while (!out.includes("READY=1\n")) {
        const { value, done } = await within(reader.read(), "the datagram");
        if (done) break;
        out += value;
      }
      assert.match(out, /READY=1\n/);
      reader.releaseLock();
      assert.equal((await child.status).success, true);
    } finally {
      try {
        child.kill();
      } catch {
        // already exited
      }
      await child.stdout.cancel().catch(() => {});
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("notifySystemd() names the socket when nobody listens there", async () => {
  const dir = await Deno.makeTempDir();
  try {
    assert.throws(() => notifySystemd("READY=1", `${dir}/none`), /none.*connect\(\)/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

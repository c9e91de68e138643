/**
 * The whole system on one machine, as three processes: the host daemon, our
 * agent (hybrid-vsock mode, as under Firecracker), and this test playing the
 * VMM (relaying the socket-backed virtio-serial port between guest and host)
 * and a guest process on /dev/lxd/sock. Exercises: serial STARTED → host
 * announce (PUT /1.0 via `<uds>` + CONNECT 8443) → agent validates and
 * writes CONNECTED; devlxd requests proxied to the host; a config change on
 * the host reaching a guest's /1.0/events stream; PATCH Ready stored on the
 * host; STOPPED on agent shutdown.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { addHybridInstance, bounded, cliOk, DaemonProcess, tempDir } from "./host_harness.ts";
import { SerialRelay } from "./serial_relay.ts";
import { runFlags } from "./deno_tasks.ts";

const ROOT = new URL("..", import.meta.url).pathname;

/** Our agent as a child process, with the `agent` permission set. */
function startAgent(args: string[]) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", ...runFlags("agent"), "agent/main.ts", ...args],
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
    child,
    log: () => log,
    async stop(): Promise<number> {
      try {
        child.kill("SIGTERM");
      } catch {
        // exited
      }
      const status = await bounded(child.status, 15_000, "the agent to exit");
      await done;
      return status.code;
    },
  };
}

/**
 * The host daemon with vm1 (hybrid, socket-backed serial port relayed by this
 * test, config drive in `lxd_agent`) and our agent on it; `extra` goes to
 * `instance add`, `agentArgs` to the agent.
 */
async function hostWithAgent(dir: string, extra: string[], agentArgs: string[]) {
  const p = (name: string) => join(dir, name);
  const relay = new SerialRelay(p("host-serial.sock"), p("guest-serial.sock"));
  const daemon = await DaemonProcess.start(p("state"));
  const hybrid = await addHybridInstance(p("state"), [
    "--serial",
    p("host-serial.sock"),
    "--config-drive",
    p("lxd_agent"),
    ...extra,
  ]);
  const agent = startAgent([
    `--config-dir=${p("lxd_agent")}`,
    `--serial-port=${p("guest-serial.sock")}`,
    `--transport=hybrid:${hybrid}`,
    `--devlxd-socket=${p("dev-lxd/sock")}`,
    `--state-file=${p("run/state.json")}`,
    ...agentArgs,
  ]);
  return {
    p,
    daemon,
    agent,
    async [Symbol.asyncDispose]() {
      await daemon[Symbol.asyncDispose]();
      await relay[Symbol.asyncDispose]();
    },
  };
}

Deno.test("host daemon and our agent: announce, CONNECTED, devlxd proxied, events, Ready, STOPPED", async () => {
  await using dir = await tempDir("host-e2e-");
  await using w = await hostWithAgent(dir.path, ["-c", "user.foo=bar"], [
    "--rewrite-interval=200ms",
    "--log-level=debug",
  ]);
  const { p, daemon, agent } = w;
  try {
    await daemon.waitFor(/msg="agent state" .*instance=vm1 state=CONNECTED/, 30_000);

    // A guest process on /dev/lxd/sock: bare devlxd answers, proxied to the host.
    const client = Deno.createHttpClient({ proxy: { transport: "unix", path: p("dev-lxd/sock") } });
    try {
      const devlxd = (path: string, init: RequestInit = {}) =>
        bounded(fetch(`http://localhost${path}`, { ...init, client }), 15_000, `devlxd ${path}`);
      const value = await devlxd("/1.0/config/user.foo");
      assert.equal(value.status, 200);
      assert.equal(await value.text(), "bar");
      const info = await (await devlxd("/1.0")).json();
      assert.equal(info.instance_type, "virtual-machine");

      const events = await devlxd("/1.0/events?type=config");
      assert.equal(events.status, 200);
      const reader = events.body!.pipeThrough(new TextDecoderStream()).getReader();
      // The change is made once the agent follows the host's stream or can take a push.
      await cliOk(["config", "set", "vm1", "user.foo", "baz", "--state-dir", p("state")]);
      let text = "";
      while (!text.includes("\n")) {
        const { value, done } = await bounded(
          reader.read(),
          15_000,
          "the config event in the guest",
        );
        assert.equal(done, false);
        text += value;
      }
      const event = JSON.parse(text.trim().split("\n")[0]);
      assert.equal(event.type, "config");
      assert.deepEqual(event.metadata, { key: "user.foo", old_value: "bar", value: "baz" });
      await reader.cancel();

      const ready = await devlxd("/1.0", {
        method: "PATCH",
        body: JSON.stringify({ state: "Ready" }),
      });
      assert.equal(ready.status, 200);
      await ready.body?.cancel();
      const list = JSON.parse(
        await cliOk(["instance", "list", "--format", "json", "--state-dir", p("state")]),
      );
      assert.equal(list[0].runtime.ready, true);
      assert.equal(list[0].runtime.agentState, "CONNECTED");
    } finally {
      client.close();
    }
  } finally {
    assert.equal(await agent.stop(), 0, agent.log());
  }
  await daemon.waitFor(/msg="agent state" .*instance=vm1 state=STOPPED/, 15_000);
});

Deno.test("host daemon and our agent: a burst of 64 concurrent guest requests is answered in full (the agent sets up its host connections a few at a time, within the host's bound on a peer's pending handshakes)", async () => {
  await using dir = await tempDir("host-e2e-burst-");
  await using w = await hostWithAgent(dir.path, [], []);
  const { p, daemon, agent } = w;
  try {
    await daemon.waitFor(/msg="agent state" .*instance=vm1 state=CONNECTED/, 30_000);
    const client = Deno.createHttpClient({ proxy: { transport: "unix", path: p("dev-lxd/sock") } });
    try {
      const statuses = await Promise.all(Array.from({ length: 64 }, async () => {
        const response = await bounded(
          fetch("http://localhost/1.0", { client }),
          60_000,
          "a guest request of the burst",
        );
        const text = await response.text();
        return response.status === 200 ? 200 : `${response.status} ${text.slice(0, 200)}`;
      }));
      const failed = statuses.filter((s) => s !== 200);
      assert.deepEqual(failed, [], `${failed.length} of 64 failed`);
    } finally {
      client.close();
    }
  } finally {
    assert.equal(await agent.stop(), 0, agent.log().slice(-2000));
  }
});

/**
 * The whole coordination cycle on one machine, as processes: the host daemon
 * (`-P=host`, unix transport) and three of our agents (`-P=agent`, hybrid
 * vsock), each with its own `<uds>`, config drive and socket-backed serial
 * port (a `SerialRelay` standing in for QEMU's chardev). Every step is
 * asserted through what the programs show — the serial lines the agents
 * write, the daemon's log, `status` and `instance list`, the agents'
 * `--status --format json`, and guest requests on `/dev/lxd/sock` — and
 * waited for with a bound, never a fixed sleep. Prints the time from a host
 * restart to every agent CONNECTED again; asserts nothing about it.
 * Needs the `test` permission set.
 * @module
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { Registry } from "../host/registry.ts";
import { bounded, cliOk, DaemonProcess, tempDir } from "./host_harness.ts";
import { type AgentPaths, AgentProcess, devlxd, runAgentCommand } from "./agent_harness.ts";
import { SerialRelay } from "./serial_relay.ts";

/** Bound on each awaited step; the periods involved are 200 ms to 3 s. */
const STEP_MS = 20_000;

/** One VM: its paths, its serial relay and its current agent process. */
interface Guest {
  name: string;
  /** `user.x` on the host, what a guest request must read back. */
  value: string;
  paths: AgentPaths;
  relay: SerialRelay;
  agent?: AgentProcess;
  /** stderr of this guest's earlier agent processes. */
  pastLogs: string[];
}

/** `lxd-vsock-agent --status --format json`: what an operator in the guest sees. */
interface AgentStatusJson {
  running: boolean;
  state?: string;
  host?: { cid: number; port: number } | null;
  hostSource?: string | null;
  ready?: boolean;
  devlxd?: { serving: boolean };
}

/**
 * A state directory with `count` instances, their relays, and the daemon
 * and agent processes started on it; disposing kills and removes them all.
 */
class Fleet implements AsyncDisposable {
  readonly guests: Guest[] = [];
  /** Every daemon started, oldest first (for the logs on failure). */
  readonly daemons: DaemonProcess[] = [];
  #dir: { path: string } & AsyncDisposable;

  private constructor(dir: { path: string } & AsyncDisposable) {
    this.#dir = dir;
  }

  /** Registers `count` hybrid instances (no daemon yet) with a relay each. */
  static async create(count: number): Promise<Fleet> {
    const fleet = new Fleet(await tempDir("coordination-cycle-"));
    try {
      for (let i = 1; i <= count; i++) {
        const name = `vm${i}`;
        const dir = join(fleet.#dir.path, name);
        await Deno.mkdir(dir);
        const paths: AgentPaths = {
          dir,
          configDir: join(dir, "lxd_agent"),
          uds: join(dir, "v.sock"),
          serial: join(dir, "serial-guest.sock"),
          devlxdSocket: join(dir, "dev-lxd", "sock"),
          stateFile: join(dir, "run", "state.json"),
        };
        const relay = new SerialRelay(join(dir, "serial-host.sock"), paths.serial);
        const guest: Guest = { name, value: `value-of-${name}`, paths, relay, pastLogs: [] };
        fleet.guests.push(guest);
        await cliOk([
          ...["instance", "add", name, "--state-dir", fleet.stateDir, "--cid", String(2 + i)],
          ...["--serial", relay.hostPath, "--hybrid", paths.uds],
          ...["--config-drive", paths.configDir, "-c", `user.x=${guest.value}`],
        ]);
      }
    } catch (error) {
      await fleet[Symbol.asyncDispose]();
      throw error;
    }
    return fleet;
  }

  get stateDir(): string {
    return join(this.#dir.path, "state");
  }

  /** The daemon started last. */
  get daemon(): DaemonProcess {
    const daemon = this.daemons.at(-1);
    if (daemon === undefined) throw new Error("No daemon started");
    return daemon;
  }

  /** Starts a daemon (with `extra` flags such as `--port N`) and waits until it listens. */
  async startDaemon(extra: string[] = []): Promise<DaemonProcess> {
    const daemon = await DaemonProcess.start(this.stateDir, extra);
    this.daemons.push(daemon);
    return daemon;
  }

  /** Starts (or restarts) the agent of `guest`. */
  startAgent(guest: Guest): AgentProcess {
    if (guest.agent !== undefined) guest.pastLogs.push(guest.agent.stderr);
    guest.agent = AgentProcess.start(guest.paths);
    return guest.agent;
  }

  /** Every process's log, for a failure report. */
  logs(): string {
    const parts = this.daemons.map((d, i) =>
      `--- daemon #${i + 1} (port ${d.port})\n${d.lines.join("\n")}`
    );
    for (const g of this.guests) {
      g.pastLogs.forEach((log, i) => parts.push(`--- agent ${g.name} (process #${i + 1})\n${log}`));
      parts.push(`--- agent ${g.name} (current)\n${g.agent?.stderr ?? "(not started)"}`);
      parts.push(`--- serial lines of ${g.name}: ${g.relay.guestLines.join(" ")}`);
    }
    return parts.join("\n");
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const g of this.guests) await g.agent?.[Symbol.asyncDispose]();
    for (const d of this.daemons) await d[Symbol.asyncDispose]();
    for (const g of this.guests) await g.relay.close();
    await this.#dir[Symbol.asyncDispose]();
  }
}

/** Runs `body` on a fresh fleet of `count`; on failure prints every process's log. */
async function withFleet(count: number, body: (fleet: Fleet) => Promise<void>): Promise<void> {
  await using fleet = await Fleet.create(count);
  try {
    await body(fleet);
  } catch (error) {
    console.error(fleet.logs());
    throw error;
  }
}

/** Polls `check` (every 25 ms) until it returns a value other than undefined/false. */
async function until<T>(
  check: () => T | undefined | false | Promise<T | undefined | false>,
  what: string,
  ms = STEP_MS,
): Promise<T> {
  const deadline = performance.now() + ms;
  for (;;) {
    const value = await check();
    if (value !== undefined && value !== false) return value;
    if (performance.now() > deadline) {
      throw new Error(`Timed out after ${ms} ms waiting for ${what}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The first line of `daemon`'s log at or after index `from` matching `re`. */
function daemonLine(daemon: DaemonProcess, re: RegExp, from = 0, ms = STEP_MS): Promise<string> {
  return until(() => daemon.lines.slice(from).find((l) => re.test(l)), `daemon log ${re}`, ms);
}

/** Waits for an agent log line matching `re` in its stderr after offset `from`. */
async function agentLine(agent: AgentProcess, re: RegExp, from = 0): Promise<void> {
  await agent.changed.until(() => re.test(agent.stderr.slice(from)), `agent log ${re}`, STEP_MS);
}

/** `lxd-vsock-agent --status --format json` for `guest`, with its exit code. */
async function agentStatus(guest: Guest): Promise<{ code: number; status: AgentStatusJson }> {
  const out = await runAgentCommand([
    "--status",
    "--format",
    "json",
    `--state-file=${guest.paths.stateFile}`,
  ]);
  return { code: out.code, status: JSON.parse(out.stdout) };
}

/**
 * Asserts the agent of `guest` reports CONNECTED to vsock 2:`port`, ready as
 * given, with the address from one of `sources`.
 */
async function assertAgentConnected(
  guest: Guest,
  port: number,
  ready: boolean,
  sources = ["PUT /1.0", "serial"],
): Promise<void> {
  const { code, status } = await agentStatus(guest);
  assert.equal(code, 0, `${guest.name} --status: ${JSON.stringify(status)}`);
  assert.equal(status.running, true);
  assert.equal(status.state, "CONNECTED");
  assert.deepEqual({ cid: status.host?.cid, port: status.host?.port }, { cid: 2, port });
  // By default the address came from the host's announce (PUT /1.0 or the serial
  // CONNECT line), not from the config drive.
  assert.ok(
    sources.includes(status.hostSource ?? ""),
    `${guest.name} host source ${status.hostSource}, not one of ${sources.join(", ")}`,
  );
  assert.equal(status.ready, ready, `${guest.name} ready`);
  assert.equal(status.devlxd?.serving, true);
}

/** `instance list --format json`, by name. */
async function instances(
  fleet: Fleet,
): Promise<Map<string, { runtime: { agentState: string; ready: boolean } }>> {
  const list = JSON.parse(
    await cliOk(["instance", "list", "--format", "json", "--state-dir", fleet.stateDir]),
  ) as { name: string; runtime: { agentState: string; ready: boolean } }[];
  return new Map(list.map((i) => [i.name, i]));
}

/** The daemon's `status --format json`. */
interface DaemonStatusJson {
  running: boolean;
  port: number;
  hybridListeners: Record<string, string>;
  monitor: { name: string; agentState: string; announcedPort?: number; channelUp: boolean }[];
}

async function daemonStatus(fleet: Fleet): Promise<DaemonStatusJson> {
  return JSON.parse(await cliOk(["status", "--format", "json", "--state-dir", fleet.stateDir]));
}

/** `status` shows the host on `port`, every guest CONNECTED and announced there, and its listener. */
async function assertStatusConnected(fleet: Fleet, port: number): Promise<void> {
  const status = await daemonStatus(fleet);
  assert.equal(status.port, port);
  for (const g of fleet.guests) {
    const m = status.monitor.find((m) => m.name === g.name);
    assert.equal(m?.agentState, "CONNECTED", g.name);
    assert.equal(m?.announcedPort, port, g.name);
    assert.equal(status.hybridListeners[g.name], `${g.paths.uds}_${port}`);
  }
}

/** A guest process's request on /dev/lxd/sock, bounded. */
async function guestGet(guest: Guest, path: string): Promise<{ status: number; text: string }> {
  const response = await bounded(devlxd(guest.paths.devlxdSocket, path), STEP_MS, `GET ${path}`);
  return { status: response.status, text: await response.text() };
}

/** Waits until the host has announced `port` to every guest and each is CONNECTED with it. */
async function allConnected(fleet: Fleet, port: number, from: number[]): Promise<void> {
  await Promise.all(fleet.guests.map(async (g, i) => {
    await agentLine(
      g.agent!,
      new RegExp(`msg="connected to the host" cid=2 port=${port}\\b`),
      from[i],
    );
  }));
}

/** Two distinct ports for `<uds>_<port>` paths (free: the paths are in this test's directory). */
function twoPorts(): [number, number] {
  const first = 20_000 + Math.floor(Math.random() * 40_000);
  return [first, first + 1 + Math.floor(Math.random() * 1000)];
}

Deno.test("three agents and the host daemon: STARTED, announce, CONNECTED, guest request, host restart on a new port with Ready kept, agent kill -9 and restart", async () => {
  await withFleet(3, async (fleet) => {
    const [port1, port2] = twoPorts();

    // 1. The agents start before any host: each writes STARTED on its serial port.
    for (const g of fleet.guests) fleet.startAgent(g);
    for (const g of fleet.guests) {
      await g.relay.waitForGuestLine("STARTED", { timeout: STEP_MS });
      const { code, status } = await agentStatus(g);
      assert.equal(code, 1, `${g.name} is not CONNECTED without a host`);
      assert.equal(status.state, "STARTED");
    }

    // 2. The host starts on port1, reads STARTED on each serial port and announces itself.
    const daemon1 = await fleet.startDaemon(["--port", String(port1)]);
    assert.equal(daemon1.port, port1);
    for (const g of fleet.guests) {
      await daemonLine(
        daemon1,
        new RegExp(`msg="announced" .*instance=${g.name} .*port=${port1}\\b`),
      );
    }

    // 3. Each agent validates the address and writes CONNECTED; the host sees it.
    for (const g of fleet.guests) {
      const started = g.relay.guestLines.indexOf("STARTED");
      await g.relay.waitForGuestLine("CONNECTED", { from: started, timeout: STEP_MS });
      await daemonLine(
        daemon1,
        new RegExp(`msg="agent state" .*instance=${g.name} state=CONNECTED`),
      );
      await assertAgentConnected(g, port1, false);
    }
    await assertStatusConnected(fleet, port1);

    // 4. A guest request through /dev/lxd/sock is served by the host, and Ready is stored.
    for (const g of fleet.guests) {
      assert.deepEqual(await guestGet(g, "/1.0/config/user.x"), { status: 200, text: g.value });
      const ready = await bounded(
        devlxd(g.paths.devlxdSocket, "/1.0", {
          method: "PATCH",
          body: JSON.stringify({ state: "Ready" }),
        }),
        STEP_MS,
        "PATCH /1.0",
      );
      assert.equal(ready.status, 200, await ready.text());
    }
    for (const [name, i] of await instances(fleet)) {
      assert.equal(i.runtime.agentState, "CONNECTED", name);
      assert.equal(i.runtime.ready, true, name);
    }
    for (const g of fleet.guests) await assertAgentConnected(g, port1, true);

    // 5. The host stops; Ready is cleared in its store (as LXD forgets it), and it
    // restarts on port2. Each agent is announced to again, reaches the new port,
    // and re-sends Ready.
    assert.equal((await daemon1.stop("SIGTERM")).code, 0);
    {
      using registry = Registry.open(join(fleet.stateDir, "registry.db"));
      for (const g of fleet.guests) registry.updateRuntime(g.name, { ready: false });
    }
    for (const [name, i] of await instances(fleet)) assert.equal(i.runtime.ready, false, name);
    const logFrom = fleet.guests.map((g) => g.agent!.stderr.length);
    const spawnedAt = performance.now();
    const daemon2 = await fleet.startDaemon(["--port", String(port2)]);
    const listeningAt = performance.now();
    assert.equal(daemon2.port, port2);
    await allConnected(fleet, port2, logFrom);
    const connectedAt = performance.now();
    console.log(
      `host restart → ${fleet.guests.length} agents CONNECTED: ${
        (connectedAt - listeningAt).toFixed(0)
      } ms (from "listening"; ${(connectedAt - spawnedAt).toFixed(0)} ms from the process start)`,
    );
    for (const g of fleet.guests) {
      // Our agent reads the CONNECT line on its (bidirectional) serial channel and
      // reaches the new port by itself: no PUT /1.0, one TLS handshake (its own).
      await daemonLine(
        daemon2,
        new RegExp(`msg="announced" .*instance=${g.name} .*port=${port2}\\b.*via="CONNECT line"`),
      );
      await daemonLine(daemon2, new RegExp(`msg="ready changed" .*instance=${g.name} ready=true`));
      await assertAgentConnected(g, port2, true);
    }
    await assertStatusConnected(fleet, port2);
    for (const [name, i] of await instances(fleet)) {
      assert.equal(i.runtime.agentState, "CONNECTED", name);
      assert.equal(i.runtime.ready, true, name);
    }
    for (const g of fleet.guests) {
      assert.deepEqual(await guestGet(g, "/1.0/config/user.x"), { status: 200, text: g.value });
    }

    // 6. One agent is killed -9 (no STOPPED) and restarted: the daemon rewrote its
    // config drive with port2 when it started, so the agent reaches port2 from
    // agent.conf by itself (whether or not the host re-announces meanwhile).
    const victim = fleet.guests[1];
    const serialFrom = victim.relay.guestLines.length;
    victim.agent!.child.kill("SIGKILL");
    const killed = await bounded(victim.agent!.child.status, STEP_MS, "the agent to die");
    assert.equal(killed.signal, "SIGKILL");
    await victim.agent![Symbol.asyncDispose]();
    assert.ok(
      !victim.relay.guestLines.slice(serialFrom).includes("STOPPED"),
      "a killed agent writes no STOPPED",
    );
    const restarted = fleet.startAgent(victim);
    const startedLine = await victim.relay.waitForGuestLine("STARTED", {
      from: serialFrom,
      timeout: STEP_MS,
    });
    await agentLine(
      restarted,
      new RegExp(`msg="connection info from agent.conf" cid=2 port=${port2}\\b`),
    );
    await agentLine(restarted, new RegExp(`msg="connected to the host" cid=2 port=${port2}\\b`));
    await victim.relay.waitForGuestLine("CONNECTED", { from: startedLine, timeout: STEP_MS });
    // The guest's Ready survives the agent's restart (kept beside its state file).
    await assertAgentConnected(victim, port2, true, ["agent.conf", "PUT /1.0", "serial"]);
    assert.deepEqual(await guestGet(victim, "/1.0/config/user.x"), {
      status: 200,
      text: victim.value,
    });
    for (const g of fleet.guests.filter((g) => g !== victim)) {
      await assertAgentConnected(g, port2, true);
    }

    for (const g of fleet.guests) assert.equal(await g.agent!.stop(), 0, g.agent!.stderr);
  });
});

Deno.test("a host restarted on its default port (the last one) keeps three agents CONNECTED and served", async () => {
  await withFleet(3, async (fleet) => {
    const daemon1 = await fleet.startDaemon();
    for (const g of fleet.guests) fleet.startAgent(g);
    for (const g of fleet.guests) {
      await daemonLine(
        daemon1,
        new RegExp(`msg="agent state" .*instance=${g.name} state=CONNECTED`),
      );
      await agentLine(
        g.agent!,
        new RegExp(`msg="connected to the host" cid=2 port=${daemon1.port}\\b`),
      );
      const ready = await bounded(
        devlxd(g.paths.devlxdSocket, "/1.0", {
          method: "PATCH",
          body: JSON.stringify({ state: "Ready" }),
        }),
        STEP_MS,
        "PATCH /1.0",
      );
      assert.equal(ready.status, 200, await ready.text());
    }

    assert.equal((await daemon1.stop("SIGTERM")).code, 0);
    const daemon2 = await fleet.startDaemon();
    const listeningAt = performance.now();
    assert.equal(daemon2.port, daemon1.port, "no --port: the last port, still free");

    // Whether or not an agent noticed the gap, each serves guests through the new daemon.
    for (const g of fleet.guests) {
      await until(async () => {
        const r = await guestGet(g, "/1.0/config/user.x");
        return r.status === 200 && r.text === g.value;
      }, `a guest request of ${g.name} served after the restart`);
    }
    await until(async () => {
      const statuses = await Promise.all(fleet.guests.map(agentStatus));
      return statuses.every(({ code, status }) =>
        code === 0 && status.host?.port === daemon2.port && status.ready === true
      );
    }, "every agent CONNECTED to the same port, ready");
    console.log(
      `host restart on the same port → ${fleet.guests.length} agents serving and CONNECTED: ${
        (performance.now() - listeningAt).toFixed(0)
      } ms (includes the guest requests and --status runs that check it)`,
    );
    for (const [name, i] of await instances(fleet)) {
      assert.equal(i.runtime.agentState, "CONNECTED", name);
      assert.equal(i.runtime.ready, true, name);
    }
    for (const g of fleet.guests) assert.equal(await g.agent!.stop(), 0, g.agent!.stderr);
  });
});

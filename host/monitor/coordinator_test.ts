import assert from "node:assert/strict";
import type { ConnectionInfo, DevlxdEvent } from "../../shared/api.ts";
import type { Instance, InstanceRuntime, StatusChannel } from "../instance.ts";
import { type AgentProbe } from "./announcer.ts";
import { MtlsError } from "../../shared/http/mod.ts";
import { createLogger } from "../../shared/log.ts";
import type { AgentApi } from "./announce_machine.ts";
import {
  Coordinator,
  type CoordinatorOptions,
  type CoordinatorStore,
  type MonitorStatus,
} from "./coordinator.ts";
import { FakeQmpServer, FakeRingBuffer } from "../../tests/fakes/qmp.ts";
import { FakeAgent, makeIdentity, makeTarget, unixConnect } from "../../tests/fakes/agent.ts";
import { Queue, tempDir } from "./_test_util.ts";

const INTERVALS = { waiting: 10, stopped: 20, connected: 100 };
const SERVER_CERT = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

function makeInstance(
  name: string,
  cid: number,
  status: StatusChannel,
  runtime: Partial<InstanceRuntime> = {},
): Instance {
  return {
    name,
    cid,
    status,
    agentCert: "agent-cert",
    clientCert: "client-cert",
    clientKey: "client-key",
    config: {},
    devices: {},
    runtime: { agentState: "STOPPED", ready: false, ...runtime },
  };
}

/** The coordinator's view of one instance, as operators see it. */
function statusOf(coordinator: Coordinator, name: string): MonitorStatus | undefined {
  return coordinator.snapshot().find((s) => s.name === name);
}

type Change = { name: string; state: string; error?: string };

class FakeStore implements CoordinatorStore {
  readonly instances = new Map<string, Instance>();
  seen = 0;
  /** Every change of agent state or last error the coordinator recorded. */
  readonly changes = new Queue<Change>();
  constructor(instances: Instance[]) {
    for (const i of instances) this.instances.set(i.name, i);
  }
  list(): Instance[] {
    return [...this.instances.values()];
  }
  get(name: string): Instance | undefined {
    return this.instances.get(name);
  }
  setRuntime(name: string, patch: Partial<InstanceRuntime>): void {
    const i = this.instances.get(name)!;
    i.runtime = { ...i.runtime, ...patch };
    this.changes.push({ name, state: i.runtime.agentState, error: i.runtime.lastError });
  }
  recordSeen(): void {
    this.seen++;
  }
}

/** An in-process stand-in for the agents' APIs. */
class FakeApi implements AgentApi {
  coordinator!: Coordinator;
  readonly announces = new Queue<{ name: string; info: ConnectionInfo }>();
  readonly pushed = new Queue<{ name: string; event: DevlxdEvent }>();
  get pushes(): Array<{ name: string; event: DevlxdEvent }> {
    return this.pushed.all;
  }
  readonly pids = new Map<string, number>();
  /** What `GET /1.0` reports as the agent's host address (our agent reports it). */
  readonly connections = new Map<string, { cid: number; port: number } | null>();
  probes = 0;
  /** Whether the agent "validates" (reaches the host) when announced to. */
  validates = true;
  announceError: Error | undefined;
  pushError: Error | undefined;
  inFlight = 0;
  readonly entered = new Queue<string>();
  maxInFlight = 0;
  gate: Promise<void> | undefined;

  /** Whether the PUT answer carries the agent's pid (our agent), sparing the probe. */
  pidInAnnounce = false;

  async announce(instance: Instance, info: ConnectionInfo): Promise<{ pid?: number } | void> {
    this.inFlight++;
    this.entered.push(instance.name);
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await this.gate;
      if (this.announceError) throw this.announceError;
      if (this.validates) this.coordinator.agentSeen(instance.name);
      this.announces.push({ name: instance.name, info });
      if (this.pidInAnnounce) return { pid: this.pids.get(instance.name) ?? 100 };
    } finally {
      this.inFlight--;
    }
  }
  pushEvent(instance: Instance, event: DevlxdEvent): Promise<void> {
    if (this.pushError) return Promise.reject(this.pushError);
    this.pushed.push({ name: instance.name, event });
    return Promise.resolve();
  }
  probe(instance: Instance): Promise<AgentProbe> {
    this.probes++;
    const pid = this.pids.get(instance.name) ?? 100;
    const connection = this.connections.get(instance.name);
    return Promise.resolve({ pid, connection, metadata: { environment: { server_pid: pid } } });
  }
}

function setup(instances: Instance[], extra: Partial<CoordinatorOptions> = {}) {
  const store = new FakeStore(instances);
  const api = new FakeApi();
  const changes = store.changes;
  let port = 40001;
  const coordinator = new Coordinator({
    store,
    hostPort: () => port,
    serverCert: SERVER_CERT,
    agentApi: api,
    intervals: INTERVALS,
    backoff: { min: 20, max: 40 },
    ...extra,
  });
  api.coordinator = coordinator;
  return { store, api, changes, coordinator, setPort: (p: number) => port = p };
}

function event(value: string): DevlxdEvent {
  return {
    timestamp: "2026-11-24T00:00:00Z",
    type: "config",
    metadata: { key: "user.k", old_value: "", value },
  };
}

/** A temp dir, a fake QEMU serving one ring buffer over QMP, and "vm1" (CID 10) watching it. */
async function qmpVm() {
  const dir = await tempDir();
  const ring = new FakeRingBuffer();
  const qemu = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  const vm = makeInstance("vm1", 10, {
    kind: "qmp",
    path: `${dir.path}/qmp`,
    chardev: "vserial",
    size: 16,
  });
  return {
    dir,
    ring,
    qemu,
    vm,
    async [Symbol.asyncDispose]() {
      await qemu[Symbol.asyncDispose]();
      await dir[Symbol.asyncDispose]();
    },
  };
}

Deno.test("Coordinator announces when the agent shows STARTED and is CONNECTED once it reaches the host", async () => {
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const { api, changes, coordinator, store } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  ring.write("STARTED\n");
  const { name, info } = await api.announces.next();
  assert.equal(name, "vm1");
  assert.deepEqual(info, { cid: 2, port: 40001, certificate: SERVER_CERT, devlxd: true });
  await changes.until((c) => c.state === "CONNECTED");
  assert.deepEqual(changes.all.map((c) => c.state), ["STARTED", "CONNECTED"]);
  assert.equal(store.get("vm1")!.runtime.agentState, "CONNECTED");
  const status = statusOf(coordinator, "vm1")!;
  assert.equal(status.pollInterval, INTERVALS.connected);
  assert.equal(status.announcedPort, 40001);
  assert.equal(status.observed, "STARTED");
});

Deno.test("Coordinator announces to an agent that reached the host from agent.conf before its first STARTED was read", async () => {
  // Our agent writes STARTED until a host announces itself, even when agent.conf's
  // address already works (LXD 5.0.2): if its first request arrives before the
  // host reads that STARTED, the host must still announce, or it stays STARTED.
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  // Its GET /1.0 (the probe) shows it holds this host's address: nothing looks stale.
  api.connections.set("vm1", { cid: 2, port: 40001 });
  coordinator.start();
  coordinator.agentSeen("vm1");
  await changes.until((c) => c.state === "CONNECTED");
  ring.write("STARTED\n");
  const { name } = await api.announces.next();
  assert.equal(name, "vm1");
});

Deno.test("Coordinator does not re-announce on the periodic STARTED of a connected agent that is alive", async () => {
  await using fixture = await qmpVm();
  const { ring, qemu, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  const conn = await qemu.waitConnections(1);
  // A stock lxd-agent keeps writing STARTED; the same process (same pid) answers the checks.
  // Read until the agent API was checked at least once more than the probe after the announce.
  let rounds = 0;
  for (; rounds < 500 && (api.probes < 2 || rounds < 6); rounds++) {
    const reads = qemu.commands.filter((c) => c === "ringbuf-read").length;
    ring.write("STARTED\n");
    await conn.event("VSERPORT_CHANGE");
    await qemu.waitCommands("ringbuf-read", reads + 1);
  }
  assert.ok(api.probes >= 2, `${api.probes} probes: the agent API was checked`);
  assert.equal(api.announces.all.length, 1);
  assert.equal(statusOf(coordinator, "vm1")!.agentState, "CONNECTED");
});

Deno.test("Coordinator re-announces an agent that restarted without STOPPED at the next slow poll", async () => {
  await using fixture = await qmpVm();
  const { ring, qemu, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  await api.announces.next();
  // kill -9: no STOPPED; a new agent process comes back with stale info and
  // only writes STARTED (every 5 s for a stock agent: here before each poll).
  api.pids.set("vm1", 200);
  api.validates = true;
  const readsAtCrash = qemu.commands.filter((c) => c === "ringbuf-read").length;
  const rewrite = setInterval(() => ring.write("STARTED\n"), 5);
  try {
    await api.announces.next();
  } finally {
    clearInterval(rewrite);
  }
  const readsToNotice = qemu.commands.filter((c) => c === "ringbuf-read").length - readsAtCrash;
  assert.ok(readsToNotice <= 2, `noticed after ${readsToNotice} slow polls`);
  assert.equal(statusOf(coordinator, "vm1")!.agentState, "CONNECTED");
});

Deno.test("Coordinator takes the pid from an announce answer that carries it, without a probe, and still spots a restart", async () => {
  await using fixture = await qmpVm();
  const { ring, qemu, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  api.pidInAnnounce = true;
  coordinator.start();
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  await api.announces.next();
  assert.equal(api.probes, 0, "no GET /1.0 after the announce");
  api.pids.set("vm1", 200); // restarted without STOPPED
  const readsAtCrash = qemu.commands.filter((c) => c === "ringbuf-read").length;
  const rewrite = setInterval(() => ring.write("STARTED\n"), 5);
  try {
    await api.announces.next();
  } finally {
    clearInterval(rewrite);
  }
  const readsToNotice = qemu.commands.filter((c) => c === "ringbuf-read").length - readsAtCrash;
  assert.ok(readsToNotice <= 2, `noticed after ${readsToNotice} slow polls`);
  assert.ok(api.probes >= 1, "the stale check asked the agent");
});

Deno.test("Coordinator re-announces a connected agent whose GET /1.0 shows another host port", async () => {
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  api.connections.set("vm1", { cid: 2, port: 40001 });
  coordinator.start();
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  await api.announces.next();
  // Same process (same pid), but it now holds an old port and says STARTED.
  api.connections.set("vm1", { cid: 2, port: 39999 });
  const rewrite = setInterval(() => ring.write("STARTED\n"), 5);
  try {
    const again = await api.announces.next();
    assert.equal(again.info.port, 40001);
  } finally {
    clearInterval(rewrite);
  }
  assert.equal(api.pids.size, 0);
});

Deno.test("Coordinator checks an agent that went silent after its last request, then wrote STARTED once", async () => {
  await using fixture = await qmpVm();
  const { ring, qemu, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  api.connections.set("vm1", { cid: 2, port: 40001 });
  coordinator.start();
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  await api.announces.next();
  // Our agent writes nothing while connected; it makes a request now and then.
  coordinator.agentSeen("vm1");
  const reads = qemu.commands.filter((c) => c === "ringbuf-read").length;
  await qemu.waitCommands("ringbuf-read", reads + 2); // empty reads
  // It restarts holding no host address and writes one STARTED.
  api.connections.set("vm1", null);
  ring.write("STARTED\n");
  const again = await api.announces.next();
  assert.equal(again.info.port, 40001);
});

Deno.test("Coordinator checks a connected agent at once when STARTED arrives on a socket channel", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/serial`;
  using listener = Deno.listen({ transport: "unix", path });
  const vm = makeInstance("vm1", 10, { kind: "socket", path });
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  api.connections.set("vm1", { cid: 2, port: 40001 });
  coordinator.start();
  using guest = await listener.accept();
  const write = (line: string) => guest.write(new TextEncoder().encode(line));
  await write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  await api.announces.next();
  await write("CONNECTED\n");
  coordinator.agentSeen("vm1"); // requests after its last line
  api.connections.set("vm1", null); // killed; back with no host address
  // Our agent rewrites STARTED (every 5 s) until it is connected again.
  const rewrite = setInterval(() => write("STARTED\n").catch(() => {}), 20);
  try {
    assert.equal((await api.announces.next()).info.port, 40001);
  } finally {
    clearInterval(rewrite);
  }
});

Deno.test("Coordinator marks STOPPED on a STOPPED line, polls slower, and announces at the next STARTED", async () => {
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  ring.write("STOPPED\n");
  await changes.until((c) => c.state === "STOPPED");
  assert.equal(statusOf(coordinator, "vm1")!.pollInterval, INTERVALS.stopped);
  ring.write("STARTED\n");
  await changes.until((c) => c.state === "CONNECTED");
  assert.equal(api.announces.all.length, 2);
});

Deno.test("Coordinator logs an announce that succeeded while the status channel went down and came back", async () => {
  // make e2e (topology, loaded L1): QMP's connect timed out right after a host
  // restart (STOPPED, then STARTED), the agent got the PUT, and nothing said so.
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const lines = new Queue<string>();
  const logger = createLogger({ level: "info", write: lines.push });
  const { api, changes, coordinator } = setup([vm], { logger });
  await using _c = coordinator;
  const gate = Promise.withResolvers<void>();
  api.gate = gate.promise;
  coordinator.start();
  ring.write("STARTED\n");
  await api.entered.next();
  ring.write("STOPPED\n");
  await changes.until((c) => c.state === "STOPPED");
  gate.resolve();
  const line = await lines.until((l) => /msg="announced"/.test(l));
  assert.match(line, /instance=vm1 .*via="PUT \/1.0" during="a status channel restart"/);
});

Deno.test("Coordinator records a refused announce as lastError and retries at a later STARTED", async () => {
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  api.announceError = new MtlsError("Agent refused the connection", "refused");
  coordinator.start();
  ring.write("STARTED\n");
  const failed = await changes.until((c) => c.error !== undefined);
  assert.equal(failed.state, "STARTED");
  assert.match(failed.error!, /announce failed: Agent refused/);
  api.announceError = undefined;
  const rewrite = setInterval(() => ring.write("STARTED\n"), 10);
  try {
    await changes.until((c) => c.state === "CONNECTED");
  } finally {
    clearInterval(rewrite);
  }
  assert.equal(statusOf(coordinator, "vm1")!.lastError, undefined);
});

Deno.test("Coordinator keeps an agent CONNECTED when it reached the host during an announce that then failed", async () => {
  await using fixture = await qmpVm();
  const { ring, vm } = fixture;
  const { api, changes, coordinator, store } = setup([vm]);
  await using _c = coordinator;
  const release = Promise.withResolvers<void>();
  api.gate = release.promise;
  api.announceError = new MtlsError("vsock connect timed out after 3000 ms", "timeout");
  coordinator.start();
  ring.write("STARTED\n");
  assert.equal(await api.entered.next(), "vm1");
  // A slow nested VM: the agent reaches us before the announce's connect gives up.
  coordinator.agentSeen("vm1");
  await changes.until((c) => c.state === "CONNECTED");
  release.resolve();
  const failed = await changes.until((c) => c.error !== undefined);
  assert.equal(failed.state, "CONNECTED");
  assert.match(failed.error!, /announce failed: vsock connect timed out/);
  assert.deepEqual(changes.all.map((c) => c.state), ["STARTED", "CONNECTED", "CONNECTED"]);
  const status = statusOf(coordinator, "vm1")!;
  assert.equal(status.agentState, "CONNECTED");
  assert.equal(status.pollInterval, INTERVALS.connected);
  assert.match(status.lastError!, /announce failed/);
  assert.equal(store.get("vm1")!.runtime.agentState, "CONNECTED");
});

Deno.test("Coordinator.start() announces to every agent last known up, with bounded concurrency", async () => {
  const vms = Array.from(
    { length: 6 },
    (_, i) => makeInstance(`vm${i}`, 10 + i, { kind: "none" }, { agentState: "CONNECTED" }),
  );
  vms.push(makeInstance("off", 99, { kind: "none" }, { agentState: "STOPPED" }));
  const { api, coordinator, setPort } = setup(vms, { announceConcurrency: 2 });
  await using _c = coordinator;
  setPort(45678);
  const { promise: gate, resolve: open } = Promise.withResolvers<void>();
  api.gate = gate;
  coordinator.start();
  await api.entered.next();
  await api.entered.next();
  // One macrotask turn: every announce that could start has reached the gate.
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(api.inFlight, 2);
  open();
  for (let i = 0; i < 6; i++) await api.announces.next();
  assert.equal(api.maxInFlight, 2);
  assert.deepEqual(
    api.announces.all.map((a) => a.name).sort(),
    ["vm0", "vm1", "vm2", "vm3", "vm4", "vm5"],
  );
  assert.ok(api.announces.all.every((a) => a.info.port === 45678));
  assert.equal(statusOf(coordinator, "off")!.agentState, "STOPPED");
});

Deno.test("Coordinator marks only the instance whose QEMU went away STOPPED", async () => {
  await using dir = await tempDir();
  const ringA = new FakeRingBuffer();
  const ringB = new FakeRingBuffer();
  const qemuA = new FakeQmpServer(`${dir.path}/a`, { rings: { vserial: ringA } });
  await using _qemuB = new FakeQmpServer(`${dir.path}/b`, { rings: { vserial: ringB } });
  const a = makeInstance("a", 10, {
    kind: "qmp",
    path: `${dir.path}/a`,
    chardev: "vserial",
    size: 16,
  });
  const b = makeInstance("b", 11, {
    kind: "qmp",
    path: `${dir.path}/b`,
    chardev: "vserial",
    size: 16,
  });
  const { changes, coordinator } = setup([a, b]);
  await using _c = coordinator;
  coordinator.start();
  ringA.write("STARTED\n");
  ringB.write("STARTED\n");
  await changes.until((c) => c.name === "a" && c.state === "CONNECTED");
  await changes.until((c) => c.name === "b" && c.state === "CONNECTED");
  await qemuA.close();
  await changes.until((c) => c.name === "a" && c.state === "STOPPED");
  assert.equal(statusOf(coordinator, "a")!.channelUp, false);
  assert.equal(statusOf(coordinator, "b")!.agentState, "CONNECTED");
  assert.equal(statusOf(coordinator, "b")!.channelUp, true);
  assert.equal(statusOf(coordinator, "a")!.lastError, undefined);
});

Deno.test("Coordinator queues events while the agent is offline and delivers them in order on reconnect", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  const { api, coordinator } = setup([vm], { eventQueueLimit: 3 });
  await using _c = coordinator;
  coordinator.start();
  const results = await Promise.all(
    ["a", "b", "c", "d"].map((v) => coordinator.pushEvent("vm1", event(v))),
  );
  assert.deepEqual(results, ["queued", "queued", "queued", "queued"]);
  assert.equal(statusOf(coordinator, "vm1")!.queuedEvents, 3);
  assert.equal(api.pushes.length, 0);
  coordinator.agentSeen("vm1");
  assert.equal(await coordinator.pushEvent("vm1", event("e")), "pushed");
  assert.deepEqual(api.pushes.map((p) => p.event), ["b", "c", "d", "e"].map(event));
  assert.equal(statusOf(coordinator, "vm1")!.droppedEvents, 1);
});

Deno.test("Coordinator bounds the offline queue in bytes: large events push out the oldest, the newest stays", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  const { coordinator } = setup([vm], { eventQueueBytes: 5000 });
  await using _c = coordinator;
  coordinator.start();
  for (const v of ["a", "b", "c"]) await coordinator.pushEvent("vm1", event(v.repeat(2000)));
  assert.equal(statusOf(coordinator, "vm1")!.queuedEvents, 2);
  assert.equal(statusOf(coordinator, "vm1")!.droppedEvents, 1);
  await coordinator.pushEvent("vm1", event("x".repeat(9000)));
  assert.equal(statusOf(coordinator, "vm1")!.queuedEvents, 1);
});

Deno.test("Coordinator keeps an event queued when the push fails and retries it", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  const { api, coordinator } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  coordinator.agentSeen("vm1");
  api.pushError = new MtlsError("Agent connect timed out", "timeout");
  assert.equal(await coordinator.pushEvent("vm1", event("x")), "queued");
  api.pushError = undefined;
  coordinator.agentSeen("vm1"); // the agent shows up again
  await coordinator.pushEvent("vm1", event("y"));
  assert.deepEqual(api.pushes.map((p) => p.event), [event("x"), event("y")]);
});

Deno.test("Coordinator hands events to an open pull stream instead of pushing them", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  const streamed: DevlxdEvent[] = [];
  let streamOpen = true;
  const { api, coordinator } = setup([vm], {
    deliverViaStream: (_name, e) => streamOpen && (streamed.push(e), true),
  });
  await using _c = coordinator;
  coordinator.start();
  coordinator.agentSeen("vm1");
  assert.equal(await coordinator.pushEvent("vm1", event("s")), "stream");
  streamOpen = false;
  assert.equal(await coordinator.pushEvent("vm1", event("p")), "pushed");
  assert.deepEqual(streamed, [event("s")]);
  assert.deepEqual(api.pushes.map((p) => p.event), [event("p")]);
});

Deno.test("Coordinator pushes events queued while offline even if the agent opens a pull stream", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  let streamOpen = false;
  const { api, coordinator } = setup([vm], { deliverViaStream: () => streamOpen });
  await using _c = coordinator;
  coordinator.start();
  assert.equal(await coordinator.pushEvent("vm1", event("offline")), "queued");
  // The agent comes back and opens its pull stream: new events go there,
  // the one it missed is pushed.
  streamOpen = true;
  coordinator.agentSeen("vm1");
  assert.equal(await coordinator.pushEvent("vm1", event("online")), "stream");
  assert.deepEqual((await api.pushed.next()).event, event("offline"));
  assert.deepEqual(api.pushes.map((p) => p.event), [event("offline")]);
  assert.equal(statusOf(coordinator, "vm1")!.queuedEvents, 0);
});

Deno.test("Coordinator.update() announces a security.devlxd change to an agent that is up", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  const { api, coordinator } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  coordinator.agentSeen("vm1");
  coordinator.update({ ...vm, config: { "user.x": "1" } }); // no devlxd change
  coordinator.update({ ...vm, config: { "security.devlxd": "false" } });
  const { info } = await api.announces.next();
  assert.equal(info.devlxd, false);
  assert.equal(api.announces.all.length, 1);
});

Deno.test("Coordinator writes CONNECT 2:<port> on a bidirectional serial channel", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/serial`;
  using listener = Deno.listen({ transport: "unix", path });
  const vm = makeInstance("vm1", 10, { kind: "socket", path });
  const { api, changes, coordinator } = setup([vm]);
  await using _c = coordinator;
  api.announceError = new MtlsError("Agent refused the connection", "refused");
  coordinator.start();
  using guest = await listener.accept();
  await guest.write(new TextEncoder().encode("STARTED\n"));
  const buf = new Uint8Array(64);
  const n = await guest.read(buf);
  assert.equal(new TextDecoder().decode(buf.subarray(0, n!)), "CONNECT 2:40001\n");
  // The line went out though PUT /1.0 was refused: waiting for the agent.
  const sent = await changes.until((c) => c.state === "CONNECT sent");
  assert.match(sent.error!, /CONNECT line sent/);
  coordinator.agentSeen("vm1");
  assert.equal(statusOf(coordinator, "vm1")!.agentState, "CONNECTED");
});

Deno.test("Coordinator.remove() stops watching and drops queued events", async () => {
  const vm = makeInstance("vm1", 10, { kind: "none" });
  const { coordinator } = setup([vm]);
  await using _c = coordinator;
  coordinator.start();
  assert.equal(await coordinator.pushEvent("vm1", event("q")), "queued");
  coordinator.remove("vm1");
  assert.equal(statusOf(coordinator, "vm1"), undefined);
  assert.equal(await coordinator.pushEvent("vm1", event("r")), "dropped");
  assert.deepEqual(coordinator.snapshot(), []);
});

Deno.test("Coordinator announces over mutual TLS to an agent API and delivers events by POST", async () => {
  await using dir = await tempDir();
  const { target, agent } = await makeTarget("vm1");
  const host = await makeIdentity("host-server");
  const vm: Instance = {
    ...makeInstance("vm1", 10, { kind: "none" }, { agentState: "STARTED" }),
    ...target,
  };
  const ref: { coordinator?: Coordinator } = {};
  await using fake = new FakeAgent(`${dir.path}/agent`, {
    agent,
    clientCert: target.clientCert,
    afterPut: () => ref.coordinator!.agentSeen("vm1"), // the agent's validation request
  });
  await fake.ready;
  const store = new FakeStore([vm]);
  const coordinator = ref.coordinator = new Coordinator({
    store,
    hostPort: () => 41000,
    serverCert: host.cert,
    connectAgent: (_instance, { signal }) => unixConnect(fake.path)(signal),
    intervals: INTERVALS,
  });
  await using _c = coordinator;
  coordinator.start();
  await fake.waitFor(() => fake.puts.length === 1);
  assert.deepEqual(fake.puts[0], { cid: 2, port: 41000, certificate: host.cert, devlxd: true });
  assert.equal(await coordinator.pushEvent("vm1", event("tls")), "pushed");
  assert.deepEqual(fake.events, [event("tls")]);
  assert.equal(statusOf(coordinator, "vm1")!.agentState, "CONNECTED");
});

Deno.test("Coordinator announces to an agent that reads the CONNECT line without PUT /1.0 (one handshake: its own); one that does not read it gets the PUT", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/serial`;
  using listener = Deno.listen({ transport: "unix", path });
  const vm = makeInstance("vm1", 10, { kind: "socket", path });
  const { api, changes, coordinator } = setup([vm], { connectLineWait: 5000 });
  await using _c = coordinator;
  api.validates = false; // only the line reaches "our" agent here
  coordinator.start();
  using guest = await listener.accept();
  const reader = guest.readable.pipeThrough(new TextDecoderStream()).getReader();
  await guest.write(new TextEncoder().encode("STARTED\n"));
  let text = "";
  while (!/CONNECT 2:40001\n/.test(text)) text += (await reader.read()).value;
  coordinator.agentSeen("vm1"); // our agent read the line and reached the host
  await changes.until((c) => c.state === "CONNECTED");
  assert.equal(api.announces.all.length, 0, "no PUT /1.0 for an agent that read the line");
  assert.equal(api.entered.all.length, 0);
  reader.releaseLock();

  // A stock agent: it never reads the line; the PUT follows the wait.
  const stock = setup([makeInstance("vm2", 11, { kind: "socket", path: `${dir.path}/s2` })], {
    connectLineWait: 50,
  });
  await using _s = stock.coordinator;
  using listener2 = Deno.listen({ transport: "unix", path: `${dir.path}/s2` });
  stock.coordinator.start();
  using guest2 = await listener2.accept();
  await guest2.write(new TextEncoder().encode("STARTED\n"));
  assert.equal((await stock.api.announces.next()).name, "vm2");
  await stock.changes.until((c) => c.state === "CONNECTED");
});

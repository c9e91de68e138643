import assert from "node:assert/strict";
import {
  createStatusWatcher,
  readStatusChannel,
  type StatusObservation,
} from "./status_watcher.ts";
import { FakeQmpServer, FakeRingBuffer } from "../../tests/fakes/qmp.ts";
import { Queue, tempDir } from "./_test_util.ts";

const HOUR = 3_600_000;

function qmpChannel(path: string, chardev = "vserial") {
  return { kind: "qmp" as const, path, chardev, size: 16 };
}

Deno.test("qmp watcher reads the ring buffer once at connect", async () => {
  await using dir = await tempDir();
  const ring = new FakeRingBuffer();
  ring.write("STARTED\n");
  await using _server = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`), {
    onState: seen.push,
    interval: HOUR,
  }).start();
  const first = await seen.next();
  assert.equal(first.state, "STARTED");
  assert.equal(first.source, "line");
});

Deno.test("qmp watcher tells how long before a line the channel was last read", async () => {
  await using dir = await tempDir();
  const ring = new FakeRingBuffer();
  ring.write("STARTED\n");
  await using server = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`), {
    onState: seen.push,
    interval: 20,
  }).start();
  assert.equal((await seen.next()).elapsed, undefined); // first read after connecting
  await server.waitCommands("ringbuf-read", 3);
  ring.write("CONNECTED\n");
  const second = await seen.next();
  assert.equal(second.state, "CONNECTED");
  assert.ok(second.elapsed !== undefined && second.elapsed > 0 && second.elapsed < 5000);
});

Deno.test("qmp watcher reads again after every QMP event", async () => {
  await using dir = await tempDir();
  const ring = new FakeRingBuffer();
  await using server = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`), {
    onState: seen.push,
    interval: HOUR,
  }).start();
  await server.waitCommands("ringbuf-read", 1);
  ring.write("CONNECTED\n");
  await (await server.waitConnections(1)).event("VSERPORT_CHANGE", { id: "vserial", open: true });
  assert.equal((await seen.next()).state, "CONNECTED");
  assert.equal(server.commands.filter((c) => c === "ringbuf-read").length, 2);
});

Deno.test("qmp watcher keeps quiet when a read returns nothing and polls on its timer", async () => {
  await using dir = await tempDir();
  const ring = new FakeRingBuffer();
  await using server = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`), {
    onState: seen.push,
    interval: 10,
  }).start();
  await server.waitCommands("ringbuf-read", 5);
  assert.deepEqual(seen.all, []);
  ring.write("STOPPED\n");
  assert.equal((await seen.next()).state, "STOPPED");
});

Deno.test("qmp watcher applies a shorter interval at once", async () => {
  await using dir = await tempDir();
  const ring = new FakeRingBuffer();
  await using server = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  const seen = new Queue<StatusObservation>();
  await using watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`), {
    onState: seen.push,
    interval: HOUR,
  }).start();
  await server.waitCommands("ringbuf-read", 1);
  ring.write("STARTED\n");
  watcher.setInterval(20);
  assert.equal((await seen.next()).state, "STARTED");
  assert.equal(watcher.interval, 20);
});

Deno.test("qmp watcher reports STOPPED once when QEMU goes away and reconnects with backoff", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/qmp`;
  const ring = new FakeRingBuffer();
  ring.write("CONNECTED\n");
  const first = new FakeQmpServer(path, { rings: { vserial: ring } });
  const seen = new Queue<StatusObservation>();
  await using watcher = createStatusWatcher(qmpChannel(path), {
    onState: seen.push,
    interval: HOUR,
    backoff: { min: 20, max: 40 },
  }).start();
  assert.equal((await seen.next()).state, "CONNECTED");
  await first.close(); // QEMU killed: socket gone
  const down = await seen.next();
  assert.deepEqual([down.state, down.source], ["STOPPED", "channel"]);
  assert.equal(watcher.connected, false);
  // Several failed reconnects later, a new QEMU appears on the same path.
  await using second = new FakeQmpServer(path, { rings: { vserial: ring } });
  ring.write("STARTED\n");
  assert.equal((await seen.next()).state, "STARTED");
  assert.equal(seen.all.filter((o) => o.state === "STOPPED").length, 1);
  assert.equal(second.connections.length, 1);
});

Deno.test("qmp watcher retries a missing socket within its poll period, however long the backoff", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/qmp`;
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher(qmpChannel(path), {
    onState: seen.push,
    interval: 20,
    backoff: { min: HOUR, max: HOUR },
  }).start();
  const down = await seen.next();
  assert.ok(down.error instanceof Deno.errors.NotFound, String(down.error));
  const ring = new FakeRingBuffer();
  ring.write("STARTED\n");
  await using _server = new FakeQmpServer(path, { rings: { vserial: ring } }); // the VM starts
  assert.equal((await seen.next()).state, "STARTED");
});

Deno.test("qmp watcher treats a QEMU that never greets as stopped", async () => {
  await using dir = await tempDir();
  await using _server = new FakeQmpServer(`${dir.path}/qmp`, { greeting: false });
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`), {
    onState: seen.push,
    timeout: 50,
    backoff: { min: HOUR, max: HOUR },
  }).start();
  const down = await seen.next();
  assert.equal(down.state, "STOPPED");
  assert.ok(down.error instanceof Deno.errors.TimedOut, String(down.error));
});

Deno.test("qmp watcher reports a wrong chardev as an error, once, and stays connected", async () => {
  await using dir = await tempDir();
  await using server = new FakeQmpServer(`${dir.path}/qmp`);
  const seen = new Queue<StatusObservation>();
  const errors = new Queue<Error>();
  await using watcher = createStatusWatcher(qmpChannel(`${dir.path}/qmp`, "missing"), {
    onState: seen.push,
    onError: errors.push,
    interval: 5,
  }).start();
  assert.match((await errors.next()).message, /Device 'missing' not found/);
  await server.waitCommands("ringbuf-read", 5);
  assert.equal(errors.all.length, 1);
  assert.deepEqual(seen.all, []);
  assert.equal(watcher.connected, true);
});

Deno.test("one instance's QEMU dying does not disturb another watcher", async () => {
  await using dir = await tempDir();
  const ringA = new FakeRingBuffer();
  const ringB = new FakeRingBuffer();
  const serverA = new FakeQmpServer(`${dir.path}/a`, { rings: { vserial: ringA } });
  await using serverB = new FakeQmpServer(`${dir.path}/b`, { rings: { vserial: ringB } });
  const seenA = new Queue<StatusObservation>();
  const seenB = new Queue<StatusObservation>();
  await using _a = createStatusWatcher(qmpChannel(`${dir.path}/a`), {
    onState: seenA.push,
    interval: 10,
    backoff: { min: HOUR },
  }).start();
  await using _b = createStatusWatcher(qmpChannel(`${dir.path}/b`), {
    onState: seenB.push,
    interval: 10,
  }).start();
  await serverB.waitCommands("ringbuf-read", 1);
  await serverA.close();
  assert.equal((await seenA.next()).state, "STOPPED");
  ringB.write("CONNECTED\n");
  assert.equal((await seenB.next()).state, "CONNECTED");
  assert.equal(serverB.connections.length, 1);
});

Deno.test("socket watcher reports each line and writes CONNECT back to the guest", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/serial`;
  using listener = Deno.listen({ transport: "unix", path });
  const seen = new Queue<StatusObservation>();
  await using watcher = createStatusWatcher({ kind: "socket", path }, {
    onState: seen.push,
    backoff: { min: HOUR },
  }).start();
  using guest = await listener.accept();
  const enc = new TextEncoder();
  await guest.write(enc.encode("STARTED\nnoise\nCONN"));
  assert.equal((await seen.next()).state, "STARTED");
  await guest.write(enc.encode("ECTED\n"));
  assert.equal((await seen.next()).state, "CONNECTED");
  assert.equal(watcher.canWrite, true);
  assert.equal(await watcher.writeLine("CONNECT 2:1234\n"), true);
  const buf = new Uint8Array(64);
  const n = await guest.read(buf);
  assert.equal(new TextDecoder().decode(buf.subarray(0, n!)), "CONNECT 2:1234\n");
  guest.close();
  assert.equal((await seen.next()).state, "STOPPED");
  assert.equal(await watcher.writeLine("CONNECT 2:1234\n"), false);
});

Deno.test("file watcher reports complete appended lines and STOPPED when the file is missing", async () => {
  await using dir = await tempDir();
  const path = `${dir.path}/status`;
  await Deno.writeTextFile(path, "STARTED\nCONN");
  const seen = new Queue<StatusObservation>();
  await using _watcher = createStatusWatcher({ kind: "file", path }, {
    onState: seen.push,
    interval: 10,
    backoff: { min: 10, max: 10 },
  }).start();
  assert.equal((await seen.next()).state, "STARTED");
  await Deno.writeTextFile(path, "ECTED\n", { append: true });
  assert.equal((await seen.next()).state, "CONNECTED");
  await Deno.remove(path);
  assert.equal((await seen.next()).state, "STOPPED");
  await Deno.writeTextFile(path, "STARTED\n");
  assert.equal((await seen.next()).state, "STARTED");
});

Deno.test("none watcher reports nothing and closes cleanly", async () => {
  const seen = new Queue<StatusObservation>();
  const watcher = createStatusWatcher({ kind: "none" }, { onState: seen.push }).start();
  assert.equal(watcher.kind, "none");
  await watcher.close();
  await watcher.close();
  assert.deepEqual(seen.all, []);
});

Deno.test("readStatusChannel() shows the ring buffer's last line, an empty ring, and a missing VM", async () => {
  await using dir = await tempDir();
  const ring = new FakeRingBuffer();
  await using _server = new FakeQmpServer(`${dir.path}/qmp`, { rings: { vserial: ring } });
  ring.write("STARTED\nCONNECTED\n");
  const channel = qmpChannel(`${dir.path}/qmp`);
  assert.deepEqual(await readStatusChannel(channel), {
    kind: "qmp",
    text: "ARTED\nCONNECTED\n",
    state: "CONNECTED",
  });
  const empty = await readStatusChannel(channel);
  assert.deepEqual([empty.text, empty.state], ["", undefined]);
  assert.match(empty.note!, /ring buffer empty/);
  const missing = await readStatusChannel(qmpChannel(`${dir.path}/nope`));
  assert.equal(missing.state, "STOPPED");
  assert.match(missing.note!, /VM not running/);
  await Deno.writeTextFile(`${dir.path}/file`, "STOPPED\nSTARTED\n");
  assert.equal(
    (await readStatusChannel({ kind: "file", path: `${dir.path}/file` })).state,
    "STARTED",
  );
  assert.deepEqual(await readStatusChannel({ kind: "none" }), {
    kind: "none",
    note: "no status channel",
  });
});

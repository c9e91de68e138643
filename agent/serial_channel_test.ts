import assert from "node:assert/strict";
import { LineBuffer } from "../shared/line_buffer.ts";
import { SerialChannel } from "./serial_channel.ts";
import { until, within } from "./_testing.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A queue of CONNECT targets the channel reports. */
function targets() {
  const seen: { cid: number; port: number }[] = [];
  const waiters: (() => void)[] = [];
  return {
    seen,
    onConnect(target: { cid: number; port: number }) {
      seen.push(target);
      waiters.splice(0).forEach((w) => w());
    },
    async next(count: number) {
      while (seen.length < count) {
        await within(new Promise<void>((r) => waiters.push(r)), `CONNECT #${count}`);
      }
      return seen[count - 1];
    },
  };
}

async function mkfifo(path: string): Promise<void> {
  const { success } = await new Deno.Command("mkfifo", { args: [path] }).output();
  assert.ok(success, "mkfifo failed");
}

Deno.test("SerialChannel.write() to a missing port resolves false, then writes once it appears", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/port`;
  const channel = new SerialChannel({ paths: [path], watch: false });
  try {
    assert.equal(await channel.write("STARTED"), false);
    await mkfifo(path);
    using fifo = await Deno.open(path, { read: true, write: true });
    assert.equal(await channel.write("CONNECTED"), true);
    const buf = new Uint8Array(64);
    const n = await within(fifo.read(buf), "the state line");
    assert.equal(decoder.decode(buf.subarray(0, n ?? 0)), "CONNECTED\n");
  } finally {
    await channel.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SerialChannel uses the first existing port of its candidates", async () => {
  const dir = await Deno.makeTempDir();
  await mkfifo(`${dir}/incus`);
  const channel = new SerialChannel({
    paths: [`${dir}/lxd`, `${dir}/canonical`, `${dir}/incus`],
    watch: false,
  });
  try {
    using fifo = await Deno.open(`${dir}/incus`, { read: true, write: true });
    assert.equal(await channel.write("STOPPED"), true);
    const buf = new Uint8Array(64);
    const n = await within(fifo.read(buf), "the state line");
    assert.equal(decoder.decode(buf.subarray(0, n ?? 0)), "STOPPED\n");
  } finally {
    await channel.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SerialChannel reads CONNECT from a device port, ignoring garbage, partial, oversized and bad lines", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/port`;
  await mkfifo(path);
  const seen = targets();
  const channel = new SerialChannel({ paths: [path], onConnect: seen.onConnect, pollInterval: 20 });
  try {
    using fifo = await Deno.open(path, { read: true, write: true });
    await fifo.write(encoder.encode("garbage\n\x00\xff\nCONNECT 0:1234\nCONNECT 2:0\n"));
    await fifo.write(encoder.encode("CONNECT 2:70000\nCONNECT 4294967295:5\n"));
    await fifo.write(encoder.encode("x".repeat(500) + "CONNECT 2:1\n"));
    await fifo.write(encoder.encode("CONN"));
    await fifo.write(encoder.encode("ECT 2:1234\n"));
    assert.deepEqual(await seen.next(1), { cid: 2, port: 1234 });
    await fifo.write(encoder.encode("CONNECT 3:4321\r\n"));
    assert.deepEqual(await seen.next(2), { cid: 3, port: 4321 });
    assert.equal(seen.seen.length, 2);
  } finally {
    await channel.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SerialChannel reopens a device port that disappears and reappears", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/port`;
  await mkfifo(path);
  const seen = targets();
  const channel = new SerialChannel({
    paths: [path],
    onConnect: seen.onConnect,
    pollInterval: 20,
    retryInterval: 20,
  });
  try {
    {
      using fifo = await Deno.open(path, { read: true, write: true });
      await fifo.write(encoder.encode("CONNECT 2:1000\n"));
      assert.deepEqual(await seen.next(1), { cid: 2, port: 1000 });
    }
    await Deno.remove(path);
    await until(() => !channel.holding, "the channel to notice the port is gone");
    assert.equal(await channel.write("STARTED"), false);
    await mkfifo(path);
    using fifo = await Deno.open(path, { read: true, write: true });
    await fifo.write(encoder.encode("CONNECT 2:2000\n"));
    assert.deepEqual(await seen.next(2), { cid: 2, port: 2000 });
  } finally {
    await channel.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/** The host end of a socket-backed port: accepts the channel, reads its lines. */
function socketHost(path: string) {
  const listener = Deno.listen({ transport: "unix", path });
  return {
    listener,
    async accept() {
      const conn = await within(listener.accept(), "the channel to connect");
      const lines = new LineBuffer(64);
      const queue: string[] = [];
      const buf = new Uint8Array(256);
      return {
        conn,
        async line(): Promise<string> {
          while (queue.length === 0) {
            const n = await within(conn.read(buf), "a state line");
            if (n === null) throw new Error("channel closed the port");
            queue.push(...lines.push(buf.subarray(0, n)));
          }
          return queue.shift()!;
        },
      };
    },
  };
}

Deno.test("SerialChannel speaks both ways over a socket-backed port and rejoins it after it reappears", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/port.sock`;
  const seen = targets();
  let state: "STARTED" | "CONNECTED" = "STARTED";
  let host = socketHost(path);
  const channel = new SerialChannel({
    paths: [path],
    onConnect: seen.onConnect,
    currentState: () => state,
    retryInterval: 20,
  });
  try {
    let peer = await host.accept();
    assert.equal(await peer.line(), "STARTED");
    await peer.conn.write(encoder.encode("CONNECT 2:5555\n"));
    assert.deepEqual(await seen.next(1), { cid: 2, port: 5555 });
    state = "CONNECTED";
    assert.equal(await channel.write("CONNECTED"), true);
    assert.equal(await peer.line(), "CONNECTED");

    peer.conn.close();
    host.listener.close(); // Deno removes the socket file
    await until(() => !channel.holding, "the channel to notice the port is gone");
    host = socketHost(path);
    peer = await host.accept();
    assert.equal(await peer.line(), "CONNECTED", "the current state is written on reopening");
    await peer.conn.write(encoder.encode("CONNECT 2:6666\n"));
    assert.deepEqual(await seen.next(2), { cid: 2, port: 6666 });
    await channel.close();
    peer.conn.close();
  } finally {
    await channel.close();
    try {
      host.listener.close();
    } catch {
      // closed by the test body
    }
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("SerialChannel keeps its default retry interval when the option is passed as undefined", async () => {
  // The agent forwards its own optional settings; an undefined retryInterval once
  // became 0 ms: an agent without a serial port looked for it in a busy loop.
  let lookups = 0;
  const paths = {
    *[Symbol.iterator]() {
      lookups++;
      yield "/nonexistent/serial-port";
    },
  } as unknown as string[];
  const channel = new SerialChannel({ paths, retryInterval: undefined, pollInterval: undefined });
  try {
    await new Promise((resolve) => setTimeout(resolve, 300));
    // Default 1000 ms: the first look only; a 0 ms retry makes hundreds.
    assert.ok(lookups <= 2, `${lookups} lookups in 300 ms`);
  } finally {
    await channel.close();
  }
});

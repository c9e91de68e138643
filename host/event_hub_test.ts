import assert from "node:assert/strict";
import { ALL_TOPICS, EventHub, EventStreamOverflow } from "./event_hub.ts";

type E = { n: number };

async function readLines(stream: ReadableStream<Uint8Array>, count: number): Promise<unknown[]> {
  const out: unknown[] = [];
  let buffer = "";
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  while (out.length < count) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let nl;
    while ((nl = buffer.indexOf("\n")) >= 0) {
      out.push(JSON.parse(buffer.slice(0, nl)));
      buffer = buffer.slice(nl + 1);
    }
  }
  await reader.cancel();
  return out;
}

Deno.test("EventHub delivers to every subscriber of a topic and to ALL_TOPICS, not to other topics", () => {
  const hub = new EventHub<E>();
  const a: number[] = [], b: number[] = [], all: string[] = [], other: number[] = [];
  const offA = hub.subscribe("vm1", (e) => a.push(e.n));
  hub.subscribe("vm1", (e) => b.push(e.n));
  hub.subscribe("vm2", (e) => other.push(e.n));
  hub.subscribe(ALL_TOPICS, (e, topic) => all.push(`${topic}:${e.n}`));
  assert.equal(hub.publish("vm1", { n: 1 }), 3);
  offA();
  hub.publish("vm1", { n: 2 });
  assert.deepEqual(a, [1]);
  assert.deepEqual(b, [1, 2]);
  assert.deepEqual(other, []);
  assert.deepEqual(all, ["vm1:1", "vm1:2"]);
  assert.equal(hub.subscriberCount("vm1"), 1);
});

Deno.test("EventHub keeps delivering when one subscriber throws", () => {
  const hub = new EventHub<E>();
  const got: number[] = [];
  hub.subscribe("t", () => {
    throw new Error("boom");
  });
  hub.subscribe("t", (e) => got.push(e.n));
  hub.publish("t", { n: 7 });
  assert.deepEqual(got, [7]);
});

Deno.test("EventHub.stream() yields NDJSON, applies the filter and unsubscribes on cancel", async () => {
  const hub = new EventHub<E>();
  const stream = hub.stream("t", { filter: (e) => e.n % 2 === 0 });
  const lines = readLines(stream, 2);
  for (let n = 1; n <= 4; n++) hub.publish("t", { n });
  assert.deepEqual(await lines, [{ n: 2 }, { n: 4 }]);
  assert.equal(hub.subscriberCount("t"), 0);
});

Deno.test("EventHub.stream() ends on closeTopic() and on abort", async () => {
  const hub = new EventHub<E>();
  const controller = new AbortController();
  const byClose = hub.stream("t");
  const byAbort = hub.stream("u", { signal: controller.signal });
  hub.publish("t", { n: 1 });
  hub.closeTopic("t");
  controller.abort();
  assert.deepEqual(await readLines(byClose, 10), [{ n: 1 }]);
  assert.deepEqual(await readLines(byAbort, 10), []);
  assert.equal(hub.subscriberCount("t") + hub.subscriberCount("u"), 0);
});

Deno.test("EventHub.stream() drops a reader that falls maxQueue events behind, freeing its queue, and says why", async () => {
  const drops: string[] = [];
  const hub = new EventHub<E>({
    maxQueue: 3,
    onDrop: (topic, error) => drops.push(`${topic}: ${error.message}`),
  });
  const stream = hub.stream("t");
  for (let n = 1; n <= 10; n++) hub.publish("t", { n });
  assert.equal(hub.subscriberCount("t"), 0);
  await assert.rejects(readLines(stream, 100), EventStreamOverflow);
  assert.deepEqual(drops, [
    "t: Event stream dropped: the reader fell 3 events behind (3 events, 24 bytes unread)",
  ]);
});

Deno.test("EventHub.stream() drops a reader that falls maxQueueBytes behind; one large event still goes to a reader that keeps up", async () => {
  const hub = new EventHub<{ s: string }>({ maxQueueBytes: 1000 });
  const big = { s: "x".repeat(5000) };
  const keepsUp = hub.stream("t");
  const reader = keepsUp.getReader();
  const read = reader.read();
  hub.publish("t", big);
  assert.equal(JSON.parse(new TextDecoder().decode((await read).value)).s, big.s);
  await reader.cancel();
  const behind = hub.stream("t");
  hub.publish("t", big); // fits: nothing queued before it
  hub.publish("t", { s: "small" }); // 5 kB queued already: over the bound
  assert.equal(hub.subscriberCount("t"), 0);
  await assert.rejects(behind.getReader().read(), /fell 1000 bytes behind/);
});

import assert from "node:assert/strict";
import { EventRelay, goEventOrder } from "./event_relay.ts";
import { within } from "./_testing.ts";

const decoder = new TextDecoder();

function event(key: string, value: string) {
  return {
    timestamp: "2026-01-01T00:00:00Z",
    type: "config",
    metadata: { key, old_value: "", value },
  };
}

const DEVICE_EVENT = {
  timestamp: "2026-01-01T00:00:01Z",
  type: "device",
  metadata: { name: "eth0", action: "added", config: {} },
};

/** Reads JSON lines from a subscriber stream. */
function lines(stream: ReadableStream<Uint8Array>) {
  const reader = stream.getReader();
  let buffered = "";
  return {
    async next(): Promise<unknown> {
      while (!buffered.includes("\n")) {
        const { value, done } = await within(reader.read(), "an event");
        if (done) throw new Error("stream ended");
        buffered += decoder.decode(value);
      }
      const i = buffered.indexOf("\n");
      const line = buffered.slice(0, i);
      buffered = buffered.slice(i + 1);
      return JSON.parse(line);
    },
    cancel: () => reader.cancel(),
  };
}

Deno.test("EventRelay delivers a pushed event to each subscriber once, filtered by type", async () => {
  await using relay = new EventRelay();
  const all = lines(relay.subscribe());
  const config = lines(relay.subscribe(["config"]));
  const device = lines(relay.subscribe(["device"]));
  assert.equal(relay.subscribers, 3);
  assert.equal(relay.publish(event("user.a", "1")), true);
  assert.equal(relay.publish(event("user.a", "1")), false, "the second copy is dropped");
  assert.equal(relay.publish(DEVICE_EVENT), true);
  assert.equal(relay.publish(event("user.b", "2")), true);
  assert.deepEqual(await all.next(), event("user.a", "1"));
  assert.deepEqual(await all.next(), DEVICE_EVENT);
  assert.deepEqual(await all.next(), event("user.b", "2"));
  assert.deepEqual(await config.next(), event("user.a", "1"));
  assert.deepEqual(await config.next(), event("user.b", "2"));
  assert.deepEqual(await device.next(), DEVICE_EVENT);
  await all.cancel();
  await config.cancel();
  await device.cancel();
  assert.equal(relay.subscribers, 0);
});

Deno.test("EventRelay pulls the host's events only while someone subscribes, without duplicates", async () => {
  let pulls = 0;
  let hostStream: ReadableStreamDefaultController<Uint8Array> | undefined;
  let pullSignal: AbortSignal | undefined;
  const opened = Promise.withResolvers<void>();
  const aborted = Promise.withResolvers<void>();
  await using relay = new EventRelay({
    retry: [10, 10],
    fetchHost: (request) => {
      pulls++;
      assert.equal(new URL(request.url).pathname, "/1.0/events");
      pullSignal = request.signal;
      pullSignal.addEventListener("abort", () => aborted.resolve());
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          hostStream = controller;
          opened.resolve();
        },
      });
      return Promise.resolve(new Response(body));
    },
  });
  assert.equal(relay.pulling, false);
  const sub = lines(relay.subscribe());
  assert.equal(relay.pulling, true);
  await within(opened.promise, "the pull request");
  const encoder = new TextEncoder();
  hostStream!.enqueue(encoder.encode(JSON.stringify(event("user.x", "1")) + "\nnot json\n"));
  assert.deepEqual(await sub.next(), event("user.x", "1"));
  relay.publish(event("user.x", "1")); // the same event pushed as well
  hostStream!.enqueue(encoder.encode(JSON.stringify(event("user.y", "2")).slice(0, 10)));
  hostStream!.enqueue(encoder.encode(JSON.stringify(event("user.y", "2")).slice(10) + "\n"));
  assert.deepEqual(await sub.next(), event("user.y", "2"), "each event once, in order");
  await sub.cancel();
  await within(aborted.promise, "the pull to stop with the last subscriber");
  assert.equal(relay.pulling, false);
  assert.equal(pulls, 1);
});

Deno.test("EventRelay retries a failing pull and ends subscribers on close()", async () => {
  let attempts = 0;
  const third = Promise.withResolvers<void>();
  const relay = new EventRelay({
    retry: [5, 5],
    fetchHost: () => {
      if (++attempts === 3) third.resolve();
      return Promise.resolve(new Response("nope", { status: 503 }));
    },
  });
  const reader = relay.subscribe().getReader();
  await within(third.promise, "three pull attempts");
  await relay.close();
  assert.deepEqual(await reader.read(), { value: undefined, done: true });
});

Deno.test("EventRelay recognises the same event with other key order or extra fields", async () => {
  await using relay = new EventRelay();
  const sub = lines(relay.subscribe());
  assert.equal(relay.publish(event("user.k", "v")), true);
  const reordered = {
    metadata: { value: "v", old_value: "", key: "user.k" },
    type: "config",
    timestamp: "2026-01-01T00:00:00Z",
    project: "default",
  };
  assert.equal(relay.publish(reordered), false);
  assert.equal(relay.publish(event("user.k", "w")), true, "another value is another event");
  assert.deepEqual(await sub.next(), event("user.k", "v"));
  assert.deepEqual(await sub.next(), event("user.k", "w"));
  await sub.cancel();
});

Deno.test("EventRelay writes events with LXD's field order (type, timestamp, metadata, location, project), whatever order they came in", async () => {
  await using relay = new EventRelay();
  const reader = relay.subscribe().getReader();
  relay.publish({
    project: "default",
    metadata: { key: "user.a", old_value: "", value: "1" },
    location: "none",
    timestamp: "2026-01-01T00:00:00Z",
    type: "config",
  });
  const { value } = await within(reader.read(), "an event");
  assert.equal(
    decoder.decode(value),
    '{"type":"config","timestamp":"2026-01-01T00:00:00Z","metadata":{"key":"user.a","old_value":"","value":"1"},"location":"none","project":"default"}\n',
  );
  await reader.cancel();
  assert.deepEqual(Object.keys(goEventOrder({ metadata: 1, extra: 2, type: "x" }) as object), [
    "type",
    "metadata",
    "extra",
  ]);
  assert.equal(goEventOrder("not an object"), "not an object");
});

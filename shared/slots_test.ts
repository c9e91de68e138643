import assert from "node:assert/strict";
import { Slots } from "./slots.ts";

Deno.test("Slots hands out count slots, then queues in arrival order", async () => {
  const slots = new Slots(2);
  await slots.acquire();
  await slots.acquire();
  const order: number[] = [];
  const third = slots.acquire().then(() => order.push(3));
  const fourth = slots.acquire().then(() => order.push(4));
  assert.equal(slots.waiting, 2);
  slots.release();
  await third;
  assert.deepEqual(order, [3]);
  assert.equal(slots.waiting, 1);
  slots.release();
  await fourth;
  assert.deepEqual(order, [3, 4]);
  slots.release();
  slots.release();
  // Both slots are free again: two acquires resolve at once.
  await slots.acquire();
  await slots.acquire();
  assert.equal(slots.waiting, 0);
});

Deno.test("Slots: an aborted waiter leaves the queue with the signal's reason", async () => {
  const slots = new Slots(1);
  await slots.acquire();
  const abort = new AbortController();
  const waiting = slots.acquire(abort.signal);
  const next = slots.acquire();
  abort.abort(new Error("gave up"));
  await assert.rejects(waiting, /gave up/);
  assert.equal(slots.waiting, 1);
  slots.release();
  await next; // the slot went to the waiter behind the aborted one
  await assert.rejects(slots.acquire(AbortSignal.abort(new Error("already"))), /already/);
});

Deno.test("Slots counts below one as one", async () => {
  const slots = new Slots(0);
  await slots.acquire();
  assert.equal(slots.waiting, 0);
});

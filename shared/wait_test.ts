import assert from "node:assert/strict";
import { sleep, Waiters } from "./wait.ts";

Deno.test("sleep() ends early when its signal aborts, and at once when it already has", async () => {
  const controller = new AbortController();
  const started = performance.now();
  const slept = sleep(60_000, controller.signal);
  controller.abort();
  await slept;
  await sleep(60_000, AbortSignal.abort());
  assert.ok(performance.now() - started < 30_000);
});

Deno.test("sleep() takes a delay that is not a finite number as 0, as setTimeout does", async () => {
  await sleep(undefined as unknown as number);
  await sleep(Number.NaN);
});

Deno.test("Waiters.wait() is true at wake(), false after its bound or on abort", async () => {
  const waiters = new Waiters();
  const woken = [waiters.wait(60_000), waiters.wait(60_000)];
  waiters.wake();
  assert.deepEqual(await Promise.all(woken), [true, true]);
  assert.equal(await waiters.wait(1), false);
  assert.equal(await waiters.wait(0), false);
  const controller = new AbortController();
  const aborted = waiters.wait(60_000, controller.signal);
  controller.abort();
  assert.equal(await aborted, false);
  waiters.wake(); // nobody left to wake
});

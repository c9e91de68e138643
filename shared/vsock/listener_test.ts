import assert from "node:assert/strict";
import { acceptLoop } from "./listener.ts";
import type { FdSocket } from "./fd_socket.ts";

Deno.test("acceptLoop() pauses after failed accepts and goes on; it ends once stopped", async () => {
  const outcomes: (Error | string)[] = [
    new Error("Too many open files (EMFILE)"),
    new Error("Too many open files (EMFILE)"),
    "a",
    new Error("ENOBUFS"),
    "b",
  ];
  let stopped = false;
  const listener = {
    accept(): Promise<FdSocket> {
      const next = outcomes.shift();
      if (next === undefined) {
        stopped = true;
        return Promise.reject(new Error("closed"));
      }
      return next instanceof Error
        ? Promise.reject(next)
        : Promise.resolve(next as unknown as FdSocket);
    },
  };
  const accepted: unknown[] = [];
  const pauses: number[] = [];
  await acceptLoop(listener, (socket) => accepted.push(socket), {
    stopped: () => stopped,
    onError: (_error, retryMs) => pauses.push(retryMs),
    minPause: 1,
    maxPause: 3,
  });
  assert.deepEqual(accepted, ["a", "b"]);
  assert.deepEqual(pauses, [1, 2, 1], "doubling, capped, reset by a success");
});

import assert from "node:assert/strict";
import { type OperationEvent, Operations, TooManyOperationsError } from "./operations.ts";
import { within } from "./_testing.ts";

Deno.test("Operations: Pending → Running → Success, each step and metadata update an event", async () => {
  const operations = new Operations({ retention: 10_000 });
  const events: OperationEvent[] = [];
  operations.subscribe((event) => events.push(event as OperationEvent));
  const release = Promise.withResolvers<void>();
  const operation = operations.start({
    class: "websocket",
    description: "Executing command",
    metadata: { fds: {} },
    run: async (op) => {
      await release.promise;
      op.updateMetadata({ return: 0 });
    },
  });
  assert.equal(operation.render().status, "Running");
  assert.equal(operation.render().status_code, 103);
  assert.equal(operations.get(operation.id), operation);
  release.resolve();
  await within(operation.done, "the operation");
  assert.deepEqual(events.map((e) => [e.type, e.metadata.status, e.metadata.metadata]), [
    ["operation", "Pending", { fds: {} }],
    ["operation", "Running", { fds: {} }],
    ["operation", "Running", { return: 0 }],
    ["operation", "Success", { return: 0 }],
  ]);
  assert.equal(operation.render().status_code, 200);
  assert.throws(() => operation.updateMetadata({}), /Only pending or running/);
  await operations.close();
});

Deno.test("Operations: a run that throws ends Failure with its message in err", async () => {
  const operations = new Operations();
  const operation = operations.start({
    class: "task",
    description: "x",
    metadata: {},
    run: () => Promise.reject(new Error("it broke")),
  });
  await operation.done;
  assert.equal(operation.render().status, "Failure");
  assert.equal(operation.render().status_code, 400);
  assert.equal(operation.render().err, "it broke");
  await operations.close();
});

Deno.test("Operations: a finished operation is forgotten after the retention time", async () => {
  const operations = new Operations({ retention: 20 });
  const operation = operations.start({
    class: "task",
    description: "x",
    metadata: {},
    run: () => Promise.resolve(),
  });
  await operation.done;
  assert.ok(operations.get(operation.id) !== undefined);
  const deadline = Date.now() + 2000;
  while (operations.get(operation.id) !== undefined && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  assert.equal(operations.get(operation.id), undefined);
  await operations.close();
});

Deno.test("Operations: at most maxRunning at once, and close() aborts the runs", async () => {
  const operations = new Operations({ maxRunning: 1 });
  const started = operations.start({
    class: "task",
    description: "x",
    metadata: {},
    run: (_op, signal) =>
      new Promise((_, reject) => signal.addEventListener("abort", () => reject(signal.reason))),
  });
  assert.throws(
    () =>
      operations.start({
        class: "task",
        description: "y",
        metadata: {},
        run: () => Promise.resolve(),
      }),
    TooManyOperationsError,
  );
  assert.equal(operations.running, 1);
  await within(operations.close(), "close()");
  assert.equal(started.render().status, "Failure");
  assert.equal(operations.running, 0);
});

Deno.test("Operations.broadcast() hands other events to the same subscribers", () => {
  const operations = new Operations();
  const seen: string[] = [];
  const unsubscribe = operations.subscribe((event) => seen.push(event.type));
  operations.broadcast({ type: "config", metadata: { key: "user.foo" } });
  unsubscribe();
  operations.broadcast({ type: "config" });
  assert.deepEqual(seen, ["config"]);
});

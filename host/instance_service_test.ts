import assert from "node:assert/strict";
import { join } from "node:path";
import type { DevlxdEvent } from "../shared/api.ts";
import { EventHub, type LifecycleEvent } from "./event_hub.ts";
import { InstanceService } from "./instance_service.ts";
import { Registry } from "./registry.ts";
import { prepareStateDir } from "./state_dir.ts";

const PEM = "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n";

async function setup() {
  const dir = await Deno.makeTempDir({ prefix: "service-test-" });
  const paths = await prepareStateDir(dir);
  const registry = Registry.open(paths.registry);
  const events = new EventHub<DevlxdEvent>();
  const lifecycle = new EventHub<LifecycleEvent>();
  let generated = 0;
  const service = new InstanceService({
    registry,
    paths,
    events,
    lifecycle,
    serverCert: PEM,
    now: () => new Date("2026-01-01T00:00:00Z"),
    generateKeyPair: () => {
      generated++;
      return Promise.resolve({
        cert: PEM,
        key: "-----BEGIN PRIVATE KEY-----\nK\n-----END PRIVATE KEY-----\n",
      });
    },
  });
  const seen: LifecycleEvent[] = [];
  lifecycle.subscribe("*", (e) => seen.push(e));
  return {
    dir,
    paths,
    registry,
    events,
    service,
    seen,
    generated: () => generated,
    [Symbol.asyncDispose]: async () => {
      registry.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("InstanceService.add() checks the name and CID before generating keys or writing files", async () => {
  await using t = await setup();
  await t.service.add({ name: "vm1", cid: 3 });
  assert.equal(t.generated(), 2);
  await assert.rejects(t.service.add({ name: "vm1", cid: 4 }), /already exists/);
  await assert.rejects(t.service.add({ name: "vm2", cid: 3 }), /already used/);
  await assert.rejects(t.service.add({ name: "vm2", cid: 1 }), /Invalid CID/);
  assert.equal(t.generated(), 2);
  await assert.rejects(Deno.stat(join(t.paths.instances, "vm2")), Deno.errors.NotFound);
});

Deno.test("InstanceService.add() run concurrently with one name registers it once", async () => {
  await using t = await setup();
  const results = await Promise.allSettled([
    t.service.add({ name: "vm1", cid: 3 }),
    t.service.add({ name: "vm1", cid: 4 }),
  ]);
  assert.deepEqual(results.map((r) => r.status), ["fulfilled", "rejected"]);
  assert.equal(t.registry.require("vm1").cid, 3);
});

Deno.test("InstanceService.setReady() persists and publishes only on change", async () => {
  await using t = await setup();
  await t.service.add({ name: "vm1", cid: 3 });
  t.service.setReady("vm1", true);
  t.service.setReady("vm1", true);
  assert.equal(t.registry.require("vm1").runtime.ready, true);
  assert.deepEqual(t.seen.filter((e) => e.action === "ready").map((e) => e.metadata), [{
    ready: true,
  }]);
});

Deno.test("InstanceService.applyRuntime() records state, change time and error, publishing state changes", async () => {
  await using t = await setup();
  await t.service.add({ name: "vm1", cid: 3 });
  // What the coordinator's announce machine records (it stamps lastChange).
  const lastChange = "2026-01-01T00:00:00.000Z";
  t.service.applyRuntime("vm1", { agentState: "STARTED", lastChange, lastError: undefined });
  t.service.applyRuntime("vm1", {
    agentState: "STARTED",
    lastChange,
    lastError: "announce failed",
  });
  t.service.applyRuntime("vm1", { agentState: "CONNECTED", lastChange, lastError: undefined });
  const runtime = t.registry.require("vm1").runtime;
  assert.equal(runtime.agentState, "CONNECTED");
  assert.equal(runtime.lastChange, "2026-01-01T00:00:00.000Z");
  assert.equal(runtime.lastError, undefined);
  assert.deepEqual(
    t.seen.filter((e) => e.action === "agent-state").map((e) => e.metadata.agentState),
    ["STARTED", "CONNECTED"],
  );
});

Deno.test("InstanceService: setting security.devlxd=false ends the instance's open event streams", async () => {
  await using t = await setup();
  await t.service.add({ name: "vm1", cid: 3 });
  const stream = t.events.stream("vm1");
  t.service.setConfig("vm1", "security.devlxd", "false");
  assert.equal((await stream.getReader().read()).done, true);
});

Deno.test("InstanceService: unchanged or host-only config values publish no devlxd event", async () => {
  await using t = await setup();
  await t.service.add({ name: "vm1", cid: 3, config: { "user.a": "1" } });
  const got: DevlxdEvent[] = [];
  t.events.subscribe("vm1", (e) => got.push(e));
  t.service.setConfig("vm1", "user.a", "1");
  t.service.setConfig("vm1", "limits.memory", "1GiB");
  assert.equal(t.service.unsetConfig("vm1", "user.absent"), false);
  assert.deepEqual(got, []);
});

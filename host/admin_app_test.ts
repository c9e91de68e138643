import assert from "node:assert/strict";
import { join } from "node:path";
import type { DevlxdEvent } from "../shared/api.ts";
import { createAdminApp } from "./admin_app.ts";
import { readConfigDrive } from "./config_drive.ts";
import { EventHub, type LifecycleEvent } from "./event_hub.ts";
import { InstanceService } from "./instance_service.ts";
import { Registry } from "./registry.ts";
import { prepareStateDir } from "./state_dir.ts";

const SERVER_CERT = "-----BEGIN CERTIFICATE-----\nSERVER\n-----END CERTIFICATE-----\n";

async function setup() {
  const dir = await Deno.makeTempDir({ prefix: "admin-test-" });
  const paths = await prepareStateDir(join(dir, "state"));
  const registry = Registry.open(paths.registry);
  const events = new EventHub<DevlxdEvent>();
  const lifecycle = new EventHub<LifecycleEvent>();
  let n = 0;
  const service = new InstanceService({
    registry,
    paths,
    events,
    lifecycle,
    serverCert: SERVER_CERT,
    port: () => 4242,
    generateKeyPair: ({ commonName }) => {
      n++;
      return Promise.resolve({
        cert: `-----BEGIN CERTIFICATE-----\n${commonName} ${n}\n-----END CERTIFICATE-----\n`,
        key: `-----BEGIN PRIVATE KEY-----\n${n}\n-----END PRIVATE KEY-----\n`,
      });
    },
  });
  const app = createAdminApp({
    service,
    status: () => ({ running: true, version: "t", stateDir: paths.dir }),
  });
  const call = async (method: string, path: string, body?: unknown) => {
    const response = await app.request(path, {
      method,
      body: body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body),
    });
    return { status: response.status, body: await response.json() };
  };
  return {
    dir,
    paths,
    registry,
    events,
    lifecycle,
    app,
    call,
    [Symbol.asyncDispose]: async () => {
      registry.close();
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("admin POST /1.0/instances registers, writes the config drive, and hides the client key", async () => {
  await using t = await setup();
  const { status, body } = await t.call("POST", "/1.0/instances", {
    name: "vm1",
    cid: 7,
    config: { "user.a": "b" },
  });
  assert.equal(status, 201);
  assert.equal(body.metadata.instance.name, "vm1");
  assert.equal(body.metadata.instance.clientKey, undefined);
  const drivePath = join(t.paths.instances, "vm1", "config");
  assert.equal(body.metadata.configDrive, drivePath);
  const drive = await readConfigDrive(drivePath);
  assert.match(drive.agentCert, /vm1\.agent\.lxd-vsock/);
  assert.match(drive.agentKey, /PRIVATE KEY/);
  assert.match(drive.clientCert, /vm1\.host\.lxd-vsock/);
  assert.deepEqual(drive.info, { cid: 2, port: 4242, certificate: SERVER_CERT, devlxd: true });
  for (const file of ["agent.crt", "agent.key", "server.crt", "agent.conf"]) {
    assert.equal((await Deno.stat(join(drivePath, file))).mode! & 0o777, 0o600, file);
  }
  const stored = t.registry.require("vm1");
  assert.equal(stored.agentCert, drive.agentCert);
  assert.equal(stored.clientCert, drive.clientCert);
  const list = await t.call("GET", "/1.0/instances");
  assert.deepEqual(list.body.metadata.map((i: { name: string }) => i.name), ["vm1"]);
});

Deno.test("admin add refuses duplicates and bad input with 4xx, writing nothing", async () => {
  await using t = await setup();
  await t.call("POST", "/1.0/instances", { name: "vm1", cid: 7 });
  const cases: [unknown, number, RegExp][] = [
    [{ name: "vm1", cid: 8 }, 409, /already exists/],
    [{ name: "vm2", cid: 7 }, 409, /CID 7 is already used/],
    [{ name: "vm2", cid: 2 }, 400, /Invalid CID 2/],
    [{ name: "vm2", cid: 2 ** 32 - 1 }, 400, /Invalid CID/],
    [{ name: "Bad!", cid: 9 }, 400, /Invalid instance name/],
    [{ name: "vm2", cid: 9, config: { "../x": "1" } }, 400, /Invalid config key/],
    ["{not json", 400, /Invalid request body/],
  ];
  for (const [body, status, message] of cases) {
    const r = await t.call("POST", "/1.0/instances", body);
    assert.equal(r.status, status, JSON.stringify(body));
    assert.match(r.body.error, message);
  }
  assert.deepEqual(t.registry.list().map((i) => i.name), ["vm1"]);
  assert.deepEqual([...Deno.readDirSync(t.paths.instances)].map((e) => e.name), ["vm1"]);
});

Deno.test("admin config and device changes reach the instance's devlxd streams and the lifecycle stream", async () => {
  await using t = await setup();
  await t.call("POST", "/1.0/instances", { name: "vm1", cid: 7 });
  const devlxd: DevlxdEvent[] = [];
  const lifecycle: string[] = [];
  t.events.subscribe("vm1", (e) => devlxd.push(e));
  t.lifecycle.subscribe("vm1", (e) => lifecycle.push(e.action));
  assert.equal(
    (await t.call("PUT", "/1.0/instances/vm1/config/user.foo", { value: "bar" })).status,
    200,
  );
  assert.equal(
    (await t.call("PUT", "/1.0/instances/vm1/config/limits.cpu", { value: "2" })).status,
    200,
  );
  assert.equal((await t.call("GET", "/1.0/instances/vm1/config/user.foo")).body.metadata, "bar");
  assert.equal((await t.call("DELETE", "/1.0/instances/vm1/config/user.foo")).status, 200);
  assert.equal((await t.call("GET", "/1.0/instances/vm1/config/user.foo")).status, 404);
  const dev = await t.call("POST", "/1.0/instances/vm1/devices", {
    name: "eth0",
    config: { type: "nic" },
  });
  assert.equal(dev.status, 201);
  assert.equal((await t.call("DELETE", "/1.0/instances/vm1/devices/eth0")).status, 200);
  assert.deepEqual(
    devlxd.map((e) => [e.type, e.metadata]),
    [
      ["config", { key: "user.foo", old_value: "", value: "bar" }],
      ["config", { key: "user.foo", old_value: "bar", value: "" }],
      ["device", { name: "eth0", action: "added", config: { type: "nic" } }],
      ["device", { name: "eth0", action: "removed", config: { type: "nic" } }],
    ],
  );
  assert.deepEqual(lifecycle, [
    "config-changed",
    "config-changed",
    "config-changed",
    "device-added",
    "device-removed",
  ]);
});

Deno.test("admin config/device errors: 400 for bad keys, 404 for unknown instances, 409 for duplicate devices", async () => {
  await using t = await setup();
  await t.call("POST", "/1.0/instances", { name: "vm1", cid: 7 });
  const r1 = await t.call("PUT", "/1.0/instances/vm1/config/raw.qemu", { value: "x" });
  assert.equal(r1.status, 400);
  assert.match(r1.body.error, /Unknown config key/);
  assert.equal((await t.call("PUT", "/1.0/instances/vm1/config/user.a", { value: 1 })).status, 400);
  assert.equal(
    (await t.call("PUT", "/1.0/instances/nope/config/user.a", { value: "1" })).status,
    404,
  );
  assert.equal((await t.call("GET", "/1.0/instances/nope")).status, 404);
  assert.equal((await t.call("DELETE", "/1.0/instances/nope")).status, 404);
  await t.call("POST", "/1.0/instances/vm1/devices", { name: "eth0", config: { type: "nic" } });
  assert.equal(
    (await t.call("POST", "/1.0/instances/vm1/devices", { name: "eth0", config: { type: "nic" } }))
      .status,
    409,
  );
  assert.equal(
    (await t.call("POST", "/1.0/instances/vm1/devices", { name: "x", config: {} })).status,
    400,
  );
  assert.equal((await t.call("DELETE", "/1.0/instances/vm1/devices/zz")).status, 404);
  assert.equal((await t.call("GET", "/nope")).status, 404);
  assert.deepEqual(t.registry.require("vm1").config, {});
  assert.deepEqual(Object.keys(t.registry.require("vm1").devices), ["eth0"]);
});

Deno.test("admin DELETE removes the instance, its default config drive, and ends its devlxd streams", async () => {
  await using t = await setup();
  await t.call("POST", "/1.0/instances", { name: "vm1", cid: 7 });
  const stream = t.events.stream("vm1");
  assert.equal((await t.call("DELETE", "/1.0/instances/vm1")).status, 200);
  assert.equal(t.registry.get("vm1"), undefined);
  await assert.rejects(Deno.stat(join(t.paths.instances, "vm1")), Deno.errors.NotFound);
  const { done } = await stream.getReader().read();
  assert.equal(done, true);
});

Deno.test("admin GET /1.0/events streams lifecycle events, optionally for one instance", async () => {
  await using t = await setup();
  const response = await t.app.request("/1.0/events?instance=vm2");
  assert.equal(response.status, 200);
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  await t.call("POST", "/1.0/instances", { name: "vm1", cid: 7 });
  await t.call("POST", "/1.0/instances", { name: "vm2", cid: 8 });
  const { value } = await reader.read();
  const event = JSON.parse(value!);
  assert.equal(event.instance, "vm2");
  assert.equal(event.action, "instance-added");
  await reader.cancel();
  assert.equal(t.lifecycle.subscriberCount("*"), 0);
});

Deno.test("admin GET /1.0 reports the daemon status", async () => {
  await using t = await setup();
  const { body } = await t.call("GET", "/1.0");
  assert.deepEqual(body.metadata, { running: true, version: "t", stateDir: t.paths.dir });
});

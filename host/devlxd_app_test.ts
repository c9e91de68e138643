import assert from "node:assert/strict";
import { join } from "node:path";
import type { DevlxdEvent } from "../shared/api.ts";
import { createHostDevlxdApp } from "./devlxd_app.ts";
import { EventHub } from "./event_hub.ts";
import type { Instance } from "./instance.ts";

const FP = "a".repeat(64);

function instance(overrides: Partial<Instance> = {}): Instance {
  return {
    name: "vm1",
    cid: 3,
    status: { kind: "none" },
    agentCert: "",
    clientCert: "",
    clientKey: "",
    config: {
      "user.foo": "bar",
      "user.meta-data": "extra: 1\n",
      "cloud-init.user-data": "#cloud-config\n",
      "limits.cpu": "2",
      "security.devlxd.images": "true",
    },
    devices: { eth0: { name: "eth0", network: "lxdbr0", type: "nic" } },
    runtime: { agentState: "CONNECTED", ready: false },
    ...overrides,
  };
}

function setup() {
  const ready: [string, boolean][] = [];
  const events = new EventHub<DevlxdEvent>();
  const imagesDir = Deno.makeTempDirSync({ prefix: "devlxd-images-" });
  Deno.writeTextFileSync(join(imagesDir, FP), "image bytes");
  const app = createHostDevlxdApp({
    setReady: (name, r) => ready.push([name, r]),
    events,
    location: "host1",
    imagesDir,
  });
  const request = (path: string, init: RequestInit = {}, inst: Instance = instance()) =>
    app.request(path, init, { instance: inst });
  return {
    app,
    ready,
    events,
    request,
    [Symbol.dispose]: () => Deno.removeSync(imagesDir, { recursive: true }),
  };
}

async function envelope(response: Response) {
  return { status: response.status, body: await response.json() };
}

async function metadata(response: Response): Promise<unknown> {
  assert.equal(response.status, 200);
  const body = await response.json();
  assert.equal(body.type, "sync");
  assert.equal(body.status_code, 200);
  return body.metadata;
}

async function error(response: Response, status: number, message: string | RegExp) {
  assert.equal(response.status, status);
  const body = await response.json();
  assert.equal(body.type, "error");
  assert.equal(body.error_code, status);
  if (typeof message === "string") assert.equal(body.error, message);
  else assert.match(body.error, message);
}

Deno.test("devlxd GET / and GET /1.0 answer in the LXD envelope with the ready state", async () => {
  using t = setup();
  assert.deepEqual(await metadata(await t.request("/")), ["/1.0"]);
  assert.deepEqual(await metadata(await t.request("/1.0")), {
    api_version: "1.0",
    location: "host1",
    instance_type: "virtual-machine",
    state: "Started",
  });
  const ready = instance({ runtime: { agentState: "CONNECTED", ready: true } });
  assert.equal(
    (await metadata(await t.request("/1.0", {}, ready)) as { state: string }).state,
    "Ready",
  );
});

Deno.test("devlxd PATCH /1.0 stores Ready/Started and refuses bad bodies and states with 400", async () => {
  using t = setup();
  const patch = (body: string) => t.request("/1.0", { method: "PATCH", body });
  assert.equal(await metadata(await patch('{"state":"Ready"}')), null);
  await metadata(await patch('{"state":"Started"}'));
  assert.deepEqual(t.ready, [["vm1", true], ["vm1", false]]);
  await error(await patch("not json"), 400, "Invalid request body");
  await error(await patch("[1]"), 400, "Invalid request body");
  await error(await patch('{"state":"Frozen"}'), 400, "Invalid state");
  await error(await patch("{}"), 400, "Invalid state");
  assert.equal(t.ready.length, 2);
});

Deno.test("devlxd GET /1.0/config lists only user.* and cloud-init.* keys", async () => {
  using t = setup();
  assert.deepEqual(await metadata(await t.request("/1.0/config")), [
    "/1.0/config/cloud-init.user-data",
    "/1.0/config/user.foo",
    "/1.0/config/user.meta-data",
  ]);
});

Deno.test("devlxd GET /1.0/config/{key}: value, 403 outside user.*/cloud-init.*, 404 unset, 400 traversal", async () => {
  using t = setup();
  assert.equal(await metadata(await t.request("/1.0/config/user.foo")), "bar");
  assert.equal(
    await metadata(await t.request("/1.0/config/cloud-init.user-data")),
    "#cloud-config\n",
  );
  await error(await t.request("/1.0/config/limits.cpu"), 403, "Forbidden");
  await error(await t.request("/1.0/config/security.devlxd.images"), 403, "Forbidden");
  await error(await t.request("/1.0/config/user.absent"), 404, "Not Found");
  await error(await t.request("/1.0/config/..%2F..%2Fetc%2Fpasswd"), 400, "Invalid config key");
  await error(await t.request("/1.0/config/user.foo%2F..%2Fbar"), 400, "Invalid config key");
  await error(await t.request("/1.0/config/user.foo/../limits.cpu"), 403, "Forbidden");
});

Deno.test("devlxd GET /1.0/meta-data and /1.0/devices", async () => {
  using t = setup();
  assert.equal(
    await metadata(await t.request("/1.0/meta-data")),
    "instance-id: vm1\nlocal-hostname: vm1\nextra: 1\n",
  );
  assert.deepEqual(await metadata(await t.request("/1.0/devices")), {
    eth0: { name: "eth0", network: "lxdbr0", type: "nic" },
  });
});

Deno.test("devlxd security.devlxd=false answers 403 on every endpoint", async () => {
  using t = setup();
  const off = instance({ config: { "security.devlxd": "false", "user.foo": "bar" } });
  for (const path of ["/", "/1.0", "/1.0/config", "/1.0/config/user.foo", "/1.0/events", "/nope"]) {
    await error(await t.request(path, {}, off), 403, "Forbidden");
  }
  await error(
    await t.request("/1.0", { method: "PATCH", body: '{"state":"Ready"}' }, off),
    403,
    "Forbidden",
  );
  assert.equal(t.ready.length, 0);
});

Deno.test("devlxd unknown paths get 404 and wrong methods 405, in the envelope", async () => {
  using t = setup();
  await error(await t.request("/2.0"), 404, "Not Found");
  await error(await t.request("/1.0/nope"), 404, "Not Found");
  await error(await t.request("/1.0/config/user.a/b"), 404, "Not Found");
  await error(await t.request("/1.0", { method: "DELETE" }), 405, "Method Not Allowed");
  await error(
    await t.request("/1.0/config", { method: "POST", body: "{}" }),
    405,
    "Method Not Allowed",
  );
  await error(
    await t.request("/1.0/devices", { method: "PUT", body: "{}" }),
    405,
    "Method Not Allowed",
  );
  await error(
    await t.request(`/1.0/images/${FP}/export`, { method: "POST" }),
    405,
    "Method Not Allowed",
  );
});

Deno.test("devlxd request without an authenticated instance gets 401", async () => {
  using t = setup();
  const { status, body } = await envelope(await t.app.request("/1.0"));
  assert.equal(status, 401);
  assert.equal(body.error, "Unauthorized");
});

Deno.test("devlxd GET /1.0/events streams this instance's events, filtered by ?type=", async () => {
  using t = setup();
  const controller = new AbortController();
  const response = await t.request("/1.0/events?type=device", { signal: controller.signal });
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("content-type"), "application/x-ndjson");
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  const ts = "2026-01-01T00:00:00.000Z";
  t.events.publish("vm2", {
    timestamp: ts,
    type: "device",
    metadata: { name: "x", action: "added", config: { type: "nic" } },
  });
  t.events.publish("vm1", {
    timestamp: ts,
    type: "config",
    metadata: { key: "user.a", old_value: "", value: "b" },
  });
  const device: DevlxdEvent = {
    timestamp: ts,
    type: "device",
    metadata: { name: "eth1", action: "added", config: { type: "nic" } },
  };
  t.events.publish("vm1", device);
  const { value } = await reader.read();
  assert.deepEqual(JSON.parse(value!), device);
  await reader.cancel();
  assert.equal(t.events.subscriberCount("vm1"), 0);
  await error(await t.request("/1.0/events?type=config,bogus"), 400, /Invalid event type "bogus"/);
});

Deno.test("devlxd image export streams the file only with security.devlxd.images and a valid fingerprint", async () => {
  using t = setup();
  const ok = await t.request(`/1.0/images/${FP}/export`);
  assert.equal(ok.status, 200);
  assert.equal(ok.headers.get("content-length"), "11");
  assert.equal(await ok.text(), "image bytes");
  await error(await t.request(`/1.0/images/${"b".repeat(64)}/export`), 404, "Not Found");
  await error(
    await t.request("/1.0/images/..%2F..%2Fetc%2Fpasswd/export"),
    400,
    "Invalid fingerprint",
  );
  await error(await t.request(`/1.0/images/${"A".repeat(64)}/export`), 400, "Invalid fingerprint");
  await error(await t.request("/1.0/images/../export"), 404, "Not Found");
  const noImages = instance({ config: {} });
  await error(await t.request(`/1.0/images/${FP}/export`, {}, noImages), 403, "Forbidden");
});

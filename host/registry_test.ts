import assert from "node:assert/strict";
import { join } from "node:path";
import { MAX_CID } from "../shared/api.ts";
import { type NewInstance, Registry, SEEN_PERSIST_INTERVAL_MS } from "./registry.ts";
import { RegistryError } from "./registry_error.ts";

const PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
const KEY = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";

function spec(name: string, cid: number, extra: Partial<NewInstance> = {}): NewInstance {
  return { name, cid, agentCert: PEM, clientCert: PEM, clientKey: KEY, ...extra };
}

async function withDb(fn: (path: string) => void | Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "registry-test-" });
  try {
    await fn(join(dir, "registry.db"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("Registry keeps added instances across a reopen", () =>
  withDb((path) => {
    {
      using r = Registry.open(path);
      r.add(spec("vm1", 3, {
        status: { kind: "qmp", path: "/run/vm1.qmp", chardev: "ring", size: 16 },
        config: { "user.foo": "bar", "security.devlxd": "true" },
        devices: { eth0: { type: "nic", network: "lxdbr0", name: "eth0" } },
      }));
      r.add(spec("vm0", 4, { hybrid: "/run/fc/vm0.vsock" }));
    }
    using r = Registry.open(path);
    assert.deepEqual(r.list().map((i) => i.name), ["vm0", "vm1"]);
    const vm1 = r.require("vm1");
    assert.equal(vm1.cid, 3);
    assert.deepEqual(vm1.status, { kind: "qmp", path: "/run/vm1.qmp", chardev: "ring", size: 16 });
    assert.deepEqual(vm1.config, { "security.devlxd": "true", "user.foo": "bar" });
    assert.deepEqual(vm1.devices.eth0, { type: "nic", network: "lxdbr0", name: "eth0" });
    assert.deepEqual(vm1.runtime, { agentState: "STOPPED", ready: false });
    assert.equal(r.get("vm0")?.hybrid, "/run/fc/vm0.vsock");
    assert.equal(r.byCid(4)?.name, "vm0");
    assert.equal(r.byCid(5), undefined);
  }));

Deno.test("Registry.open() refuses a second holder with a clear LOCKED error", () =>
  withDb((path) => {
    const first = Registry.open(path);
    assert.throws(
      () => Registry.open(path),
      (e) =>
        e instanceof RegistryError && e.code === "LOCKED" && /in use by another/.test(e.message),
    );
    first.close();
    using second = Registry.open(path);
    assert.equal(second.size, 0);
  }));

Deno.test("Registry.add() rejects bad names, reserved or too large CIDs and duplicates, leaving the store unchanged", () =>
  withDb((path) => {
    {
      using r = Registry.open(path);
      r.add(spec("vm1", 10, { hybrid: "/run/a.vsock" }));
      const cases: [NewInstance, RegExp][] = [
        [spec("vm1", 11), /Instance "vm1" already exists/],
        [spec("vm2", 10), /CID 10 is already used by instance "vm1"/],
        [spec("vm2", 11, { hybrid: "/run/a.vsock" }), /already used by instance "vm1"/],
        [spec("VM2", 11), /Invalid instance name/],
        [spec("-vm", 11), /Invalid instance name/],
        [spec("a/../b", 11), /Invalid instance name/],
        [spec("x".repeat(64), 11), /Invalid instance name/],
        [spec("vm2", 2), /Invalid CID 2/],
        [spec("vm2", 0), /Invalid CID 0/],
        [spec("vm2", MAX_CID + 1), /Invalid CID 4294967295/],
        [spec("vm2", 3.5), /not an integer/],
        [spec("vm2", 11, { config: { "volatile.x": "1" } }), /Unknown config key/],
        [spec("vm2", 11, { config: { "user.a": 1 as unknown as string } }), /not a string/],
        [spec("vm2", 11, { devices: { eth0: { network: "x" } } }), /"type" is required/],
        [spec("vm2", 11, { hybrid: "relative.sock" }), /absolute path/],
        [
          spec("vm2", 11, { status: { kind: "qmp", path: "/q", chardev: "bad id", size: 16 } }),
          /chardev/,
        ],
        [spec("vm2", 11, { agentCert: "nope" }), /agent certificate/],
      ];
      for (const [bad, message] of cases) {
        assert.throws(() => r.add(bad), message, `${JSON.stringify(bad.name)} cid=${bad.cid}`);
      }
      assert.doesNotThrow(() => r.add(spec("vm2", MAX_CID)));
    }
    using r = Registry.open(path);
    assert.deepEqual(r.list().map((i) => [i.name, i.cid]), [["vm1", 10], ["vm2", MAX_CID]]);
  }));

Deno.test("Registry config set/unset returns old values, persists, and refuses keys outside known namespaces", () =>
  withDb((path) => {
    {
      using r = Registry.open(path);
      r.add(spec("vm1", 3));
      assert.deepEqual(r.setConfig("vm1", "user.foo", "a"), { old: "", value: "a" });
      assert.deepEqual(r.setConfig("vm1", "user.foo", "b"), { old: "a", value: "b" });
      assert.equal(r.unsetConfig("vm1", "user.absent"), undefined);
      r.setConfig("vm1", "cloud-init.user-data", "#cloud-config\n");
      assert.equal(r.unsetConfig("vm1", "cloud-init.user-data"), "#cloud-config\n");
      for (
        const [key, value, message] of [
          ["../etc/passwd", "x", /Invalid config key/],
          ["user.foo/../bar", "x", /Invalid config key/],
          ["user..foo", "x", /Invalid config key/],
          ["user.", "x", /Invalid config key/],
          ["raw.qemu", "x", /Unknown config key/],
          ["security.devlxd", "maybe", /use "true" or "false"/],
        ] as const
      ) assert.throws(() => r.setConfig("vm1", key, value), message);
      assert.throws(
        () => r.setConfig("nope", "user.a", "b"),
        (e) => (e as RegistryError).code === "NOT_FOUND",
      );
    }
    using r = Registry.open(path);
    assert.deepEqual(r.require("vm1").config, { "user.foo": "b" });
  }));

Deno.test("Registry devices: add refuses duplicates, remove returns the config, both persist", () =>
  withDb((path) => {
    {
      using r = Registry.open(path);
      r.add(spec("vm1", 3));
      r.addDevice("vm1", "eth0", { type: "nic", network: "br0" });
      r.addDevice("vm1", "root", { type: "disk", path: "/" });
      assert.throws(
        () => r.addDevice("vm1", "eth0", { type: "nic" }),
        (e) => (e as RegistryError).code === "ALREADY_EXISTS",
      );
      assert.throws(() => r.addDevice("vm1", "../x", { type: "nic" }), /Invalid device name/);
      assert.deepEqual(r.removeDevice("vm1", "root"), { type: "disk", path: "/" });
      assert.throws(
        () => r.removeDevice("vm1", "root"),
        (e) => (e as RegistryError).code === "NOT_FOUND",
      );
    }
    using r = Registry.open(path);
    assert.deepEqual(r.require("vm1").devices, { eth0: { type: "nic", network: "br0" } });
  }));

Deno.test("Registry.updateRuntime() stores ready and agent state durably; remove() drops everything", () =>
  withDb((path) => {
    {
      using r = Registry.open(path);
      r.add(spec("vm1", 3, { config: { "user.a": "1" }, devices: { d: { type: "nic" } } }));
      r.add(spec("vm2", 4));
      r.updateRuntime("vm1", {
        ready: true,
        agentState: "CONNECTED",
        lastChange: "2026-01-01T00:00:00.000Z",
      });
      assert.throws(
        () => r.updateRuntime("vm1", { agentState: "BOGUS" as "STARTED" }),
        /Invalid agent state/,
      );
      r.remove("vm2");
    }
    using r = Registry.open(path);
    assert.deepEqual(r.require("vm1").runtime, {
      agentState: "CONNECTED",
      ready: true,
      lastChange: "2026-01-01T00:00:00.000Z",
    });
    assert.equal(r.get("vm2"), undefined);
    assert.equal(r.byCid(4), undefined);
    r.remove("vm1");
    assert.equal(r.byCid(3), undefined);
    r.add(spec("vm1", 3));
    assert.deepEqual(r.require("vm1").config, {});
    assert.deepEqual(r.require("vm1").devices, {});
  }));

Deno.test("Registry.recordSeen() is visible at once and reaches the file at the latest on close()", () =>
  withDb((path) => {
    let now = Date.parse("2026-01-01T00:00:00Z");
    {
      using r = Registry.open(path, { now: () => now });
      r.add(spec("vm1", 3));
      r.recordSeen("vm1");
      now += 1000;
      r.recordSeen("vm1");
      assert.equal(r.require("vm1").runtime.lastSeen, "2026-01-01T00:00:01.000Z");
      now += SEEN_PERSIST_INTERVAL_MS;
      r.recordSeen("vm1");
      now += 5;
      r.recordSeen("vm1");
      r.recordSeen("unknown");
    }
    using r = Registry.open(path);
    assert.equal(r.require("vm1").runtime.lastSeen, "2026-01-01T00:01:01.005Z");
  }));

Deno.test("Registry returns copies: callers cannot change the store by mutating results", () =>
  withDb((path) => {
    using r = Registry.open(path);
    r.add(spec("vm1", 3));
    const copy = r.require("vm1");
    copy.config["user.x"] = "y";
    copy.runtime.ready = true;
    assert.deepEqual(r.require("vm1").config, {});
    assert.equal(r.require("vm1").runtime.ready, false);
  }));

Deno.test("Registry meta settings persist", () =>
  withDb((path) => {
    {
      using r = Registry.open(path);
      assert.equal(r.getMeta("port"), undefined);
      r.setMeta("port", "4242");
    }
    using r = Registry.open(path);
    assert.equal(r.getMeta("port"), "4242");
  }));

Deno.test("Registry.view() and viewByCid() give the stored instance, which follows later changes; get() gives copies", () =>
  withDb((path) => {
    using r = Registry.open(path);
    r.add(spec("vm1", 3));
    const view = r.view("vm1")!;
    const copy = r.get("vm1")!;
    assert.equal(r.viewByCid(3), view);
    assert.notEqual(r.get("vm1"), copy);
    r.setConfig("vm1", "user.foo", "bar");
    assert.equal(view.config["user.foo"], "bar");
    assert.equal(copy.config["user.foo"], undefined);
    r.remove("vm1");
    assert.equal(r.view("vm1"), undefined);
    assert.equal(r.viewByCid(3), undefined);
  }));

import assert from "node:assert/strict";
import { GuestAgentStatus } from "./agent_state.ts";
import { createAgentApi } from "./agent_api.ts";
import { collectState } from "./guest_state.ts";

function api(guest = true) {
  const status = new GuestAgentStatus();
  return createAgentApi({
    status: () => status.snapshot(),
    applyConnection: () => Promise.resolve(),
    publish: () => {},
    version: "9.9",
    facts: () => ({
      kernel: "Linux",
      kernelArchitecture: "x86_64",
      kernelRelease: "6.1.0-test",
      kernelBuild: "#1 SMP",
      osName: "Debian GNU/Linux",
      osVersion: "12",
      hostname: "vm1",
    }),
    guest: guest ? {} : undefined,
  });
}

Deno.test("agent API GET /1.0 reports the guest's kernel, OS and the exec extension", async () => {
  const body = await (await api().request("/1.0")).json();
  const env = body.metadata.environment;
  assert.equal(env.kernel, "Linux");
  assert.equal(env.kernel_architecture, "x86_64");
  assert.equal(env.kernel_version, "6.1.0-test");
  assert.equal(env.os_name, "Debian GNU/Linux");
  assert.equal(env.os_version, "12");
  assert.equal(env.server_name, "vm1");
  assert.ok(body.metadata.api_extensions.includes("container_exec_user_group_cwd"));
});

Deno.test("agent API GET /1.0/state answers the guest's state in the LXD envelope", async () => {
  const res = await api().request("/1.0/state");
  assert.equal(res.status, 200);
  const body = await res.json();
  assert.equal(body.type, "sync");
  const expected = collectState();
  assert.deepEqual(Object.keys(body.metadata).sort(), Object.keys(expected).sort());
  assert.deepEqual(
    Object.keys(body.metadata.network).sort(),
    Object.keys(expected.network!).sort(),
  );
  assert.equal(typeof body.metadata.memory.usage, "number");
  assert.ok(body.metadata.processes > 0);
});

Deno.test("agent API PUT /1.0/state answers 501 as lxd-agent does", async () => {
  const res = await api().request("/1.0/state", { method: "PUT", body: "{}" });
  assert.equal(res.status, 501);
  assert.equal((await res.json()).error, "Not implemented");
});

Deno.test("agent API GET /1.0/metrics answers lxd-agent's metrics document", async () => {
  const body = await (await api().request("/1.0/metrics")).json();
  assert.deepEqual(Object.keys(body.metadata).sort(), [
    "cpu_seconds_total",
    "disk",
    "filesystem",
    "memory",
    "network",
    "procs_total",
  ]);
  assert.ok(body.metadata.memory.memory_mem_total_bytes > 0);
});

Deno.test("agent API without the guest routes answers 404 for /1.0/state", async () => {
  assert.equal((await api(false).request("/1.0/state")).status, 404);
});

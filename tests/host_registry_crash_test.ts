/**
 * Durability of the registry across a SIGKILL at an arbitrary moment: a
 * writer process reports each change after `setConfig()` returned; every
 * reported change must be in the store after the writer is killed.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { Registry } from "../host/registry.ts";
import { bounded, tempDir } from "./host_harness.ts";

const REGISTRY = new URL("../host/registry.ts", import.meta.url).href;

Deno.test("no change reported committed is lost when the writer is killed with SIGKILL", async () => {
  await using dir = await tempDir("host-crash-");
  const path = join(dir.path, "registry.db");
  const script = `
    import { Registry } from ${JSON.stringify(REGISTRY)};
    const r = Registry.open(${JSON.stringify(path)});
    const pem = "-----BEGIN CERTIFICATE-----\\nA\\n-----END CERTIFICATE-----\\n";
    r.add({ name: "vm1", cid: 3, agentCert: pem, clientCert: pem, clientKey: pem });
    const out = (s) => Deno.stdout.writeSync(new TextEncoder().encode(s));
    for (let i = 0; ; i++) { r.setConfig("vm1", "user.k" + i, String(i)); out(i + "\\n"); }
  `;
  const child = new Deno.Command(Deno.execPath(), {
    args: ["eval", script],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let reported = -1;
  let buffer = "";
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  while (reported < 200) {
    const { value, done } = await bounded(reader.read(), 30_000, "the writer's progress");
    assert.equal(done, false, "the writer exited early");
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop()!;
    if (lines.length > 0) reported = Number(lines.at(-1));
  }
  child.kill("SIGKILL");
  await child.status;
  await reader.cancel();
  await child.stderr.cancel();
  using r = Registry.open(path);
  const config = r.require("vm1").config;
  for (let i = 0; i <= reported; i++) assert.equal(config[`user.k${i}`], String(i), `user.k${i}`);
});

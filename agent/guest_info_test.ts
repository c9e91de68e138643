import assert from "node:assert/strict";
import { parseOsRelease, readGuestFacts, serverEnvironment } from "./guest_info.ts";

Deno.test("parseOsRelease() reads NAME and VERSION_ID, quoted or not", () => {
  assert.deepEqual(parseOsRelease('NAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n'), {
    name: "Debian GNU/Linux",
    version: "12",
  });
  assert.deepEqual(parseOsRelease("NAME=Arch\n"), { name: "Arch", version: "" });
});

Deno.test("readGuestFacts() reports what uname and /etc/os-release say on this machine", async () => {
  const uname = async (flag: string) =>
    new TextDecoder().decode(
      (await new Deno.Command("uname", { args: [flag], stdout: "piped" }).output()).stdout,
    ).trim();
  const facts = readGuestFacts();
  assert.equal(facts.kernel, await uname("-s"));
  assert.equal(facts.kernelRelease, await uname("-r"));
  assert.equal(facts.kernelBuild, await uname("-v"));
  assert.equal(facts.kernelArchitecture, await uname("-m"));
  assert.equal(facts.hostname, await uname("-n"));
  const os = parseOsRelease(await Deno.readTextFile("/etc/os-release"));
  assert.equal(facts.osName, os.name);
  const env = serverEnvironment(facts, 42, "1.2");
  // lxd-agent 5.0.2 puts the kernel release in kernel_version.
  assert.equal(env.kernel_version, facts.kernelRelease);
  assert.equal(env.server_pid, 42);
  assert.ok("storage_supported_drivers" in env);
});

Deno.test("serverEnvironment() says server lxd-agent, which LXD's client needs to treat it as an agent", () => {
  const env = serverEnvironment(readGuestFacts(), 1, "0.1.0");
  assert.equal(env.server, "lxd-agent");
  assert.equal(env.server_version, "0.1.0");
});

/**
 * Denial of service and lost work against a daemon process (issue 13), over
 * the unix ("hybrid vsock") transport with real TLS: an attacker without the
 * agent's key, or a guest that misbehaves, must not starve its own agent or
 * other instances, and must not flood the log.
 */

import "reflect-metadata";
import assert from "node:assert/strict";
import { join } from "node:path";
import type { FdSocket } from "../shared/vsock/mod.ts";
import {
  type AgentIdentity,
  agentIdentity,
  agentRequest,
  cliOk,
  connectHybridListener,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

interface Setup extends AsyncDisposable {
  daemon: DaemonProcess;
  stateDir: string;
  hybrid: string;
  id: AgentIdentity;
}

/** vm1 (hybrid, CID 10, `user.foo=bar`) and a daemon serving it. */
async function setup(extra: string[] = []): Promise<Setup> {
  const dir = await tempDir("host-hard-");
  const hybrid = join(dir.path, "vm1.vsock");
  await cliOk([
    "instance",
    "add",
    "vm1",
    "--cid",
    "10",
    "--hybrid",
    hybrid,
    "-c",
    "user.foo=bar",
    "--state-dir",
    dir.path,
  ]);
  const daemon = await DaemonProcess.start(dir.path, extra);
  return {
    daemon,
    stateDir: dir.path,
    hybrid,
    id: await agentIdentity(dir.path, "vm1"),
    [Symbol.asyncDispose]: async () => {
      await daemon[Symbol.asyncDispose]();
      await dir[Symbol.asyncDispose]();
    },
  };
}

Deno.test("40 connections that never finish a TLS handshake leave the agent's reads working and log one summary line", async () => {
  await using t = await setup();
  // The attacker: a guest process without the agent's key holds 40 connections
  // to the host port, each stuck in the handshake (a TLS record header, then nothing).
  const attack: FdSocket[] = [];
  try {
    for (let i = 0; i < 40; i++) {
      const socket = await connectHybridListener(t.hybrid, t.daemon.port);
      socket.on("error", () => {});
      socket.write(new Uint8Array([0x16, 0x03, 0x01]));
      attack.push(socket);
    }
    const logBefore = t.daemon.lines.length;
    let ok = 0;
    const failures: string[] = [];
    for (let i = 0; i < 10; i++) {
      try {
        const r = await agentRequest(t.hybrid, t.daemon.port, t.id, "/1.0/config/user.foo");
        if (r.status === 200 && r.body.metadata === "bar") ok++;
        else failures.push(`status ${r.status}`);
      } catch (error) {
        failures.push(String(error));
      }
    }
    assert.equal(ok, 10, `the agent's reads under attack: ${ok}/10 succeeded (${failures[0]})`);
    const refusalLines = t.daemon.lines.slice(logBefore).filter((l) =>
      /refused|evicted|too many/.test(l)
    );
    assert.ok(refusalLines.length <= 2, `log lines per refusal:\n${refusalLines.join("\n")}`);
  } finally {
    for (const socket of attack) socket.destroy();
  }
});

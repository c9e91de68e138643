/**
 * The daemon on real AF_VSOCK: peer CID plus certificate pick the instance.
 * Needs a machine whose vsock can reach itself (vsock_loopback, as in the VM
 * harness): set LXD_VSOCK_LOOPBACK=1. Elsewhere it is skipped, because a
 * connect to this machine's own CID (or to CID 2) must not be made here.
 */

import "reflect-metadata";
import assert from "node:assert/strict";
import { httpRequest } from "../shared/http/mod.ts";
import { connectTls } from "../shared/tls/mod.ts";
import { connectVsock, localCid } from "../shared/vsock/mod.ts";
import {
  type AgentIdentity,
  agentIdentity,
  cliOk,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

const enabled = Deno.env.get("LXD_VSOCK_LOOPBACK") === "1";
if (!enabled) {
  console.log(
    "host_vsock_test: skipped (set LXD_VSOCK_LOOPBACK=1 on a machine with vsock loopback, e.g. the VM harness)",
  );
}

async function vsockRequest(cid: number, port: number, id: AgentIdentity, path: string) {
  const raw = await connectVsock(cid, port, { timeout: 5000 });
  try {
    const secure = await connectTls(raw, { cert: id.cert, key: id.key, pinned: id.serverCert });
    try {
      const response = await httpRequest(secure, new Request(`http://devlxd${path}`), {
        timeout: 10_000,
      });
      return { status: response.status, body: await response.json() };
    } finally {
      secure.destroy();
    }
  } finally {
    raw.destroy();
  }
}

Deno.test({
  name:
    "over AF_VSOCK the instance is found by peer CID and certificate; another CID's certificate gets 401",
  ignore: !enabled,
  async fn() {
    await using dir = await tempDir("host-vsock-");
    const cid = Number(Deno.env.get("LXD_VSOCK_LOOPBACK_CID") ?? localCid());
    const other = cid === 999 ? 998 : 999;
    await cliOk([
      "instance",
      "add",
      "self",
      "--cid",
      String(cid),
      "--state-dir",
      dir.path,
      "-c",
      "user.x=1",
    ]);
    await cliOk(["instance", "add", "elsewhere", "--cid", String(other), "--state-dir", dir.path]);
    await using daemon = await DaemonProcess.start(dir.path, ["--transport", "vsock"]);
    const status = JSON.parse(await cliOk(["status", "--format", "json", "--state-dir", dir.path]));
    assert.equal(status.vsock.port, daemon.port);
    const self = await vsockRequest(
      cid,
      daemon.port,
      await agentIdentity(dir.path, "self"),
      "/1.0/config/user.x",
    );
    assert.deepEqual([self.status, self.body.metadata], [200, "1"]);
    const wrong = await vsockRequest(
      cid,
      daemon.port,
      await agentIdentity(dir.path, "elsewhere"),
      "/1.0",
    );
    assert.deepEqual([wrong.status, wrong.body.error], [401, "Unauthorized"]);
  },
});

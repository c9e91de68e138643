/**
 * The daemon on real AF_VSOCK, where the kernel-reported peer CID picks the
 * instance together with the certificate. Needs a machine whose vsock reaches
 * itself (vsock_loopback, as in the VM harness's L1): set LXD_VSOCK_LOOPBACK=1.
 * A loopback connection to CID 1 arrives from CID 1, which no instance can
 * have, so it must get 401 even with a registered certificate. Where this
 * machine has a guest CID that loops back (a VM with a virtio transport and
 * vsock_loopback), also set LXD_VSOCK_LOOPBACK_CID to it: an instance
 * registered with that CID is then served. Elsewhere the tests are skipped:
 * never connect to this machine's own CID (or CID 2) without loopback.
 */

import "reflect-metadata";
import assert from "node:assert/strict";
import { httpRequest } from "../shared/http/mod.ts";
import { connectTls } from "../shared/tls/mod.ts";
import { connectVsock } from "../shared/vsock/mod.ts";
import {
  type AgentIdentity,
  agentIdentity,
  cliOk,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";
import { requires } from "../shared/_requires.ts";

const selfCid = Number(Deno.env.get("LXD_VSOCK_LOOPBACK_CID") ?? 0);
const noLoopback = Deno.env.get("LXD_VSOCK_LOOPBACK") === "1"
  ? undefined
  : "needs LXD_VSOCK_LOOPBACK=1 where vsock loops back (as in make e2e's L1)";
const noLoopbackCid = selfCid >= 3
  ? undefined
  : "needs LXD_VSOCK_LOOPBACK_CID, a guest CID of this machine that loops back";

async function vsockRequest(cid: number, port: number, id: AgentIdentity, path: string) {
  const raw = await connectVsock(cid, port, { timeout: 5000 });
  try {
    const secure = await connectTls(raw, { cert: id.cert, key: id.key, pinned: id.serverCert });
    const response = await httpRequest(secure, new Request(`http://devlxd${path}`), {
      timeout: 10_000,
    });
    return { status: response.status, body: await response.json() };
  } finally {
    raw.destroy();
  }
}

Deno.test(requires(noLoopback, {
  name:
    "over AF_VSOCK a registered certificate from a CID no instance has (loopback CID 1) gets 401",
  async fn() {
    await using dir = await tempDir("host-vsock-");
    await cliOk(["instance", "add", "vm1", "--cid", "10", "--state-dir", dir.path]);
    await using daemon = await DaemonProcess.start(dir.path, [
      "--transport",
      "vsock",
      "--no-monitor",
    ]);
    const status = JSON.parse(await cliOk(["status", "--format", "json", "--state-dir", dir.path]));
    assert.equal(status.vsock.port, daemon.port);
    const reply = await vsockRequest(1, daemon.port, await agentIdentity(dir.path, "vm1"), "/1.0");
    assert.deepEqual([reply.status, reply.body.error], [401, "Unauthorized"]);
    await daemon.waitFor(/msg="unauthorized agent connection" peer=cid:1 /);
  },
}));

Deno.test(requires([noLoopback, noLoopbackCid], {
  name:
    "over AF_VSOCK the instance with the peer's CID and certificate is served; another's certificate gets 401",
  async fn() {
    await using dir = await tempDir("host-vsock-");
    await cliOk([
      "instance",
      "add",
      "self",
      "--cid",
      String(selfCid),
      "--state-dir",
      dir.path,
      "-c",
      "user.x=1",
    ]);
    await cliOk([
      "instance",
      "add",
      "other",
      "--cid",
      String(selfCid === 999 ? 998 : 999),
      "--state-dir",
      dir.path,
    ]);
    await using daemon = await DaemonProcess.start(dir.path, [
      "--transport",
      "vsock",
      "--no-monitor",
    ]);
    const self = await vsockRequest(
      selfCid,
      daemon.port,
      await agentIdentity(dir.path, "self"),
      "/1.0/config/user.x",
    );
    assert.deepEqual([self.status, self.body.metadata], [200, "1"]);
    const wrong = await vsockRequest(
      selfCid,
      daemon.port,
      await agentIdentity(dir.path, "other"),
      "/1.0",
    );
    assert.deepEqual([wrong.status, wrong.body.error], [401, "Unauthorized"]);
  },
}));

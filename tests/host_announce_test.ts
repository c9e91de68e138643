/**
 * The daemon's monitor end to end over hybrid vsock: a STARTED line on the
 * instance's status channel makes the host announce itself to the agent API
 * (`PUT /1.0` through `<uds_path>` + `CONNECT 8443`, mutual TLS pinned to the
 * config drive's certificates); the agent's first request marks it CONNECTED.
 */

import "reflect-metadata";
import assert from "node:assert/strict";
import { join } from "node:path";
import { type ConnectionInfo, parseConnectionInfo } from "../shared/api.ts";
import { serveHttp, syncResponse } from "../shared/http/mod.ts";
import { acceptTls } from "../shared/tls/mod.ts";
import { listenHybridMux } from "../shared/vsock/mod.ts";
import { readConfigDrive } from "../host/config_drive.ts";
import {
  addHybridInstance,
  agentIdentity,
  agentRequest,
  bounded,
  cliOk,
  DaemonProcess,
  tempDir,
} from "./host_harness.ts";

Deno.test("a STARTED line makes the daemon announce itself with PUT /1.0; the agent's request marks it CONNECTED", async () => {
  await using dir = await tempDir("host-announce-");
  const statusFile = join(dir.path, "vm1.status");
  await Deno.writeTextFile(statusFile, "");
  const hybrid = await addHybridInstance(dir.path, ["--status-file", statusFile]);
  const drive = await readConfigDrive(join(dir.path, "instances", "vm1", "config"));

  // The agent API of the VM, as the VMM exposes it: <uds_path> + CONNECT 8443.
  using agentApi = listenHybridMux(hybrid, [8443], { replace: true });
  const announced = Promise.withResolvers<ConnectionInfo>();
  const serving = (async () => {
    for await (const socket of agentApi) {
      acceptTls(socket, { cert: drive.agentCert, key: drive.agentKey, pinned: drive.clientCert })
        .then(({ socket: secure }) =>
          serveHttp(secure, async (request) => {
            if (request.method === "PUT" && new URL(request.url).pathname === "/1.0") {
              announced.resolve(parseConnectionInfo(await request.json()));
            }
            return syncResponse(null);
          })
        )
        .catch(() => {});
    }
  })();

  await using daemon = await DaemonProcess.start(dir.path);
  await Deno.writeTextFile(statusFile, "STARTED\n", { append: true });
  const info = await bounded(announced.promise, 15_000, "the PUT /1.0 announce");
  assert.equal(info.cid, 2);
  assert.equal(info.port, daemon.port);
  assert.equal(info.certificate, drive.info.certificate);
  assert.equal(info.devlxd, true);

  const reply = await agentRequest(
    hybrid,
    daemon.port,
    await agentIdentity(dir.path, "vm1"),
    "/1.0",
  );
  assert.equal(reply.status, 200);
  await daemon.waitFor(/msg="agent state" .*instance=vm1 state=CONNECTED/);
  const list = JSON.parse(
    await cliOk(["instance", "list", "--format", "json", "--state-dir", dir.path]),
  );
  assert.equal(list[0].runtime.agentState, "CONNECTED");
  assert.ok(list[0].runtime.lastSeen);
  agentApi.close();
  await serving;
});

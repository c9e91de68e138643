/**
 * The agent's SFTP server end to end inside one process: the agent API app
 * served by serveHttp on a unix socket, `GET /1.0/sftp` upgraded as LXD's
 * `qemu.FileSFTPConn` does, driven by shared/sftp/client.ts.
 */
import assert from "node:assert/strict";
import { requires } from "../shared/_requires.ts";
import { serveHttp } from "../shared/http/mod.ts";
import { FX } from "../shared/sftp/codec.ts";
import { openSftp, SftpStatusError, SftpUpgradeError } from "../shared/sftp/client.ts";
import { getuid } from "../shared/vsock/_libc.ts";
import { connectUnix, listenUnix } from "../shared/vsock/mod.ts";
import { GuestAgentStatus } from "./agent_state.ts";
import { createAgentApi } from "./agent_api.ts";
import { guestPath, SftpPathError } from "./sftp_server.ts";

async function agentApi(guest = true) {
  const dir = await Deno.makeTempDir({ prefix: "lxd-vsock-sftp-" });
  const path = `${dir}/agent.sock`;
  const status = new GuestAgentStatus();
  const app = createAgentApi({
    status: () => status.snapshot(),
    applyConnection: () => Promise.resolve(),
    publish: () => {},
    version: "test",
    guest: guest ? {} : undefined,
  });
  const listener = listenUnix(path);
  const served: Promise<void>[] = [];
  const loop = (async () => {
    for await (const socket of listener) served.push(serveHttp(socket, app.fetch));
  })().catch(() => {});
  const work = await Deno.makeTempDir({ prefix: "lxd-vsock-sftp-files-" });
  return {
    work,
    sftp: async () => await openSftp(await connectUnix(path)),
    dial: () => connectUnix(path),
    async [Symbol.asyncDispose]() {
      listener.close();
      await loop;
      await Promise.all(served);
      await Deno.remove(dir, { recursive: true });
      await Deno.remove(work, { recursive: true });
    },
  };
}

Deno.test("guestPath() resolves against / and never climbs above it", () => {
  assert.equal(guestPath("a/../../etc/passwd"), "/etc/passwd");
  assert.equal(guestPath("/../../.."), "/");
  assert.equal(guestPath("."), "/");
  assert.equal(guestPath("//srv///x/./y/"), "/srv/x/y");
  assert.throws(() => guestPath("/etc/\0passwd"), SftpPathError);
  assert.throws(() => guestPath("/" + "a".repeat(5000)), SftpPathError);
});

Deno.test("sftp: a file round-trips with its content and mode; missing paths are NO_SUCH_FILE", async () => {
  await using agent = await agentApi();
  using client = await agent.sftp();
  const data = new Uint8Array(200_000).map((_, i) => (i * 31) & 0xff);
  const path = `${agent.work}/file.bin`;
  await client.writeFile(path, data, 0o600);
  await client.chmod(path, 0o640);
  assert.deepEqual(await client.readFile(path), data);
  const attrs = await client.lstat(path);
  assert.equal(attrs.size, data.byteLength);
  assert.equal(attrs.permissions! & 0o7777, 0o640);
  assert.equal(attrs.permissions! & 0o170000, 0o100000, "a regular file");
  const local = await Deno.lstat(path);
  assert.equal(local.mode! & 0o7777, 0o640);
  await assert.rejects(
    client.lstat(`${agent.work}/missing`),
    (e) => e instanceof SftpStatusError && e.code === FX.NO_SUCH_FILE,
  );
  await assert.rejects(
    client.readFile(`${agent.work}/missing`),
    (e) => e instanceof SftpStatusError && e.code === FX.NO_SUCH_FILE,
  );
  await assert.rejects(
    client.lstat(`${agent.work}/bad\0name`),
    (e) => e instanceof SftpStatusError && e.code === FX.FAILURE && /NUL/.test(e.message),
  );
});

Deno.test("sftp: directories, symlinks and listings", async () => {
  await using agent = await agentApi();
  using client = await agent.sftp();
  const dir = `${agent.work}/d`;
  await client.mkdir(dir, 0o750);
  assert.equal((await client.lstat(dir)).permissions! & 0o170000, 0o040000);
  await client.writeFile(`${dir}/a.txt`, new TextEncoder().encode("a"));
  await client.symlink("a.txt", `${dir}/link`);
  assert.equal(await client.readlink(`${dir}/link`), "a.txt");
  assert.equal((await client.lstat(`${dir}/link`)).permissions! & 0o170000, 0o120000);
  assert.equal((await client.stat(`${dir}/link`)).size, 1);
  const names = (await client.readdir(dir)).map((e) => e.name).sort();
  assert.deepEqual(names, ["a.txt", "link"]);
  assert.equal(await client.realpath(`${dir}/../d/./a.txt`), `${dir}/a.txt`);
  await assert.rejects(client.remove(dir), SftpStatusError, "REMOVE refuses a directory");
  await client.remove(`${dir}/link`);
  await client.remove(`${dir}/a.txt`);
  await client.rmdir(dir);
  await assert.rejects(Deno.lstat(dir), Deno.errors.NotFound);
});

Deno.test(requires(getuid() === 0 ? undefined : "not root (it changes a file's owner)", {
  name: "sftp: chown sets the owner LXD passes (X-LXD-uid/gid)",
  async fn() {
    await using agent = await agentApi();
    using client = await agent.sftp();
    const path = `${agent.work}/owned`;
    await client.writeFile(path, new Uint8Array([1]));
    await client.chown(path, 1234, 5678);
    const attrs = await client.lstat(path);
    assert.equal(attrs.uid, 1234);
    assert.equal(attrs.gid, 5678);
    assert.equal((await Deno.lstat(path)).uid, 1234);
  },
}));

Deno.test("sftp: the upgrade needs Upgrade: sftp; an agent without it answers as LXD reports (101 expected, 404)", async () => {
  await using agent = await agentApi();
  const { httpRequest } = await import("../shared/http/mod.ts");
  const plain = await httpRequest(await agent.dial(), new Request("http://a/1.0/sftp"));
  assert.equal(plain.status, 400);
  assert.equal((await plain.json()).error, "Missing or invalid upgrade header");
  await using bare = await agentApi(false);
  await assert.rejects(
    bare.sftp(),
    (e) =>
      e instanceof SftpUpgradeError && e.status === 404 &&
      e.message === "Dialing failed: expected status code 101 got 404",
  );
});

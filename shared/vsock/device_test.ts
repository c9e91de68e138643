import assert from "node:assert/strict";
import { TempDir } from "./_testing.ts";
import { DeviceFd } from "./device.ts";
import { SocketError } from "./socket_error.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

async function mkfifo(path: string): Promise<void> {
  const { success } = await new Deno.Command("mkfifo", { args: [path] }).output();
  assert.ok(success, "mkfifo failed");
}

function assertSocketError(error: unknown, syscall: string, code: string): true {
  assert.ok(error instanceof SocketError, `expected a SocketError, got ${error}`);
  assert.equal(error.syscall, syscall);
  assert.equal(error.code, code);
  return true;
}

Deno.test("DeviceFd.open() of a missing path returns undefined", () => {
  using dir = new TempDir();
  assert.equal(DeviceFd.open(dir.join("none")), undefined);
});

Deno.test("DeviceFd reads back through a FIFO what it wrote", async () => {
  using dir = new TempDir();
  await mkfifo(dir.join("fifo"));
  using fifo = DeviceFd.open(dir.join("fifo"));
  assert.ok(fifo !== undefined);
  assert.equal(fifo.path, dir.join("fifo"));
  assert.equal(fifo.write(encoder.encode("CONNECT 2:1024\n")), 15);
  const buf = new Uint8Array(64);
  const n = fifo.read(buf);
  assert.equal(n, 15);
  assert.equal(decoder.decode(buf.subarray(0, n)), "CONNECT 2:1024\n");
});

Deno.test("DeviceFd.read() of an empty FIFO returns undefined (would block)", async () => {
  using dir = new TempDir();
  await mkfifo(dir.join("fifo"));
  using fifo = DeviceFd.open(dir.join("fifo"));
  assert.ok(fifo !== undefined);
  assert.equal(fifo.read(new Uint8Array(16)), undefined);
});

Deno.test("DeviceFd.write() to a full FIFO returns undefined (would block)", async () => {
  using dir = new TempDir();
  await mkfifo(dir.join("fifo"));
  using fifo = DeviceFd.open(dir.join("fifo"));
  assert.ok(fifo !== undefined);
  const chunk = new Uint8Array(4096);
  let total = 0;
  let result: number | undefined;
  // A pipe holds 64 KiB by default (at most 1 MiB as configured): bounded.
  for (let i = 0; i < 1024; i++) {
    result = fifo.write(chunk);
    if (result === undefined) break;
    total += result;
  }
  assert.equal(result, undefined);
  assert.ok(total >= 4096, `wrote ${total} bytes before it filled`);
});

Deno.test("DeviceFd.read() of /dev/null returns 0 (end of file) and write() takes everything", () => {
  using device = DeviceFd.open("/dev/null");
  assert.ok(device !== undefined);
  assert.equal(device.read(new Uint8Array(8)), 0);
  assert.equal(device.write(encoder.encode("STARTED\n")), 8);
});

Deno.test("DeviceFd.open() of a unix socket throws a SocketError ENXIO naming the path", () => {
  using dir = new TempDir();
  const path = dir.join("port.sock");
  using _listener = Deno.listen({ transport: "unix", path });
  assert.throws(
    () => DeviceFd.open(path),
    (error: unknown) =>
      assertSocketError(error, "open", "ENXIO") &&
      (error as Error).message === `Cannot open ${path}: no such device or address`,
  );
});

Deno.test("DeviceFd.open() of a directory throws a SocketError EISDIR", () => {
  using dir = new TempDir();
  assert.throws(
    () => DeviceFd.open(dir.path),
    (error: unknown) =>
      assertSocketError(error, "open", "EISDIR") &&
      (error as Error).message.includes(dir.path),
  );
});

Deno.test("DeviceFd.stillThere() turns false when the path goes away or names another file", async () => {
  using dir = new TempDir();
  const path = dir.join("fifo");
  await mkfifo(path);
  using fifo = DeviceFd.open(path);
  assert.ok(fifo !== undefined);
  assert.equal(fifo.stillThere(), true);
  await Deno.remove(path);
  assert.equal(fifo.stillThere(), false);
  await mkfifo(path);
  assert.equal(fifo.stillThere(), false);
  using other = DeviceFd.open(path);
  assert.equal(other?.stillThere(), true);
});

Deno.test("DeviceFd.close() is idempotent; read and write then throw EBADF", async () => {
  using dir = new TempDir();
  await mkfifo(dir.join("fifo"));
  const fifo = DeviceFd.open(dir.join("fifo"));
  assert.ok(fifo !== undefined);
  assert.equal(fifo.closed, false);
  fifo.close();
  fifo.close();
  fifo[Symbol.dispose]();
  assert.equal(fifo.closed, true);
  assert.equal(fifo.stillThere(), false);
  assert.throws(
    () => fifo.read(new Uint8Array(4)),
    (e: unknown) => assertSocketError(e, "read", "EBADF"),
  );
  assert.throws(
    () => fifo.write(new Uint8Array(4)),
    (e: unknown) => assertSocketError(e, "write", "EBADF"),
  );
});

import assert from "node:assert/strict";
import {
  AF_UNIX,
  AF_VSOCK,
  decodeSockaddr,
  decodeSockaddrUn,
  decodeSockaddrVm,
  encodeSockaddrUn,
  encodeSockaddrVm,
  formatAddress,
  SOCKADDR_VM_SIZE,
  UNIX_PATH_MAX,
  VMADDR_CID_ANY,
} from "./sockaddr.ts";

Deno.test("encodeSockaddrVm() lays out family, port, CID and flags in host byte order", () => {
  const bytes = encodeSockaddrVm(3, 0x12345678, 1);
  assert.equal(bytes.byteLength, SOCKADDR_VM_SIZE);
  assert.deepEqual(
    [...bytes],
    [40, 0, 0, 0, 0x78, 0x56, 0x34, 0x12, 3, 0, 0, 0, 1, 0, 0, 0],
  );
});

Deno.test("encodeSockaddrVm() encodes VMADDR_CID_ANY as all ones", () => {
  const bytes = encodeSockaddrVm(VMADDR_CID_ANY, 1024);
  assert.deepEqual([...bytes.subarray(8, 12)], [0xff, 0xff, 0xff, 0xff]);
  assert.deepEqual([...bytes.subarray(4, 8)], [0x00, 0x04, 0, 0]);
});

Deno.test("decodeSockaddrVm() reads back what encodeSockaddrVm() wrote", () => {
  for (const [cid, port] of [[0, 0], [2, 8443], [VMADDR_CID_ANY, 0xFFFFFFFF], [1, 65534]]) {
    assert.deepEqual(decodeSockaddrVm(encodeSockaddrVm(cid, port)), { family: "vsock", cid, port });
  }
});

Deno.test("encodeSockaddrVm() rejects CIDs and ports outside 0..2^32-1 with a RangeError", () => {
  assert.throws(() => encodeSockaddrVm(-1, 1), RangeError);
  assert.throws(() => encodeSockaddrVm(2 ** 32, 1), RangeError);
  assert.throws(() => encodeSockaddrVm(3, 1.5), RangeError);
  assert.throws(() => encodeSockaddrVm(3, Number.NaN), RangeError);
  assert.throws(() => encodeSockaddrVm(3, 1, 256), RangeError);
});

Deno.test("decodeSockaddrVm() rejects another family and short buffers with a TypeError", () => {
  assert.throws(() => decodeSockaddrVm(encodeSockaddrUn("/x")), TypeError);
  assert.throws(() => decodeSockaddrVm(encodeSockaddrVm(3, 1), 8), TypeError);
});

Deno.test("encodeSockaddrUn() writes the family, the path and a NUL terminator", () => {
  const bytes = encodeSockaddrUn("/run/a.sock");
  assert.equal(bytes.byteLength, 2 + 11 + 1);
  assert.equal(bytes[0] | (bytes[1] << 8), AF_UNIX);
  assert.equal(new TextDecoder().decode(bytes.subarray(2, 13)), "/run/a.sock");
  assert.equal(bytes[13], 0);
});

Deno.test("encodeSockaddrUn() encodes UTF-8 paths by bytes", () => {
  const bytes = encodeSockaddrUn("/tmp/é");
  assert.equal(bytes.byteLength, 2 + 7 + 1);
  assert.deepEqual(decodeSockaddrUn(bytes), { family: "unix", path: "/tmp/é" });
});

Deno.test("encodeSockaddrUn() keeps abstract names without a terminator", () => {
  const bytes = encodeSockaddrUn("\0lxd-vsock");
  assert.equal(bytes.byteLength, 2 + 10);
  assert.deepEqual(decodeSockaddrUn(bytes), { family: "unix", path: "\0lxd-vsock" });
});

Deno.test("encodeSockaddrUn() accepts 107 path bytes and rejects 108 with a RangeError", () => {
  const longest = "/" + "a".repeat(UNIX_PATH_MAX - 2);
  assert.equal(encodeSockaddrUn(longest).byteLength, 2 + UNIX_PATH_MAX);
  assert.throws(() => encodeSockaddrUn(longest + "a"), RangeError);
});

Deno.test("encodeSockaddrUn() rejects empty paths and embedded NULs with a TypeError", () => {
  assert.throws(() => encodeSockaddrUn(""), TypeError);
  assert.throws(() => encodeSockaddrUn("/a\0b"), TypeError);
});

Deno.test("decodeSockaddrUn() stops at the NUL and honours the kernel's length", () => {
  const buf = new Uint8Array(110);
  buf.set(encodeSockaddrUn("/tmp/s"));
  buf.fill(0x41, 9); // garbage past the terminator
  assert.deepEqual(decodeSockaddrUn(buf, 9), { family: "unix", path: "/tmp/s" });
  assert.deepEqual(decodeSockaddrUn(buf, 8), { family: "unix", path: "/tmp/s" });
  // An unnamed socket (a client's) has only the family.
  assert.deepEqual(decodeSockaddrUn(buf, 2), { family: "unix", path: "" });
});

Deno.test("decodeSockaddr() dispatches on the family and rejects unknown ones", () => {
  assert.deepEqual(decodeSockaddr(encodeSockaddrVm(5, 7)), { family: "vsock", cid: 5, port: 7 });
  assert.deepEqual(decodeSockaddr(encodeSockaddrUn("/s")), { family: "unix", path: "/s" });
  const inet = new Uint8Array(16);
  inet[0] = 2;
  assert.throws(() => decodeSockaddr(inet), TypeError);
  assert.equal(AF_VSOCK, 40);
});

Deno.test("formatAddress() names vsock and unix addresses for messages", () => {
  assert.equal(formatAddress({ family: "vsock", cid: 3, port: 1024 }), "vsock 3:1024");
  assert.equal(formatAddress({ family: "unix", path: "/s" }), "unix /s");
  assert.equal(formatAddress({ family: "unix", path: "" }), "unix (unnamed)");
});

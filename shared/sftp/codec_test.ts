import assert from "node:assert/strict";
import { FXP, PacketReader, PacketSplitter, PacketWriter, SftpProtocolError } from "./codec.ts";

Deno.test("PacketWriter and PacketReader round-trip integers, strings and attributes", () => {
  const packet = new PacketWriter().u8(FXP.ATTRS).u32(7).string("héllo").u64(2 ** 40)
    .attrs({ size: 5, uid: 1, gid: 2, permissions: 0o100644, atime: 3, mtime: 4 }).packet();
  assert.equal(new DataView(packet.buffer).getUint32(0), packet.byteLength - 4);
  const r = new PacketReader(packet.subarray(4));
  assert.equal(r.u8(), FXP.ATTRS);
  assert.equal(r.u32(), 7);
  assert.equal(r.string(), "héllo");
  assert.equal(r.u64(), 2 ** 40);
  assert.deepEqual(r.attrs(), {
    size: 5,
    uid: 1,
    gid: 2,
    permissions: 0o100644,
    atime: 3,
    mtime: 4,
  });
  assert.equal(r.remaining, 0);
  assert.throws(() => r.u32(), SftpProtocolError);
});

Deno.test("PacketSplitter splits packets across and within chunks, and refuses oversized ones", () => {
  const a = new PacketWriter().u8(1).u32(3).packet();
  const b = new PacketWriter().u8(4).u32(9).string("x").packet();
  const both = new Uint8Array([...a, ...b]);
  const splitter = new PacketSplitter(1024);
  assert.deepEqual(splitter.push(both.subarray(0, 3)), []);
  const out = splitter.push(both.subarray(3));
  assert.deepEqual(out, [a.subarray(4), b.subarray(4)]);
  const big = new Uint8Array([0, 0, 0x10, 0, 1]);
  assert.throws(() => new PacketSplitter(1024).push(big), SftpProtocolError);
});

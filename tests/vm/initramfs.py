#!/usr/bin/python3
"""Builds the test VMs' initramfs (gzip'd newc cpio) from a Debian kernel tree.

Usage: initramfs.py MODULES_DIR BUSYBOX INIT OUTPUT MODULE...

Copies busybox (as /bin/busybox) and INIT (as /init), and the named kernel
modules together with everything they depend on (read from each module's
`.modinfo` `depends=`; there is no modules.dep in an extracted package and no
kmod here), decompressed, as /lib/vmtest/modules/<name>.ko. For each named
module, /lib/vmtest/deps/<name> lists the modules to insmod for it, in load
order. The archive is deterministic (fixed mtimes and inode numbers), and has
/dev/console so the kernel can give init a console before devtmpfs is mounted.
"""

import gzip
import lzma
import os
import struct
import sys


def modinfo(data: bytes) -> dict[str, str]:
    """The key=value pairs of an ELF64 module's .modinfo section."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            info: dict[str, str] = {}
            for entry in data[off:off + size].split(b"\0"):
                if b"=" in entry:
                    key, value = entry.decode(errors="replace").split("=", 1)
                    info.setdefault(key, value)
            return info
    return {}


def read_module(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        raise ValueError(f"{path}: zstd-compressed modules are not supported")
    return data


def index_modules(root: str) -> dict[str, str]:
    """Module name (dashes as underscores) -> file path."""
    found: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for file in files:
            for ext in (".ko", ".ko.xz", ".ko.gz", ".ko.zst"):
                if file.endswith(ext):
                    found[file[: -len(ext)].replace("-", "_")] = os.path.join(dirpath, file)
    return found


class Cpio:
    """A newc archive writer."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
        self.ino += 1
        self.out += b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def finish(self) -> bytes:
        self.ino = 0
        self.add("TRAILER!!!", 0)
        self.out += b"\0" * (-len(self.out) % 512)
        return bytes(self.out)


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    moddir, busybox, init, output, *wanted = argv
    available = index_modules(moddir)
    data: dict[str, bytes] = {}
    deps: dict[str, list[str]] = {}

    def resolve(name: str, stack: tuple[str, ...] = ()) -> list[str]:
        if name in deps:
            return deps[name]
        if name in stack:
            raise ValueError(f"module dependency cycle: {' -> '.join(stack + (name,))}")
        if name not in available:
            raise ValueError(f"module {name} not found under {moddir} (built in, or missing?)")
        data[name] = read_module(available[name])
        order: list[str] = []
        for dep in filter(None, modinfo(data[name]).get("depends", "").split(",")):
            for m in resolve(dep.replace("-", "_"), stack + (name,)):
                if m not in order:
                    order.append(m)
        order.append(name)
        deps[name] = order
        return order

    for name in wanted:
        resolve(name)

    cpio = Cpio()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "mnt", "lib", "lib/vmtest",
              "lib/vmtest/modules", "lib/vmtest/deps"):
        cpio.add(d, 0o040755)
    cpio.add("dev/console", 0o020600, rdev=(5, 1))
    with open(busybox, "rb") as f:
        cpio.add("bin/busybox", 0o100755, f.read())
    cpio.add("bin/sh", 0o120777, b"busybox")
    with open(init, "rb") as f:
        cpio.add("init", 0o100755, f.read())
    for name in sorted(data):
        cpio.add(f"lib/vmtest/modules/{name}.ko", 0o100644, data[name])
    for name in wanted:
        cpio.add(f"lib/vmtest/deps/{name}", 0o100644, ("\n".join(deps[name]) + "\n").encode())
    tmp = output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(cpio.finish(), compresslevel=6, mtime=0))
    os.replace(tmp, output)
    print(f"initramfs: {len(data)} modules: {' '.join(sorted(data))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

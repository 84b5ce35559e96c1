#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the seed corpus for fuzz-snapshot into corpus-snapshot/.

Each seed is one mode byte (0 whole document, 1 payload wrapped in a valid
header here, 2 snapshot file contents; see fuzz-snapshot.c) then the bytes.
The format is daemon/vhub-snapshot.h's, written independently here so that
the seeds also check that the C code matches its documentation.  Run from
this directory; the output is committed.
"""
import os
import struct

NEST, U64, U32, BOOL, STR, BYTES, FDNAME, I64 = range(1, 9)
CRITICAL = 1


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def rec(tag, kind, value, flags=0):
    return struct.pack("<HBBI", tag, kind, flags, len(value)) + value


def nest(tag, *children, flags=0):
    return rec(tag, NEST, b"".join(children), flags)


def doc(payload, generation=1, version=1, compat=1):
    head = b"VHUBSNAP" + struct.pack("<HHIQI", version, compat, 32, generation, len(payload))
    return head + struct.pack("<I", crc32c(payload, crc32c(head))) + payload


def vm(name, regions, devices, rings):
    out = [rec(1, STR, name.encode()), rec(2, U32, struct.pack("<I", 1000)),
           rec(3, I64, struct.pack("<q", -1))]
    for r in range(regions):
        out.append(nest(4, rec(1, U64, struct.pack("<Q", r << 30)), rec(2, U64, struct.pack("<Q", 1 << 30)),
                        rec(3, FDNAME, b"vm/1000/%s/region/%d" % (name.encode(), r))))
    for d in range(devices):
        ring_recs = [nest(4, rec(1, U32, struct.pack("<I", q)),
                          rec(2, FDNAME, b"dev/1000/%s/blk%d/ring%d.kick" % (name.encode(), d, q)),
                          rec(3, U32, struct.pack("<I", 100 + q))) for q in range(rings)]
        out.append(nest(5, rec(1, STR, b"blk%d" % d), rec(2, U64, struct.pack("<Q", 0x1300000000 | d)),
                        rec(3, BOOL, bytes([d % 2 == 0])), rec(5, BYTES, bytes([d]) * 60), *ring_recs))
    return nest(1, *out)


def file_slots(*docs, slot=4096):
    out = bytearray(2 * slot)
    for i, d in enumerate(docs):
        if d is not None:
            out[i * slot:i * slot + len(d)] = d
    return bytes(out)


VM = vm("vm0", 8, 4, 2)
deep = b""
for _ in range(20):
    deep = nest(1, deep)

seeds = {
    "doc-vm": b"\0" + doc(VM),
    "doc-empty": b"\0" + doc(b""),
    "doc-truncated": b"\0" + doc(VM)[:-7],
    "doc-bad-crc": b"\0" + doc(VM)[:-1] + b"\xff",
    "doc-newer-compat": b"\0" + doc(VM, version=3, compat=3),
    "doc-newer-readable": b"\0" + doc(VM + rec(99, U64, bytes(8)), version=3, compat=2),
    "payload-vm": b"\1" + VM,
    "payload-critical-unknown": b"\1" + nest(1, rec(99, U64, bytes(8), CRITICAL)),
    "payload-unknown-kind": b"\1" + rec(7, 200, b"abc"),
    "payload-deep": b"\1" + deep,
    "payload-length-past-end": b"\1" + struct.pack("<HBBI", 1, U64, 0, 9) + bytes(8),
    "payload-bad-values": b"\1" + rec(1, BOOL, b"\2") + rec(2, STR, b"a\0b") + rec(3, FDNAME, b"a:b"),
    "payload-nest-overrun": b"\1" + struct.pack("<HBBI", 1, NEST, 0, 12) + rec(2, U64, bytes(8)),
    "file-two-slots": b"\2" + file_slots(doc(VM, 3), doc(VM, 4)),
    "file-torn-newest": b"\2" + file_slots(doc(VM, 3), doc(VM, 4)[:200] + b"\xa5" * 64 + doc(VM, 4)[264:]),
    "file-newer-in-slot1": b"\2" + file_slots(doc(VM, 3), doc(VM, 4, version=3, compat=3)),
    "file-empty": b"\2",
    "file-slot-overrun": b"\2" + file_slots(b"VHUBSNAP" + struct.pack("<HHIQI", 1, 1, 32, 1, 9000) + bytes(4)),
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus-snapshot")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    # the same document the C test keeps as its version-1 fixture
    fixture = os.path.join(os.path.dirname(out), "..", "..", "daemon", "tests", "snapshot-v1.bin")
    with open(fixture, "rb") as f:
        data = f.read()
    gen = struct.unpack_from("<Q", data, 16)[0]
    assert data == doc(VM, gen), "daemon/tests/snapshot-v1.bin differs from this script's encoding"
    print("wrote %d seeds; the C writer's fixture matches this script's encoding" % len(seeds))

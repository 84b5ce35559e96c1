#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the seed corpora of the protocol fuzz targets.

corpus/ (fuzz-vhu-message): each seed is 1 byte fd count (and reader
hint), 8 bytes negotiated protocol features (little-endian), then
vhost-user wire bytes.

corpus-frontend-requests/ (fuzz-vhu-frontend-requests): 8 bytes of
protocol features the back-end offers, then per message one byte fd count
and its wire bytes: a VMM's session as a back-end receives it.

Run from this directory; the output is committed, so this only needs
re-running when seeds are added.  The fuzzers' own findings are merged
into the same directories (see docs/fuzzing.md); crashers are committed as
crash-* next to these.
"""
import os
import struct

VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
ALL_PF = (1 << 24) - 1
PF = {name: 1 << bit for bit, name in enumerate(
    "MQ LOG_SHMFD RARP REPLY_ACK NET_MTU BACKEND_REQ CROSS_ENDIAN CRYPTO_SESSION "
    "PAGEFAULT CONFIG BACKEND_SEND_FD HOST_NOTIFIER INFLIGHT_SHMFD RESET_DEVICE "
    "INBAND_NOTIFICATIONS CONFIGURE_MEM_SLOTS STATUS XEN_MMAP SHARED_OBJECT "
    "DEVICE_STATE GET_VRING_BASE_INFLIGHT GPA_ADDRESSES SHMEM "
    "GET_VRING_BASE_SKIP_DRAIN".split())}


def msg(request, flags, payload=b"", size=None):
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def u64(v):
    return struct.pack("<Q", v)


def region(gpa, size=0x200000, uaddr=0x7f0000000000, off=0):
    return struct.pack("<QQQQ", gpa, size, uaddr, off)


def seed(n_fds, pf, *msgs):
    return bytes([n_fds]) + struct.pack("<Q", pf) + b"".join(msgs)


UUID = bytes(range(0x10, 0x20))
SKIP_DRAIN_PF = PF["GET_VRING_BASE_SKIP_DRAIN"] | PF["GET_VRING_BASE_INFLIGHT"] | PF["INFLIGHT_SHMFD"]


def STATE(index, num):
    return struct.pack("<II", index, num)


SHMEM_MAP = struct.pack("<B7xQQQQ", 0, 0, 4096, 8192, 1)

SEEDS = {
    "get-features": seed(0, 0, msg(1, VERSION)),
    "get-features-reply": seed(0, 0, msg(1, VERSION | REPLY, u64(0x175007e46))),
    "set-mem-table-2": seed(2, ALL_PF, msg(5, VERSION | NEED_REPLY,
                                           struct.pack("<II", 2, 0) + region(0) + region(1 << 30))),
    "set-mem-table-nregions-mismatch": seed(2, ALL_PF, msg(5, VERSION,
                                            struct.pack("<II", 3, 0) + region(0) + region(1 << 30))),
    "set-vring-kick-fd": seed(1, 0, msg(12, VERSION, u64(1))),
    "set-vring-call-nofd": seed(0, 0, msg(13, VERSION, u64(0x100))),
    "set-vring-err-nofd-with-fd": seed(1, 0, msg(14, VERSION, u64(0x101))),
    "get-config-60": seed(0, PF["CONFIG"], msg(24, VERSION, struct.pack("<III", 0, 60, 0) + bytes(60))),
    "get-config-size-mismatch": seed(0, PF["CONFIG"], msg(24, VERSION,
                                                          struct.pack("<III", 0, 60, 0) + bytes(59))),
    "get-config-error-reply": seed(0, PF["CONFIG"], msg(24, VERSION | REPLY)),
    "get-inflight-24": seed(0, PF["INFLIGHT_SHMFD"], msg(31, VERSION,
                                                         struct.pack("<QQHHI", 0, 0, 2, 128, 0))),
    "get-inflight-20": seed(0, PF["INFLIGHT_SHMFD"], msg(31, VERSION,
                                                         struct.pack("<QQHH", 0, 0, 2, 128))),
    "get-inflight-reply": seed(1, PF["INFLIGHT_SHMFD"], msg(31, VERSION | REPLY,
                                                            struct.pack("<QQHHI", 8192, 0, 2, 128, 0))),
    "set-log-base-shmfd": seed(1, PF["LOG_SHMFD"], msg(6, VERSION, struct.pack("<QQ", 0x10000, 0))),
    "backend-host-notifier": seed(1, PF["BACKEND_SEND_FD"] | PF["HOST_NOTIFIER"],
                                  msg(3, VERSION | NEED_REPLY, struct.pack("<QQQ", 1, 4096, 0))),
    "backend-shmem-map": seed(1, PF["BACKEND_SEND_FD"] | PF["SHMEM"], msg(9, VERSION, SHMEM_MAP)),
    "backend-shared-object-lookup": seed(0, PF["SHARED_OBJECT"], msg(8, VERSION | NEED_REPLY, UUID),
                                         msg(8, VERSION | REPLY, u64(0))),
    "get-shared-object-uuid-reply": seed(1, PF["SHARED_OBJECT"], msg(41, VERSION, UUID),
                                         msg(41, VERSION | REPLY, UUID)),
    "set-device-state-fd": seed(1, PF["DEVICE_STATE"], msg(42, VERSION, struct.pack("<II", 0, 0)),
                                msg(42, VERSION | REPLY, u64(0x100))),
    "get-shmem-config-reply": seed(0, PF["SHMEM"], msg(44, VERSION | REPLY,
                                   struct.pack("<II", 3, 0) + b"".join(u64((1 << 20) * (i < 3)) for i in range(256)))),
    # bits 20-23 and request 45 (GET_VRING_BASE_SKIP_DRAIN needs 23, 20 and 12)
    "get-vring-base-skip-drain": seed(0, SKIP_DRAIN_PF, msg(45, VERSION, STATE(1, 0)),
                                      msg(45, VERSION | REPLY, STATE(1, 17))),
    "get-vring-base-skip-drain-no-inflight": seed(0, PF["GET_VRING_BASE_SKIP_DRAIN"] | PF["INFLIGHT_SHMFD"],
                                                  msg(45, VERSION, STATE(0, 0))),
    "get-vring-base-skip-drain-num": seed(0, SKIP_DRAIN_PF, msg(45, VERSION, STATE(0, 1))),
    "get-shmem-config-unaligned": seed(0, PF["SHMEM"], msg(44, VERSION | REPLY,
                                       struct.pack("<II", 2, 0) + u64(0x1001) + bytes(8 * 255))),
    "get-shmem-config-beyond-nregions": seed(0, PF["SHMEM"], msg(44, VERSION | REPLY,
                                             struct.pack("<II", 1, 0) + u64(0) + u64(1 << 20) + bytes(8 * 254))),
    "vring-kick-inband": seed(0, PF["INBAND_NOTIFICATIONS"] | PF["BACKEND_REQ"] | PF["REPLY_ACK"],
                              msg(35, VERSION | NEED_REPLY, STATE(1, 0)), msg(35, VERSION | REPLY, u64(0))),
    "set-vring-endian": seed(0, PF["CROSS_ENDIAN"], msg(23, VERSION, STATE(0, 0))),
    "iotlb-update": seed(0, 0, msg(22, VERSION | NEED_REPLY,
                                   struct.pack("<QQQBB6x", 0x1000, 0x1000, 0x7f0000001000, 3, 2))),
    "two-messages": seed(0, PF["REPLY_ACK"], msg(2, VERSION | NEED_REPLY, u64(0x140000000)),
                         msg(8, VERSION, struct.pack("<II", 0, 256)), msg(2, VERSION | REPLY, u64(0))),
    "short-header": seed(0, 0, msg(1, VERSION)[:7]),
    "oversized-size": seed(0, 0, msg(26, VERSION, b"", size=4097)),
    "flags-version-2": seed(0, 0, msg(3, 0x2)),
    "reply-with-need-reply": seed(0, 0, msg(1, VERSION | REPLY | NEED_REPLY, u64(1))),
    "unknown-request": seed(0, ALL_PF, msg(99, VERSION, u64(0))),
    "too-many-fds": seed(9, ALL_PF, msg(5, VERSION,
                                         struct.pack("<II", 8, 0) + b"".join(region(i << 30) for i in range(8)))),
}


def fe(n_fds, request, payload=b"", need_reply=False):
    """One front-end request as fuzz-vhu-frontend-requests reads it."""
    return bytes([n_fds]) + msg(request, VERSION | (NEED_REPLY if need_reply else 0), payload)


def session(pf, *reqs):
    return struct.pack("<Q", pf) + b"".join(reqs)


def state(index, num):
    return struct.pack("<II", index, num)


VRING_ADDR = struct.pack("<IIQQQQ", 0, 0, 0x10000, 0x11000, 0x12000, 0)
INFLIGHT = struct.pack("<QQHHI", 8192, 0, 1, 256, 0)
MEM_SINGLE = u64(0) + region(0)
NEGOTIATE = (fe(0, 1), fe(0, 15), fe(0, 16, u64(ALL_PF)))

FRONTEND_SEEDS = {
    # QEMU's order for a blk device: handshake, memory, one ring, start, stop
    "qemu-blk-session": session(ALL_PF, *NEGOTIATE, fe(0, 17), fe(0, 3), fe(1, 21, need_reply=True),
                                fe(0, 36), fe(1, 37, MEM_SINGLE, True), fe(0, 24, struct.pack("<III", 0, 60, 0) + bytes(60)),
                                fe(0, 2, u64(0x140000000), True), fe(0, 31, INFLIGHT), fe(1, 32, INFLIGHT),
                                fe(0, 8, state(0, 256)), fe(0, 10, state(0, 0)), fe(0, 9, VRING_ADDR),
                                fe(1, 13, u64(0)), fe(1, 14, u64(0)), fe(1, 12, u64(0)),
                                fe(0, 18, state(0, 1)), fe(0, 39, u64(0xf), True), fe(0, 11, state(0, 0)),
                                fe(0, 34)),
    "mem-table-2": session(ALL_PF, *NEGOTIATE,
                           fe(2, 5, struct.pack("<II", 2, 0) + region(0) + region(1 << 30), True),
                           fe(0, 38, MEM_SINGLE, True)),
    "migration": session(ALL_PF, *NEGOTIATE, fe(1, 6, struct.pack("<QQ", 0x10000, 0), True),
                         fe(1, 42, struct.pack("<II", 0, 0)), fe(0, 43), fe(0, 40)),
    "no-protocol-features": session(0, fe(0, 1), fe(0, 2, u64(0)), fe(0, 3), fe(1, 7),
                                    fe(0, 8, state(0, 128)), fe(1, 12, u64(0x100 | 1)),
                                    fe(0, 16, u64(1))),
    "misc-requests": session(ALL_PF, *NEGOTIATE, fe(0, 19, u64(0x5254_0012_3456)), fe(0, 20, u64(1500)),
                             fe(0, 22, struct.pack("<QQQBB6x", 0x1000, 0x1000, 0x7f0000001000, 3, 2), True),
                             fe(0, 23, state(0, 1)), fe(0, 25, struct.pack("<III", 0, 4, 0) + bytes(4)),
                             fe(0, 26, u64(0) * 4), fe(0, 27, u64(1)), fe(0, 28), fe(0, 29), fe(0, 30),
                             fe(1, 33), fe(0, 35, state(0, 0)), fe(0, 41, UUID), fe(0, 44)),
    "vring-call-fd-and-nofd-bit": session(ALL_PF, *NEGOTIATE, fe(1, 13, u64(0x100))),
    "too-many-fds": session(ALL_PF, *NEGOTIATE, fe(9, 5, struct.pack("<II", 8, 0) +
                                                   b"".join(region(i << 30) for i in range(8)))),
}


def write(directory, seeds):
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(seeds)} seeds into {directory}/")


def main():
    write("corpus", SEEDS)
    write("corpus-frontend-requests", FRONTEND_SEEDS)


if __name__ == "__main__":
    main()

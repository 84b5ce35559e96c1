#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Seeds for fuzz-vmm-conn (frontdoor/tests/fuzz-vmm-conn.c): what QEMU 7.2
and cloud-hypervisor send to a vhost-user back-end, and the hostile cases of
test-vmm-conn.  Input layout: offered protocol features (u64), a mode byte,
then chunks of (ctl, u16 length, bytes); see the target's comment.

    frontdoor/tests/gen-corpus-vmm-conn.py frontdoor/tests/corpus-vmm-conn
"""
import os
import struct
import sys

VERSION, REPLY, NEED = 0x1, 0x4, 0x8
(GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE, SET_LOG_BASE, SET_LOG_FD,
 SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL,
 SET_VRING_ERR, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE,
 SEND_RARP, NET_SET_MTU, SET_BACKEND_REQ_FD, IOTLB_MSG, SET_VRING_ENDIAN, GET_CONFIG,
 SET_CONFIG) = range(1, 26)
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
RESET_DEVICE, VRING_KICK, GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG = 34, 35, 36, 37, 38
SET_STATUS, GET_STATUS = 39, 40
BREQ_CONFIG_CHANGE_MSG = 2

PF = {n: 1 << b for b, n in enumerate(
    "MQ LOG_SHMFD RARP REPLY_ACK NET_MTU BACKEND_REQ CROSS_ENDIAN CRYPTO_SESSION PAGEFAULT "
    "CONFIG BACKEND_SEND_FD HOST_NOTIFIER INFLIGHT_SHMFD RESET_DEVICE INBAND_NOTIFICATIONS "
    "CONFIGURE_MEM_SLOTS STATUS".split())}


def pf(*names):
    v = 0
    for n in names:
        v |= PF[n]
    return v


# qemu-storage-daemon's offer with INFLIGHT_SHMFD and STATUS (what the face relays)
BLK_OFFER = pf("MQ", "LOG_SHMFD", "REPLY_ACK", "BACKEND_REQ", "CONFIG", "BACKEND_SEND_FD",
               "HOST_NOTIFIER", "CONFIGURE_MEM_SLOTS", "INFLIGHT_SHMFD", "STATUS")
# dpdk-testpmd's (no CONFIG, no CONFIGURE_MEM_SLOTS)
NET_OFFER = pf("MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "BACKEND_SEND_FD",
               "HOST_NOTIFIER", "STATUS")

CTL_CHANNEL, CTL_SHUT, CTL_SETTLE, CTL_SOCKETS = 0x10, 0x20, 0x40, 0x80


def msg(request, flags=VERSION, payload=b"", size=None):
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def u64(v):
    return struct.pack("<Q", v)


def state(index, num):
    return struct.pack("<II", index, num)


def chunk(data, fds=0, ctl=CTL_SETTLE):
    return bytes([ctl | fds]) + struct.pack("<H", len(data)) + data


def seed(offer, mode, *chunks):
    return struct.pack("<Q", offer) + bytes([mode]) + b"".join(chunks)


def region(gpa, size, uaddr, off=0):
    return struct.pack("<QQQQ", gpa, size, uaddr, off)


def vring_addr(i):
    return struct.pack("<IIQQQQ", i, 0, 0x7f0000001000 + i * 0x10000, 0x7f0000003000 + i * 0x10000,
                       0x7f0000002000 + i * 0x10000, 0)


def qemu_handshake(offer, queues, need_enable=True):
    """hw/virtio/vhost-user.c vhost_user_backend_init + vhost_dev_init, then
    vhost_dev_start and vhost_dev_stop (QEMU 7.2 order)."""
    c = [chunk(msg(GET_FEATURES)), chunk(msg(GET_PROTOCOL_FEATURES)),
         chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(offer))), chunk(msg(GET_QUEUE_NUM))]
    if offer & PF["CONFIGURE_MEM_SLOTS"]:
        c.append(chunk(msg(GET_MAX_MEM_SLOTS)))
    c.append(chunk(msg(SET_BACKEND_REQ_FD, VERSION | NEED), fds=1, ctl=CTL_SETTLE | CTL_SOCKETS))
    c.append(chunk(msg(SET_OWNER)))
    c.append(chunk(msg(GET_FEATURES)))
    for i in range(queues):
        c.append(chunk(msg(SET_VRING_CALL, payload=u64(i)), fds=1))
    if offer & PF["CONFIG"]:
        c.append(chunk(msg(GET_CONFIG, payload=struct.pack("<III", 0, 60, 0) + bytes(60))))
    c.append(chunk(msg(SET_FEATURES, payload=u64(0x175007e46 | 1 << 30))))
    if offer & PF["CONFIGURE_MEM_SLOTS"]:
        c.append(chunk(msg(ADD_MEM_REG, VERSION | NEED, u64(0) + region(0, 0xa0000, 0x7f0000000000)),
                       fds=1))
        c.append(chunk(msg(ADD_MEM_REG, VERSION | NEED,
                           u64(0) + region(0xc0000, 0x1ff40000, 0x7f00000c0000, 0xc0000)), fds=1))
    else:
        c.append(chunk(msg(SET_MEM_TABLE, VERSION | NEED,
                           struct.pack("<II", 2, 0) + region(0, 0xa0000, 0x7f0000000000) +
                           region(0xc0000, 0x1ff40000, 0x7f00000c0000, 0xc0000)), fds=2))
    if offer & PF["INFLIGHT_SHMFD"]:
        c.append(chunk(msg(GET_INFLIGHT_FD, payload=struct.pack("<QQHHI", 0, 0, queues, 128, 0))))
        c.append(chunk(msg(SET_INFLIGHT_FD, payload=struct.pack("<QQHHI", 4096, 0, queues, 128, 0)),
                       fds=1))
    for i in range(queues):
        c.append(chunk(msg(SET_VRING_NUM, payload=state(i, 128))))
        c.append(chunk(msg(SET_VRING_BASE, payload=state(i, 0))))
        c.append(chunk(msg(SET_VRING_ADDR, payload=vring_addr(i))))
        c.append(chunk(msg(SET_VRING_KICK, payload=u64(i)), fds=1))
        c.append(chunk(msg(SET_VRING_CALL, payload=u64(i)), fds=1))
    for i in range(queues):
        c.append(chunk(msg(SET_VRING_ENABLE, VERSION | NEED if need_enable else VERSION, state(i, 1))))
    if offer & PF["STATUS"]:
        c.append(chunk(msg(GET_STATUS)))
        c.append(chunk(msg(SET_STATUS, payload=u64(0x0f))))
    for i in range(queues):
        c.append(chunk(msg(SET_VRING_ENABLE, payload=state(i, 0))))
    for i in range(queues):
        c.append(chunk(msg(GET_VRING_BASE, payload=state(i, 0))))
    return c


def ch_handshake(offer):
    """cloud-hypervisor (vu_common_ctrl.rs): SET_OWNER first, NEED_REPLY on
    every request once REPLY_ACK is acked, the back-end channel last."""
    acked = offer & pf("MQ", "REPLY_ACK", "CONFIGURE_MEM_SLOTS", "INFLIGHT_SHMFD", "CONFIG",
                       "LOG_SHMFD", "BACKEND_REQ", "BACKEND_SEND_FD")
    n = VERSION | NEED
    c = [chunk(msg(SET_OWNER)), chunk(msg(GET_FEATURES)), chunk(msg(GET_PROTOCOL_FEATURES)),
         chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(acked))),
         chunk(msg(GET_CONFIG, n, struct.pack("<III", 0, 60, 0) + bytes(60))),
         chunk(msg(SET_FEATURES, n, u64(0x175007e46 | 1 << 30))),
         chunk(msg(SET_MEM_TABLE, n, struct.pack("<II", 1, 0) + region(0, 1 << 29, 0x7f0000000000)),
               fds=1)]
    for i in range(2):
        c.append(chunk(msg(SET_VRING_NUM, n, state(i, 128))))
    c.append(chunk(msg(GET_INFLIGHT_FD, n, struct.pack("<QQHHI", 0, 0, 2, 128, 0))))
    c.append(chunk(msg(SET_INFLIGHT_FD, n, struct.pack("<QQHHI", 4096, 0, 2, 128, 0)), fds=1))
    for i in range(2):
        c.append(chunk(msg(SET_VRING_ADDR, n, vring_addr(i))))
        c.append(chunk(msg(SET_VRING_BASE, n, state(i, 0))))
        c.append(chunk(msg(SET_VRING_CALL, n, u64(i)), fds=1))
        c.append(chunk(msg(SET_VRING_KICK, n, u64(i)), fds=1))
    for i in range(2):
        c.append(chunk(msg(SET_VRING_ENABLE, n, state(i, 1))))
    c.append(chunk(msg(SET_BACKEND_REQ_FD, n), fds=1, ctl=CTL_SETTLE | CTL_SOCKETS))
    return c


def channel_traffic():
    """The VMM's back-end channel: the face sends CONFIG_CHANGE_MSG; good and
    bad "replies" come back, then the VMM closes it."""
    ack = msg(BREQ_CONFIG_CHANGE_MSG, VERSION | REPLY, u64(0))
    return [chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(BLK_OFFER))),
            chunk(msg(SET_BACKEND_REQ_FD, VERSION | NEED), fds=1, ctl=CTL_SETTLE | CTL_SOCKETS),
            chunk(ack, ctl=CTL_SETTLE | CTL_CHANNEL),
            chunk(msg(SET_BACKEND_REQ_FD, VERSION | NEED), fds=1, ctl=CTL_SETTLE | CTL_SOCKETS),
            chunk(msg(BREQ_CONFIG_CHANGE_MSG, VERSION, u64(0)), ctl=CTL_SETTLE | CTL_CHANNEL),
            chunk(msg(SET_BACKEND_REQ_FD, VERSION | NEED), fds=1, ctl=CTL_SETTLE | CTL_SOCKETS),
            chunk(b"", ctl=CTL_SETTLE | CTL_CHANNEL | CTL_SHUT),
            chunk(msg(GET_FEATURES))]


def seeds():
    s = {}
    s["qemu-blk"] = seed(BLK_OFFER, 0, *qemu_handshake(BLK_OFFER, 2))
    s["qemu-blk-no-enable-ack"] = seed(BLK_OFFER, 0, *qemu_handshake(BLK_OFFER, 2, False))
    s["qemu-net-mem-table"] = seed(NET_OFFER, 0, *qemu_handshake(NET_OFFER, 4))
    s["qemu-blk-late-answers"] = seed(BLK_OFFER, 1, *qemu_handshake(BLK_OFFER, 1))
    s["qemu-blk-ack-failure"] = seed(BLK_OFFER, 4, *qemu_handshake(BLK_OFFER, 1))
    s["ch-blk"] = seed(BLK_OFFER, 0, *ch_handshake(BLK_OFFER))
    s["ch-blk-late-tight"] = seed(BLK_OFFER, 3, *ch_handshake(BLK_OFFER))
    s["channel"] = seed(BLK_OFFER, 0, *channel_traffic())
    # pipelined: chunks without settling, answers late, two pending at most
    s["pipelined-tight"] = seed(BLK_OFFER, 3, chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(BLK_OFFER)), ctl=0),
                                *[chunk(msg(GET_FEATURES, VERSION | NEED), ctl=0) for _ in range(6)],
                                *[chunk(msg(SET_VRING_NUM, VERSION | NEED, state(0, 8)), ctl=0) for _ in range(6)])
    # one message in three chunks; then one whose fds ride on its second chunk
    m = msg(SET_VRING_CALL, payload=u64(0))
    s["split"] = seed(BLK_OFFER, 0, chunk(m[:5], fds=1, ctl=0), chunk(m[5:14], ctl=0), chunk(m[14:]),
                      chunk(m[:12]), chunk(m[12:], fds=1))
    s["mem-table-8"] = seed(NET_OFFER, 0, chunk(msg(SET_MEM_TABLE, VERSION, struct.pack("<II", 8, 0) + b"".join(
        region(i << 30, 1 << 20, 0x7f0000000000 + (i << 30)) for i in range(8))), fds=8))
    s["config-256"] = seed(BLK_OFFER, 0, chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(BLK_OFFER))),
                           chunk(msg(GET_CONFIG, payload=struct.pack("<III", 0, 256, 0) + bytes(256))),
                           chunk(msg(SET_CONFIG, VERSION | NEED, struct.pack("<III", 4, 4, 0) + b"abcd")))
    # hostile: each ends the connection
    s["bad-reply-flag"] = seed(BLK_OFFER, 0, chunk(msg(GET_FEATURES, VERSION | REPLY)))
    s["bad-version"] = seed(BLK_OFFER, 0, chunk(msg(GET_FEATURES, 2)))
    s["bad-unknown"] = seed(BLK_OFFER, 0, chunk(msg(99)))
    s["bad-oversized"] = seed(BLK_OFFER, 0, chunk(msg(SET_CONFIG, size=4097) + bytes(64)))
    s["bad-short"] = seed(BLK_OFFER, 0, chunk(msg(SET_VRING_NUM, payload=b"1234")))
    s["bad-mem-table-fds"] = seed(BLK_OFFER, 0, chunk(msg(SET_MEM_TABLE, payload=struct.pack("<II", 2, 0) + bytes(64)), fds=1))
    s["bad-fds-where-none"] = seed(BLK_OFFER, 0, chunk(msg(GET_FEATURES), fds=2))
    s["bad-kick-nofd-fd"] = seed(BLK_OFFER, 0, chunk(msg(SET_VRING_KICK, payload=u64(1 << 8)), fds=1))
    s["bad-nine-fds"] = seed(BLK_OFFER, 0, chunk(msg(SET_MEM_TABLE, payload=struct.pack("<II", 8, 0) + bytes(256)), fds=9))
    s["bad-pf-unoffered"] = seed(BLK_OFFER, 0, chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(BLK_OFFER | PF["PAGEFAULT"]))))
    s["bad-pf-inconsistent"] = seed(BLK_OFFER | PF["INBAND_NOTIFICATIONS"], 0,
                                    chunk(msg(SET_PROTOCOL_FEATURES, payload=u64(pf("INBAND_NOTIFICATIONS", "BACKEND_REQ")))))
    s["bad-unnegotiated"] = seed(BLK_OFFER, 0, chunk(msg(GET_CONFIG, payload=struct.pack("<III", 0, 4, 0) + bytes(4))))
    s["eof-mid-message"] = seed(BLK_OFFER, 0, chunk(msg(SET_FEATURES, payload=u64(0))[:6], ctl=CTL_SETTLE | CTL_SHUT))
    s["eof"] = seed(BLK_OFFER, 0, chunk(msg(GET_FEATURES), ctl=CTL_SETTLE | CTL_SHUT))
    return s


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus-vmm-conn")
    os.makedirs(out, exist_ok=True)
    for name, data in seeds().items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()

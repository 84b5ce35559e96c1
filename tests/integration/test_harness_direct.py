#!/usr/bin/env python3
"""The harness against the real back-ends through direct.py (no vhubd).

    test_harness_direct.py [blk] [net] [fs] [restart] [null] [net-client]   (default: all)

blk: qemu-storage-daemon; config capacity == image size, 2 queues, many
     concurrent writes then reads verified against the image file.
net: dpdk-testpmd io forwarding; frames sent on TX come back intact on RX.
fs:  virtiofsd; FUSE_INIT, GETATTR of the root, LOOKUP+OPEN+READ of a file.
restart: qsd SIGKILLed and restarted keeps the data; virtiofsd started twice.
null: 16 null-co exports served by one qemu-storage-daemon.
net-client: testpmd in client mode connects to our socket, twice.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, direct, fs, net, scenarios          # noqa: E402
from vhubtest.backends import (QsdBackend, QsdNullBackend, TestpmdBackend,  # noqa: E402
                               VirtiofsdBackend)
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.testing import Skip, check, check_eq, log, run   # noqa: E402

IMAGE_SIZE = 16 << 20


def scenario_blk(t):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    initial = scenarios.make_image(img, IMAGE_SIZE)
    sock = os.path.join(d, "blk.sock")
    t.enter(QsdBackend(img, sock, num_queues=2, log_dir=d))
    mem = t.enter(GuestMemory(32 << 20))
    fe = t.enter(direct.DirectFrontend.connect(sock))
    fe.handshake()
    log("qsd: features %#x, protocol features offered %#x, negotiated %#x"
        % (fe.features, fe.protocol_offered, fe.protocol_features))
    check_eq(fe.queue_num, 2, "GET_QUEUE_NUM")
    cfg = blk.parse_config(fe.get_config(0, 60))
    check_eq(cfg["capacity"], IMAGE_SIZE // 512, "config capacity (512-byte sectors)")
    check_eq(cfg.get("num_queues"), 2, "config num_queues")
    queues = [blk.BlkQueue(mem, index=i, size=128) for i in range(2)]
    acked = fe.setup(mem, scenarios.BLK_FEATURES, [q.vq for q in queues])
    log("acked features %#x" % acked)
    scenarios.blk_first_sectors(queues[0], initial)
    check(queues[1].get_id() == b"vhost_user_blk", "GET_ID on queue 1 answers the serial")
    scenarios.blk_io(queues, img, initial)
    bases = fe.stop_rings()
    for q in queues:
        check_eq(bases[q.index], q.vq.submitted,
                 "GET_VRING_BASE of ring %d (requests submitted on it)" % q.index)
    # Restart every ring where it stopped (a nonzero base) and do more I/O.
    for q in queues:
        q.vq.reset(bases[q.index])
        fe.start_ring(q.vq)
        q.vq.kick()
    scenarios.blk_io(queues, img, open(img, "rb").read(), nreq=64, seed=11)
    bases2 = fe.stop_rings()
    for q in queues:
        check_eq(bases2[q.index], (bases[q.index] + q.vq.submitted) & 0xFFFF,
                 "ring %d restarted at base %d: GET_VRING_BASE after %d more requests"
                 % (q.index, bases[q.index], q.vq.submitted))
    # And once across the 16-bit wrap of the ring indices.
    scenarios.blk_index_wrap(fe, queues[0])


def scenario_net(t):
    d = t.tmpdir()
    sock = os.path.join(d, "net.sock")
    pmd = t.enter(TestpmdBackend(sock, queues=2, log_dir=d))
    mem = t.enter(GuestMemory(32 << 20))
    fe = t.enter(direct.DirectFrontend.connect(sock))
    fe.handshake()
    log("testpmd: features %#x, protocol features offered %#x, negotiated %#x, queue num %d"
        % (fe.features, fe.protocol_offered, fe.protocol_features, fe.queue_num))
    check(fe.protocol_features & (1 << direct.PF_STATUS), "STATUS protocol feature negotiated")
    pairs = [net.NetQueuePair(mem, pair=i, size=256) for i in range(2)]
    vqs = [vq for p in pairs for vq in p.vqs]
    acked = fe.setup(mem, scenarios.NET_FEATURES, vqs)
    log("acked features %#x" % acked)
    pmd.wait_forwarding()
    scenarios.net_loopback(pairs)
    bases = fe.stop_rings()
    for p in pairs:
        check_eq(bases[p.tx.index], p.sent, "GET_VRING_BASE of TX ring %d (frames sent)" % p.tx.index)
        check_eq(bases[p.rx.index], p.received,
                 "GET_VRING_BASE of RX ring %d (buffers the device filled)" % p.rx.index)
    fe.close()
    check_eq(pmd.stop(), 0, "testpmd exit code after SIGTERM")


def scenario_fs(t):
    d = t.tmpdir()
    share = os.path.join(d, "share")
    os.mkdir(share)
    content = os.urandom(200000)
    with open(os.path.join(share, "data.bin"), "wb") as f:
        f.write(content)
    sock = os.path.join(d, "fs.sock")
    vfs = t.enter(VirtiofsdBackend(sock, share, log_dir=d))
    mem = t.enter(GuestMemory(16 << 20))
    fe = t.enter(direct.DirectFrontend.connect(sock))
    fe.handshake()
    log("virtiofsd: features %#x, protocol features offered %#x, negotiated %#x"
        % (fe.features, fe.protocol_offered, fe.protocol_features))
    check_eq(fe.queue_num, 2, "GET_QUEUE_NUM (hiprio + 1 request queue)")
    dev = fs.FsDevice(mem)
    acked = fe.setup(mem, scenarios.FS_FEATURES, dev.vqs)
    log("acked features %#x" % acked)
    scenarios.fs_checks(dev, share, "data.bin", content)
    bases = fe.stop_rings()
    check_eq(bases[1], dev.requests[0].submitted, "GET_VRING_BASE of the request queue")
    check_eq(bases[0], dev.hiprio.submitted, "GET_VRING_BASE of the hiprio queue")
    fe.close()
    check_eq(vfs.wait_exit(5), 0, "virtiofsd exits 0 when its front-end disconnects")


def scenario_restart(t):
    """The launchers' kill/restart: qsd SIGKILLed mid-session comes back on
    the same socket with the data; virtiofsd is a new process each time."""
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, 1 << 20)
    sock = os.path.join(d, "blk.sock")
    qsd = t.enter(QsdBackend(img, sock, num_queues=1, log_dir=d))
    mem = t.enter(GuestMemory(8 << 20))
    fe = direct.DirectFrontend.connect(sock)
    t.defer(fe.close)
    q = blk.BlkQueue(mem, index=0, size=64)
    fe.setup(mem, scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ), [q.vq])
    q.write_sectors(10, b"\x5a" * 4096)
    old_pid = qsd.pid
    qsd.kill()
    check(not qsd.alive, "qemu-storage-daemon killed with SIGKILL")
    try:
        for _ in range(3):   # the first write may still land in the dead socket's buffer
            fe.get_features()
    except direct.BackendClosed as e:
        log("ok: the front-end sees the loss: %s" % e)
    else:
        check(False, "requests to a killed back-end fail")
    qsd.start()
    check(qsd.alive and qsd.pid != old_pid, "qemu-storage-daemon restarted on the same socket")
    fe2 = direct.DirectFrontend.connect(sock)
    t.defer(fe2.close)
    q2 = blk.BlkQueue(mem, index=0, size=64)
    fe2.setup(mem, scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ), [q2.vq])
    check(q2.read_sectors(10, 8) == b"\x5a" * 4096, "data written before the kill reads back")

    share = os.path.join(d, "share")
    os.mkdir(share)
    fsock = os.path.join(d, "fs.sock")
    vfs = t.enter(VirtiofsdBackend(fsock, share, log_dir=d))
    for round_ in range(2):
        fe3 = direct.DirectFrontend.connect(fsock)
        dev = fs.FsDevice(mem)
        fe3.setup(mem, scenarios.FS_FEATURES, dev.vqs)
        check_eq(dev.init()["major"], 7, "virtiofsd (start %d) answers FUSE_INIT" % (round_ + 1))
        fe3.close()
        check_eq(vfs.wait_exit(5), 0, "virtiofsd exits 0 after its front-end left")
        if round_ == 0:
            vfs.start()


def scenario_null(t):
    """Many null-co exports in one qemu-storage-daemon, each its own device."""
    d = t.tmpdir()
    socks = [os.path.join(d, "null%d.sock" % i) for i in range(16)]
    t.enter(QsdNullBackend(socks, size=1 << 20, log_dir=d))
    mem = t.enter(GuestMemory(4 << 20))
    for i, sock in enumerate(socks):
        fe = t.enter(direct.DirectFrontend.connect(sock))
        fe.handshake()
        cap = blk.parse_config(fe.get_config(0, 8))["capacity"]
        if cap != 2048:
            check_eq(cap, 2048, "null export %d capacity" % i)
        q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
        fe.setup(mem, scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ), [q.vq])
        q.write_sectors(i, bytes([i + 1]) * 512)
        if len(q.read_sectors(i, 1)) != 512:
            check(False, "null export %d read" % i)
    log("ok: 16 null-co exports of one process: capacity 2048 sectors, write+read each")


def scenario_net_client(t):
    """testpmd with client=1 connects to the socket we listen on, and
    reconnects after we close."""
    d = t.tmpdir()
    sock = os.path.join(d, "net-client.sock")
    pmd = t.enter(TestpmdBackend(sock, queues=1, client=True, log_dir=d))
    mem = t.enter(GuestMemory(16 << 20))
    for round_ in range(2):
        fe = direct.DirectFrontend.listen(sock, accept_timeout=10)
        try:
            fe.handshake()
            pair = net.NetQueuePair(mem, pair=0, size=128)
            fe.setup(mem, 1 << 32, pair.vqs)
            if round_ == 0:
                pmd.wait_forwarding()
            scenarios.net_loopback([pair], nframes=100)
            log("ok: round %d: testpmd connected to our socket and looped 100 frames" % (round_ + 1))
        finally:
            fe.close()
    check_eq(pmd.stop(), 0, "testpmd exit code after SIGTERM")


SCENARIOS = {"blk": scenario_blk, "net": scenario_net, "fs": scenario_fs,
             "restart": scenario_restart, "null": scenario_null,
             "net-client": scenario_net_client}


def main(t):
    names = sys.argv[1:] or list(SCENARIOS)
    skipped = []
    for name in names:
        log("==== %s" % name)
        try:
            from vhubtest.testing import TestContext
            sub = TestContext(name)
            with sub.stack:
                SCENARIOS[name](sub)
        except Skip as e:
            log("skipped %s: %s" % (name, e))
            skipped.append("%s: %s" % (name, e))
    if skipped:
        raise Skip("; ".join(skipped))


if __name__ == "__main__":
    run(main)

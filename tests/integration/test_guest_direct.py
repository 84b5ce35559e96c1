#!/usr/bin/env python3
"""A real Linux guest under QEMU (TCG) connected straight to the real
back-ends: the control run for every front-door test (docs/testing-guests.md).
test_frontdoor_guest.py runs the same scenarios with QEMU pointed at vhubd's
front door instead (`way`: vhubtest.frontdoor).

    test_guest_direct.py [blk] [fs] [net]   (default: all)

blk: vhost-user-blk-pci (2 queues, -smp 2) to qemu-storage-daemon (2 queues).
     The guest reads a host pattern with O_DIRECT, writes it back with
     O_DIRECT and with buffered writes + fsync and reads both back; then
     numbered 4 KiB blocks one at a time with O_DIRECT until told to stop,
     with a QMP stop + cont under way; then 8 parallel O_DIRECT writers;
     then the benchmark's throughput step, small.  The host checks the
     whole image file against a model of everything the guest wrote.
fs:  vhost-user-fs-pci to virtiofsd: the guest reads a host file (sha256)
     and writes one the host checks; virtiofsd exits when QEMU leaves.
net: -netdev vhost-user + virtio-net-pci to dpdk-testpmd (io forwarding):
     ICMPv6 echo requests to ff02::1 only; the guest's tx and rx counters
     move and testpmd's own port counters saw the frames.
"""

import hashlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import guest, guest_image                        # noqa: E402
from vhubtest.backends import QsdBackend, TestpmdBackend, VirtiofsdBackend  # noqa: E402
from vhubtest.frontdoor import Direct                          # noqa: E402
from vhubtest.guest import BlkDevice, FsDevice, Guest, NetDevice  # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402

IMAGE_SIZE = 64 << 20
BLOCK = guest.BLOCK
# The image's layout, in 4 KiB blocks.
PATTERN, PATTERN_O_DIRECT, PATTERN_FSYNC, PATTERN_BLOCKS = 0, 256, 512, 256
SEQ_FIRST, SEQ_AREA, SEQ_BEFORE, SEQ_AFTER = 1024, 64, 32, 64   # wraps around its area
PAR_FIRST, PAR_AREA, PAR_WRITERS, PAR_COUNT = 2048, 128, 8, 16
THR_FIRST, THR_MIB = 4096, 4


def last_progress_n(g, step):
    """The highest block count the step's progress lines reported so far."""
    prefix = "GUEST-PROGRESS %s w=" % step
    return max((int(l.text.rsplit("n=", 1)[1]) for l in list(g.lines) if l.text.startswith(prefix)),
               default=0)


def scenario_blk(t, image, way):
    d = way.dir
    img = os.path.join(d, "disk.img")
    pattern = os.urandom(PATTERN_BLOCKS * BLOCK)
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
        f.write(pattern)
    model = bytearray(IMAGE_SIZE)
    qsd = t.enter(QsdBackend(img, os.path.join(d, "blk.sock"), num_queues=2, log_dir=d))
    g = t.enter(Guest(d, [BlkDevice(way.socket(qsd.socket, "blk0", "blk"), num_queues=2)], image))
    ready = g.wait_ready()
    check_eq(ready["cpus"], "2", "guest vCPUs")
    first = g.first_io()
    check(first is not None, "the guest read /dev/vda with O_DIRECT at boot (%.2fs after QEMU's "
          "start)" % (g.first_io_time() or 0))
    check(first["probe_us"].isdigit() and int(first["probe_us"]) > 0,
          "the guest kernel timed virtio_blk's probe of the disk: %s us" % first["probe_us"])

    r = g.run("blk-basic", "/dev/vda", PATTERN, PATTERN_O_DIRECT, PATTERN_FSYNC,
              PATTERN_BLOCKS, hashlib.sha256(pattern).hexdigest())
    check_eq(r.int("size"), IMAGE_SIZE, "disk size seen by the guest")
    check_eq(r.int("queues"), 2, "blk-mq hardware queues in the guest")
    for at in (PATTERN, PATTERN_O_DIRECT, PATTERN_FSYNC):
        model[at * BLOCK:(at + PATTERN_BLOCKS) * BLOCK] = pattern

    # One writer, until told to stop: what the back-end restart tests use.
    # Midway the VM is paused and resumed over QMP (QEMU stops the vhost-user
    # rings with GET_VRING_BASE, then starts them again): the control for
    # the hung back-end test, and the guest's I/O must carry on after it.
    g.begin("blk-write", "/dev/vda", 1, SEQ_FIRST, SEQ_AREA, 0)
    g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= SEQ_BEFORE)
    qmp = g.qmp()
    check_eq(qmp.execute("query-status")["status"], "running", "QMP query-status")
    qmp.execute("stop", timeout=10)
    qmp.wait_event("STOP", timeout=10)
    check_eq(qmp.execute("query-status")["status"], "paused", "QMP query-status after stop")
    qmp.execute("cont", timeout=10)
    qmp.wait_event("RESUME", timeout=10)
    check_eq(qmp.execute("query-status")["status"], "running", "QMP query-status after cont")
    resumed_at = last_progress_n(g, "blk-write")
    g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= resumed_at + SEQ_AFTER)
    g.stop_steps()
    r = g.result("blk-write")
    seq = guest.parse_counts(r)
    check(len(seq) == 1 and seq[0] >= resumed_at + SEQ_AFTER,
          "numbered O_DIRECT blocks one at a time until stopped: %s, >= %d after the VM resumed "
          "at block %d" % (seq, SEQ_AFTER, resumed_at))
    guest.blk_write_model(model, SEQ_FIRST, SEQ_AREA, seq)

    r = g.run("blk-write", "/dev/vda", PAR_WRITERS, PAR_FIRST, PAR_AREA, PAR_COUNT)
    par = guest.parse_counts(r)
    check_eq(par, [PAR_COUNT] * PAR_WRITERS, "blocks written and verified by each parallel writer")
    guest.blk_write_model(model, PAR_FIRST, PAR_AREA, par)
    irqs = [int(n) for n in r["queue_irqs"].split(",")]
    check(len(irqs) == 2 and min(irqs) > 0,
          "both request virtqueues completed requests (interrupts per queue: %s)" % irqs)

    # The benchmark's step (bench_guest.py), small: random data the guest
    # made, known to the host by its sha256.
    r = g.run("blk-throughput", "/dev/vda", THR_FIRST, THR_MIB, 1 << 20)
    check_eq(r.int("bytes"), THR_MIB << 20, "blk-throughput bytes written and read")

    g.poweroff()
    way.release("blk0")
    check_eq(qsd.stop(), 0, "qemu-storage-daemon exit code on SIGTERM")
    with open(img, "rb") as f:
        disk = f.read()
    check_eq(len(disk), IMAGE_SIZE, "image size")
    thr = slice(THR_FIRST * BLOCK, THR_FIRST * BLOCK + (THR_MIB << 20))
    check_eq(hashlib.sha256(disk[thr]).hexdigest(), r["sha256"],
             "image file: sha256 of the blk-throughput data")
    model[thr] = disk[thr]
    for name, at in (("host pattern", PATTERN), ("O_DIRECT copy", PATTERN_O_DIRECT),
                     ("buffered+fsync copy", PATTERN_FSYNC)):
        check(disk[at * BLOCK:(at + PATTERN_BLOCKS) * BLOCK] == pattern,
              "image file: %s at block %d" % (name, at))
    bad = [i for i in range(IMAGE_SIZE // BLOCK)
           if disk[i * BLOCK:(i + 1) * BLOCK] != model[i * BLOCK:(i + 1) * BLOCK]]
    check(not bad, "whole image file equals the model: pattern, 2 copies, %d + %d numbered blocks, "
          "the blk-throughput data, zeros elsewhere" % (sum(seq), sum(par)),
          "blocks differing: %s" % bad[:10])


def scenario_fs(t, image, way):
    d = way.dir
    share = os.path.join(d, "share")
    os.mkdir(share)
    content = os.urandom(256 << 10)
    with open(os.path.join(share, "from-host.bin"), "wb") as f:
        f.write(content)
    vfs = t.enter(VirtiofsdBackend(os.path.join(d, "fs.sock"), share, log_dir=d))
    g = t.enter(Guest(d, [FsDevice(way.socket(vfs.socket, "fs0", "fs"), tag="fs0")], image))
    g.wait_ready()
    r = g.run("fs", "fs0", "from-host.bin", hashlib.sha256(content).hexdigest(), "from-guest.txt")
    check_eq(r.int("size"), len(content), "size of the host file in the guest")
    check_eq(r.int("entries"), 2, "directory entries the guest sees after writing")
    g.poweroff()
    with open(os.path.join(share, "from-guest.txt"), "rb") as f:
        written = f.read()
    check(written == content + b"vhubtest guest wrote this\n",
          "host sees the guest's file: the host file's %d bytes + the guest's line" % len(content),
          "got %d bytes" % len(written))
    way.release("fs0")
    check_eq(vfs.wait_exit(10), 0, "virtiofsd exit code once its front-end left")


def testpmd_port_counters(text):
    """Last (RX-packets, TX-packets) testpmd printed for its port."""
    found = re.findall(r"RX-packets:\s*(\d+).*?TX-packets:\s*(\d+)", text, re.S)
    return tuple(int(x) for x in found[-1]) if found else None


def net_guest(t, image, way, packed=False):
    """dpdk-testpmd (io forwarding, looped) and a guest whose eth0 leads to
    it through `way` as net0 (with packed virtqueues offered if packed):
    (testpmd, guest), the guest ready."""
    pmd = t.enter(TestpmdBackend(os.path.join(way.dir, "net.sock"), queues=1, log_dir=way.dir))
    pmd.wait_forwarding()
    g = t.enter(Guest(way.dir, [NetDevice(way.socket(pmd.socket, "net0", "net"), packed=packed)], image))
    g.wait_ready()
    return pmd, g


def scenario_net(t, image, way, packed=False):
    pmd, g = net_guest(t, image, way, packed)
    count = 10
    r = g.run("net", "eth0", count)
    for line in r.log:
        log("  %s" % line)
    check_eq(r["packed"], "1" if packed else "0",
             "the guest's driver acked packed virtqueues (VIRTIO_F_RING_PACKED): %s" % packed)
    if packed:
        way.check_acked("net0", 1 << 34, "VIRTIO_F_RING_PACKED")
    check(r.int("tx") >= count, "guest eth0 tx_packets moved by >= %d (%s)" % (count, r["tx"]))
    check(r.int("rx") >= count, "guest eth0 rx_packets moved by >= %d: io forwarding looped "
          "the frames back (%s)" % (count, r["rx"]))
    # Each request to ff02::1 is delivered once inside the guest (multicast
    # loopback) and once more from the wire when testpmd sends it back.
    check(r.int("in_echos") >= 2 * count, "guest's ICMPv6 layer got each of its %d echo requests "
          "twice: looped inside and back from testpmd (Icmp6InEchos +%s)" % (count, r["in_echos"]))
    check_eq((r.int("rx_errors"), r.int("tx_errors")), (0, 0), "eth0 rx/tx errors")
    g.poweroff()
    way.release("net0")
    check_eq(pmd.stop(), 0, "dpdk-testpmd exit code on SIGTERM")
    counters = testpmd_port_counters(pmd.log_text())
    check(counters is not None and min(counters) >= count,
          "testpmd's port received and sent >= %d frames %s" % (count, counters), counters)


def scenario_net_packed(t, image, way):
    """net with packed virtqueues: the guest's virtio-net driver and
    dpdk-testpmd's vhost PMD both do packed rings; the same traffic checks."""
    scenario_net(t, image, way, packed=True)


SCENARIOS = {"blk": scenario_blk, "fs": scenario_fs, "net": scenario_net, "net-packed": scenario_net_packed}


def main(t):
    names = sys.argv[1:] or list(SCENARIOS)
    image = guest_image.prepare()
    for name in names:
        log("==== guest-direct-%s" % name)
        SCENARIOS[name](t, image, Direct(t))


if __name__ == "__main__":
    run(main)

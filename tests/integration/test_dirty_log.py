#!/usr/bin/env python3
"""vm.dirty_log.start/stop against a real qemu-storage-daemon.

The daemon allocates the log memfd (one bit per 4 KiB page up to the end of
the VM's highest region), hands it to the back-end with SET_LOG_BASE, acks
VHOST_F_LOG_ALL and sets VHOST_VRING_F_LOG on every ring; the back-end then
marks every page it writes.  A virtio-blk READ makes the device write guest
memory: exactly the pages of the read buffer (plus the used ring's page,
which is logged at its guest-physical address) must become dirty, and pages
nobody wrote must stay clean.  After vm.dirty_log.stop no new bit is set.
Also: device.reset brings a running device back to ready and it starts
again; dirty logging is refused for a back-end without LOG_SHMFD.
"""

import mmap
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                           # noqa: E402
from vhubtest.backends import QsdBackend    # noqa: E402
from vhubtest.client import RpcError, u64                      # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testing import check, check_eq, run         # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                   # noqa: E402

PAGE = 4096
RAM = 32 << 20


def dirty_pages(log_mm):
    pages = set()
    data = log_mm[:]
    for i, byte in enumerate(data):
        if byte:
            for bit in range(8):
                if byte & (1 << bit):
                    pages.add(i * 8 + bit)
    return pages


def main(t):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    initial = scenarios.make_image(img, 8 << 20)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    sock = daemon.backend_socket("blk0.sock")
    t.enter(QsdBackend(img, sock, num_queues=1, log_dir=d))
    mem, vmm = vm_with_memory(t, c, RAM)
    dev = vmm.add_device("blk0", sock, type="blk")
    check(dev["protocol_features"] & (1 << 1), "LOG_SHMFD negotiated with qemu-storage-daemon")
    q = blk.BlkQueue(mem, index=0, size=64)
    features = scenarios.BLK_FEATURES & dev["features"]
    vmm.start_device("blk0", features, [q.vq])

    res, fds = c.call_fds("vm.dirty_log.start", {"vm": "vm0"})
    check_eq(len(fds), 1, "vm.dirty_log.start answers with one fd")
    size = u64(res["size"])
    check(size * 8 * PAGE >= RAM, "the log covers all guest memory (%d bytes of log)" % size)
    check_eq(os.fstat(fds[0]).st_size, size, "log memfd size")
    # the VMM owns the log: it reads it and clears what it has synced
    log_mm = mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fds[0])
    check_eq(dirty_pages(log_mm), set(), "no page is dirty before any I/O")

    # A read of 3 pages: the device writes the data buffer, the status byte
    # and the used ring.
    req = q.submit(blk.VIRTIO_BLK_T_IN, 64, length=3 * PAGE)
    q.kick()
    q.wait(1, 5.0)
    check(req.status == 0 and req.data == initial[64 * 512:64 * 512 + 3 * PAGE], "read data correct")
    dirty = dirty_pages(log_mm)
    want = set(range(req.data_gpa // PAGE, (req.data_gpa + 3 * PAGE - 1) // PAGE + 1))
    check(want <= dirty, "the pages of the 3-page buffer the device wrote are dirty (%s)" % sorted(want))
    check((req.status_gpa // PAGE) in dirty, "the status byte's page is dirty")
    check((q.vq.used // PAGE) in dirty, "the used ring's page is dirty (VHOST_VRING_F_LOG)")
    allowed = want | {req.status_gpa // PAGE, q.vq.used // PAGE, (q.vq.used + 6 + 8 * q.vq.size) // PAGE}
    check(dirty <= allowed, "nothing else is dirty: %s" % sorted(dirty - allowed))
    # A write request makes the device read guest memory only: its data
    # buffer must stay clean (the log is cleared first, as a VMM does after
    # a sync).
    log_mm[:] = bytes(size)
    w = q.submit(blk.VIRTIO_BLK_T_OUT, 200, data=b"\x5a" * PAGE)
    q.kick()
    q.wait(1, 5.0)
    check(w.status == 0, "write ok")
    wpages = set(range(w.data_gpa // PAGE, (w.data_gpa + PAGE - 1) // PAGE + 1))
    only_read = wpages - {w.status_gpa // PAGE, q.vq.used // PAGE}
    check(only_read and not only_read & dirty_pages(log_mm),
          "pages the device only read stay clean (%s)" % sorted(only_read))
    check((w.status_gpa // PAGE) in dirty_pages(log_mm), "the write's status byte page is dirty")

    c.call("vm.dirty_log.stop", {"vm": "vm0"})
    before = dirty_pages(log_mm)
    r2 = q.submit(blk.VIRTIO_BLK_T_IN, 300, length=PAGE)
    q.kick()
    q.wait(1, 5.0)
    check(r2.status == 0, "read after stop ok")
    check_eq(dirty_pages(log_mm), before, "no new dirty bit after vm.dirty_log.stop")
    log_mm.close()
    try:
        c.call("vm.dirty_log.stop", {"vm": "vm0"})
        check(False, "second stop must fail")
    except RpcError as e:
        check_eq(e.code, -32004, "vm.dirty_log.stop when off")

    # device.reset: running -> ready, and it starts again from scratch.
    c.call("device.reset", {"vm": "vm0", "device": "blk0"})
    check_eq(vmm.device_state("blk0")["state"], "ready", "state after device.reset")
    q.vq.close()
    q2 = blk.BlkQueue(mem, index=0, size=64)
    vmm.start_device("blk0", features, [q2.vq])
    r3 = q2.read_sectors(0, 8)
    check_eq(r3, initial[:4096], "I/O after reset and start")
    vmm.stop_device("blk0")
    q2.vq.close()

    # A back-end without LOG_SHMFD (virtiofsd has it; use a second VM with
    # none: vm without memory) -> refused.
    vm1 = Vmm(c, "vm1")
    vm1.create()
    try:
        c.call("vm.dirty_log.start", {"vm": "vm1"})
        check(False, "dirty log without memory must fail")
    except RpcError as e:
        check_eq(e.code, -32004, "vm.dirty_log.start on a VM without memory")
    vm1.destroy()

    vmm.remove_device("blk0")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Memory hot-add/remove fans out to every back-end of a VM at once.

One VM, four vhost-user-blk exports of one qemu-storage-daemon
(CONFIGURE_MEM_SLOTS: ADD_MEM_REG / REM_MEM_REG, each acked) and one
dpdk-testpmd net port (no CONFIGURE_MEM_SLOTS: SET_MEM_TABLE with the
whole table), all running with their rings in region 0.

- vm.memory.add of a second memfd at a higher gpa: each blk back-end was
  sent one ADD_MEM_REG and testpmd one SET_MEM_TABLE, and each of them
  really mapped it: on every blk device a write from buffers in the new
  region lands in its image file and a read lands in the new region; two
  blk devices are restarted with their rings in the new region too; testpmd
  loops frames back through RX/TX buffers in the new region while running.
- vm.memory.remove while rings of running devices are there: -32004 and
  nothing is sent; after moving those rings back to region 0 the removal
  goes through (REM_MEM_REG to each blk back-end, SET_MEM_TABLE to testpmd)
  and I/O in region 0 still works everywhere; the gpa can be reused.
- vm.memory.list follows every step; no device was lost on the way.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_memory_common import (QsdFileExports, RegionAlloc, blk_buffers_in,  # noqa: E402
                                blk_roundtrip, check_vm_table, detail,
                                drop_region, expect_rpc_error, hot_region, net_bufs,
                                net_exchange, net_queues, sent_count)
from vhubtest import blk, scenarios                                           # noqa: E402
from vhubtest.backends import TestpmdBackend                                  # noqa: E402
from vhubtest.client import WRONG_STATE                                       # noqa: E402
from vhubtest.daemon import Daemon                                            # noqa: E402
from vhubtest.memory import GuestMemory                                       # noqa: E402
from vhubtest.testing import check, check_eq, log, run                        # noqa: E402
from vhubtest.vmm import Vmm                                                  # noqa: E402

NBLK = 4
IMAGE_SIZE = 4 << 20
HOT_GPA = 0x100000000          # 4 GiB: above region 0, beyond 32 bits
HOT_SIZE = 16 << 20
NFRAMES = 48


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()

    images = [os.path.join(d, "disk%d.img" % i) for i in range(NBLK)]
    for img in images:
        scenarios.make_image(img, IMAGE_SIZE)
    blk_socks = [daemon.backend_socket("blk%d.sock" % i) for i in range(NBLK)]
    qsd = t.enter(QsdFileExports(images, blk_socks, num_queues=1, log_dir=d))
    pmd = t.enter(TestpmdBackend(daemon.backend_socket("net0.sock"), queues=1, log_dir=d))

    mem = t.enter(GuestMemory(32 << 20))
    r0 = mem.regions[0]
    vmm = Vmm(c, "vm0")
    vmm.create()
    vmm.add_memory(mem)

    blks = ["blk%d" % i for i in range(NBLK)]
    for name, sock in zip(blks, blk_socks):
        dev = vmm.add_device(name, sock, type="blk")
        check(dev["protocol_features"] & (1 << 15), "%s: CONFIGURE_MEM_SLOTS negotiated" % name)
        check_eq(dev["max_mem_slots"], 32, "%s: max_mem_slots" % name)
    ndev = vmm.add_device("net0", pmd.socket, type="net", queues=2)
    check(not ndev["protocol_features"] & (1 << 15),
          "net0 (testpmd): no CONFIGURE_MEM_SLOTS, so SET_MEM_TABLE")
    check_eq(ndev["max_mem_slots"], 8, "net0: max_mem_slots (SET_MEM_TABLE's 8)")

    # Everything running, rings in region 0.
    queues = {}
    for name in blks:
        q = blk.BlkQueue(mem, size=64, max_io=8192)
        vmm.start_device(name, scenarios.BLK_FEATURES, [q.vq])
        queues[name] = q
    rx, tx = net_queues(mem)
    vmm.start_device("net0", scenarios.NET_FEATURES, [rx, tx])
    pmd.wait_forwarding()
    for i, name in enumerate(blks):
        blk_roundtrip(queues[name], 8, 8, salt=0x10 + i, image=images[i])
    log("ok: blk I/O in region 0 on %s" % ", ".join(blks))
    net_exchange(mem, rx, tx, net_bufs(mem, NFRAMES), net_bufs(mem, NFRAMES), tag=0)
    log("ok: %d frames looped back by testpmd through region 0" % NFRAMES)

    sent = {name: (sent_count(daemon, name, "ADD_MEM_REG"), sent_count(daemon, name, "REM_MEM_REG"))
            for name in blks}
    tables = sent_count(daemon, "net0", "SET_MEM_TABLE")

    # ---- hot-add ----
    r1 = hot_region(mem, HOT_GPA, HOT_SIZE)
    t0 = time.monotonic()
    vmm.add_region(r1)
    log("vm.memory.add with %d running devices: %.1f ms" % (NBLK + 1, (time.monotonic() - t0) * 1e3))
    check_vm_table(vmm, [r0, r1], "after the hot-add")
    check_eq(vmm.vm_entry()["regions"], 2, "vm.list regions")
    for name in blks:
        check_eq((sent_count(daemon, name, "ADD_MEM_REG"), sent_count(daemon, name, "REM_MEM_REG")),
                 (sent[name][0] + 1, sent[name][1]),
                 "%s was sent exactly one ADD_MEM_REG and no REM_MEM_REG" % name)
    check_eq(sent_count(daemon, "net0", "SET_MEM_TABLE"), tables + 1,
             "net0 was sent one SET_MEM_TABLE")

    # Buffers in the new region, rings still in region 0: each back-end must
    # have mapped it (qsd drops the connection on an unmapped buffer).
    view = RegionAlloc(mem, r1)
    hot_q = {}
    for i, name in enumerate(blks):
        q = blk.BlkQueue(view, vq=queues[name].vq, max_io=8192)
        check(blk_buffers_in(q, r1), "%s: request buffers in the new region" % name)
        hot_q[name] = q
        for k, (sector, n) in enumerate([(64, 1), (200, 8), (1000, 16)]):
            blk_roundtrip(q, sector, n, salt=0x100 * (i + 1) + k, image=images[i])
        log("ok: %s: writes from and reads into the new region (image file checked)" % name)
    rx_hot, tx_hot = net_bufs(view, NFRAMES), net_bufs(view, NFRAMES)
    check(all(r1.contains(g, 2048) for g in rx_hot + tx_hot), "net0: RX/TX buffers in the new region")
    net_exchange(mem, rx, tx, rx_hot, tx_hot, tag=1)
    log("ok: net0: %d frames looped back by testpmd through buffers in the new region" % NFRAMES)

    # Rings in the new region too: blk2 and blk3 restart there.
    moved = blks[2:]
    for name in moved:
        base = vmm.stop_device(name)[0]
        q = blk.BlkQueue(view, size=64, max_io=8192, base=base)
        check(r1.contains(q.vq.desc) and r1.contains(q.vq.used), "%s: rings in the new region" % name)
        vmm.start_device(name, scenarios.BLK_FEATURES, [q.vq])
        queues[name] = q
        blk_roundtrip(q, 300, 4, salt=0x77, image=images[blks.index(name)])
        log("ok: %s: rings and buffers in the new region" % name)

    # ---- remove refused while running rings are there ----
    for name in blks:
        sent[name] = (sent_count(daemon, name, "ADD_MEM_REG"), sent_count(daemon, name, "REM_MEM_REG"))
    tables = sent_count(daemon, "net0", "SET_MEM_TABLE")
    e = expect_rpc_error(vmm.c.call, WRONG_STATE, "vm.memory.remove of a region holding running rings",
                         "vm.memory.remove", {"vm": "vm0", "gpa": HOT_GPA})
    check(any(n in detail(e) for n in moved), "the refusal names the running device", detail(e))
    check_vm_table(vmm, [r0, r1], "unchanged after the refused removal")
    check(all(sent_count(daemon, n, "REM_MEM_REG") == sent[n][1] for n in blks) and
          sent_count(daemon, "net0", "SET_MEM_TABLE") == tables,
          "nothing was sent to any back-end for the refused removal")

    # Move those rings back to region 0, then remove.
    for name in moved:
        base = vmm.stop_device(name)[0]
        q = blk.BlkQueue(mem, size=64, max_io=8192, base=base)
        check(r0.contains(q.vq.desc) and r0.contains(q.vq.used), "%s: rings back in region 0" % name)
        vmm.start_device(name, scenarios.BLK_FEATURES, [q.vq])
        queues[name] = q
    t0 = time.monotonic()
    vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": HOT_GPA})
    log("vm.memory.remove with %d running devices: %.1f ms" % (NBLK + 1, (time.monotonic() - t0) * 1e3))
    check_vm_table(vmm, [r0], "after the removal")
    for name in blks:
        check_eq((sent_count(daemon, name, "ADD_MEM_REG"), sent_count(daemon, name, "REM_MEM_REG")),
                 (sent[name][0], sent[name][1] + 1),
                 "%s was sent exactly one REM_MEM_REG" % name)
    check_eq(sent_count(daemon, "net0", "SET_MEM_TABLE"), tables + 1,
             "net0 was sent one SET_MEM_TABLE (the table without the region)")
    drop_region(mem, r1)

    # I/O in the remaining region still works everywhere.
    for i, name in enumerate(blks):
        blk_roundtrip(queues[name], 500 + i, 8, salt=0x200 + i, image=images[i])
    net_exchange(mem, rx, tx, net_bufs(mem, NFRAMES), net_bufs(mem, NFRAMES), tag=2)
    log("ok: blk and net I/O in region 0 after the removal")

    # The same gpa again, a fresh memfd: slots were really freed.
    r2 = hot_region(mem, HOT_GPA, HOT_SIZE)
    vmm.add_region(r2)
    check_vm_table(vmm, [r0, r2], "after re-adding the gpa with a new memfd")
    view2 = RegionAlloc(mem, r2)
    q = blk.BlkQueue(view2, vq=queues["blk0"].vq, max_io=8192)
    blk_roundtrip(q, 40, 8, salt=0x300, image=images[0])
    net_exchange(mem, rx, tx, net_bufs(view2, 16), net_bufs(view2, 16), tag=3)
    log("ok: blk0 and net0 I/O through the re-added region")
    vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": HOT_GPA})
    drop_region(mem, r2)
    check_vm_table(vmm, [r0], "after the second removal")

    for dev in vmm.device_list():
        check(dev["state"] == "running" and dev["reconnects"] == 0,
              "%s still running, never lost" % dev["device"], dev)

    for name in blks + ["net0"]:
        vmm.stop_device(name)
        vmm.remove_device(name)
    vmm.destroy()
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")
    check_eq(pmd.stop(), 0, "testpmd exit code after SIGTERM")


if __name__ == "__main__":
    run(main)

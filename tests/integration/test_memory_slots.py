#!/usr/bin/env python3
"""Memory slot limits and bad regions are refused before any message.

1. qemu-storage-daemon (GET_MAX_MEM_SLOTS 32) and a test back-end offering
   64 slots in one VM: 32 regions (region 0 + 31 memfds of 2 MiB) are
   accepted and qsd really mapped every one (a blk write+read with buffers
   in each region); the 33rd is refused with -32008 naming the device and
   its 32 slots; nothing changed: vm.memory.list, the test back-end's
   table, the ADD_MEM_REGs sent (none), the daemon's fd count (the refused
   memfd is closed), I/O.  A removal frees a slot for another region.
2. -32009 for every bad region (gpa or user-address overlap, unaligned
   gpa/size/offset/uaddr, beyond the fd, size 0, wrap-around, a pipe, an
   eventfd, a read-only fd), -32004 for removing a region that holds a
   running device's rings; none of them sends anything or changes the
   table.
3. dpdk-testpmd (SET_MEM_TABLE, at most 8 regions) with a test back-end in
   one VM: 8 regions work (frames loop back through buffers in the 8th);
   the 9th is refused -32008 before anything is sent to either back-end;
   a device.add of testpmd to a VM that already has 9 regions fails -32008.
4. The daemon's own cap: 509 regions for a test back-end offering 509
   slots, the 510th refused naming it; without devices a VM takes 512
   regions and refuses the 513th.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_memory_common import (QsdFileExports, RegionAlloc, blk_roundtrip,   # noqa: E402
                                check_tb_tables, check_vm_table, detail, drop_region,
                                expect_rpc_error, hot_region, net_bufs, net_exchange,
                                net_queues, sent_count, table, vm_table)
from vhubtest import blk, scenarios                                           # noqa: E402
from vhubtest.backends import TestpmdBackend                                  # noqa: E402
from vhubtest.client import (BAD_REGION, INVALID_PARAMS, LIMIT_REACHED,       # noqa: E402
                             WRONG_STATE, u64_json)
from vhubtest.daemon import Daemon                                            # noqa: E402
from vhubtest.memory import GuestMemory, memfd                                # noqa: E402
from vhubtest.testbackend import TestBackend                                  # noqa: E402
from vhubtest.testing import check, check_eq, log, run                        # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                                  # noqa: E402

MiB = 1 << 20
HOT_BASE = 0x40000000
STRIDE = 4 * MiB


def memory_add(vmm, gpa, size, fd, offset=None, uaddr=None):
    params = {"vm": vmm.vm, "gpa": u64_json(gpa), "size": u64_json(size), "fd": 0}
    if offset is not None:
        params["offset"] = u64_json(offset)
    if uaddr is not None:
        params["uaddr"] = u64_json(uaddr)
    return vmm.c.call("vm.memory.add", params, fds=[fd])


def part_qsd_32(t, d, daemon, c):
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, 4 * MiB)
    qsd = t.enter(QsdFileExports([img], [daemon.backend_socket("blk0.sock")], log_dir=d))
    tb = t.enter(TestBackend([daemon.backend_socket("tb0.sock")], args=["--mem-slots", "64"],
                             log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4 * MiB)
    dev = vmm.add_device("blk0", qsd.socket, type="blk")
    check_eq(dev["max_mem_slots"], 32, "blk0 (qsd) max_mem_slots")
    dev = vmm.add_device("tb0", tb.socket, type="blk")
    check_eq(dev["max_mem_slots"], 64, "tb0 (test back-end --mem-slots 64) max_mem_slots")
    q = blk.BlkQueue(mem, size=64, max_io=8192)
    vmm.start_device("blk0", scenarios.BLK_FEATURES, [q.vq])
    blk_roundtrip(q, 0, 8, salt=1, image=img)

    hot = []
    t0 = time.monotonic()
    for k in range(31):
        r = hot_region(mem, HOT_BASE + k * STRIDE, 2 * MiB)
        vmm.add_region(r)
        hot.append(r)
    log("31 hot-adds with 2 devices: %.1f ms" % ((time.monotonic() - t0) * 1e3))
    check_eq(vmm.vm_entry()["regions"], 32, "vm.list regions (qsd's 32 slots full)")
    check_vm_table(vmm, mem.regions, "with 32 regions")
    check_tb_tables(vmm, tb, [0], "with 32 regions")
    for k, r in enumerate(hot):
        rq = blk.BlkQueue(RegionAlloc(mem, r), vq=q.vq, max_io=4096)
        blk_roundtrip(rq, 16 + 8 * k, 8, salt=0x40 + k, image=img)
    log("ok: qsd did a write and a read through buffers in each of the 31 hot-added regions")

    # The 33rd: refused before anything is sent.
    before = vm_table(vmm)
    tb_adds = tb.requests(0).get("ADD_MEM_REG", 0)
    qsd_adds = sent_count(daemon, "blk0", "ADD_MEM_REG")
    fds = daemon.settled_fd_count(c)
    extra = hot_region(mem, HOT_BASE + 31 * STRIDE, 2 * MiB)   # not in the VM (yet)
    t0 = time.monotonic()
    e = expect_rpc_error(vmm.add_region, LIMIT_REACHED, "the 33rd region", extra)
    log("refused in %.1f ms: %s" % ((time.monotonic() - t0) * 1e3, e.data))
    check("blk0" in detail(e) and "32" in detail(e),
          "the detail names the device and its 32 slots", detail(e))
    check_eq(vm_table(vmm), before, "vm.memory.list unchanged")
    check_tb_tables(vmm, tb, [0], "unchanged")
    check_eq(tb.requests(0).get("ADD_MEM_REG", 0), tb_adds, "test back-end got no ADD_MEM_REG")
    check_eq(sent_count(daemon, "blk0", "ADD_MEM_REG"), qsd_adds, "qsd was sent no ADD_MEM_REG")
    check_eq(daemon.settled_fd_count(c), fds, "daemon fd count (the refused memfd was closed)")
    blk_roundtrip(q, 600, 8, salt=2, image=img)
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, hot[-1]), vq=q.vq, max_io=4096), 700, 8, salt=3,
                  image=img)
    log("ok: I/O in region 0 and the 32nd region still works")

    # A removal frees a slot.
    vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": hot[0].gpa})
    drop_region(mem, hot.pop(0))
    vmm.add_region(extra)
    check_eq(vmm.vm_entry()["regions"], 32, "32 regions again after remove + add")
    check_vm_table(vmm, mem.regions, "after remove + add")
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, extra), vq=q.vq, max_io=4096), 800, 8,
                  salt=4, image=img)
    check_tb_tables(vmm, tb, [0], "after remove + add")
    log("ok: the freed slot took a new region and qsd uses it")
    return vmm, mem, q, tb, img


def part_bad_regions(t, daemon, c, vmm, mem, q, tb, img):
    r0 = mem.regions[0]
    # Room for one more: drop the last hot region first.
    last = mem.regions[-1]
    vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": last.gpa})
    drop_region(mem, last)
    before = vm_table(vmm)
    qsd_adds = sent_count(daemon, "blk0", "ADD_MEM_REG")
    tb_adds = tb.requests(0).get("ADD_MEM_REG", 0)
    fds = daemon.settled_fd_count(c)
    free_gpa = 0x80000000

    f2 = memfd(2 * MiB)
    t.defer(os.close, f2)
    rd, wr = os.pipe()
    t.defer(os.close, rd)
    t.defer(os.close, wr)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    t.defer(os.close, efd)
    ro = os.open("/proc/self/fd/%d" % f2, os.O_RDONLY | os.O_CLOEXEC)
    t.defer(os.close, ro)
    odd = memfd(2 * MiB + 512)
    t.defer(os.close, odd)
    cases = [
        ("gpa inside region 0", dict(gpa=r0.gpa + MiB, size=2 * MiB, fd=f2)),
        ("gpa range overlapping region 0's end", dict(gpa=r0.gpa + r0.size - 4096, size=2 * MiB, fd=f2)),
        ("gpa range covering a hot region", dict(gpa=mem.regions[1].gpa - 4096, size=2 * MiB, fd=f2)),
        ("user address overlapping region 0's", dict(gpa=free_gpa, size=2 * MiB, fd=f2,
                                                    uaddr=r0.uaddr + 4096)),
        ("default uaddr (= gpa) overlapping region 0's uaddr",
         dict(gpa=r0.uaddr + 8192, size=2 * MiB, fd=f2)) if r0.uaddr < (1 << 46) else None,
        ("unaligned gpa", dict(gpa=free_gpa + 0x800, size=MiB, fd=f2)),
        ("unaligned size", dict(gpa=free_gpa, size=2 * MiB + 512, fd=odd)),
        ("unaligned offset", dict(gpa=free_gpa, size=MiB, fd=f2, offset=512)),
        ("unaligned uaddr", dict(gpa=free_gpa, size=MiB, fd=f2, uaddr=0x7f0000000100)),
        ("size beyond the fd", dict(gpa=free_gpa, size=4 * MiB, fd=f2)),
        ("offset + size beyond the fd", dict(gpa=free_gpa, size=2 * MiB, fd=f2, offset=4096)),
        ("offset beyond the fd", dict(gpa=free_gpa, size=4096, fd=f2, offset=4 * MiB)),
        ("size 0", dict(gpa=free_gpa, size=0, fd=f2)),
        ("gpa range wrapping around 2^64", dict(gpa=(1 << 64) - 4096, size=2 * MiB, fd=f2)),
        ("a pipe", dict(gpa=free_gpa, size=4096, fd=rd)),
        ("an eventfd", dict(gpa=free_gpa, size=4096, fd=efd)),
        ("a read-only fd", dict(gpa=free_gpa, size=MiB, fd=ro)),
    ]
    for case in cases:
        if case is None:
            continue
        what, kw = case
        e = expect_rpc_error(memory_add, BAD_REGION, "vm.memory.add: %s" % what, vmm, **kw)
        check(detail(e), "with a detail")
    check_eq(vm_table(vmm), before, "vm.memory.list unchanged after %d bad regions" % len(cases))
    check_tb_tables(vmm, tb, [0], "unchanged")
    check_eq(tb.requests(0).get("ADD_MEM_REG", 0), tb_adds, "test back-end got no ADD_MEM_REG")
    check_eq(sent_count(daemon, "blk0", "ADD_MEM_REG"), qsd_adds,
             "qsd was sent no ADD_MEM_REG")
    check_eq(daemon.settled_fd_count(c), fds, "daemon fd count (every refused fd was closed)")

    # A good one in the same place still works.
    memory_add(vmm, free_gpa, 2 * MiB, f2)
    check_eq(len(vm_table(vmm)), len(before) + 1, "a valid region at the same gpa is accepted")
    check_tb_tables(vmm, tb, [0], "after the valid region")
    vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": free_gpa})
    check_eq(vm_table(vmm), before, "and removed again")

    try:
        vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": free_gpa})
        check(False, "vm.memory.remove of a gpa with no region fails")
    except Exception as ex:  # RpcError
        check(getattr(ex, "code", None) in (BAD_REGION, INVALID_PARAMS),
              "vm.memory.remove of a gpa with no region fails (%s)" % ex)

    # -32004: rings of the running test back-end in a hot region.
    hot = mem.regions[1]
    tq = blk.BlkQueue(RegionAlloc(mem, hot), size=64, max_io=4096)
    vmm.start_device("tb0", scenarios.BLK_FEATURES & 0x100001200, [tq.vq])
    blk_roundtrip(tq, 4, 8, salt=9)
    rems = tb.requests(0).get("REM_MEM_REG", 0)
    e = expect_rpc_error(vmm.c.call, WRONG_STATE, "vm.memory.remove of the region with tb0's rings",
                         "vm.memory.remove", {"vm": "vm0", "gpa": hot.gpa})
    check("tb0" in detail(e), "the detail names the running device", detail(e))
    check_eq(tb.requests(0).get("REM_MEM_REG", 0), rems, "no REM_MEM_REG reached the test back-end")
    check_eq(vm_table(vmm), before, "vm.memory.list unchanged")
    blk_roundtrip(tq, 12, 8, salt=10)
    vmm.stop_device("tb0")
    vmm.c.call("vm.memory.remove", {"vm": "vm0", "gpa": hot.gpa})
    drop_region(mem, hot)
    check_tb_tables(vmm, tb, [0], "after removing it once tb0 stopped")
    blk_roundtrip(q, 900, 8, salt=11, image=img)


def part_testpmd_8(t, d, daemon, c):
    pmd = t.enter(TestpmdBackend(daemon.backend_socket("net0.sock"), queues=1, log_dir=d))
    tb = t.enter(TestBackend([daemon.backend_socket("tb1.sock")], log_dir=d))

    # A VM that already has 9 regions cannot take testpmd.
    nine = t.enter(GuestMemory(2 * MiB))
    for k in range(8):
        nine.add_region(HOT_BASE + k * STRIDE, 2 * MiB)
    v9 = Vmm(c, "vm9")
    v9.create()
    v9.add_memory(nine)
    e = expect_rpc_error(v9.add_device, LIMIT_REACHED, "device.add of testpmd to a VM with 9 regions",
                         "net9", pmd.socket, type="net", queues=2)
    check("8" in detail(e), "the detail says 8", detail(e))
    v9.destroy()

    mem, vmm = vm_with_memory(t, c, 8 * MiB, vm="vm1")
    dev = vmm.add_device("net0", pmd.socket, type="net", queues=2)
    check_eq(dev["max_mem_slots"], 8, "net0 (testpmd) max_mem_slots")
    vmm.add_device("tb1", tb.socket, type="blk")
    rx, tx = net_queues(mem)
    vmm.start_device("net0", scenarios.NET_FEATURES, [rx, tx])
    pmd.wait_forwarding()
    for k in range(7):
        vmm.add_region(hot_region(mem, HOT_BASE + k * STRIDE, 2 * MiB))
    check_eq(vmm.vm_entry()["regions"], 8, "vm.list regions (testpmd's 8 full)")
    check_tb_tables(vmm, tb, [0], "with 8 regions")
    last = RegionAlloc(mem, mem.regions[-1])
    net_exchange(mem, rx, tx, net_bufs(last, 32), net_bufs(last, 32), tag=8)
    log("ok: testpmd looped frames back through buffers in the 8th region")

    before = vm_table(vmm)
    tables = sent_count(daemon, "net0", "SET_MEM_TABLE")
    tb_adds = tb.requests(0).get("ADD_MEM_REG", 0)
    extra = hot_region(mem, HOT_BASE + 7 * STRIDE, 2 * MiB)   # not in the VM (yet)
    e = expect_rpc_error(vmm.add_region, LIMIT_REACHED, "the 9th region with testpmd in the VM",
                         extra)
    check("net0" in detail(e) and "8" in detail(e), "the detail names testpmd's device and 8",
          detail(e))
    check_eq(sent_count(daemon, "net0", "SET_MEM_TABLE"), tables, "testpmd was sent nothing")
    check_eq(tb.requests(0).get("ADD_MEM_REG", 0), tb_adds,
             "the other back-end was sent nothing either")
    check_eq(vm_table(vmm), before, "vm.memory.list unchanged")
    net_exchange(mem, rx, tx, net_bufs(last, 32), net_bufs(last, 32), tag=9)
    log("ok: testpmd still forwards through the 8th region")

    # Remove one (SET_MEM_TABLE with 7), then the 9th's memfd fits as the 8th.
    gone = mem.regions[1]
    vmm.c.call("vm.memory.remove", {"vm": "vm1", "gpa": gone.gpa})
    drop_region(mem, gone)
    check_eq(sent_count(daemon, "net0", "SET_MEM_TABLE"), tables + 1, "one SET_MEM_TABLE for the removal")
    vmm.add_region(extra)
    check_eq(sent_count(daemon, "net0", "SET_MEM_TABLE"), tables + 2, "one SET_MEM_TABLE for the add")
    check_vm_table(vmm, mem.regions, "after remove + add")
    view = RegionAlloc(mem, extra)
    net_exchange(mem, rx, tx, net_bufs(view, 16), net_bufs(view, 16), tag=10)
    check_tb_tables(vmm, tb, [0], "after remove + add")
    log("ok: testpmd uses the region added into the freed slot")
    vmm.stop_device("net0")
    vmm.destroy()
    check_eq(pmd.stop(), 0, "testpmd exit code after SIGTERM")


def part_daemon_cap(t, d, daemon, c):
    tb = t.enter(TestBackend([daemon.backend_socket("tb2.sock")], args=["--mem-slots", "509"],
                             log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4096, vm="vmbig")
    dev = vmm.add_device("tb2", tb.socket, type="blk")
    check_eq(dev["max_mem_slots"], 509, "tb2 max_mem_slots")
    t0 = time.monotonic()
    for k in range(1, 509):
        vmm.add_region(mem.add_region(k * 2 * 4096, 4096))
    log("508 hot-adds of 4 KiB with one device: %.0f ms" % ((time.monotonic() - t0) * 1e3))
    check_eq(vmm.vm_entry()["regions"], 509, "509 regions")
    check_eq(table(tb.regions(0)), vm_table(vmm), "the test back-end mapped all 509")
    r = mem.add_region(509 * 2 * 4096, 4096)
    e = expect_rpc_error(vmm.add_region, LIMIT_REACHED, "the 510th region with tb2 (509 slots)", r)
    check("tb2" in detail(e) and "509" in detail(e), "the detail names tb2 and 509", detail(e))
    vmm.remove_device("tb2")
    for k in range(509, 512):
        if k > 509:
            r = mem.add_region(k * 2 * 4096, 4096)
        vmm.add_region(r)
    check_eq(vmm.vm_entry()["regions"], 512, "512 regions in a VM without devices")
    r = mem.add_region(512 * 2 * 4096, 4096)
    e = expect_rpc_error(vmm.add_region, LIMIT_REACHED, "the 513th region (the daemon's 512)", r)
    check("512" in detail(e), "the detail says 512", detail(e))
    vmm.destroy()
    check_eq(tb.stop(), 0, "test back-end exit code")


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    vmm, mem, q, tb, img = part_qsd_32(t, d, daemon, c)
    part_bad_regions(t, daemon, c, vmm, mem, q, tb, img)
    vmm.stop_device("blk0")
    vmm.destroy()
    part_testpmd_8(t, d, daemon, c)
    part_daemon_cap(t, d, daemon, c)
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""A refused memory change is rolled back on every back-end that took it.

One VM, six devices, fanned out to at once: qsd export qa, test back-end
sockets tb0 and tb1, a test back-end without CONFIGURE_MEM_SLOTS (ts:
SET_MEM_TABLE), qsd export qb, test back-end socket tb2 (one process each
for qsd, the test back-ends with and without CONFIGURE_MEM_SLOTS).

1. tb1 refuses ADD_MEM_REG in the middle of the fan-out: vm.memory.add
   fails -32006 naming tb1 and ADD_MEM_REG; vm.memory.list is unchanged;
   tb0 and tb2 each got ADD_MEM_REG and then REM_MEM_REG, ts two
   SET_MEM_TABLEs, and all report the committed table again; the qsd exports were sent ADD_MEM_REG then
   REM_MEM_REG; no device was lost.  qsd really dropped the region: a read
   into a buffer in it is never completed and qsd drops the connection
   ("vu_panic: virtio: invalid address for buffers"; with reconnect_ms 0
   the device fails), while the same read into region 0 works.
2. The same region added again (no misbehaviour) goes through everywhere:
   the test back-ends report it, qb does I/O through it.
3. A rollback that fails: tb0 accepts ADD_MEM_REG but refuses the
   REM_MEM_REG of the rollback, tb1 refuses ADD_MEM_REG: the call fails
   naming tb1, its detail names tb0; tb0 is failed (device.failed event,
   state "failed"); every other device is back on the committed table.
   Later changes skip the failed device; removed and added again, it gets
   the whole current table in its handshake.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_memory_common import (QsdFileExports, RegionAlloc, blk_probe_unmapped,  # noqa: E402
                                blk_roundtrip, check_tb_tables, check_vm_table, detail,
                                expect_rpc_error, hot_region, sent_count, vm_table)
from vhubtest import blk, scenarios                                               # noqa: E402
from vhubtest.client import BACKEND_ERROR                                         # noqa: E402
from vhubtest.daemon import Daemon                                                # noqa: E402
from vhubtest.memory import GuestMemory                                           # noqa: E402
from vhubtest.testbackend import TestBackend                                      # noqa: E402
from vhubtest.testing import check, check_eq, log, run                            # noqa: E402
from vhubtest.vmm import Vmm                                                      # noqa: E402

MiB = 1 << 20
R1_GPA = 0x40000000
R2_GPA = 0x50000000
R3_GPA = 0x60000000
TB_SOCKS = [0, 1, 2]
PF_NO_MEM_SLOTS = 0xdbe2b & ~(1 << 15)   # the test back-end's default without CONFIGURE_MEM_SLOTS


def counts(tb, sock):
    r = tb.requests(sock)
    return r.get("ADD_MEM_REG", 0), r.get("REM_MEM_REG", 0)


def qsd_counts(daemon, dev):
    return sent_count(daemon, dev, "ADD_MEM_REG"), sent_count(daemon, dev, "REM_MEM_REG")


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    imgs = [os.path.join(d, "qa.img"), os.path.join(d, "qb.img")]
    for img in imgs:
        scenarios.make_image(img, 4 * MiB)
    qsd = t.enter(QsdFileExports(imgs, [daemon.backend_socket("qa.sock"),
                                        daemon.backend_socket("qb.sock")], log_dir=d))
    tb = t.enter(TestBackend([daemon.backend_socket("tb%d.sock" % i) for i in TB_SOCKS], log_dir=d))
    ts = t.enter(TestBackend([daemon.backend_socket("ts.sock")], log_dir=d,
                             args=["--protocol-features", hex(PF_NO_MEM_SLOTS)]))

    mem = t.enter(GuestMemory(8 * MiB))
    r0 = mem.regions[0]
    vmm = Vmm(c, "vm0")
    vmm.create()
    vmm.add_memory(mem)
    # reconnect_ms 0 on the qsd exports: the probe below makes qsd drop the
    # connection, and the request it chokes on would be resubmitted forever
    order = [("qa", qsd.sockets[0]), ("tb0", tb.sockets[0]), ("tb1", tb.sockets[1]),
             ("ts", ts.socket), ("qb", qsd.sockets[1]), ("tb2", tb.sockets[2])]
    for name, sock in order:
        extra = {"reconnect_ms": 0} if name.startswith("q") else {}
        vmm.add_device(name, sock, type="blk", **extra)
    check_eq([x["device"] for x in vmm.device_list()], [n for n, _ in order], "device order")
    qa = blk.BlkQueue(mem, size=64, max_io=8192)
    qb = blk.BlkQueue(mem, size=64, max_io=8192)
    vmm.start_device("qa", scenarios.BLK_FEATURES, [qa.vq])
    vmm.start_device("qb", scenarios.BLK_FEATURES, [qb.vq])
    blk_roundtrip(qa, 0, 8, salt=1, image=imgs[0])
    blk_roundtrip(qb, 0, 8, salt=2, image=imgs[1])
    check_tb_tables(vmm, tb, TB_SOCKS, "at the start")
    check_tb_tables(vmm, ts, [0], "at the start (ts)")

    # ---- 1: tb1 refuses ADD_MEM_REG ----
    tb_before = {s: counts(tb, s) for s in TB_SOCKS}
    q_before = {n: qsd_counts(daemon, n) for n in ("qa", "qb")}
    ts_tables = ts.requests(0).get("SET_MEM_TABLE", 0)
    tb.misbehave("ADD_MEM_REG", "refuse", sock=1, count=1)
    r1 = hot_region(mem, R1_GPA, 4 * MiB)
    e = expect_rpc_error(vmm.add_region, BACKEND_ERROR, "vm.memory.add refused by tb1", r1)
    log("error: %s" % e.data)
    check_eq((e.data or {}).get("device"), "tb1", "error.data.device names the refusing back-end")
    check_eq((e.data or {}).get("request"), "ADD_MEM_REG", "error.data.request")
    check_vm_table(vmm, [r0], "unchanged")
    check_tb_tables(vmm, tb, TB_SOCKS, "after the rollback")
    check_tb_tables(vmm, ts, [0], "after the rollback (ts)")
    check_eq(ts.requests(0).get("SET_MEM_TABLE", 0), ts_tables + 2,
             "ts took SET_MEM_TABLE with the region, then SET_MEM_TABLE without (rolled back)")
    for s in (0, 2):
        a, r = tb_before[s]
        check_eq(counts(tb, s), (a + 1, r + 1), "tb%d took ADD_MEM_REG, then REM_MEM_REG (rolled back)" % s)
    a, r = tb_before[1]
    check_eq(counts(tb, 1), (a + 1, r), "tb1 got ADD_MEM_REG (refused) and nothing to roll back")
    for n in ("qa", "qb"):
        a, r = q_before[n]
        check_eq(qsd_counts(daemon, n), (a + 1, r + 1),
                 "%s (qsd) was sent ADD_MEM_REG, then REM_MEM_REG" % n)
    states = {x["device"]: (x["state"], x["reconnects"]) for x in vmm.device_list()}
    check_eq(states, {"qa": ("running", 0), "tb0": ("ready", 0), "tb1": ("ready", 0),
                      "ts": ("ready", 0), "qb": ("running", 0), "tb2": ("ready", 0)},
             "no device lost or failed")
    check(not [ev for ev in c.events() if ev["event"] in ("device.failed", "device.disconnected")],
          "no device.failed / device.disconnected event")

    # qsd really unmapped it: a buffer there is an invalid address to it.
    blk_roundtrip(qa, 64, 8, salt=3, image=imgs[0])
    probe = blk.BlkQueue(RegionAlloc(mem, r1), vq=qa.vq, max_io=4096)
    req = blk_probe_unmapped(probe, 8, wait=1.0)
    check(not req.done, "qa: a read into the rolled-back region is never completed")
    ev = c.wait_event(lambda ev: ev.get("device") == "qa" and ev["event"] == "device.failed", 5)
    log("event: %s" % ev)
    check("invalid address for buffers" in qsd.log_text(),
          "qsd reports the buffer address as invalid (it does not have the region)")
    check_eq(vmm.device_state("qa")["state"], "failed", "qa failed (reconnect_ms 0)")
    vmm.remove_device("qa")
    blk_roundtrip(qb, 128, 8, salt=4, image=imgs[1])
    log("ok: qb is untouched by all that")

    # ---- 2: the same region again, accepted everywhere ----
    vmm.add_region(r1)
    check_vm_table(vmm, [r0, r1], "after the retry")
    check_tb_tables(vmm, tb, TB_SOCKS, "after the retry")
    check_tb_tables(vmm, ts, [0], "after the retry (ts)")
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, r1), vq=qb.vq, max_io=8192), 256, 16, salt=5,
                  image=imgs[1])
    log("ok: qb does I/O through the region it had rolled back before")

    # ---- 3: a rollback that fails ----
    tb_before = {s: counts(tb, s) for s in TB_SOCKS}
    tb.misbehave("REM_MEM_REG", "refuse", sock=0, count=1)
    tb.misbehave("ADD_MEM_REG", "refuse", sock=1, count=1)
    r2 = hot_region(mem, R2_GPA, 2 * MiB)
    before = vm_table(vmm)
    e = expect_rpc_error(vmm.add_region, BACKEND_ERROR, "vm.memory.add refused by tb1, tb0's rollback refused",
                         r2)
    log("error: %s" % e.data)
    check_eq((e.data or {}).get("device"), "tb1", "error.data.device names the refusing back-end")
    check("tb0" in detail(e), "the detail names tb0, which could not be rolled back", detail(e))
    ev = c.wait_event(lambda ev: ev.get("device") == "tb0" and ev["event"] == "device.failed", 5)
    check(ev.get("vm") == "vm0" and ev.get("reason"), "device.failed event for tb0 with a reason: %s"
          % ev.get("reason"))
    check_eq(vmm.device_state("tb0")["state"], "failed", "tb0 state")
    check_eq(vm_table(vmm), before, "vm.memory.list unchanged")
    check_tb_tables(vmm, tb, [1, 2], "on tb1 and tb2")
    check_tb_tables(vmm, ts, [0], "on ts")
    check_eq(counts(tb, 2), (tb_before[2][0] + 1, tb_before[2][1] + 1), "tb2 took ADD then REM")
    check_eq(counts(tb, 0), (tb_before[0][0] + 1, tb_before[0][1] + 1),
             "tb0 took ADD and was sent REM (which it refused)")
    tb.wait_until(lambda: not tb.connected(0), 5, "tb0's connection closed by the daemon")
    log("ok: the daemon closed its connection to tb0")
    blk_roundtrip(qb, 300, 8, salt=6, image=imgs[1])
    states = {x["device"]: x["state"] for x in vmm.device_list()}
    check_eq(states, {"tb0": "failed", "tb1": "ready", "ts": "ready", "qb": "running",
                      "tb2": "ready"},
             "device states")

    # The failed device is out of the fan-out; later changes go through.
    r3 = hot_region(mem, R3_GPA, 2 * MiB)
    vmm.add_region(r3)
    check_vm_table(vmm, [r0, r1, r3], "after adding another region")
    check_tb_tables(vmm, tb, [1, 2], "on tb1 and tb2")
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, r3), vq=qb.vq, max_io=8192), 400, 8, salt=7,
                  image=imgs[1])
    vmm.remove_device("tb0")
    vmm.add_device("tb0", tb.sockets[0], type="blk")
    check_tb_tables(vmm, tb, TB_SOCKS, "with tb0 added again (full table in its handshake)")
    check_tb_tables(vmm, ts, [0], "(ts)")

    # qsd never got r2 for good either: qb chokes on it as qa did on r1.
    probe = blk.BlkQueue(RegionAlloc(mem, r2), vq=qb.vq, max_io=4096)
    req = blk_probe_unmapped(probe, 8, wait=1.0)
    check(not req.done, "qb: a read into the rolled-back region r2 is never completed")
    c.wait_event(lambda ev: ev.get("device") == "qb" and ev["event"] == "device.failed", 5)
    log("ok: qb failed on the address qsd does not have")

    vmm.destroy()
    tb.wait_until(lambda: not any(tb.connected(s) for s in TB_SOCKS) and not ts.connected(0), 5,
                  "every test back-end connection closed after vm.destroy")
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")
    check_eq(tb.stop(), 0, "test back-end exit code")
    check_eq(ts.stop(), 0, "test back-end (ts) exit code")


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Memory changes racing device handshakes, and a hung back-end in a fan-out.

vhubd runs with --backend-timeout-ms 500.

A. device.add pipelined with vm.memory.add/remove on one connection (both
   orders; and with each side held up on purpose by a test back-end that
   delays its ADD_MEM_REG reply, so the handshake really parks behind a
   running fan-out and a fan-out really waits for a running handshake
   sync): both calls succeed and every device, the new one included, holds
   exactly vm.memory.list (test back-ends' own reports; the new one was
   sent each region once and nothing to remove).  A qsd export added
   concurrently with a region does I/O with buffers in that region.  The
   9th region racing a device.add of a back-end without CONFIGURE_MEM_SLOTS:
   exactly one of the two fails with -32008, and the tables agree.
B. A hung back-end (qemu-storage-daemon under SIGSTOP): vm.memory.add fails
   with -32007 naming it and ADD_MEM_REG after ~500 ms; it is reported
   disconnected; every other device is rolled back to vm.memory.list.
   While it is still hung a further region goes through (the lost device is
   not in the fan-out); after SIGCONT it reconnects, restarts its ring, and
   does I/O through that region: its reconnect handshake carried the whole
   table.  A back-end that goes silent on the REM_MEM_REG of a rollback is
   lost too, reconnects, and ends up on the committed table.
C. Serialized changes: 16 additions and 8 removals pipelined on one
   connection all succeed and every back-end ends on the VM's table; an
   addition overlapping one still queued is refused -32009; a device.remove
   pipelined behind a fan-out that device holds up does not fail the change.
No device is left holding a table that differs from vm.memory.list.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_memory_common import (QsdFileExports, RegionAlloc, blk_roundtrip,       # noqa: E402
                                check_tb_tables, check_vm_table, detail, expect_rpc_error,
                                hot_region, sent_count, vm_table)
from vhubtest import blk, scenarios                                               # noqa: E402
from vhubtest.client import (BACKEND_ERROR, BACKEND_TIMEOUT, BAD_REGION,          # noqa: E402
                             LIMIT_REACHED, RpcError, u64_json)
from vhubtest.daemon import Daemon                                                # noqa: E402
from vhubtest.memory import GuestMemory                                           # noqa: E402
from vhubtest.testbackend import TestBackend                                      # noqa: E402
from vhubtest.testing import check, check_eq, log, run                            # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                                      # noqa: E402

MiB = 1 << 20
TIMEOUT_MS = 500
NTB = 8
PF_NO_MEM_SLOTS = 0xdbe2b & ~(1 << 15)   # the test back-end's default without CONFIGURE_MEM_SLOTS


def add_req(vmm, region):
    """vm.memory.add sent now (not waited for)."""
    params = {"vm": vmm.vm, "gpa": u64_json(region.gpa), "size": u64_json(region.size), "fd": 0,
              "offset": 0, "uaddr": u64_json(region.uaddr)}
    return vmm.c.request("vm.memory.add", params, fds=[region.fd])


def dev_req(vmm, name, sock, **extra):
    return vmm.c.request("device.add", dict({"vm": vmm.vm, "device": name, "socket": sock,
                                             "type": "blk"}, **extra))


def outcome(p, timeout=10):
    """(result, None) or (None, RpcError)."""
    try:
        return p.result(timeout), None
    except RpcError as e:
        return None, e


def part_races(t, d, daemon, c):
    tb = t.enter(TestBackend([daemon.backend_socket("tb%d.sock" % i) for i in range(NTB)],
                             log_dir=d))
    img = os.path.join(d, "qx.img")
    scenarios.make_image(img, 4 * MiB)
    qsd = t.enter(QsdFileExports([img], [daemon.backend_socket("qx.sock")], log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4 * MiB)
    vmm.add_device("tb0", tb.sockets[0], type="blk")
    vmm.add_device("tb1", tb.sockets[1], type="blk")
    present = [0, 1]
    gpa = iter(range(0x40000000, 0x80000000, 0x4000000))

    # A1: memory first, then device.add, back to back.
    r = hot_region(mem, next(gpa), 2 * MiB)
    p_mem, p_dev = add_req(vmm, r), dev_req(vmm, "tb2", tb.sockets[2])
    p_dev.result(10)
    p_mem.result(10)
    present.append(2)
    check_vm_table(vmm, mem.regions, "A1 (vm.memory.add, device.add pipelined)")
    check_tb_tables(vmm, tb, present, "A1")

    # A2: device.add first, then memory.
    r = hot_region(mem, next(gpa), 2 * MiB)
    p_dev, p_mem = dev_req(vmm, "tb3", tb.sockets[3]), add_req(vmm, r)
    p_mem.result(10)
    p_dev.result(10)
    present.append(3)
    check_vm_table(vmm, mem.regions, "A2 (device.add, vm.memory.add pipelined)")
    check_tb_tables(vmm, tb, present, "A2")

    # A3: a fan-out held open (tb0 answers its ADD_MEM_REG after 300 ms)
    # while tb4's handshake reaches its memory sync: the handshake parks.
    tb.misbehave("ADD_MEM_REG", "delay", sock=0, count=1, delay_ms=300)
    r = hot_region(mem, next(gpa), 2 * MiB)
    adds0 = tb.requests(0).get("ADD_MEM_REG", 0)
    t0 = time.monotonic()
    p_mem = add_req(vmm, r)
    tb.wait_request("ADD_MEM_REG", count=adds0 + 1, sock=0)
    p_dev = dev_req(vmm, "tb4", tb.sockets[4])
    p_dev.result(10)
    t_dev = time.monotonic() - t0
    p_mem.result(10)
    present.append(4)
    check(t_dev >= 0.25, "A3: device.add answered only after the held fan-out (%.0f ms)" % (t_dev * 1e3))
    check_vm_table(vmm, mem.regions, "A3 (handshake parked behind a fan-out)")
    check_tb_tables(vmm, tb, present, "A3")
    req4 = tb.requests(4)
    check_eq((req4.get("ADD_MEM_REG", 0), req4.get("REM_MEM_REG", 0), req4.get("SET_MEM_TABLE", 0)),
             (len(mem.regions), 0, 0),
             "A3: tb4 was sent each region exactly once and nothing else")

    # A4: a handshake sync held open (tb5 answers its first ADD_MEM_REG
    # after 300 ms) while a region is added: the fan-out waits for it.
    tb.misbehave("ADD_MEM_REG", "delay", sock=5, count=1, delay_ms=300)
    r = hot_region(mem, next(gpa), 2 * MiB)
    t0 = time.monotonic()
    p_dev = dev_req(vmm, "tb5", tb.sockets[5])
    tb.wait_request("ADD_MEM_REG", count=1, sock=5)
    adds0 = tb.requests(0).get("ADD_MEM_REG", 0)
    p_mem = add_req(vmm, r)
    time.sleep(0.1)
    check_eq(tb.requests(0).get("ADD_MEM_REG", 0), adds0,
             "A4: the fan-out has not started while tb5's handshake syncs")
    p_mem.result(10)
    t_mem = time.monotonic() - t0
    p_dev.result(10)
    present.append(5)
    check(t_mem >= 0.25, "A4: vm.memory.add answered after the held handshake (%.0f ms)" % (t_mem * 1e3))
    check_vm_table(vmm, mem.regions, "A4 (fan-out waited for a handshake sync)")
    check_tb_tables(vmm, tb, present, "A4")

    # A5: remove racing a device.add.
    gone = mem.regions[1]
    p_mem = vmm.c.request("vm.memory.remove", {"vm": "vm0", "gpa": gone.gpa})
    p_dev = dev_req(vmm, "tb6", tb.sockets[6])
    p_mem.result(10)
    p_dev.result(10)
    present.append(6)
    i = mem.regions.index(gone)
    del mem.regions[i]
    del mem._cursor[i]
    gone.close()
    check_vm_table(vmm, mem.regions, "A5 (vm.memory.remove, device.add pipelined)")
    check_tb_tables(vmm, tb, present, "A5")

    # A6: a qsd export added while a region comes in; I/O through it.
    r = hot_region(mem, next(gpa), 4 * MiB)
    p_mem, p_dev = add_req(vmm, r), dev_req(vmm, "qx", qsd.socket)
    p_mem.result(10)
    p_dev.result(10)
    check_vm_table(vmm, mem.regions, "A6")
    check_tb_tables(vmm, tb, present, "A6")
    q = blk.BlkQueue(mem, size=64, max_io=4096)
    vmm.start_device("qx", scenarios.BLK_FEATURES, [q.vq])
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, r), vq=q.vq, max_io=8192), 32, 16, salt=1, image=img)
    log("ok: A6: qx (added concurrently) does I/O through the region added at the same time")
    for rr in mem.regions[1:]:
        blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, rr), vq=q.vq, max_io=4096), 64, 1, salt=2,
                      image=img)
    log("ok: A6: ... and through every other hot-added region")
    vmm.stop_device("qx")
    vmm.destroy()

    # A7: the 9th region racing a SET_MEM_TABLE back-end's device.add.
    # A7.0 pipelined: whichever the daemon takes first wins.  A7.1: the
    # handshake's SET_MEM_TABLE is held (300 ms) before the add is sent: the
    # device is in, so the 9th must be refused.  A witness back-end with
    # CONFIGURE_MEM_SLOTS shows what was sent.
    tbs = t.enter(TestBackend([daemon.backend_socket("tbs%d.sock" % i) for i in range(2)],
                              args=["--protocol-features", hex(PF_NO_MEM_SLOTS)], log_dir=d))
    for k in range(2):
        m8 = t.enter(GuestMemory(2 * MiB))
        for j in range(7):
            m8.add_region(0x40000000 + j * 0x4000000, 2 * MiB)
        v8 = Vmm(c, "vm8-%d" % k)
        v8.create()
        v8.add_memory(m8)
        v8.add_device("w", tb.sockets[7], type="blk")
        w_before = tb.requests(7).get("ADD_MEM_REG", 0), tb.requests(7).get("REM_MEM_REG", 0)
        ninth = m8.add_region(0x7f000000, 2 * MiB)
        if k == 1:
            tbs.misbehave("SET_MEM_TABLE", "delay", sock=k, count=1, delay_ms=300)
        p_dev = v8.c.request("device.add", {"vm": v8.vm, "device": "s", "socket": tbs.sockets[k],
                                            "type": "blk"})
        if k == 1:
            tbs.wait_request("SET_MEM_TABLE", count=1, sock=k)
        p_mem = add_req(v8, ninth)
        (_, e_dev), (_, e_mem) = outcome(p_dev), outcome(p_mem)
        log("A7.%d: device.add -> %s; vm.memory.add of the 9th -> %s" % (k, e_dev, e_mem))
        check((e_dev is None) != (e_mem is None), "A7.%d: exactly one of the two fails" % k)
        failed = e_dev or e_mem
        check_eq(failed.code, LIMIT_REACHED, "A7.%d: with -32008 (%s)" % (k, detail(failed)))
        if k == 1:
            check(e_mem is not None, "A7.1: the device whose handshake was syncing wins")
        want = 8 if e_mem else 9
        check_eq(len(vm_table(v8)), want, "A7.%d: the VM has %d regions" % (k, want))
        w_after = tb.requests(7).get("ADD_MEM_REG", 0), tb.requests(7).get("REM_MEM_REG", 0)
        log("A7.%d: the witness was sent %d ADD_MEM_REG, %d REM_MEM_REG for the 9th"
            % (k, w_after[0] - w_before[0], w_after[1] - w_before[1]))
        if e_mem:
            check_tb_tables(v8, tbs, [k], "A7.%d (device in, 9th refused)" % k)
            check_eq(w_after, w_before, "A7.%d: the 9th was refused before anything was sent" % k)
        else:
            check(not [x for x in v8.device_list() if x["device"] == "s"],
                  "A7.%d: the refused device is not in the VM" % k)
        check_tb_tables(v8, tb, [7], "A7.%d (witness)" % k)
        v8.destroy()


def part_hung(t, d, daemon, c):
    tb = t.enter(TestBackend([daemon.backend_socket("h%d.sock" % i) for i in range(2)], log_dir=d))
    imgs = [os.path.join(d, "ok.img"), os.path.join(d, "hung.img")]
    for img in imgs:
        scenarios.make_image(img, 4 * MiB)
    q_ok = t.enter(QsdFileExports([imgs[0]], [daemon.backend_socket("qok.sock")], log_dir=d))
    q_hung = t.enter(QsdFileExports([imgs[1]], [daemon.backend_socket("qhung.sock")], log_dir=d))
    mem, vmm = vm_with_memory(t, c, 8 * MiB, vm="vmh")
    vmm.add_device("h0", tb.sockets[0], type="blk")
    vmm.add_device("qok", q_ok.socket, type="blk")
    vmm.add_device("qhung", q_hung.socket, type="blk")
    vmm.add_device("h1", tb.sockets[1], type="blk")
    qo = blk.BlkQueue(mem, size=64, max_io=8192)
    qh = blk.BlkQueue(mem, size=64, max_io=8192)
    vmm.start_device("qok", scenarios.BLK_FEATURES, [qo.vq])
    vmm.start_device("qhung", scenarios.BLK_FEATURES, [qh.vq])
    blk_roundtrip(qo, 0, 8, salt=1, image=imgs[0])
    blk_roundtrip(qh, 0, 8, salt=2, image=imgs[1])
    c.events()

    # B1: qhung frozen; the fan-out loses it at its deadline.
    ok_before = (sent_count(daemon, "qok", "ADD_MEM_REG"), sent_count(daemon, "qok", "REM_MEM_REG"))
    os.kill(q_hung.pid, 19)   # SIGSTOP
    t.defer(lambda: q_hung.alive and os.kill(q_hung.pid, 18))
    r1 = hot_region(mem, 0x40000000, 4 * MiB)
    t0 = time.monotonic()
    e = expect_rpc_error(vmm.add_region, BACKEND_TIMEOUT, "vm.memory.add with qhung frozen", r1)
    took = time.monotonic() - t0
    log("error after %.0f ms: %s" % (took * 1e3, e.data))
    check(0.4 <= took < 3.0, "B1: answered at the back-end's deadline (%.0f ms, timeout %d ms)"
          % (took * 1e3, TIMEOUT_MS))
    check_eq((e.data or {}).get("device"), "qhung", "B1: error.data.device names the hung back-end")
    check_eq((e.data or {}).get("request"), "ADD_MEM_REG", "B1: error.data.request")
    ev = c.wait_event(lambda ev: ev.get("device") == "qhung" and ev["event"] == "device.disconnected", 5)
    log("event: %s" % ev)
    check_vm_table(vmm, [mem.regions[0]], "B1: unchanged")
    check_tb_tables(vmm, tb, [0, 1], "B1: rolled back")
    check_eq((sent_count(daemon, "qok", "ADD_MEM_REG"), sent_count(daemon, "qok", "REM_MEM_REG")),
             (ok_before[0] + 1, ok_before[1] + 1), "B1: qok was sent ADD_MEM_REG, then REM_MEM_REG")
    blk_roundtrip(qo, 64, 8, salt=3, image=imgs[0])
    states = {x["device"]: x["state"] for x in vmm.device_list()}
    check(states["qhung"] in ("disconnected", "connecting"), "B1: qhung is %s" % states["qhung"])
    check_eq({k: v for k, v in states.items() if k != "qhung"},
             {"h0": "ready", "qok": "running", "h1": "ready"}, "B1: the others are untouched")
    mem.regions.remove(r1)
    mem._cursor.pop()
    r1.close()

    # B2: still frozen: the lost device is out of the fan-out.
    r2 = hot_region(mem, 0x50000000, 4 * MiB)
    t0 = time.monotonic()
    vmm.add_region(r2)
    log("ok: B2: vm.memory.add with qhung still frozen (disconnected) took %.0f ms"
        % ((time.monotonic() - t0) * 1e3))
    check_vm_table(vmm, mem.regions, "B2")
    check_tb_tables(vmm, tb, [0, 1], "B2")
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, r2), vq=qo.vq, max_io=8192), 128, 8, salt=4,
                  image=imgs[0])

    # B3: thawed, it reconnects with the whole table and its ring restarted.
    os.kill(q_hung.pid, 18)   # SIGCONT
    ev = c.wait_event(lambda ev: ev.get("device") == "qhung" and ev["event"] == "device.reconnected", 15)
    log("event: %s" % ev)
    check_eq(vmm.device_state("qhung")["state"], "running", "B3: qhung running again")
    blk_roundtrip(qh, 200, 8, salt=5, image=imgs[1])
    blk_roundtrip(blk.BlkQueue(RegionAlloc(mem, r2), vq=qh.vq, max_io=8192), 256, 8, salt=6,
                  image=imgs[1])
    log("ok: B3: qhung does I/O through the region added while it was gone")

    # B4: a back-end that goes silent on the REM_MEM_REG of a rollback.
    tb.misbehave("ADD_MEM_REG", "refuse", sock=1, count=1)
    tb.misbehave("REM_MEM_REG", "silence", sock=0, count=1)
    conns = tb.connections(0)
    r3 = hot_region(mem, 0x60000000, 2 * MiB)
    before = vm_table(vmm)
    e = expect_rpc_error(vmm.add_region, BACKEND_ERROR, "vm.memory.add refused by h1, h0 silent on rollback", r3)
    log("error: %s" % e.data)
    check_eq((e.data or {}).get("device"), "h1", "B4: the error names the refusing back-end")
    c.wait_event(lambda ev: ev.get("device") == "h0" and ev["event"] == "device.disconnected", 5)
    c.wait_event(lambda ev: ev.get("device") == "h0" and ev["event"] == "device.reconnected", 10)
    tb.wait_connected(0, connections=conns + 1)
    check_eq(vm_table(vmm), before, "B4: vm.memory.list unchanged")
    check_tb_tables(vmm, tb, [0, 1], "B4: h0 reconnected onto the committed table, h1 rolled back")
    blk_roundtrip(qo, 300, 8, salt=7, image=imgs[0])
    blk_roundtrip(qh, 300, 8, salt=8, image=imgs[1])
    states = {x["device"]: x["state"] for x in vmm.device_list()}
    check_eq(states, {"h0": "ready", "qok": "running", "qhung": "running", "h1": "ready"},
             "B4: every device back in service")
    vmm.stop_device("qok")
    vmm.stop_device("qhung")
    vmm.destroy()


def part_serialized(t, d, daemon, c):
    tb = t.enter(TestBackend([daemon.backend_socket("s%d.sock" % i) for i in range(3)], log_dir=d))
    mem, vmm = vm_with_memory(t, c, 2 * MiB, vm="vms")
    for i in range(3):
        vmm.add_device("s%d" % i, tb.sockets[i], type="blk")

    # C1: a burst of additions and removals, all in flight at once (the
    # removals are of regions committed before: requests on one connection
    # are independent, so a removal may not count on a pipelined addition).
    old = [hot_region(mem, 0x20000000 + k * 0x400000, 2 * MiB) for k in range(8)]
    for r in old:
        vmm.add_region(r)
    regs = [hot_region(mem, 0x40000000 + k * 0x400000, 2 * MiB) for k in range(16)]
    pend = []
    for k, r in enumerate(regs):
        pend.append(add_req(vmm, r))
        if k % 2:
            pend.append(vmm.c.request("vm.memory.remove", {"vm": vmm.vm, "gpa": old[k // 2].gpa}))
    overlap = GuestMemory(4 * MiB, base=regs[3].gpa - 2 * MiB)
    t.defer(overlap.close)
    p_bad = add_req(vmm, overlap.regions[0])
    for p in pend:
        p.result(10)
    _, e = outcome(p_bad)
    check(e is not None and e.code == BAD_REGION,
          "C1: an addition overlapping a queued one is refused -32009 (%s)" % e)
    for r in old:
        i = mem.regions.index(r)
        del mem.regions[i]
        del mem._cursor[i]
        r.close()
    check_vm_table(vmm, mem.regions, "C1: 16 additions and 8 removals pipelined")
    check_tb_tables(vmm, tb, [0, 1, 2], "C1")

    # C2: s2 holds up a fan-out; its removal is queued behind: the change
    # still succeeds for the others.
    tb.misbehave("ADD_MEM_REG", "delay", sock=2, count=1, delay_ms=300)
    r = hot_region(mem, 0x7f000000, 2 * MiB)
    adds = tb.requests(2).get("ADD_MEM_REG", 0)
    p_mem = add_req(vmm, r)
    tb.wait_request("ADD_MEM_REG", count=adds + 1, sock=2)
    p_rm = vmm.c.request("device.remove", {"vm": vmm.vm, "device": "s2"})
    _, e_mem = outcome(p_mem)
    p_rm.result(10)
    check(e_mem is None, "C2: vm.memory.add succeeds although a device was removed meanwhile (%s)"
          % e_mem)
    check_vm_table(vmm, mem.regions, "C2")
    check_tb_tables(vmm, tb, [0, 1], "C2")
    check_eq([x["device"] for x in vmm.device_list()], ["s0", "s1"], "C2: s2 removed")
    vmm.destroy()


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", str(TIMEOUT_MS)]))
    c = daemon.client()
    part_races(t, d, daemon, c)
    part_hung(t, d, daemon, c)
    part_serialized(t, d, daemon, c)
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")


if __name__ == "__main__":
    run(main)

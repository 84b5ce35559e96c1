#!/usr/bin/env python3
"""Losses at awkward moments (vhubd --backend-timeout-ms 1000).

1. Rapid kills: qemu-storage-daemon SIGKILLed 40 times at random 0..25 ms
   intervals under continuous I/O (one request in flight per ring), most of
   them in the middle of a restore, then left alone.  Events strictly
   alternate device.disconnected / device.reconnected (one pair per outage,
   however many restore attempts it took), `reconnects` in the events counts
   1, 2, 3, ... and ends equal to device.list's; every request completes
   exactly once with the right data (a restore killed halfway is just
   rebased again at the used index); the image equals the model.
2. A loss inside the VMM's own call: the test back-end closes the connection
   at SET_VRING_KICK, SET_VRING_ENABLE or SET_STATUS of a device.start, or at
   GET_VRING_BASE of a device.stop.  The call fails with -32006 naming that
   request; the device comes back in the state it was in before the call
   (ready/stopped for a start, running for a stop: the stop never happened)
   and the VMM can go on from there.
3. A hang during a memory change: vm.memory.add while the back-end is
   SIGSTOPped fails after the deadline with -32007 naming ADD_MEM_REG, the
   VM's table is rolled back (vm.memory.list), and after SIGCONT the restored
   back-end's table is the VM's.
4. Server mode with the test back-end connecting (--connect): kill and
   restart 3 times, then --fail-handshake 3 (three connections dropped after
   GET_FEATURES, the fourth restores), then device.remove during an outage:
   answered at once, the listening socket is gone, a restarted back-end
   finds nobody.
5. The daemon's fd count is back to its baseline.
"""

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_reconnect_qsd import BlkRing, ThrottledQsd, Workload  # noqa: E402
from vhubtest.events import wait_event                          # noqa: E402
from vhubtest import blk, scenarios                            # noqa: E402
from vhubtest.client import BACKEND_ERROR, BACKEND_TIMEOUT, RpcError  # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.procs import wait_until                          # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, check_eq, log, run, run_seed  # noqa: E402
from vhubtest.vmm import Vmm                                   # noqa: E402

TIMEOUT_MS = 1000
BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)


def part_rapid_kills(t, d, daemon, c, mem, seed):
    disk_bytes = 16 << 20
    img = scenarios.sparse_image(os.path.join(d, "rapid.img"), disk_bytes)
    sock = daemon.backend_socket("rapid.sock")
    qsd = t.enter_logged("qsd (rapid kills)",
                         ThrottledQsd(img, sock, num_queues=2, log_dir=d, iops_read=3000, iops_write=3000))
    vmm = Vmm(c, "vm-rapid")
    vmm.create()
    vmm.add_memory(mem)
    vmm.add_device("blk0", sock, type="blk")
    rings = [BlkRing(mem, i) for i in range(2)]
    vmm.start_device("blk0", scenarios.BLK_FEATURES, rings)
    wl = Workload(rings, disk_bytes, 1, seed)
    wl.run_for(0.1)
    events = []

    def collect():
        for e in c.events():
            if e.get("device") == "blk0" and e.get("vm") == "vm-rapid" and \
                    e["event"] in ("device.disconnected", "device.reconnected"):
                events.append(e)
    rnd = random.Random(seed)
    for _ in range(40):
        qsd.kill()
        qsd.start(wait=False)
        wl.run_for(rnd.uniform(0.0, 0.025))
        collect()
    qsd.kill()
    qsd.start()

    def settled():
        collect()
        return (events and events[-1]["event"] == "device.reconnected"
                and vmm.device_state("blk0")["state"] == "running")
    wl.run_until(settled, 15.0, "the last restore")
    wl.run_for(0.3)
    collect()
    names = [e["event"] for e in events]
    check(names and all(n == ("device.disconnected", "device.reconnected")[i % 2]
                        for i, n in enumerate(names)) and len(names) % 2 == 0,
          "events alternate disconnected/reconnected, one pair per outage (%d outages in 41 "
          "kills)" % (len(names) // 2), names)
    recs = [e["reconnects"] for e in events if e["event"] == "device.reconnected"]
    check_eq(recs, list(range(1, len(recs) + 1)), "reconnects in the events count up")
    check_eq(vmm.device_state("blk0")["reconnects"], len(recs), "device.list reconnects")
    check(all(e["exact"] for e in events if e["event"] == "device.reconnected"),
          "every restore exact (one request per ring)")
    wl.drain(10.0)
    check_eq(wl.strays(), 0, "no request completed twice")
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion had status OK and the right data")
    vmm.stop_device("blk0")
    wl.verify_image(img, disk_bytes)
    vmm.remove_device("blk0")
    vmm.destroy()
    for r in rings:
        r.close()


def part_loss_in_call(t, d, daemon, c, mem):
    sock = daemon.backend_socket("call.sock")
    tb = t.enter_logged("test back-end (loss in a call)",
                        TestBackend([sock], args=["--queues", "1"], log_dir=d))
    vmm = Vmm(c, "vm-call")
    vmm.create()
    vmm.add_memory(mem)
    vmm.add_device("A", sock, type="blk")
    for req in ("SET_VRING_KICK", "SET_VRING_ENABLE", "SET_STATUS", "GET_VRING_BASE"):
        q = blk.BlkQueue(mem, size=16, max_io=4096)
        if req == "GET_VRING_BASE":
            vmm.start_device("A", BLK1, [q.vq])
        before = vmm.device_state("A")["state"]
        tb.misbehave(req, "close", count=1)
        try:
            if req == "GET_VRING_BASE":
                vmm.stop_device("A")
            else:
                vmm.start_device("A", BLK1, [q.vq])
        except RpcError as e:
            check(e.code == BACKEND_ERROR and (e.data or {}).get("request") == req,
                  "%s closing the connection fails the call with -32006 naming it" % req, e)
        else:
            check(False, "%s closing the connection fails the call" % req)
        ev = wait_event(c, "device.reconnected", "A")
        state = vmm.device_state("A")["state"]
        check_eq(state, before, "after a loss at %s the device is back as before the call "
                 "(reconnects %d)" % (req, ev["reconnects"]))
        if state != "running":
            vmm.start_device("A", BLK1, [q.vq])
        check_eq(len(q.read_sectors(0, 1)), 512, "after the loss at %s the ring works" % req)
        vmm.stop_device("A")
        q.vq.close()
    vmm.remove_device("A")
    vmm.destroy()
    tb.stop()


def part_hang_in_memory_change(t, d, daemon, c, mem):
    sock = daemon.backend_socket("mem.sock")
    tb = t.enter_logged("test back-end (memory hang)", TestBackend([sock], args=["--queues", "1"], log_dir=d))
    vmm = Vmm(c, "vm-mem")
    vmm.create()
    vmm.add_memory(mem)
    before = vmm.memory_list()
    vmm.add_device("A", sock, type="blk")
    q = blk.BlkQueue(mem, size=16, max_io=4096)
    vmm.start_device("A", BLK1, [q.vq])
    extra = GuestMemory()
    t.defer(extra.close)
    region = extra.add_region(1 << 30, 1 << 20)
    tb.sigstop()
    t.defer(lambda: tb.alive and tb.sigcont())
    t0 = time.monotonic()
    try:
        vmm.add_region(region)
    except RpcError as e:
        dt = time.monotonic() - t0
        check(e.code == BACKEND_TIMEOUT and (e.data or {}).get("request") == "ADD_MEM_REG",
              "vm.memory.add with a frozen back-end fails after the deadline (%.0f ms) with "
              "-32007 naming ADD_MEM_REG" % (dt * 1000), e)
    else:
        check(False, "vm.memory.add with a frozen back-end fails")
    check_eq(vmm.memory_list(), before, "the VM's memory table is rolled back")
    tb.sigcont()
    wait_event(c, "device.reconnected", "A")
    regs = sorted((r["gpa"], r["size"]) for r in tb.regions(0))
    check_eq(regs, [(r["gpa"], r["size"]) for r in before],
             "the restored back-end's table is the VM's")
    check_eq(len(q.read_sectors(0, 1)), 512, "the ring works")
    vmm.remove_device("A")
    vmm.destroy()
    tb.stop()
    q.vq.close()


def part_server_mode(t, d, daemon, c, mem):
    sock = daemon.backend_socket("srv.sock")
    vmm = Vmm(c, "vm-srv")
    vmm.create()
    vmm.add_memory(mem)
    pend = c.request("device.add", {"vm": vmm.vm, "device": "S", "socket": sock,
                                    "mode": "server", "type": "blk"})
    wait_until(lambda: os.path.exists(sock), 5.0, what="vhubd to listen on %s" % sock)
    args = ["--queues", "1", "--reconnect-ms", "20"]
    tb = t.enter_logged("test back-end (server mode)", TestBackend(connect=[sock], args=args, log_dir=d))
    pend.result(5.0)
    q = blk.BlkQueue(mem, size=16, max_io=4096)
    vmm.start_device("S", BLK1, [q.vq])
    for k in (1, 2, 3, 4):
        tb.kill()
        wait_event(c, "device.disconnected", "S")
        tb.start(args=args + (["--fail-handshake", "3"] if k == 4 else []))
        ev = wait_event(c, "device.reconnected", "S")
        check_eq(ev["reconnects"], k, "server mode: the restarted back-end connected and the "
                 "device is restored%s" % (" after 3 failed handshakes" if k == 4 else ""))
        if k == 4:
            check_eq(tb.socket_status(0)["connections"], 4, "server mode: 4 connections")
        check_eq(len(q.read_sectors(0, 1)), 512, "server mode, restore %d: the ring works" % k)
    tb.kill()
    wait_event(c, "device.disconnected", "S")
    t0 = time.monotonic()
    vmm.remove_device("S")
    dt = time.monotonic() - t0
    check(dt < 0.25, "server mode: device.remove during the outage answered at once (%.1f ms)"
          % (dt * 1000))
    check(not os.path.exists(sock), "server mode: the listening socket is gone")
    tb.start()
    time.sleep(0.3)
    check_eq(tb.socket_status(0)["connections"], 0, "a restarted back-end finds nobody")
    tb.stop()
    vmm.destroy()
    q.vq.close()


def main(t):
    seed = run_seed()
    log("seed %d (VHUB_TEST_SEED)" % seed)
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", str(TIMEOUT_MS)]))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    mem = t.enter(GuestMemory(16 << 20))
    part_rapid_kills(t, d, daemon, c, mem, seed)
    part_loss_in_call(t, d, daemon, c, mem)
    part_hang_in_memory_change(t, d, daemon, c, mem)
    part_server_mode(t, d, daemon, c, mem)
    daemon.check_fd_baseline(baseline, timeout=10.0)


if __name__ == "__main__":
    run(main)

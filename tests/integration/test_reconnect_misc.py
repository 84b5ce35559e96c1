#!/usr/bin/env python3
"""Reconnect odds and ends (vhubd --backend-timeout-ms 1000).

1. Calls during an outage: with the test back-end SIGKILLed, every device
   method (config get/set, start, stop, reset, state.check, net.mtu) answers
   -32006 with data.device at once.  device.remove during the outage
   answers at once (< 250 ms: no reconnect attempt or back-end deadline is
   waited for), the device is gone from device.list, and when the
   back-end's socket comes back nothing connects to it (its connection
   count stays 0 for longer than the reconnect delay and backoff would
   take).
2. reconnect_ms 0: the back-end's loss gives device.disconnected then
   device.failed, device.list says "failed", calls answer -32006, and the
   restarted back-end never sees a connection.
3. A VMM connection closing: its VM (one device running on a SIGSTOPped
   qemu-storage-daemon, one on a healthy one) is torn down asynchronously;
   another client's calls are answered meanwhile (median daemon.info +
   vm.list round trip under 20 ms, none held up for the frozen back-end's
   1000 ms deadline) while the teardown waits it out: the daemon's fd count
   returns to its baseline only once the frozen device's GET_VRING_BASE has
   timed out; vm.list (and daemon.info's counts) stop showing the VM as
   soon as its teardown begins.
4. The VM's memory changing during an outage: vm.memory.add and
   vm.memory.remove succeed while the device is disconnected, and the
   restored back-end gets the table as it is now (its own report of its
   regions), with I/O into the added region working.
5. Devices restore to the state they were in: one "stopped" and one
   "ready" device of one qemu-storage-daemon (two exports, one process)
   both come back (two device.reconnected, empty vrings for both) in their
   states, and start and work afterwards.
6. After all of it the daemon's /proc/PID/fd count is back to its baseline.
"""

import os
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.events import no_event, wait_event                # noqa: E402
from vhubtest import blk, scenarios                            # noqa: E402
from vhubtest.backends import QsdNullBackend                   # noqa: E402
from vhubtest.client import BACKEND_ERROR, RpcError            # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                   # noqa: E402

TIMEOUT_MS = 1000
BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)


def start_one_ring(vmm, mem, device):
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device(device, BLK1, [q.vq])
    check_eq(len(q.read_sectors(0, 1)), 512, "%s: a read through its ring" % device)
    return q


def part_remove_during_outage(t, d, daemon, c, vmm, mem):
    sock = daemon.backend_socket("r.sock")
    tb = t.enter_logged("test back-end (remove)", TestBackend([sock], args=["--queues", "1"], log_dir=d))
    vmm.add_device("R", sock, type="blk", reconnect_ms=300)
    q = start_one_ring(vmm, mem, "R")
    tb.kill()
    wait_event(c, "device.disconnected", "R")
    check_eq(vmm.device_state("R")["state"], "disconnected", "R is disconnected")
    # every device method answers at once with -32006 during the outage
    params, fds = vmm.start_params("R", BLK1, [q.vq])
    for m, p, f in (("device.config.get", {"offset": 0, "size": 8}, []),
                    ("device.config.set", {"offset": 32, "data": "AQ=="}, []),
                    ("device.start", params, fds),
                    ("device.stop", {}, []),
                    ("device.reset", {}, []),
                    ("device.state.check", {}, []),
                    ("device.net.mtu", {"mtu": 1500}, [])):
        p = dict(p, vm=vmm.vm, device="R")
        t0 = time.monotonic()
        try:
            c.call(m, p, fds=f)
        except RpcError as e:
            dt = time.monotonic() - t0
            check(e.code == BACKEND_ERROR and (e.data or {}).get("device") == "R" and dt < 0.25,
                  "%s during the outage: -32006 at once (%.1f ms: %s)"
                  % (m, dt * 1000, (e.data or {}).get("detail")), e)
        else:
            check(False, "%s during the outage fails" % m)
    t0 = time.monotonic()
    vmm.remove_device("R")
    dt = time.monotonic() - t0
    # "at once": not after a reconnect attempt (300 ms) nor a back-end
    # timeout (1000 ms); generous for a loaded machine
    check(dt < 0.25, "device.remove during the outage answered at once (%.1f ms)" % (dt * 1000))
    check(vmm.device_state("R") is None, "R is gone from device.list")
    tb.start()          # the socket reappears: inotify would fire if anything still watched
    time.sleep(1.2)     # reconnect_ms 300, then 600: an attempt would have come by now
    check_eq(tb.connections(0), 0, "the back-end never sees a new connection after the remove")
    no_event(c, "device.reconnected", "R")
    no_event(c, "device.failed", "R")
    tb.stop()
    q.vq.close()


def part_reconnect_disabled(t, d, daemon, c, vmm, mem):
    sock = daemon.backend_socket("z.sock")
    tb = t.enter_logged("test back-end (reconnect_ms 0)",
                        TestBackend([sock], args=["--queues", "1"], log_dir=d))
    vmm.add_device("Z", sock, type="blk", reconnect_ms=0)
    q = start_one_ring(vmm, mem, "Z")
    tb.kill()
    ev = wait_event(c, "device.disconnected", "Z")
    log("Z lost: %s" % ev["reason"])
    ev = wait_event(c, "device.failed", "Z")
    log("Z failed: %s" % ev["reason"])
    check_eq(vmm.device_state("Z")["state"], "failed", "device.list state with reconnect_ms 0")
    try:
        vmm.config_get("Z", 0, 8)
    except RpcError as e:
        check_eq(e.code, BACKEND_ERROR, "a call on the failed device")
    else:
        check(False, "a call on the failed device fails")
    tb.start()
    time.sleep(0.5)
    check_eq(tb.connections(0), 0, "no reconnect attempt with reconnect_ms 0")
    no_event(c, "device.reconnected", "Z")
    vmm.remove_device("Z")
    tb.stop()
    q.vq.close()


def part_vmm_close(t, d, daemon, c, mem, baseline):
    socks = [daemon.backend_socket("h.sock"), daemon.backend_socket("f.sock")]
    frozen = QsdNullBackend([socks[0]], size=1 << 20, log_dir=d)
    healthy = QsdNullBackend([socks[1]], size=1 << 20, log_dir=d)
    t.add_log("qsd frozen", frozen.log_path)
    t.enter(frozen)
    t.enter(healthy)
    x = daemon.client()
    vx = Vmm(x, "vmx")
    vx.create()
    vx.add_memory(mem)
    vx.add_device("frozen", socks[0], type="blk")
    vx.add_device("healthy", socks[1], type="blk")
    qs = [start_one_ring(vx, mem, n) for n in ("frozen", "healthy")]
    os.kill(frozen.pid, signal.SIGSTOP)
    t.defer(lambda: frozen.alive and os.kill(frozen.pid, signal.SIGCONT))
    t0 = time.monotonic()
    x.close()                       # the VMM goes away: vmx is torn down
    lat, gone_at = [], None      # round trips of daemon.info + vm.list
    hidden_at = None
    while time.monotonic() - t0 < TIMEOUT_MS / 1000 * 4:
        s = time.monotonic()
        c.call("daemon.info")
        vms = [v["vm"] for v in c.call("vm.list")["vms"]]
        lat.append(time.monotonic() - s)
        if "vmx" not in vms and hidden_at is None:
            hidden_at = time.monotonic() - t0
        # vm.list and daemon.info stop counting vmx at once; its devices'
        # connections close when their teardown really ends
        if daemon.fd_count() == baseline:
            gone_at = time.monotonic() - t0
            break
        time.sleep(0.01)
    log("another client's daemon.info + vm.list during the teardown: %d round trips, max "
        "%.1f ms; vmx left vm.list after %s, the daemon's fds were back to baseline after %s"
        % (len(lat), max(lat) * 1000, "%.0f ms" % (hidden_at * 1000) if hidden_at else "never",
           "%.0f ms" % (gone_at * 1000) if gone_at else "never"))
    check(hidden_at is not None and gone_at is not None, "the closed VMM's VM is torn down")
    check(gone_at > TIMEOUT_MS / 1000 * 0.8,
          "the teardown waited for the frozen back-end's deadline (%.0f ms)" % (gone_at * 1000))
    lat.sort()
    check(len(lat) >= 5 and lat[len(lat) // 2] < 0.02 and max(lat) < TIMEOUT_MS / 1000 / 2,
          "other clients' calls were answered meanwhile, never held up by the frozen back-end's "
          "%d ms deadline (median %.1f ms, max %.1f ms)"
          % (TIMEOUT_MS, lat[len(lat) // 2] * 1000, max(lat) * 1000))
    os.kill(frozen.pid, signal.SIGCONT)
    for q in qs:
        q.vq.close()


def region_set(regs):
    return sorted((r["gpa"], r["size"]) for r in regs)


def part_memory_during_outage(t, d, daemon, c, vmm, mem):
    sock = daemon.backend_socket("m.sock")
    tb = t.enter_logged("test back-end (memory)", TestBackend([sock], args=["--queues", "1"], log_dir=d))
    vmm.add_device("M", sock, type="blk")
    q = start_one_ring(vmm, mem, "M")
    check_eq(region_set(tb.regions(0)), [(r.gpa, r.size) for r in mem.regions],
             "M's back-end has the VM's one region")

    tb.kill()
    wait_event(c, "device.disconnected", "M")
    extra = mem.add_region(64 << 20, 1 << 20)
    vmm.add_region(extra)
    log("ok: vm.memory.add while M is disconnected succeeds")  # the call raises otherwise
    tb.start()
    ev = wait_event(c, "device.reconnected", "M")
    check_eq(ev["reconnects"], 1, "M reconnected")
    want = sorted((r.gpa, r.size) for r in mem.regions)
    check_eq(region_set(tb.regions(0)), want, "the restored back-end has the table as it is now")
    # a read whose data buffer lies in the region added during the outage
    hdr, status = mem.alloc(16, 16), mem.alloc(1, 1)
    mem.write(hdr, struct.pack("<IIQ", blk.VIRTIO_BLK_T_IN, 0, 0))
    mem.write(status, b"\xff")
    mem.fill(extra.gpa, 512, 0xA5)
    q.vq.add([(hdr, 16, False), (extra.gpa, 512, True), (status, 1, True)])
    q.vq.kick()
    q.vq.wait_used(1, 5.0)
    check(mem.read(status, 1) == b"\0" and mem.read(extra.gpa, 512) != b"\xa5" * 512,
          "a read into the added region completes with data")

    tb.kill()
    wait_event(c, "device.disconnected", "M")
    c.call("vm.memory.remove", {"vm": vmm.vm, "gpa": extra.gpa})
    log("ok: vm.memory.remove while M is disconnected succeeds")  # the call raises otherwise
    tb.start()
    wait_event(c, "device.reconnected", "M")
    check_eq(region_set(tb.regions(0)), [(mem.regions[0].gpa, mem.regions[0].size)],
             "the restored back-end no longer has the removed region")
    check_eq(len(q.read_sectors(0, 1)), 512, "M works after the second restore")
    vmm.remove_device("M")
    tb.stop()
    q.vq.close()


def part_states(t, d, daemon, c, vmm, mem):
    socks = [daemon.backend_socket("s.sock"), daemon.backend_socket("y.sock")]
    qsd = t.enter_logged("qsd (two exports)", QsdNullBackend(socks, size=1 << 20, log_dir=d))
    vmm.add_device("S", socks[0], type="blk")
    vmm.add_device("Y", socks[1], type="blk")
    q = start_one_ring(vmm, mem, "S")
    bases = vmm.stop_device("S")
    check_eq(vmm.device_state("S")["state"], "stopped", "S stopped")
    check_eq(vmm.device_state("Y")["state"], "ready", "Y ready")
    qsd.kill()
    for n in ("S", "Y"):
        wait_event(c, "device.disconnected", n)
    qsd.start()
    for n, state in (("S", "stopped"), ("Y", "ready")):
        ev = wait_event(c, "device.reconnected", n)
        check_eq((ev["reconnects"], ev["vrings"]), (1, []),
                 "%s reconnected, no ring to rebase (it was not running)" % n)
        check_eq(vmm.device_state(n)["state"], state, "%s back in state %s" % (n, state))
    q.vq.reset(bases[0])
    vmm.start_device("S", BLK1, [q.vq])
    check_eq(len(q.read_sectors(0, 1)), 512, "S starts again where it stopped and works")
    q2 = start_one_ring(vmm, mem, "Y")
    for n in ("S", "Y"):
        vmm.remove_device(n)
    q.vq.close()
    q2.vq.close()


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", str(TIMEOUT_MS)]))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    log("daemon fd baseline: %d" % baseline)
    mem, vmm = vm_with_memory(t, c, 8 << 20)
    part_remove_during_outage(t, d, daemon, c, vmm, mem)
    part_reconnect_disabled(t, d, daemon, c, vmm, mem)
    part_memory_during_outage(t, d, daemon, c, vmm, mem)
    part_states(t, d, daemon, c, vmm, mem)
    vmm.destroy()
    part_vmm_close(t, d, daemon, c, mem, baseline)
    daemon.check_fd_baseline(baseline, "daemon fd count back to baseline after everything", timeout=10.0)


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Hung, flaky and shrunken back-ends (vhubd --backend-timeout-ms 500).

1. hang: qemu-storage-daemon A SIGSTOPped.  A device.config.get on A fails
   after the deadline with -32007 and error.data {device, request:
   GET_CONFIG}; A is then lost (device.disconnected) and the daemon keeps
   trying to restore it (each attempt against the frozen process times out
   too).  Meanwhile device.config.get on a second qsd B keeps its latency:
   the median of 40 calls during the stall stays within 50 ms (and within
   20 ms of the median before).  Calls on A during the outage fail at once
   with -32006 (data.device A), both while it waits for the next attempt
   and while a restore attempt against the frozen process is under way.  SIGCONT brings A back
   (device.reconnected, the ring still works); a second stall ended by
   SIGKILL + restart instead brings it back too.
2. fail-handshake: the test back-end restarted with --fail-handshake 3
   (closes its first three connections right after GET_FEATURES): the
   daemon retries, the fourth connection restores the device, one
   device.disconnected and one device.reconnected for the whole outage.
3. fewer features: the test back-end restarted offering less than before
   (no VIRTIO_BLK_F_FLUSH): device.failed with a reason naming the
   features, device.list state "failed", calls answer -32006 at once, and
   the daemon makes no further connection attempt.
"""

import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.events import no_event, wait_event                # noqa: E402
from vhubtest import blk, scenarios                            # noqa: E402
from vhubtest.backends import QsdNullBackend                   # noqa: E402
from vhubtest.client import BACKEND_ERROR, BACKEND_TIMEOUT, RpcError  # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

TIMEOUT_MS = 500


def timed(fn, *a, **kw):
    """(seconds, result or RpcError)."""
    t0 = time.monotonic()
    try:
        r = fn(*a, **kw)
    except RpcError as e:
        r = e
    return time.monotonic() - t0, r


def config_latencies(vmm, device, n, spread=0.0):
    out = []
    for _ in range(n):
        dt, r = timed(vmm.config_get, device, 0, 8)
        if isinstance(r, RpcError):
            check(False, "device.config.get on %s answered" % device, r)
        out.append(dt)
        if spread:
            time.sleep(spread)
    return out


def part_hang(t, d, daemon, c, vmm, mem):
    socks = [daemon.backend_socket("a.sock"), daemon.backend_socket("b.sock")]
    qa = QsdNullBackend([socks[0]], size=1 << 20, log_dir=d)
    qb = QsdNullBackend([socks[1]], size=1 << 20, log_dir=d)
    t.add_log("qsd A", qa.log_path)
    t.add_log("qsd B", qb.log_path)
    t.enter(qa)
    t.enter(qb)
    vmm.add_device("A", socks[0], type="blk")
    vmm.add_device("B", socks[1], type="blk")
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("A", scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ), [q.vq])
    check_eq(len(q.read_sectors(0, 8)), 4096, "A: a read through its ring")

    before = config_latencies(vmm, "B", 40)
    med_before = statistics.median(before)
    log("B: device.config.get median %.2f ms, max %.2f ms before the stall"
        % (med_before * 1000, max(before) * 1000))

    for how in ("SIGCONT", "restart"):
        os.kill(qa.pid, signal.SIGSTOP)
        dt, r = timed(vmm.config_get, "A", 0, 8)
        check(isinstance(r, RpcError), "%s round: device.config.get on the frozen A fails" % how, r)
        check_eq(r.code, BACKEND_TIMEOUT, "%s round: error code (timed out)" % how)
        check_eq((r.data or {}).get("device"), "A", "%s round: error.data.device" % how)
        check_eq((r.data or {}).get("request"), "GET_CONFIG", "%s round: error.data.request" % how)
        check(TIMEOUT_MS / 1000 * 0.9 <= dt < TIMEOUT_MS / 1000 + 0.5,
              "%s round: it failed after the deadline (%.0f ms, deadline %d ms)"
              % (how, dt * 1000, TIMEOUT_MS))
        ev = wait_event(c, "device.disconnected", "A")
        log("%s round: A lost: %s" % (how, ev["reason"]))

        # The stall goes on (restore attempts time out); B must not notice.
        during = config_latencies(vmm, "B", 40, spread=0.02)
        med_during = statistics.median(during)
        log("B: device.config.get median %.2f ms, max %.2f ms during the stall"
            % (med_during * 1000, max(during) * 1000))
        check(med_during < 0.050 and med_during < med_before + 0.020,
              "%s round: B's median latency during A's stall %.2f ms (before %.2f ms)"
              % (how, med_during * 1000, med_before * 1000))
        # Calls on A itself fail at once with -32006, in both phases of the
        # outage: waiting for the next attempt ("disconnected") and during a
        # restore attempt against the frozen process ("connecting"), which
        # nothing waits behind.
        seen = {}
        end = time.monotonic() + 3.0
        while time.monotonic() < end and not ("connecting" in seen and "disconnected" in seen):
            phase = vmm.device_state("A")["state"]
            dt, r = timed(vmm.config_get, "A", 0, 8)
            check(isinstance(r, RpcError) and r.code == BACKEND_ERROR and dt < 0.25
                  and (r.data or {}).get("device") == "A",
                  "%s round: device.config.get on A while %s fails at once with -32006 "
                  "(%.1f ms: %s)" % (how, phase, dt * 1000, getattr(r, "data", r)))
            seen[phase] = seen.get(phase, 0) + 1
            time.sleep(0.03)
        log("%s round: calls on A during the outage by phase: %s" % (how, seen))
        check("connecting" in seen, "%s round: some call landed during a restore attempt" % how)
        state = vmm.device_state("A")["state"]
        check(state in ("disconnected", "connecting"), "%s round: A is %s" % (how, state))

        t0 = time.monotonic()
        if how == "SIGCONT":
            os.kill(qa.pid, signal.SIGCONT)
        else:
            qa.kill()
            qa.start()
        ev = wait_event(c, "device.reconnected", "A", timeout=15.0)
        log("%s round: A back %.0f ms after the %s: %s"
            % (how, (time.monotonic() - t0) * 1000, how, ev))
        check_eq(vmm.device_state("A")["state"], "running", "%s round: A running again" % how)
        check_eq(len(vmm.config_get("A", 0, 8)), 8, "%s round: device.config.get on A works" % how)
        check_eq(len(q.read_sectors(8, 8)), 4096, "%s round: A's ring works" % how)
        no_event(c, "device.disconnected", "A")
    check_eq(vmm.device_state("A")["reconnects"], 2, "A: device.list reconnects")
    check_eq(vmm.device_state("B")["reconnects"], 0, "B was never lost")
    no_event(c, "device.disconnected", "B")
    vmm.remove_device("A")
    vmm.remove_device("B")
    q.vq.close()


def part_fail_handshake(t, d, c, vmm, mem, sock):
    img = os.path.join(d, "tb.img")
    tb = t.enter_logged("test back-end",
                        TestBackend([sock], args=["--disk", img, "--queues", "1"], log_dir=d))
    vmm.add_device("T", sock, type="blk")
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("T", scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ), [q.vq])
    q.write_sectors(0, b"\x42" * 4096)

    tb.kill()
    wait_event(c, "device.disconnected", "T")
    t0 = time.monotonic()
    tb.start(args=["--disk", img, "--queues", "1", "--fail-handshake", "3"])
    ev = wait_event(c, "device.reconnected", "T", timeout=15.0)
    log("fail-handshake: device.reconnected %.0f ms after the restart: %s"
        % ((time.monotonic() - t0) * 1000, ev))
    st = tb.socket_status(0)
    check_eq(st["connections"], 4, "the back-end saw 3 failed handshakes and the good one")
    check_eq(st["requests"].get("GET_FEATURES", 0) >= 4, True,
             "every attempt began with GET_FEATURES")
    check_eq(ev["reconnects"], 1, "reconnects")
    no_event(c, "device.disconnected", "T")    # one per outage, not per attempt
    no_event(c, "device.failed", "T")
    check(q.read_sectors(0, 8) == b"\x42" * 4096, "the ring works after the flaky restore")
    return tb, q, img


def part_fewer_features(t, c, vmm, tb, q, img):
    tb.kill()
    wait_event(c, "device.disconnected", "T")
    fewer = 0x140001200 & ~(1 << blk.VIRTIO_BLK_F_FLUSH)
    tb.start(args=["--disk", img, "--queues", "1", "--features", hex(fewer)])
    ev = wait_event(c, "device.failed", "T", timeout=15.0)
    log("fewer features: device.failed: %s" % ev["reason"])
    check("feature" in ev["reason"], "device.failed has a reason naming the features")
    st = vmm.device_state("T")
    check_eq(st["state"], "failed", "device.list state")
    dt, r = timed(vmm.config_get, "T", 0, 8)
    check(isinstance(r, RpcError) and r.code == BACKEND_ERROR and dt < 0.1,
          "a call on the failed device answers -32006 at once (%.1f ms: %s)" % (dt * 1000, r))
    conns = tb.socket_status(0)["connections"]
    time.sleep(1.0)
    check_eq(tb.socket_status(0)["connections"], conns,
             "no connection attempt after device.failed (in 1 s)")
    no_event(c, "device.reconnected", "T")
    vmm.remove_device("T")
    q.vq.close()


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", str(TIMEOUT_MS)]))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    mem, vmm = vm_with_memory(t, c, 8 << 20)
    part_hang(t, d, daemon, c, vmm, mem)
    tb, q, img = part_fail_handshake(t, d, c, vmm, mem, daemon.backend_socket("t.sock"))
    part_fewer_features(t, c, vmm, tb, q, img)
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


if __name__ == "__main__":
    run(main)

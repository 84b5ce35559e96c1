#!/usr/bin/env python3
"""GET_VRING_BASE out of range is a protocol violation (issue 15: a back-end
answering 0xffffffff made device.stop answer "base": -1).

vhub-test-backend's misbehaviour "refuse" on GET_VRING_BASE answers with
num = arg.  spec "A vring descriptor index for split virtqueues": bits 0-15
the next avail index, bits 16-31 reserved; "Vring descriptor indices for
packed virtqueues": bits 0-14 avail index, 15 its wrap counter, 16-30 used
index, 31 its wrap counter, each index a position below the ring size.

1. split ring (64 entries): 0x10000 and 0xffffffff -> device.stop fails
   with -32006 (data: device, request GET_VRING_BASE), the reason names the
   value, no base reaches the VMM; the device is lost (device.disconnected)
   and restored running (device.reconnected); its ring still works.  The
   largest valid value, 0xffff, is answered as base 65535.
2. packed ring (RING_PACKED offered by the back-end and acked by the VMM; no
   I/O: only the stop's answer matters): 0xffffffff (index 0x7fff beyond the
   64-entry ring) and 0x00400000 (used index 64) are violations: device.stop
   fails the same way, and the device, lost while running with packed rings
   that cannot be restarted where they stopped, fails (device.failed naming
   VIRTIO_F_RING_PACKED; test_reconnect_packed.py); each case on a device of
   its own.  0x80038005 (avail 5, wrap 1, used 3, wrap 1) is answered as base
   2147713029 -- the whole unsigned value, not a negative number.
3. another client is answered throughout; the daemon's fds are back at the
   baseline at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                              # noqa: E402
from vhubtest.client import BACKEND_ERROR, RpcError              # noqa: E402
from vhubtest.daemon import Daemon                               # noqa: E402
from vhubtest.events import no_event, wait_event                 # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.testing import check, check_eq, log, run           # noqa: E402
from vhubtest.virtq import Virtqueue                             # noqa: E402
from vhubtest.vmm import vm_with_memory                          # noqa: E402

TB_FEATURES = 0x140001200       # the test back-end's default offer
F_RING_PACKED = 1 << 34
SPLIT = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)


def stop_fails(c, vmm, other, tb, name, num, what, then="device.reconnected"):
    """GET_VRING_BASE answered with num: device.stop must fail, the device
    must be lost and restored (then: device.reconnected) or fail
    (device.failed)."""
    tb.misbehave("GET_VRING_BASE", "refuse", count=1, arg=num)
    try:
        res = vmm.c.call("device.stop", {"vm": vmm.vm, "device": name})
        check(False, "%s: device.stop fails" % what, "answered %r" % (res,))
    except RpcError as e:
        check_eq(e.code, BACKEND_ERROR, "%s: device.stop error code" % what)
        check_eq((e.data or {}).get("request"), "GET_VRING_BASE", "%s: error.data.request" % what)
        check_eq((e.data or {}).get("device"), name, "%s: error.data.device" % what)
        check("0x%x" % num in str(e), "%s: the error names 0x%x" % (what, num), e)
        log("%s: %s" % (what, e))
    ev = wait_event(c, "device.disconnected", name)
    check("0x%x" % num in ev.get("reason", ""), "%s: device.disconnected names it" % what, ev)
    if then == "device.reconnected":
        ev = wait_event(c, "device.reconnected", name)
        check_eq(vmm.device_state(name)["state"], "running", "%s: restored, running" % what)
    else:
        ev = wait_event(c, "device.failed", name)
        check("VIRTIO_F_RING_PACKED" in ev.get("reason", ""), "%s: device.failed names packed rings" % what,
              ev)
        check_eq(vmm.device_state(name)["state"], "failed", "%s: failed" % what)
        no_event(c, "device.reconnected", name)
    check("pid" in other.call("daemon.info", timeout=3), "%s: another client is answered" % what)


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", "1000"]))
    c = daemon.client()
    other = daemon.client()
    baseline = daemon.settled_fd_count(c)
    X = t.enter(TestBackend([daemon.backend_socket("x.sock")], log_dir=d, args=["--queues", "1"]))
    P = t.enter(TestBackend([daemon.backend_socket("p.sock")], log_dir=d,
                            args=["--queues", "1", "--features",
                                  hex(TB_FEATURES | F_RING_PACKED)]))
    mem, vmm = vm_with_memory(t, c, 4 << 20)

    # ---- split ----
    vmm.add_device("X", X.socket)
    q = blk.BlkQueue(mem, index=0, size=64, max_io=4096)
    t.defer(q.vq.close)
    vmm.start_device("X", SPLIT, [q.vq])
    check_eq(len(q.read_sectors(0, 8)), 4096, "X: a read through its ring")
    for num in (0x10000, 0xffffffff):
        stop_fails(c, vmm, other, X, "X", num, "split ring, GET_VRING_BASE 0x%x" % num)
        check_eq(len(q.read_sectors(8, 8)), 4096, "X: the restored ring works")
    X.misbehave("GET_VRING_BASE", "refuse", count=1, arg=0xffff)
    check_eq(vmm.stop_device("X"), {0: 0xffff}, "split ring: GET_VRING_BASE 0xffff answered")
    no_event(c, "device.disconnected", "X")

    # ---- packed ----
    vq = Virtqueue(mem, size=64, index=0)
    t.defer(vq.close)

    def packed_device(name):
        info = vmm.add_device(name, P.socket)
        check(info["features"] & F_RING_PACKED, "%s offers RING_PACKED" % name)
        vmm.start_device(name, SPLIT | F_RING_PACKED, [vq])

    for k, num in enumerate((0xffffffff, 0x00400000)):
        packed_device("P%d" % k)
        stop_fails(c, vmm, other, P, "P%d" % k, num, "packed ring, GET_VRING_BASE 0x%x" % num,
                   then="device.failed")
        vmm.remove_device("P%d" % k)
    packed_device("P")
    P.misbehave("GET_VRING_BASE", "refuse", count=1, arg=0x80038005)
    check_eq(vmm.stop_device("P"), {0: 0x80038005},
             "packed ring: GET_VRING_BASE 0x80038005 answered as the unsigned value")
    no_event(c, "device.disconnected", "P")

    vmm.remove_device("X")
    vmm.remove_device("P")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


run(main)

#!/usr/bin/env python3
"""A running device with packed rings (VIRTIO_F_RING_PACKED acked) cannot be
restored after a loss: it fails, instead of restarting its rings at a base
read from the split ring's layout.

spec "Vring descriptor indices for packed virtqueues": a packed ring's
position is an index and a wrap counter the back-end keeps to itself.  Guest
memory holds descriptors flagged with wrap counters, and at the addresses a
split ring has its avail and used indexes (device.start's `avail` and `used`)
a packed ring has its event suppression areas: {off_wrap, flags}.  Before
the fix the restore read `used + 2` (the device area's flags) as the used
index and restarted the ring there.

The project's test back-end offers RING_PACKED but reads every ring as a
split ring: the start's kick finds an "avail index" (the driver area's flags)
that makes it mark the ring broken, which is harmless here: only the
daemon's handling of the ring's position is under test, and no request is
made.  The event suppression areas hold what a driver and
a device would write: driver area {0, 1 (DISABLE)}, device area {0x8003,
2 (DESC)}; the ring starts at base 0x8005 (avail index 5, wrap counter 1).

    test_reconnect_packed.py backend
        P (packed, running) and S (split, running, same VM) on two test
        back-ends.  P's back-end is killed and started again: P fails at once
        (device.disconnected, then device.failed naming VIRTIO_F_RING_PACKED,
        state failed); no device.reconnected; the restarted back-end gets no
        connection, so no SET_VRING_BASE (before the fix: SET_VRING_BASE 2,
        `outstanding` 65535 in device.reconnected).  S sees no event and its
        ring still reads.  A packed device that was *stopped* at the loss has
        no ring to restart: it is restored (device.reconnected, no vrings,
        state stopped) and starts again.  The daemon's fds go back to their
        baseline.

    test_reconnect_packed.py vhubd
        vhubd under a service manager with its fd store; P (packed) and S
        (split) running; a GET_CONFIG held by P's back-end is in flight when
        vhubd is SIGKILLed.  The new process restores P as lost (the reconnect
        path): device.disconnected, then device.failed naming
        VIRTIO_F_RING_PACKED (before the fix: device.reconnected); S sees no
        event and still reads; P's back-end gets no SET_VRING_BASE.

    test_reconnect_packed.py frontdoor
        The front door (the harness's VMM on a front-door socket, a packed
        ring started): the back-end killed and started again, the restore
        finds the started packed ring in the VMM's records and the device
        fails naming packed rings (the new back-end gets no SET_VRING_BASE);
        on another device, the VMM's GET_VRING_BASE of its packed ring during
        an outage has no honest answer: the VMM's connection is closed.
        (What the front door did before this fix too: coverage.)

    test_reconnect_packed.py base
        device.start of packed rings takes a packed ring's position as
        device.stop gives it (a u32: indexes in bits 0-14 and 16-30, wrap
        counters in bits 15 and 31; before: capped at 65535), and without a
        `base` starts the ring at index 0 with both wrap counters 1
        (0x80008000, virtio's initial wrap counters; before: 0, a lap behind
        the driver); a packed base with an index beyond the ring and a split
        base over 65535 are refused (-32602); a packed ring's event areas are
        4 bytes each, so a ring whose device area ends a region starts
        (before: -32009, checked as a split ring's 6 + 8 * size bytes).
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                              # noqa: E402
from vhubtest import direct as vu                                # noqa: E402
from vhubtest.direct import BackendClosed, DirectFrontend        # noqa: E402
from vhubtest.frontdoor import ThroughVhubd                      # noqa: E402
from vhubtest.client import Client, RpcError                     # noqa: E402
from vhubtest.daemon import Daemon                               # noqa: E402
from vhubtest.events import no_event, wait_event                 # noqa: E402
from vhubtest.memory import GuestMemory                          # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run_parts  # noqa: E402
from vhubtest.virtq import Virtqueue                             # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                     # noqa: E402

TB_FEATURES = 0x140001200       # the test back-end's default offer
F_RING_PACKED = 1 << 34
SPLIT = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)
PACKED = SPLIT | F_RING_PACKED
PACKED_BASE = 0x8005            # avail index 5, avail wrap counter 1
DEVICE_EVENTS = ("device.disconnected", "device.reconnected", "device.failed", "device.removed")


def packed_backend(t, d, sock):
    return t.enter(TestBackend([sock], log_dir=d,
                               args=["--queues", "1", "--features", hex(TB_FEATURES | F_RING_PACKED)]))


def packed_ring(t, mem):
    """A 64-entry packed ring's parts: descriptors at desc, the driver event
    suppression area at avail, the device's at used (what a driver and a
    device write there)."""
    vq = Virtqueue(mem, size=64, index=0)
    t.defer(vq.close)
    vq.base = PACKED_BASE
    mem.write_u16(vq.avail, 0)          # driver area: off_wrap
    mem.write_u16(vq.avail + 2, 1)      # flags: RING_EVENT_FLAGS_DISABLE
    mem.write_u16(vq.used, 0x8003)      # device area: off_wrap
    mem.write_u16(vq.used + 2, 2)       # flags: RING_EVENT_FLAGS_DESC
    return vq


def add_start_packed(vmm, tb, name, sock, vq):
    info = vmm.add_device(name, sock, type="blk", reconnect_ms=50)
    check(info["features"] & F_RING_PACKED, "%s's back-end offers RING_PACKED" % name)
    vmm.start_device(name, PACKED, [vq])
    check_eq(tb.requests().get("SET_VRING_BASE"), 1, "%s: one SET_VRING_BASE at the start" % name)


def failed_for_packed(c, vmm, name, tb, bases, what):
    """name lost while running with packed rings: it fails, and its
    back-end is never given a ring base again (bases: the SET_VRING_BASE
    it had got before)."""
    ev = wait_event(c, "device.disconnected", name)
    log("%s: %s" % (what, ev))
    ev = c.wait_event(lambda e: e.get("device") == name and e.get("event") in DEVICE_EVENTS, 15)
    if ev.get("event") == "device.reconnected":
        log("%s: restarted at %r; the back-end got %r" % (what, ev.get("vrings"), tb.vrings()))
    check_eq(ev.get("event"), "device.failed", "%s: %s fails instead of being restored" % (what, name))
    check("VIRTIO_F_RING_PACKED" in ev.get("reason", ""), "%s: the reason names packed rings" % what,
          ev.get("reason"))
    check_eq(vmm.device_state(name)["state"], "failed", "%s: %s is failed" % (what, name))
    # the failure is at the loss: the daemon never connects to the new
    # back-end (a restore attempt would come within reconnect_ms, 50 ms)
    time.sleep(0.5)
    check_eq(tb.requests().get("SET_VRING_BASE"), bases,
             "%s: the back-end got no SET_VRING_BASE after the loss" % what)
    no_event(c, "device.reconnected", name)


def untouched(c, vmm, name, q, what):
    check_eq(vmm.device_state(name)["state"], "running", "%s: %s still running" % (what, name))
    check_eq(len(q.read_sectors(16, 8)), 4096, "%s: %s's ring still reads" % (what, name))
    for ev in DEVICE_EVENTS:
        no_event(c, ev, name)


def part_backend(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    P = packed_backend(t, d, daemon.backend_socket("p.sock"))
    S = t.enter(TestBackend([daemon.backend_socket("s.sock")], log_dir=d, args=["--queues", "1"]))
    mem, vmm = vm_with_memory(t, c, 4 << 20)

    vmm.add_device("S", S.socket, reconnect_ms=50)
    q = blk.BlkQueue(mem, index=0, size=64, max_io=4096)
    t.defer(q.vq.close)
    vmm.start_device("S", SPLIT, [q.vq])
    check_eq(len(q.read_sectors(0, 8)), 4096, "S: a read through its ring")

    vq = packed_ring(t, mem)
    add_start_packed(vmm, P, "P", P.socket, vq)
    c.events()

    P.kill()
    P.start()
    failed_for_packed(c, vmm, "P", P, None, "running packed ring, back-end killed")
    untouched(c, vmm, "S", q, "P failed")
    vmm.remove_device("P")

    # stopped at the loss: no ring to restart, restored as any device
    vq2 = packed_ring(t, mem)
    add_start_packed(vmm, P, "P2", P.socket, vq2)
    check_eq(list(vmm.stop_device("P2")), [0], "P2 stopped")
    c.events()
    P.kill()
    P.start()
    wait_event(c, "device.disconnected", "P2")
    ev = wait_event(c, "device.reconnected", "P2", 15)
    check_eq(ev.get("vrings"), [], "a stopped packed device: restored with no ring restarted")
    check_eq(vmm.device_state("P2")["state"], "stopped", "P2 restored stopped")
    check_eq(P.requests().get("SET_VRING_BASE"), None, "P2's new back-end got no SET_VRING_BASE")
    vmm.start_device("P2", PACKED, [vq2])
    check_eq(P.requests().get("SET_VRING_BASE"), 1, "P2 starts again on its new back-end")
    check_eq(vmm.device_state("P2")["state"], "running", "P2 running again")
    untouched(c, vmm, "S", q, "P2 restored")

    vmm.remove_device("P2")
    vmm.remove_device("S")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


def part_vhubd(t):
    from test_restart import Managed
    d = t.tmpdir()
    m = Managed(t, d, extra=["--backend-timeout-ms", "3000"])
    P = packed_backend(t, d, m.socket("p.sock"))
    S = t.enter(TestBackend([m.socket("s.sock")], log_dir=d, args=["--queues", "1"]))
    t.add_log("test back-end (packed)", P.log_path)
    c = t.enter(Client(m.control, timeout=15))
    mem = t.enter(GuestMemory(4 << 20))
    vmm = Vmm(c, "vm0")
    vmm.create()
    vmm.add_memory(mem)
    vmm.add_device("S", m.socket("s.sock"), type="blk", reconnect_ms=50)
    q = blk.BlkQueue(mem, index=0, size=64, max_io=4096)
    t.defer(q.vq.close)
    vmm.start_device("S", SPLIT, [q.vq])
    check_eq(len(q.read_sectors(0, 8)), 4096, "S: a read through its ring")
    vq = packed_ring(t, mem)
    add_start_packed(vmm, P, "P", m.socket("p.sock"), vq)

    # a request in flight at the crash: the new process restores P as lost
    P.misbehave("GET_CONFIG", "delay", delay_ms=400, count=1)
    pending = c.request("device.config.get", {"vm": "vm0", "device": "P", "offset": 0, "size": 8})
    P.wait_request("GET_CONFIG")
    c.events()
    m.restart(sig=signal.SIGKILL)
    ev = c.wait_event(None, 10)
    check_eq((ev.get("event"), ev.get("restarts")), ("daemon.restarted", 1),
             "the first message after the crash is daemon.restarted")
    resp = pending.response(10)
    check_eq(resp.error and resp.error.get("code"), -32011, "the call in flight is answered -32011")
    # P's own back-end is alive: the loss is the new process's doing
    failed_for_packed(c, vmm, "P", P, 1, "running packed ring, vhubd crashed with a request in flight")
    untouched(c, vmm, "S", q, "after the crash")

    vmm.remove_device("P")
    m.finish(c, vmm, "S", [])


def part_frontdoor(t):
    way = ThroughVhubd(t, timeout_ms=1000)
    tb = packed_backend(t, way.dir, os.path.join(way.dir, "p.sock"))
    mem = t.enter(GuestMemory(4 << 20))

    # a VMM's started packed ring in the records at the restore: the device fails
    fe = vmm_packed(way.socket(tb.socket, "blk0", "blk"), packed_ring(t, mem))
    tb.kill()
    way.wait_events("device.disconnected", 1, "blk0")
    tb.start()
    ev = way.wait_events("device.failed", 1, "blk0")[0]
    check("packed" in ev.get("reason", ""), "front door: the restore fails naming packed rings", ev)
    check_eq(way.device("blk0")["state"], "failed", "front door: blk0 failed")
    check_eq(way.events("device.reconnected", "blk0"), [], "front door: blk0 not restored")
    check_eq(tb.requests().get("SET_VRING_BASE"), None, "front door: the new back-end got no SET_VRING_BASE")
    fe.close()
    way.release("blk0")

    # GET_VRING_BASE of a started packed ring during an outage: no honest
    # answer, the VMM is closed (its records go with it)
    fe = vmm_packed(way.socket(tb.socket, "blk1", "blk"), packed_ring(t, mem))
    tb.kill()
    way.wait_events("device.disconnected", 1, "blk1")
    try:
        base = fe.get_vring_base(0)
        check(False, "front door: GET_VRING_BASE of a packed ring without the back-end is not answered",
              "answered %#x" % base)
    except BackendClosed:
        log("front door: GET_VRING_BASE of a packed ring during the outage closed the VMM")
    way.wait_events("device.vmm_disconnected", 1, "blk1")
    fe.close()
    way.release("blk1")


def vmm_packed(path, vq):
    """A VMM (the harness's front-end) on a front-door socket, a packed ring started."""
    fe = DirectFrontend.connect(path)
    fe.handshake(vu.SUPPORTED_PROTOCOL_FEATURES)
    acked = fe.setup(vq.mem, vu.bit(vu.VIRTIO_F_VERSION_1) | F_RING_PACKED, [vq])
    check(acked & F_RING_PACKED, "the VMM acked RING_PACKED through the front door")
    return fe


def part_base(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    P = packed_backend(t, d, daemon.backend_socket("p.sock"))
    mem, vmm = vm_with_memory(t, c, 4 << 20)

    def start(name, features, vq, base, expect_error_code=None):
        vmm.add_device(name, P.socket, type="blk", reconnect_ms=0)
        params, fds = vmm.start_params(name, features, [vq])
        if base is None:
            del params["vrings"][0]["base"]
        else:
            params["vrings"][0]["base"] = base
        if expect_error_code is None:
            c.call("device.start", params, fds=fds)
            got = P.vrings()[0]["set_base"]
            vmm.stop_device(name)
        else:
            e = expect_error(RpcError, c.call, "device.start", params, fds=fds, what="%s: base %#x" % (name, base))
            check_eq(e.code, expect_error_code, "%s: base %#x refused as invalid params (%s)" % (name, base, e.message))
            got = None
        vmm.remove_device(name)
        return got

    vq = packed_ring(t, mem)
    check_eq(start("P1", PACKED, vq, None), 0x80008000,
             "a packed ring started without a base: index 0, both wrap counters 1")
    check_eq(start("P2", PACKED, vq, 0x80058005), 0x80058005,
             "a packed ring's base as device.stop gives it reaches the back-end whole")
    start("P3", PACKED, vq, 0x80408000, -32602)     # used index 64 of a 64-entry ring
    start("P4", PACKED, vq, 0x0040, -32602)         # avail index 64
    check_eq(start("S1", SPLIT, vq, None), 0, "a split ring without a base starts at 0")
    start("S2", SPLIT, vq, 0x10000, -32602)

    # a packed ring whose device event area is the region's last 4 bytes
    edge = Virtqueue(mem, size=64, index=0)
    t.defer(edge.close)
    edge.used = (4 << 20) - 4
    check_eq(start("P5", PACKED, edge, None), 0x80008000,
             "a packed ring's 4-byte device area at the region's end is inside it")
    vmm.destroy()


if __name__ == "__main__":
    run_parts({"backend": part_backend, "vhubd": part_vhubd, "frontdoor": part_frontdoor, "base": part_base},
              "backend")

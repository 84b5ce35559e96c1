#!/usr/bin/env python3
"""qemu-storage-daemon SIGKILLed and restarted under continuous I/O through vhubd.

    test_reconnect_qsd.py depth1    20 kills, ONE request in flight per ring
    test_reconnect_qsd.py depth32   10 kills, 32 requests in flight per ring

Two rings, writes of known patterns to distinct 1 KiB extents and reads of
extents already written, checked as they complete; qsd is SIGKILLed at
random points and restarted on the same socket (the daemon sees the socket
reappear through inotify and restores the device).  Each outage must give
exactly one device.disconnected and one device.reconnected whose
`reconnects` counts up, whose per-ring `base` is the used index the dead
qsd left in guest memory and whose `outstanding` is what this driver had
made available and not seen used at the kill (up to the requests it queued
between the kill and the daemon noticing: that is the race of the kill).

qsd 7.2 has no INFLIGHT_SHMFD and completes out of order, and the harness
does not ack VIRTIO_F_IN_ORDER, so `exact` must be true exactly when no ring
had more than one request outstanding.

depth1: every request completes exactly once with correct data (no stray
completion of a head that is not in flight, none stuck), all reads match
the model, device.list says reconnects == 20, and at the end every written
extent reads back right through the rings and the image file equals the
model (untouched extents still zero).

depth32: the contract allows requests to be re-executed or never completed
when exact is false.  The test asserts what IS guaranteed: the exact flag,
the outstanding counts and bases, and that the device keeps working once the
VMM restarts its rings (device.stop, rings reset, device.start) and requeues
what never completed; it counts and prints what it observed (duplicate
completions = re-executed requests, requests never completed).  Every
completion the driver accepted had status OK and correct data, and the
image equals the model at the end.  That last part holds only because this
driver never changes a chain's descriptors (slot k always uses descriptors
3k..3k+2 and its own buffers), writes have one fixed size, each extent is
written once, and the driver stops queueing from the moment it learns of the
loss: a re-executed stale avail entry then executes whatever request owns
that slot now, which is a request the guest did make.  A guest that reuses
descriptors for other buffers has no such protection (docs/reconnect.md).

BlkRing and Workload are imported by test_reconnect_inflight.py.
"""

import collections
import os
import random
import select
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                            # noqa: E402
from vhubtest.backends import QsdBackend                        # noqa: E402
from vhubtest.events import no_event, poll_event                # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run, run_seed  # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

EXTENT = 1024                  # every request moves one 1 KiB extent
EXTENT_SECTORS = EXTENT // blk.SECTOR_SIZE
STATUS_POISON = 0xFF


def u16(v):
    return v & 0xFFFF


class Req:
    """One virtio-blk request as the guest sees it."""
    __slots__ = ("serial", "type", "extent", "data", "ring", "head", "completions",
                 "status", "rdata", "requeued")

    def __init__(self, serial, rtype, extent, data=None):
        self.serial = serial
        self.type = rtype
        self.extent = extent
        self.data = data              # what a write writes
        self.ring = None
        self.head = None
        self.completions = 0
        self.status = None
        self.rdata = None
        self.requeued = False

    def clone(self, serial):
        return Req(serial, self.type, self.extent, self.data)

    def __repr__(self):
        return "Req(#%d %s extent %d ring %s head %s)" % (
            self.serial, "OUT" if self.type == blk.VIRTIO_BLK_T_OUT else "IN", self.extent,
            None if self.ring is None else self.ring.index, self.head)


class BlkRing:
    """A split ring carrying virtio-blk requests with static chains.

    Slot k always uses descriptors 3k, 3k+1, 3k+2 (header, data, status) and
    its own buffers, so the chain behind a head never points anywhere but
    its slot; free slots are reused FIFO so a duplicate completion of a head
    almost always lands on a free slot and is caught as a stray.  It has the
    attributes Vmm.start_params wants (index, size, desc, avail, used, base,
    kick_fd, call_fd).
    """

    def __init__(self, mem, index, size=128):
        self.mem = mem
        self.index = index
        self.size = size
        self.desc = mem.alloc(16 * size, 16)
        self.avail = mem.alloc(6 + 2 * size, 2)
        self.used = mem.alloc(6 + 8 * size, 4)
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.kick_fd = os.eventfd(0, flags)
        self.call_fd = os.eventfd(0, flags)
        self.nslots = size // 3
        self.slots = [(mem.alloc(16, 16), mem.alloc(EXTENT, 512), mem.alloc(1, 1))
                      for _ in range(self.nslots)]
        self.inflight = {}
        self.strays = []              # (head, len) used while that head was not in flight
        self.reset(0)

    def reset(self, base=0):
        """Zero the ring at avail = used = base; returns the requests it dropped."""
        m = self.mem
        m.fill(self.desc, 16 * self.size)
        m.fill(self.avail, 6 + 2 * self.size)
        m.fill(self.used, 6 + 8 * self.size)
        self.base = u16(base)
        self.avail_idx = self.base
        self.last_used = self.base
        m.write_u16(self.avail + 2, self.base)
        m.write_u16(self.used + 2, self.base)
        dropped = sorted(self.inflight.values(), key=lambda r: r.serial)
        self.inflight = {}
        self.free = collections.deque(range(self.nslots))
        return dropped

    @property
    def used_idx(self):
        return self.mem.read_u16(self.used + 2)

    @property
    def outstanding(self):
        return len(self.inflight)

    def submit(self, req):
        slot = self.free.popleft()
        hdr, data, status = self.slots[slot]
        m = self.mem
        head = 3 * slot
        m.write(hdr, struct.pack("<IIQ", req.type, 0, req.extent * EXTENT_SECTORS))
        m.write(status, bytes([STATUS_POISON]))
        if req.type == blk.VIRTIO_BLK_T_OUT:
            m.write(data, req.data)
            dflags = 1                                  # NEXT
        else:
            m.fill(data, EXTENT, 0xA5)                  # a read must overwrite this
            dflags = 1 | 2                              # NEXT | WRITE
        for i, (gpa, length, flags) in enumerate(((hdr, 16, 1), (data, EXTENT, dflags),
                                                  (status, 1, 2))):
            d = self.desc + 16 * (head + i)
            m.write_u64(d, gpa)
            m.write_u32(d + 8, length)
            m.write_u16(d + 12, flags)
            m.write_u16(d + 14, head + i + 1 if flags & 1 else 0)
        m.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = u16(self.avail_idx + 1)
        m.write_u16(self.avail + 2, self.avail_idx)     # entry first, then the index
        req.ring, req.head = self, head
        self.inflight[head] = req

    def kick(self):
        os.eventfd_write(self.kick_fd, 1)

    def drain_call(self):
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            pass

    def reap(self):
        """Used entries now visible: the requests they complete (first
        completion only); a used head that is not in flight is a stray."""
        used_idx = self.used_idx
        n = u16(used_idx - self.last_used)
        if n > self.size:
            raise TestFailure("ring %d: used index jumped by %d (size %d)" % (self.index, n,
                                                                               self.size))
        done = []
        for _ in range(n):
            e = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = self.mem.read_u32(e), self.mem.read_u32(e + 4)
            self.last_used = u16(self.last_used + 1)
            req = self.inflight.pop(head, None)
            if req is None:
                self.strays.append((head, length))
                continue
            hdr, data, status = self.slots[head // 3]
            req.status = self.mem.read(status, 1)[0]
            if req.type == blk.VIRTIO_BLK_T_IN:
                req.rdata = self.mem.read(data, EXTENT)
            req.completions += 1
            self.free.append(head // 3)
            done.append(req)
        return done

    def close(self):
        os.close(self.kick_fd)
        os.close(self.call_fd)


class Workload:
    """Keeps `depth` requests in flight on every ring: writes of a unique
    pattern to fresh extents, and reads of extents whose write completed,
    each checked as it completes against the model."""

    def __init__(self, rings, disk_bytes, depth, seed, read_ratio=0.3):
        self.rings = rings
        self.depth = depth
        self.rnd = random.Random(seed)
        self.fresh = list(range(disk_bytes // EXTENT))
        self.rnd.shuffle(self.fresh)
        self.read_ratio = read_ratio
        self.serial = 0
        self.model = {}               # extent -> bytes of the one write to it
        self.acked = []               # extents whose write completed OK
        self.requeue = collections.deque()
        self.paused = False
        self.all_reqs = []
        self.completed = 0
        self.bad = []                 # (req, why)

    def _new(self):
        if self.requeue:
            old = self.requeue.popleft()
            self.serial += 1
            return old.clone(self.serial)
        self.serial += 1
        # every extent is written once: once none is left, only reads
        if self.acked and (self.rnd.random() < self.read_ratio or not self.fresh):
            return Req(self.serial, blk.VIRTIO_BLK_T_IN, self.rnd.choice(self.acked))
        if not self.fresh:
            raise TestFailure("workload ran out of fresh extents (%d requests)" % self.serial)
        ext = self.fresh.pop()
        data = blk.pattern(ext * EXTENT_SECTORS, EXTENT, salt=self.serial)
        self.model[ext] = data
        return Req(self.serial, blk.VIRTIO_BLK_T_OUT, ext, data)

    def fill(self):
        """Top every ring up to depth (unless paused) and kick it."""
        if self.paused:
            return 0
        n = 0
        for r in self.rings:
            k = 0
            while r.outstanding < self.depth:
                req = self._new()
                r.submit(req)
                self.all_reqs.append(req)
                k += 1
            if k:
                r.kick()
                n += k
        return n

    def reap(self):
        n = 0
        for r in self.rings:
            for req in r.reap():
                n += 1
                self.completed += 1
                self._check(req)
        return n

    def _check(self, req):
        if req.status != blk.VIRTIO_BLK_S_OK:
            self.bad.append((req, "status %r" % req.status))
            return
        if req.type == blk.VIRTIO_BLK_T_OUT:
            self.acked.append(req.extent)
        elif req.rdata != self.model[req.extent]:
            self.bad.append((req, "read returned other data than the extent's write"))

    def step(self, wait=0.002):
        progressed = self.fill() + self.reap()
        if not progressed:
            r, _, _ = select.select([x.call_fd for x in self.rings], [], [], wait)
            for x in self.rings:
                if x.call_fd in r:
                    x.drain_call()
        if self.bad:
            raise TestFailure("%d bad completions, first %r: %s"
                              % (len(self.bad), self.bad[0][0], self.bad[0][1]))

    def run_for(self, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.step()

    def run_until(self, pred, timeout, what):
        end = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > end:
                raise TestFailure("timed out after %.1fs waiting for %s (rings: %s)"
                                  % (timeout, what, self.ring_report()))
            self.step()

    def drain(self, timeout, what="every request in flight to complete"):
        was, self.paused = self.paused, True
        try:
            self.run_until(lambda: all(r.outstanding == 0 for r in self.rings), timeout, what)
        finally:
            self.paused = was

    def settle(self, quiet=0.2, timeout=5.0):
        """Reap until no ring's used index moved for `quiet` seconds."""
        was, self.paused = self.paused, True
        try:
            last, since = None, time.monotonic()
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                self.step()
                now = [r.used_idx for r in self.rings]
                if now != last:
                    last, since = now, time.monotonic()
                elif time.monotonic() - since >= quiet:
                    return
        finally:
            self.paused = was

    def ring_report(self):
        return ", ".join("%d: avail %d used %d last_used %d inflight %d"
                         % (r.index, r.avail_idx, r.used_idx, r.last_used, r.outstanding)
                         for r in self.rings)

    def strays(self):
        return sum(len(r.strays) for r in self.rings)

    def check_completed_once(self):
        """Every request submitted so far completed exactly once."""
        once = [r for r in self.all_reqs if r.completions != 1]
        check(not once, "every one of the %d requests completed exactly once" % len(self.all_reqs),
              "%d did not, first %r" % (len(once), once[:3]))

    def verify_readback(self, timeout=20.0):
        """Read every written extent back through the rings (depth-deep)."""
        todo = collections.deque(sorted(self.model))
        want = len(todo)
        got = 0
        end = time.monotonic() + timeout
        while todo or any(r.outstanding for r in self.rings):
            for r in self.rings:
                k = 0
                while todo and r.outstanding < max(self.depth, 16):
                    self.serial += 1
                    r.submit(Req(self.serial, blk.VIRTIO_BLK_T_IN, todo.popleft()))
                    k += 1
                if k:
                    r.kick()
            for r in self.rings:
                for req in r.reap():
                    got += 1
                    if req.status != blk.VIRTIO_BLK_S_OK or req.rdata != self.model[req.extent]:
                        raise TestFailure("read-back of extent %d: status %r, data %s"
                                          % (req.extent, req.status,
                                             "right" if req.rdata == self.model[req.extent]
                                             else "WRONG"))
            if time.monotonic() > end:
                raise TestFailure("read-back stalled: %d of %d (%s)" % (got, want,
                                                                        self.ring_report()))
            select.select([x.call_fd for x in self.rings], [], [], 0.002)
            for x in self.rings:
                x.drain_call()
        return got

    def verify_image(self, path, disk_bytes):
        with open(path, "rb") as f:
            image = f.read()
        check_eq(len(image), disk_bytes, "image size")
        zero = bytes(EXTENT)
        wrong = [e for e in range(disk_bytes // EXTENT)
                 if image[e * EXTENT:(e + 1) * EXTENT] != self.model.get(e, zero)]
        check(not wrong, "image file equals the model: %d extents hold their one write, "
              "the other %d are untouched zeroes" % (len(self.model),
                                                     disk_bytes // EXTENT - len(self.model)),
              "%d extents differ, first %s" % (len(wrong), wrong[:5]))


def check_recovered_and_finish(c, vmm, wl, img, disk_bytes, kills):
    """After the kills: blk0 reconnected `kills` times and is running with no
    failure or pending disconnect; every written extent reads back through
    the rings and is in the image; then remove blk0, destroy the VM and close
    the rings."""
    st = vmm.device_state("blk0")
    check_eq(st["reconnects"], kills, "device.list reconnects")
    check_eq(st["state"], "running", "device.list state")
    no_event(c, "device.failed", "blk0")
    no_event(c, "device.disconnected", "blk0")

    n = wl.verify_readback()
    log("ok: read-back of all %d written extents through the rings matches" % n)  # verify_readback raises otherwise
    vmm.stop_device("blk0")
    wl.verify_image(img, disk_bytes)
    vmm.remove_device("blk0")
    vmm.destroy()
    for r in wl.rings:
        r.close()


def kill_and_restore(wl, c, device, backend, restart, cycle, pause_on_loss=False,
                     outage=(0.0, 0.03), timeout=15.0):
    """SIGKILL the back-end now, keep driving the rings, restart it, and wait
    for device.reconnected.  Returns (event, {ring: (lo, hi)}) where [lo, hi]
    is what the driver knows was outstanding at the loss."""
    rings = wl.rings
    a0 = {r.index: r.avail_idx for r in rings}
    backend.kill()
    used = {r.index: r.used_idx for r in rings}     # final: its writer is dead
    disc = wl.run_until(lambda: poll_event(c, "device.disconnected", device), 10.0,
                        "device.disconnected (cycle %d)" % cycle)
    if pause_on_loss:
        wl.paused = True
    a1 = {r.index: r.avail_idx for r in rings}
    wl.run_for(wl.rnd.uniform(*outage))
    t0 = time.monotonic()
    restart()
    ev = wl.run_until(lambda: poll_event(c, "device.reconnected", device), timeout,
                      "device.reconnected (cycle %d)" % cycle)
    dt = time.monotonic() - t0
    bounds = {i: (u16(a0[i] - used[i]), u16(a1[i] - used[i])) for i in a0}
    log("cycle %d: lost (%s), back %.0f ms after the restart began: reconnects %d exact %s "
        "vrings %s; driver's outstanding at the loss %s"
        % (cycle, disc.get("reason"), dt * 1000, ev["reconnects"], ev["exact"],
           [(v["index"], v["base"], v["outstanding"]) for v in ev["vrings"]], bounds))
    check_eq(sorted(v["index"] for v in ev["vrings"]), sorted(a0), "cycle %d: rings in the event"
             % cycle)
    for v in ev["vrings"]:
        i = v["index"]
        lo, hi = bounds[i]
        check_eq(v["base"], used[i], "cycle %d ring %d: base = the used index the dead back-end "
                 "left" % (cycle, i))
        check(lo <= v["outstanding"] <= hi,
              "cycle %d ring %d: outstanding %d within what the driver had made available and "
              "not seen used [%d, %d]" % (cycle, i, v["outstanding"], lo, hi))
    return ev, bounds


class ThrottledQsd(QsdBackend):
    """qsd with a throttle filter over the raw image.  Throttling keeps
    requests in flight inside qsd at the kill (its own page-cache I/O is
    otherwise done before this Python driver looks again), and separate,
    different read and write limits make it complete out of order (a read
    queued after a write overtakes it), as a loaded qsd does."""

    def __init__(self, *a, iops_read, iops_write, **kw):
        super().__init__(*a, **kw)
        self.iops = (iops_read, iops_write)

    def argv(self):
        return [self.argv0(),
                "--object", "throttle-group,id=tg0,x-iops-read=%d,x-iops-write=%d" % self.iops,
                "--blockdev", "driver=file,node-name=file0,filename=%s" % self.image,
                "--blockdev", "driver=raw,node-name=raw0,file=file0",
                "--blockdev", "driver=throttle,node-name=disk0,throttle-group=tg0,file=raw0",
                "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                            "addr.path=%s,writable=on,num-queues=%d" % (self.socket, self.num_queues)]

    def argv0(self):
        return super().argv()[0]


def main(t):
    mode = sys.argv[1] if len(sys.argv) > 1 else "depth1"
    if mode not in ("depth1", "depth32"):
        raise SystemExit("usage: test_reconnect_qsd.py [depth1|depth32]")
    depth, kills = (1, 20) if mode == "depth1" else (32, 10)
    seed = run_seed()
    log("mode %s: %d in flight per ring, %d kills, seed %d (VHUB_TEST_SEED)" % (mode, depth,
                                                                                kills, seed))
    d = t.tmpdir()
    disk_bytes = 64 << 20
    img = scenarios.sparse_image(os.path.join(d, "disk.img"), disk_bytes)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    sock = daemon.backend_socket("blk0.sock")
    iops = (3000, 3000) if depth == 1 else (4000, 1500)
    qsd = t.enter_logged("qsd",
                         ThrottledQsd(img, sock, num_queues=2, log_dir=d, iops_read=iops[0], iops_write=iops[1]))
    mem, vmm = vm_with_memory(t, c, 16 << 20)
    dev = vmm.add_device("blk0", sock, type="blk")
    features = scenarios.BLK_FEATURES & dev["features"]
    check_eq(features, scenarios.BLK_FEATURES, "qsd offers VERSION_1|FLUSH|MQ")
    check(not dev["protocol_features"] & (1 << 12), "no INFLIGHT_SHMFD with qsd 7.2")
    rings = [BlkRing(mem, i) for i in range(2)]
    vmm.start_device("blk0", features, rings)

    wl = Workload(rings, disk_bytes, depth, seed)
    wl.run_for(0.2)
    check(wl.completed > 0, "I/O flows before the first kill (%d requests)" % wl.completed)

    n_exact = n_inexact = 0
    observed = []
    for k in range(1, kills + 1):
        wl.run_for(wl.rnd.uniform(0.02, 0.15))
        if wl.rnd.random() < 0.5:
            wl.fill()   # kill right after a kick, before anything of it is reaped
        strays_before = wl.strays()
        ev, bounds = kill_and_restore(wl, c, "blk0", qsd, qsd.start, k,
                                      pause_on_loss=(depth > 1))
        check_eq(ev["reconnects"], k, "cycle %d: reconnects counts up" % k)
        most = max(v["outstanding"] for v in ev["vrings"])
        check_eq(ev["exact"], most <= 1,
                 "cycle %d: exact is true iff no ring had more than one request outstanding "
                 "(no INFLIGHT_SHMFD, IN_ORDER not acked; max outstanding %d)" % (k, most))
        if ev["exact"]:
            n_exact += 1
            wl.paused = False
            continue
        n_inexact += 1
        # What the rebase to the used index did with an out-of-order ring:
        # let qsd finish whatever it will, then look.
        wl.settle()
        dup = wl.strays() - strays_before
        stuck = sum(r.outstanding for r in rings)
        observed.append((k, dup, stuck))
        log("cycle %d: after the rebase qsd completed %d chains a second time (re-executed, "
            "caught as completions of heads not in flight) and %d requests never completed"
            % (k, dup, stuck))
        log("cycle %d: rings after settling: %s" % (k, wl.ring_report()))
        check(all(r.used_idx == r.avail_idx for r in rings),
              "cycle %d: qsd processed every avail entry from the rebased used index on (its "
              "used index caught up with avail), so what is missing went to re-executions" % k)
        # The VMM's remedy: restart the rings and requeue what never completed.
        bases = vmm.stop_device("blk0")
        check_eq(vmm.device_state("blk0")["state"], "stopped",
                 "cycle %d: device.stop after an inexact restore" % k)
        log("cycle %d: device.stop bases %s" % (k, bases))
        for r in rings:
            for req in r.reset(0):
                req.requeued = True
                wl.requeue.append(req)
        vmm.start_device("blk0", features, rings)
        wl.paused = False
        before = wl.completed
        wl.run_until(lambda: wl.completed >= before + 2 * depth, 10.0,
                     "I/O after the ring restart (cycle %d)" % k)
        # run_until raises if the I/O does not flow
        log("ok: cycle %d: I/O flows again after device.stop + device.start (%d requests "
            "requeued)" % (k, stuck))

    wl.drain(10.0)
    log("%d requests submitted, %d completed, %d stray completions; %d exact restores, "
        "%d inexact" % (len(wl.all_reqs), wl.completed, wl.strays(), n_exact, n_inexact))
    if depth == 1:
        check_eq(n_inexact, 0, "every restore with one request per ring was exact")
        check_eq(wl.strays(), 0, "no completion of a head that was not in flight (nothing "
                 "completed twice)")
        wl.check_completed_once()
    else:
        check(n_inexact > 0, "with 32 in flight some restore was inexact (%d of %d)"
              % (n_inexact, kills))
        log("observed after inexact restores (cycle, re-executed, never completed): %s"
            % observed)
        unaccounted = [r for r in wl.all_reqs if r.completions != 1 and not r.requeued]
        check(not unaccounted, "every request completed once, or never and was requeued at "
              "the ring restart (%d requeued)" % sum(r.requeued for r in wl.all_reqs),
              "%d neither, first %r" % (len(unaccounted), unaccounted[:3]))
    check_eq(wl.bad, [], "every accepted completion had status OK and correct data")
    check_recovered_and_finish(c, vmm, wl, img, disk_bytes, kills)
    daemon.check_fd_baseline(baseline)


if __name__ == "__main__":
    run(main)

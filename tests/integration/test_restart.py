#!/usr/bin/env python3
"""Restart with guests running (issue 10; docs/restart.md): vhubd under a
service manager played by vhubtest/servicemanager.py (the fd store kept,
LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID at each start), real back-ends.

    test_restart.py planned     20 planned restarts (SIGTERM) during
                                continuous verified I/O on qemu-storage-daemon
                                (2 queues, 32 in flight per ring)
    test_restart.py crash       20 SIGKILLs of vhubd: at rest, in the middle of
                                a memory fan-out, of a device.start and of a
                                reconnect (the test back-end holds a request)
    test_restart.py hygiene     100 restarts (every 10th a crash) with VMs,
                                shared objects and devices coming and going:
                                the store holds exactly the daemon's live groups
    test_restart.py unreadable  a corrupt snapshot, then one that needs a newer
                                format: vhubd says why and exits non-zero, the
                                store untouched; the right bytes back: restored
    test_restart.py rebuild-crash  SIGKILLs in the middle of the rebuild of a
                                VM's stash: its memory and device come back

planned: the guest's virtio-blk driver (the vhubtest rings, writes of unique
patterns and reads checked against the model) keeps 32 requests in flight on
each of 2 rings through every restart -- it never pauses, and it drives the
rings while the daemon is down.  After each restart: the VMM's control
connection is the same socket (never closed), its first message after the
restart is daemon.restarted with restarts counting up; vm.list,
device.list, vm.memory.list and shared_object.list answer exactly as before;
no device event (disconnected/reconnected/failed) was sent; qsd is the same
process.  At the end every request completed exactly once with correct
data, every written extent reads back through the rings, the image equals
the model, and daemon.info says restarts 20 with capability fd-store.
"""

import collections
import os
import random
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                              # noqa: E402
from vhubtest.backends import QsdBackend                         # noqa: E402
from vhubtest.client import Client                               # noqa: E402
from vhubtest.daemon import vhubd_path                           # noqa: E402
from vhubtest.memory import GuestMemory                          # noqa: E402
from vhubtest.procs import wait_until                            # noqa: E402
from vhubtest.servicemanager import ServiceManager               # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.virtq import Virtqueue                             # noqa: E402
from vhubtest.client import u64_json                             # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run, run_seed  # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                     # noqa: E402
from test_reconnect_qsd import BlkRing, Workload                 # noqa: E402

BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)
DEVICE_EVENTS = ("device.disconnected", "device.reconnected", "device.failed", "device.removed")


class Managed:
    """vhubd as a systemd service with the fd store."""

    def __init__(self, t, d, extra=(), fd_store_max=4096, env=None):
        self.d = d
        self.control = os.path.join(d, "control.sock")
        self.backends = os.path.join(d, "backends")
        os.makedirs(self.backends, exist_ok=True)
        self.sm = t.enter(ServiceManager(d, fd_store_max=fd_store_max))
        t.add_log("vhubd under the service manager", self.sm.log_path)
        self.argv = [vhubd_path(), "--control", self.control, "--backend-dir", self.backends,
                     "--log-level", "info"] + list(extra)
        self.sm.start(self.argv, env=env)
        self.sm.wait_ready()

    def socket(self, name):
        return os.path.join(self.backends, name)

    def vmm(self, t, mem_bytes, vm="vm0"):
        """A VMM's connection with a VM of mem_bytes of guest memory:
        (client, memory, Vmm)."""
        c = t.enter(Client(self.control, timeout=10))
        mem, vmm = vm_with_memory(t, c, mem_bytes, vm)
        return c, mem, vmm

    def finish(self, c, vmm, device, vqs, removed=None):
        """The end of a test: the device stopped and removed (removed()
        then), the VM destroyed, the rings and the connection closed; then
        `systemctl stop`, and vhubd exits 0."""
        vmm.stop_device(device)
        vmm.remove_device(device)
        if removed:
            removed()
        vmm.destroy()
        for vq in vqs:
            vq.close()
        c.close()
        check_eq(self.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")

    def restart(self, sig=signal.SIGTERM, while_down=None, before_start=None):
        """Restart as `systemctl restart` (SIGTERM) or a crash (SIGKILL), calling
        while_down() repeatedly until the new process is ready, and
        before_start() once between the old process's exit and the new one's
        start (the store as the manager keeps it then).  Returns the old
        process's exit code."""
        if os.environ.get("VHUB_DUMP_STORE"):
            for n in self.sm.names():
                fd = self.sm.dup(n)
                log("store: %s %d %s" % (n, os.fstat(fd).st_size, os.readlink("/proc/self/fd/%d" % fd)))
                os.close(fd)
        self.sm.send_signal(sig)
        while self.sm.proc.poll() is None:
            if while_down:
                while_down()
            else:
                time.sleep(0.001)
        code = self.sm.wait_exit()
        if before_start:
            before_start()
        self.sm.start(self.argv)
        end = time.monotonic() + 30
        while not self.sm.ready:
            if self.sm.proc.poll() is not None:
                raise TestFailure("vhubd exited (%s) instead of starting" % self.sm.proc.returncode)
            if time.monotonic() > end:
                where = {}
                for f in ("wchan", "syscall", "stat"):
                    try:
                        with open("/proc/%d/%s" % (self.sm.pid, f)) as fh:
                            where[f] = fh.read().strip()
                    except OSError as e:
                        where[f] = str(e)
                raise TestFailure("vhubd (pid %d) sent no READY=1 within 30 s: %s" % (self.sm.pid, where))
            if while_down:
                while_down()
            else:
                time.sleep(0.001)
        return code


def listing(c, vm="vm0"):
    """What a VMM can list of its VM, as comparable data."""
    def strip(devs):
        out = []
        for dev in devs:
            dev = dict(dev)
            dev.pop("since_ms", None)       # time in its state: moves on
            out.append(dev)
        return out
    return {
        "vms": c.call("vm.list")["vms"],
        "devices": strip(c.call("device.list", {"vm": vm})["devices"]),
        "memory": c.call("vm.memory.list", {"vm": vm}),
        "shared": c.call("shared_object.list", {"vm": vm}),
    }


def wait_restarted(c, wl, k):
    """The first message on the connection after restart k: daemon.restarted."""
    end = time.monotonic() + 10
    while True:
        evs = c.events()
        if evs:
            first = evs[0]
            check_eq(first.get("event"), "daemon.restarted",
                     "restart %d: the first message after it is daemon.restarted" % k)
            check_eq(first.get("restarts"), k, "restart %d: daemon.restarted counts restarts" % k)
            others = [e for e in evs[1:] if e.get("event") in DEVICE_EVENTS]
            check(not others, "restart %d: no device event" % k, others)
            return first
        if time.monotonic() > end:
            raise TestFailure("restart %d: no daemon.restarted" % k)
        wl.step()


def part_planned(t):
    seed = run_seed()
    rnd = random.Random(seed)
    log("seed %d (VHUB_TEST_SEED)" % seed)
    d = t.tmpdir()
    m = Managed(t, d)
    disk_bytes = 64 << 20
    img = scenarios.sparse_image(os.path.join(d, "disk.img"), disk_bytes)
    qsd = t.enter(QsdBackend(img, m.socket("blk0.sock"), num_queues=2, log_dir=d))
    t.add_log("qsd", qsd.log_path)
    c, mem, vmm = m.vmm(t, 16 << 20)
    dev = vmm.add_device("blk0", m.socket("blk0.sock"), type="blk")
    features = scenarios.BLK_FEATURES & dev["features"]
    rings = [BlkRing(mem, i) for i in range(2)]
    vmm.start_device("blk0", features, rings)
    wl = Workload(rings, disk_bytes, 32, seed)
    wl.run_for(0.2)
    check(wl.completed > 0, "I/O flows before the first restart (%d requests)" % wl.completed)
    c.events()
    before = listing(c)
    qsd_pid = qsd.pid
    restarts = 20
    for k in range(1, restarts + 1):
        wl.run_for(rnd.uniform(0.02, 0.1))
        done0 = wl.completed
        t0 = time.monotonic()
        code = m.restart(while_down=wl.step)
        dt = time.monotonic() - t0
        check_eq(code, 0, "restart %d: the old vhubd exits 0" % k)
        wait_restarted(c, wl, k)
        check(not c.closed, "restart %d: the VMM's connection stays open" % k)
        check_eq(listing(c), before, "restart %d: VMs, devices, regions, shared objects listed as before" % k)
        check(qsd.alive and qsd.pid == qsd_pid, "restart %d: qsd is the same process" % k)
        with m.sm.lock:
            ready = [lines for _, _, lines in m.sm.messages if "READY=1" in lines][-1]
        check("STATUS=1 VMs, 1 devices" in ready,
              "restart %d: READY=1 says what came back (STATUS=1 VMs, 1 devices)" % k, ready)
        log("restart %d: %.0f ms SIGTERM to ready, %d requests completed meanwhile"
            % (k, dt * 1000, wl.completed - done0))
    wl.run_for(0.2)
    info = c.call("daemon.info")
    check_eq(info["restarts"], restarts, "daemon.info restarts")
    check("fd-store" in info["capabilities"], "daemon.info capabilities name fd-store")
    wl.drain(10.0)
    wl.check_completed_once()
    check_eq(wl.strays(), 0, "no completion of a request not in flight")
    n = wl.verify_readback()
    log("ok: %d requests completed exactly once across %d restarts; read-back of %d extents"
        % (len(wl.all_reqs), restarts, n))
    vmm.stop_device("blk0")
    wl.verify_image(img, disk_bytes)
    for e in c.events():
        check(e.get("event") not in ("device.disconnected", "device.failed"), "no loss at all", e)
    vmm.remove_device("blk0")
    vmm.destroy()
    for r in rings:
        r.close()
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def seqpacket_inodes():
    """The inodes of the unix SOCK_SEQPACKET sockets (Type 0005 in
    /proc/net/unix)."""
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f][1:]
    return {r[6] for r in rows if len(r) >= 7 and r[4] == "0005"}


def proc_fd_kinds(pid):
    """What the process holds, by kind: sockets, eventfds, memfds by name...
    The fd store's stash writing ends (unix SOCK_SEQPACKET: vhubd uses that
    type for nothing else) are left out: a group keeps one while it changes
    and closes it a second after its last change (docs/restart.md), so they
    say when the last change was, not what the process holds."""
    kinds = collections.Counter()
    stashes = seqpacket_inodes()
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except FileNotFoundError:
            continue
        if link.startswith("socket:[") and link[len("socket:["):-1] in stashes:
            continue
        kinds[link.split("[")[0] if "[" in link else link] += 1
    return kinds


def expect_restarted(c, k, what):
    """daemon.restarted is the first message after the restart."""
    ev = c.wait_event(None, 10)
    check_eq((ev.get("event"), ev.get("restarts")), ("daemon.restarted", k),
             "crash %d (%s): the first message after it is daemon.restarted" % (k, what))


def expect_loss_and_back(c, device, k, what):
    ev = c.wait_event(lambda e: e.get("device") == device, 10)
    check_eq(ev.get("event"), "device.disconnected",
             "crash %d (%s): %s had a request in flight: lost" % (k, what, device))
    ev = c.wait_event(lambda e: e.get("device") == device, 15)
    check_eq(ev.get("event"), "device.reconnected",
             "crash %d (%s): %s restored through the reconnect path" % (k, what, device))


def part_crash(t):
    seed = run_seed()
    rnd = random.Random(seed)
    log("seed %d (VHUB_TEST_SEED)" % seed)
    d = t.tmpdir()
    m = Managed(t, d, extra=["--backend-timeout-ms", "3000"])
    busy_tb = t.enter(TestBackend([m.socket("busy.sock")], args=["--queues", "1"], log_dir=d))
    idle_tb = t.enter(TestBackend([m.socket("idle.sock")], args=["--queues", "1"], log_dir=d))
    t.add_log("test back-end (busy)", busy_tb.log_path)
    c = t.enter(Client(m.control, timeout=15))
    mem = t.enter(GuestMemory(8 << 20))
    mem1 = t.enter(GuestMemory(8 << 20))
    busy = Vmm(c, "vm0")
    busy.create()
    busy.add_memory(mem)
    busy.add_device("B", m.socket("busy.sock"), type="blk", reconnect_ms=50)
    idle = Vmm(c, "vm1")
    idle.create()
    idle.add_memory(mem1)
    idle.add_device("I", m.socket("idle.sock"), type="blk")
    iq = blk.BlkQueue(mem1, index=0, size=16, max_io=4096)
    idle.start_device("I", BLK1, [iq.vq])
    bq = Virtqueue(mem, size=16)
    extra_regions = []
    had_inflight = False
    c.events()
    kinds = ["rest", "memory", "start", "reconnect"]
    for k in range(1, 21):
        kind = kinds[(k - 1) % 4] if k <= 4 else rnd.choice(kinds)
        time.sleep(0.05)
        at_rest = proc_fd_kinds(m.sm.pid)
        idle_reqs = idle_tb.requests()
        idle_list = idle.device_list()
        pending = None
        if kind == "memory":
            n = busy_tb.requests().get("ADD_MEM_REG", 0)
            busy_tb.misbehave("ADD_MEM_REG", "delay", delay_ms=400, count=1)
            region = t.enter(GuestMemory(2 << 20, base=(1 << 32) + len(extra_regions) * (4 << 20)))
            extra_regions.append(region)
            r = region.regions[0]
            pending = c.request("vm.memory.add", {"vm": "vm0", "gpa": u64_json(r.gpa),
                                                  "size": u64_json(r.size), "fd": 0,
                                                  "offset": 0, "uaddr": u64_json(r.uaddr)},
                                fds=[r.fd])
            busy_tb.wait_request("ADD_MEM_REG", count=n + 1)
        elif kind == "start":
            if busy.device_state("B")["state"] == "running":
                busy.stop_device("B")
                c.events()
            n = busy_tb.requests().get("SET_VRING_KICK", 0)
            busy_tb.misbehave("SET_VRING_KICK", "delay", delay_ms=400, count=1)
            params, fds = busy.start_params("B", BLK1, [bq])
            pending = c.request("device.start", params, fds=fds)
            busy_tb.wait_request("SET_VRING_KICK", count=n + 1)
        elif kind == "reconnect":
            busy_tb.kill()
            ev = c.wait_event(lambda e: e.get("device") == "B", 10)
            check_eq(ev.get("event"), "device.disconnected", "crash %d: B lost before the crash" % k)
            time.sleep(rnd.uniform(0, 0.1))
        else:
            time.sleep(rnd.uniform(0, 0.05))
        m.restart(sig=signal.SIGKILL)
        expect_restarted(c, k, kind)
        if pending is not None:
            resp = pending.response(10)
            check_eq(resp.error and resp.error.get("code"), -32011,
                     "crash %d (%s): the call in flight is answered -32011" % (k, kind))
            expect_loss_and_back(c, "B", k, kind)
        if kind == "reconnect":
            busy_tb.start()
            ev = c.wait_event(lambda e: e.get("device") == "B", 15)
            check_eq(ev.get("event"), "device.reconnected",
                     "crash %d: the outage went on in the new process and B came back" % k)
        # the idle device: not a single message, same state
        check_eq(idle_tb.requests(), idle_reqs, "crash %d (%s): the idle back-end got no message" % (k, kind))
        check_eq(idle.device_list(), idle_list, "crash %d: the idle device is listed as before" % k)
        check_eq(len(iq.read_sectors(0, 1)), 512, "crash %d: the idle device still serves its ring" % k)
        idle_reqs = idle_tb.requests()
        evs = [e for e in c.events() if e.get("device") == "I" or
               (kind == "rest" and e.get("event") in DEVICE_EVENTS)]
        check(not evs, "crash %d (%s): no event for devices that were idle" % (k, kind), evs)
        time.sleep(0.1)
        now = proc_fd_kinds(m.sm.pid)
        extra = now - at_rest
        if kind == "start" and not had_inflight and sum(extra.values()) == 1 and \
                list(extra)[0].startswith("/memfd:"):
            # the start in flight had got the back-end's inflight region,
            # which a device keeps from then on (the restore's START uses it)
            log("crash %d: B keeps the inflight region its interrupted start got: %s" % (k, list(extra)))
            had_inflight = True
            extra = collections.Counter()
        check(not extra and not (at_rest - now),
              "crash %d (%s): the new process holds the same fds at rest as the old one (%d)"
              % (k, kind, sum(now.values())), (dict(extra), dict(at_rest - now)))
    info = c.call("daemon.info")
    check_eq(info["restarts"], 20, "daemon.info restarts after 20 crashes")
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def one_blk_device(t, m, d):
    """vm0 with 8 MiB of memory and blk0, a started one-ring qsd device:
    (qsd, control client, memory, Vmm, the ring's BlkQueue)."""
    disk = os.path.join(d, "disk.img")
    scenarios.make_image(disk, 8 << 20)
    qsd = t.enter(QsdBackend(disk, m.socket("blk0.sock"), num_queues=1, log_dir=d))
    c, mem, vmm = m.vmm(t, 8 << 20)
    vmm.add_device("blk0", m.socket("blk0.sock"), type="blk")
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("blk0", BLK1, [q.vq])
    return qsd, c, mem, vmm, q


def part_hygiene(t):
    from test_fd_inventory import inventory
    d = t.tmpdir()
    m = Managed(t, d, extra=["--log-level", "debug"])
    qsd, c, mem, vmm, q = one_blk_device(t, m, d)
    obj = os.memfd_create("shared-object", os.MFD_CLOEXEC)
    os.ftruncate(obj, 4096)
    uuid = "5b1c8c1e-6a0c-4a54-9d3e-7d1f0a2b3c4d"
    c.call("shared_object.add", {"vm": "vm0", "uuid": uuid, "fd": 0}, fds=[obj])
    os.close(obj)
    extra = None
    for k in range(1, 101):
        # things come and go between restarts: their names must too
        if k % 3 == 0:
            if extra is None:
                extra = t.enter(GuestMemory(2 << 20))
                Vmm(c, "tmp").create()
                Vmm(c, "tmp").add_memory(extra)
            else:
                Vmm(c, "tmp").destroy()
                extra = None
        if k % 7 == 0:
            c2 = Client(m.control, timeout=10)
            c2.call("daemon.info")
            c2.close()
        m.restart(sig=signal.SIGKILL if k % 10 == 0 else signal.SIGTERM)
        c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    check_eq(len(q.read_sectors(0, 1)), 512, "blk0 serves its ring after 100 restarts")
    time.sleep(0.2)
    inv = inventory(m.sm.pid, m.sm.log_path)
    live = sorted({g for _, (name, g) in inv.items() if g})
    check_eq(sorted(m.sm.names()), live, "after 100 restarts the store holds exactly the daemon's "
             "live groups and snapshots (no stale name)")
    check_eq(c.call("daemon.info")["restarts"], 100, "daemon.info restarts")
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def part_unreadable(t):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz"))
    gen = __import__("gen-corpus-snapshot")
    d = t.tmpdir()
    m = Managed(t, d)
    qsd, c, mem, vmm, q = one_blk_device(t, m, d)
    before = listing(c)
    m.sm.send_signal(signal.SIGSTOP)    # nothing rewrites its snapshot from here on
    sfd = m.sm.dup("s1")
    good = os.pread(sfd, os.fstat(sfd).st_size, 0)
    stored = {n: m.sm.dup(n) for n in m.sm.names()}

    def same_store(what):
        now = m.sm.names()
        check_eq(sorted(now), sorted(stored), "%s: the store holds the same names" % what)
        for n in now:
            fd = m.sm.dup(n)
            same = os.fstat(fd).st_ino == os.fstat(stored[n]).st_ino
            os.close(fd)
            check(same, "%s: %s is the same stored file" % (what, n))

    def refused(what, why):
        m.sm.send_signal(signal.SIGKILL)
        m.sm.wait_exit()
        m.sm.start(m.argv)
        code = m.sm.wait_exit(10)
        check(code not in (0, None), "%s: vhubd exits non-zero (%s)" % (what, code))
        with open(m.sm.log_path, errors="replace") as f:
            text = f.read()
        check(why in text,
              "%s: the log says why (%r)" % (what, why))
        same_store(what)
        check(qsd.alive, "%s: qsd did not lose its front-end" % what)

    # 1: both copies of the VM's snapshot corrupt (a flipped byte in each slot)
    slot = len(good) // 2
    bad = bytearray(good)
    bad[40] ^= 0xFF
    bad[slot + 40] ^= 0xFF
    os.pwrite(sfd, bytes(bad), 0)
    refused("corrupt snapshot", "snapshot s1 is unreadable")
    # 2: a snapshot written for a newer reader (compat: the next version) in both slots
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "daemon",
                           "vhub-snapshot.h")) as f:
        reads = int(re.search(r"#define VHUB_SNAP_VERSION\s+(\d+)u", f.read()).group(1))
    newer = gen.doc(b"", generation=1 << 40, version=reads + 1, compat=reads + 1)
    os.pwrite(sfd, newer + bytes(slot - len(newer)) + newer, 0)
    refused("newer format", "snapshot s1 needs a newer vhubd (format version %d, readable from version %d; "
            "this vhubd reads version %d)" % (reads + 1, reads + 1, reads))
    # the right bytes back: a daemon that can read it takes everything back
    os.pwrite(sfd, good, 0)
    os.close(sfd)
    for fd in stored.values():
        os.close(fd)
    m.sm.start(m.argv)
    m.sm.wait_ready()
    ev = c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    check_eq(ev.get("restarts"), 1, "restored at last: daemon.restarted (restart 1)")
    check_eq(listing(c), before, "every VM, device and region is back")
    check_eq(len(q.read_sectors(0, 1)), 512, "blk0 serves its ring")
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def part_output(t):
    """A VMM that does not read its answers during a planned restart: what
    the old process could not write within its 0.5 s is carried in the
    snapshot and written first by the next process -- every request gets
    its one answer, in order, the lines whole, then daemon.restarted."""
    import json
    import socket
    d = t.tmpdir()
    m = Managed(t, d)
    c = t.enter(Client(m.control, timeout=10))
    Vmm(c, "vm0").create()
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    t.defer(raw.close)
    raw.connect(m.control)
    n = 3000
    # each answer is vm.list's (~100 bytes) plus framing: far more than the
    # socket buffers hold, far less than the output bound (4 MiB)
    lines = b"".join(json.dumps({"jsonrpc": "2.0", "id": i, "method": "vm.list"}).encode() + b"\n"
                     for i in range(n))
    raw.sendall(lines)
    time.sleep(0.5)                 # the daemon reads and answers; nobody reads
    code = m.restart()
    check_eq(code, 0, "the old vhubd exits 0")
    buf = b""
    answers, restarted_at = [], None
    end = time.monotonic() + 5
    while len(answers) < n and time.monotonic() < end:
        raw.settimeout(max(0.1, end - time.monotonic()))
        try:
            chunk = raw.recv(1 << 20)
        except socket.timeout:
            break
        check(chunk, "the connection stays open")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)          # every line whole
            if msg.get("method") == "event":
                if msg["params"].get("event") == "daemon.restarted":
                    restarted_at = len(answers)
                continue
            check("result" in msg and msg["result"]["vms"][0]["vm"] == "vm0",
                  "answer %s is vm.list's" % msg.get("id"), msg)
            answers.append(msg["id"])
    check_eq(answers, list(range(n)), "every request answered once, in order")
    check(restarted_at is not None and 0 < restarted_at,
          "daemon.restarted follows the answers the old process had queued (after %s)" % restarted_at)
    with open(m.sm.log_path, errors="replace") as f:
        carried = re.findall(r"(\d+) bytes of output it has not read yet are carried", f.read())
    check(carried and int(carried[-1]) > 0, "the old process carried unwritten output (%s bytes)"
          % (carried[-1] if carried else "no"))
    log("ok: %d answers, %s bytes of them carried across the restart, daemon.restarted after answer %d"
        % (n, carried[-1], restarted_at))
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def part_rebuild_crash(t):
    """A crash in the middle of the rebuild of a VM's stash (vm0's group v1:
    its guest memory, its device's connection and inflight region): the
    daemon killed right after it sent the first, then the second, message
    of the rebuild its back-end's loss makes -- the manager holds what it
    sends and drops what would have come after.  Each time the new process
    has the VM's memory as before, and its device, back, serves its ring.
    Before the rebuild stored a copy first (h-sandbox), the first message
    was the old stash's removal: the VM came back without its memory
    ("region 1: its fd was not passed back"), which restart-sandbox's crash
    loop hit once under ASan."""
    d = t.tmpdir()
    m = Managed(t, d, extra=["--backend-timeout-ms", "3000"])
    tb = t.enter(TestBackend([m.socket("b.sock")], args=["--queues", "1"], log_dir=d))
    t.add_log("test back-end", tb.log_path)
    c, mem, vmm = m.vmm(t, 8 << 20)
    vmm.add_device("B", m.socket("b.sock"), type="blk", reconnect_ms=50)
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("B", BLK1, [q.vq])
    check_eq(len(q.read_sectors(0, 1)), 512, "B serves its ring")
    memory = c.call("vm.memory.list", {"vm": "vm0"})
    group = "v1"
    check(group in m.sm.names(), "vm0's group is %s" % group, m.sm.names())

    def names_group(lines):
        return any(line in ("FDNAME=" + group, "FDNAME=" + group + "+") for line in lines)

    for k, cut_after in ((1, 1), (2, 2)):
        c.events()
        m.sm.hold()
        tb.kill()
        ev = c.wait_event(lambda e: e.get("device") == "B", 10)
        check_eq(ev.get("event"), "device.disconnected", "crash %d: B lost" % k)
        wait_until(lambda: sum(names_group(lines) for lines in m.sm.held_lines()) >= cut_after, 10.0,
                   what="the rebuild of %s's stash to send %d messages" % (group, cut_after))
        m.sm.send_signal(signal.SIGKILL)
        m.sm.wait_exit()
        seen = [0]

        def cut(lines):
            if names_group(lines):
                seen[0] += 1
            return seen[0] > cut_after
        m.sm.release(cut)
        log("crash %d: the store after %d of the rebuild's messages: %s" % (k, cut_after, m.sm.names()))
        m.sm.start(m.argv)
        m.sm.wait_ready()
        ev = c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
        check_eq(ev.get("restarts"), k, "crash %d: daemon.restarted" % k)
        check_eq(c.call("vm.memory.list", {"vm": "vm0"}), memory,
                 "crash %d: vm0's memory is back, as before the crash" % k)
        tb.start()
        ev = c.wait_event(lambda e: e.get("device") == "B" and e.get("event") in DEVICE_EVENTS, 15)
        check_eq(ev.get("event"), "device.reconnected", "crash %d: B came back" % k)
        check_eq(len(q.read_sectors(0, 1)), 512, "crash %d: B serves its ring (the guest's memory)" % k)
        wait_until(lambda: group in m.sm.names() and group + "+" not in m.sm.names(), 10.0,
                   what="the store to hold %s under its own name alone" % group)
    with open(m.sm.log_path, errors="replace") as f:
        text = f.read()
    check("not passed back" not in text, "no fd of the VM's group was lost")
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


PARTS = {"planned": part_planned, "crash": part_crash, "hygiene": part_hygiene,
         "unreadable": part_unreadable, "output": part_output, "rebuild-crash": part_rebuild_crash}


def main(t):
    mode = sys.argv[1] if len(sys.argv) > 1 else "planned"
    if mode not in PARTS:
        raise SystemExit("usage: test_restart.py [%s]" % "|".join(PARTS))
    try:
        PARTS[mode](t)
    finally:
        if os.environ.get("VHUB_PRINT_LOGS"):
            t.print_logs()


if __name__ == "__main__":
    run(main)

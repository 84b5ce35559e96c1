#!/usr/bin/env python3
"""Unmodified QEMU booting a real Linux guest through vhubd's front door
(docs/front-door.md): QEMU's vhost-user sockets are vhubd's, vhubd is the
front-end of the real back-ends.  test_guest_direct.py is the control: the
same guest, steps and host-side checks with QEMU straight on the back-ends.

    test_frontdoor_guest.py SCENARIO...

blk, fs, net    test_guest_direct's scenarios through vhubd, plus vhubd's own
                checks: the socket's place and modes, device.list's vmm
                state, vmm_connected/vmm_disconnected, no fd left behind.
blk-restart     qemu-storage-daemon SIGKILLed and restarted 5 times while the
                guest writes and reads numbered blocks one at a time with
                O_DIRECT: no I/O error in the guest, every block verified in
                the guest and in the image file.
tb-restart      the project's test back-end (INFLIGHT_SHMFD, completions out of
                order and late) killed 5 times under 8 parallel O_DIRECT
                writers: no error, all verified, every restore exact.
net-packed      net with packed virtqueues (virtio-net-pci packed=on): the guest's
                driver and testpmd's vhost PMD do packed rings through vhubd.
net-restart     dpdk-testpmd killed and restarted: the guest's traffic resumes.
hung            qemu-storage-daemon SIGSTOPped while QMP `stop` makes QEMU ask
                for the rings' bases: QMP answers within the back-end timeout
                plus a second, the monitor answers throughout; after SIGCONT
                and `cont` the guest's I/O goes on.
vmm-return      QEMU killed; a new QEMU (reconnect=1) boots the guest again on
                the same socket: served, the first guest's data intact.
vhubd-carry     vhubd restarted as planned (SIGTERM, a played service manager)
                5 times under one O_DIRECT writer on blk0, beside fs0
                (virtiofsd): QEMU's vhost-user sessions are carried -- its
                sockets are the same, its log silent, vhubd sees no
                vmm_disconnected and no new connection, virtiofsd lives and
                fs0 works afterwards -- and the guest's longest I/O pause
                across each restart is measured.
vhubd-restart   the same with vhubd crashed (SIGKILL) 3 times: QEMU is idle
                on its connections, so its sessions are at rest in the last
                snapshot and carried too.
vhubd-fallback  vhubd crashed with QEMU's SET_CONFIG in flight (the guest's
                cache_type write, qemu-storage-daemon SIGSTOPped): blk0's
                session cannot be carried; QEMU's connection closes, it
                reconnects by itself and the guest's writer goes on, every
                block verified; fs0 beside it is carried.  (The half-read
                message is test_frontdoor_contract's `restart`: QEMU writes
                each message whole.)
vhubd-carry-busy  the same request in flight at a planned restart (SIGTERM):
                the old vhubd lets it finish (answered from its state at the
                back-end timeout), its last snapshot finds the session at
                rest, and it is carried: QEMU keeps its sockets.
vhubd-crash-stop  vhubd crashed in the middle of QEMU's device stop (QMP
                `stop`: the rings' SET_VRING_ENABLEs and GET_VRING_BASE in
                flight, qemu-storage-daemon SIGSTOPped): requests a crash
                carries -- QEMU keeps its sockets, the next vhubd handles them
                again once the back-end is restored, and after `cont` the
                guest's writer goes on (with the fallback, QEMU 7.2 never set
                the disk up again).
hostile         VMMs that send garbage, break the protocol, flood without
                reading or connect twice, beside a guest doing I/O on another
                device of the VM: each is closed, everyone else is served.
"""

import hashlib
import os
import random
import re
import signal
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import test_guest_direct as direct                              # noqa: E402
from vhubtest import guest, guest_image, scenarios              # noqa: E402
from vhubtest.backends import QsdBackend, QsdNullBackend, VirtiofsdBackend  # noqa: E402
from vhubtest.client import Client                              # noqa: E402
from vhubtest.direct import DirectFrontend                      # noqa: E402
from vhubtest.frontdoor import ThroughVhubd                     # noqa: E402
from vhubtest.guest import BlkDevice, FsDevice, Guest           # noqa: E402
from vhubtest.qmp import QmpTimeout                             # noqa: E402
from vhubtest.testbackend import TestBackend                    # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run  # noqa: E402

IMAGE_SIZE = 64 << 20
BLOCK = guest.BLOCK
RESTARTS = 5


def blk_image(d, size=IMAGE_SIZE):
    return scenarios.sparse_image(os.path.join(d, "disk.img"), size)


def read_image(img):
    with open(img, "rb") as f:
        return f.read()


def check_image(img, model, what):
    disk = read_image(img)
    check_eq(len(disk), len(model), "image size")
    bad = [i for i in range(len(disk) // BLOCK) if disk[i * BLOCK:(i + 1) * BLOCK] != model[i * BLOCK:(i + 1) * BLOCK]]
    check(not bad, "image file equals the model: %s" % what, "blocks differing: %s" % bad[:10])


def last_n(g, step):
    return direct.last_progress_n(g, step)


def wait_more(g, step, more, timeout=60.0):
    """Until every writer of `step` reported `more` blocks beyond now."""
    at = last_n(g, step)
    return g.wait_progress(step, lambda p: int(p.get("n", 0)) >= at + more, timeout=timeout)


def fd_targets(way):
    """What vhubd's fds are (sockets by kind only: a renewed back-end
    connection is a new socket of the same kind)."""
    return sorted(re.sub(r"socket:\[\d+\]", "socket", l.split(" -> ", 1)[1]) for l in way.daemon.fd_list())


def check_no_fd_left(way, before, what):
    """vhubd holds what it held before, plus --vmm-dir (opened for the first
    front-door device, kept)."""
    want = sorted(before + ([way.vmm_dir] if way.vmm_dir not in before else []))
    deadline = time.monotonic() + 5
    while fd_targets(way) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    check_eq(fd_targets(way), want, "vhubd's fds after %s" % what)


def vmm_session_checks(way, device, sessions=1):
    """What vhubd says of a front-door device once its VMM is gone."""
    con = way.events("device.vmm_connected", device)
    gone = way.wait_events("device.vmm_disconnected", sessions, device, timeout=10)
    check(len(con) == sessions and len(gone) == sessions,
          "%s: %d device.vmm_connected and device.vmm_disconnected event(s)" % (device, sessions),
          (len(con), len(gone)))
    d = way.device(device)
    check_eq((d["vmm"], d["vmm_socket"]), ("waiting", way.sockets[device]),
             "device.list of %s once its VMM left: vmm, vmm_socket" % device)


THROUGH_TIMEOUT_MS = 30000


def through(name):
    """test_guest_direct's scenario through vhubd, and vhubd's own checks."""
    def scenario(t, image):
        # a deadline far above any real back-end's reply time: these tests
        # compare the guest's I/O with the direct run (whose QEMU waits for
        # ever); under load on 2 vCPUs testpmd's first SET_MEM_TABLE of 512 MiB
        # took over the 5 s default once, which the daemon rightly took for a
        # lost back-end. Deadlines have their own tests (hung-*, fallback-*).
        way = ThroughVhubd(t, timeout_ms=THROUGH_TIMEOUT_MS)
        fds0 = fd_targets(way)
        dev = {"blk": "blk0", "fs": "fs0", "net": "net0", "net-packed": "net0"}[name]
        orig_release = way.release

        def release(device):
            # before the device goes: the VMM left; without RESET_DEVICE the
            # back-end got a new connection for the next VMM (virtiofsd
            # exits then, as when QEMU leaves it)
            vmm_session_checks(way, device)
            lost = way.wait_events("device.disconnected", 1, device, timeout=10)
            check(len(lost) == 1 and "RESET_DEVICE" in lost[0]["reason"],
                  "the VMM left: one device.disconnected, the back-end renewed (%s)" % lost[0]["reason"])
            orig_release(device)
        way.release = release
        direct.SCENARIOS[name](t, image, way)
        check_no_fd_left(way, fds0, "device.remove of %s" % dev)
    return scenario


# ---- back-end restarts under a real guest ----------------------------------

SEQ_FIRST, SEQ_AREA = 1024, 64


def blk_writer(t, image, way):
    """qemu-storage-daemon (2 queues) through `way` as blk0 and a guest on it
    with one O_DIRECT writer of numbered blocks, 32 written already.
    Returns (image file, its model, qsd, guest)."""
    img = blk_image(way.dir)
    qsd = t.enter(QsdBackend(img, os.path.join(way.dir, "blk.sock"), num_queues=2, log_dir=way.dir))
    g = t.enter(Guest(way.dir, [BlkDevice(way.socket(qsd.socket, "blk0", "blk"), num_queues=2)], image))
    g.wait_ready()
    g.begin("blk-write", "/dev/vda", 1, SEQ_FIRST, SEQ_AREA, 0)
    g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= 32)
    return img, bytearray(IMAGE_SIZE), qsd, g


def blk_writer_end(way, g, qsd, img, model, seq, what):
    """The guest off, blk0 removed, qsd stopped; the image file holds the
    writer's seq[0] blocks and nothing else."""
    g.poweroff()
    way.release("blk0")
    check_eq(qsd.stop(), 0, "qemu-storage-daemon exit code")
    guest.blk_write_model(model, SEQ_FIRST, SEQ_AREA, seq)
    check_image(img, model, what)


def scenario_blk_restart(t, image):
    way = ThroughVhubd(t)
    img, model, qsd, g = blk_writer(t, image, way)
    for i in range(RESTARTS):
        qsd.kill()
        qsd.start()
        ev = way.wait_events("device.reconnected", i + 1, "blk0")[i]
        log("restart %d: device.reconnected reconnects=%s exact=%s vrings=%s"
            % (i + 1, ev["reconnects"], ev["exact"], ev["vrings"]))
        check_eq(ev["reconnects"], i + 1, "device.reconnected's running total")
        p = wait_more(g, "blk-write", 32)
        log("restart %d: the guest wrote on, block %s" % (i + 1, p["n"]))
    g.stop_steps()
    r = g.result("blk-write")   # every block read back and compared; kmsg_errors=0
    seq = guest.parse_counts(r)
    check(seq[0] >= 32 * (RESTARTS + 1), "one O_DIRECT writer through %d restarts: %s blocks, no I/O "
          "error in the guest's kernel log (%s)" % (RESTARTS, seq, r["kmsg_errors"]))
    dev = way.device("blk0")
    check_eq((dev["state"], dev["reconnects"], dev["vmm"]), ("running", RESTARTS, "connected"),
             "device.list: state, reconnects, vmm")
    check_eq(len(way.events("device.disconnected", "blk0")), RESTARTS, "device.disconnected events")
    check(not way.events("device.vmm_disconnected", "blk0"), "QEMU's connection stayed up throughout")
    g.run("kmsg-check")
    blk_writer_end(way, g, qsd, img, model, seq, "%d numbered blocks, zeros elsewhere" % seq[0])


PAR_FIRST, PAR_AREA, PAR_WRITERS = 2048, 128, 8


def scenario_tb_restart(t, image):
    way = ThroughVhubd(t)
    d = way.dir
    img = blk_image(d)
    model = bytearray(IMAGE_SIZE)
    # the guest uses 2 queues (2 vCPUs); completions late and out of order
    tb = t.enter(TestBackend([os.path.join(d, "tb.sock")], log_dir=d,
                             args=["--disk", img, "--disk-size", str(IMAGE_SIZE), "--queues", "2",
                                   "--complete", "random", "--delay-ms", "20", "--seed", "7"]))
    g = t.enter(Guest(d, [BlkDevice(way.socket(tb.socket, "blk0", "blk"), num_queues=2)], image))
    g.wait_ready()
    conn = tb.conn(0)
    check(conn["inflight"] is not None, "QEMU set up the inflight region through vhubd: %s" % conn["inflight"])
    g.begin("blk-write", "/dev/vda", PAR_WRITERS, PAR_FIRST, PAR_AREA, 0)
    g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= 32)
    outstanding = 0
    for i in range(RESTARTS):
        # killed with requests in flight (held 10-30 ms each, completed out of order)
        in_flight = 0
        deadline = time.monotonic() + 5
        while in_flight == 0 and time.monotonic() < deadline:
            in_flight = sum(v["in_flight"] for v in tb.vrings(0))
        tb.kill()
        tb.start()
        ev = way.wait_events("device.reconnected", i + 1, "blk0")[i]
        out = sum(v["outstanding"] for v in ev["vrings"])
        outstanding += out
        log("restart %d: exact=%s, %d requests outstanding at the loss: %s" % (i + 1, ev["exact"], out, ev["vrings"]))
        check(ev["exact"], "restore %d is exact (INFLIGHT_SHMFD)" % (i + 1))
        p = wait_more(g, "blk-write", 32)
        log("restart %d: the writers wrote on (a writer at block %s)" % (i + 1, p["n"]))
    g.stop_steps()
    r = g.result("blk-write", timeout=90)
    counts = guest.parse_counts(r)
    check(len(counts) == PAR_WRITERS and min(counts) >= 32,
          "%d parallel O_DIRECT writers through %d kills: %s blocks each, all read back and compared, "
          "no kernel error" % (PAR_WRITERS, RESTARTS, counts))
    check(outstanding > 0, "the back-end was killed with requests in flight: %d outstanding over the "
          "restores, resubmitted from the inflight region and each completed once" % outstanding)
    check_eq(way.device("blk0")["reconnects"], RESTARTS, "device.list reconnects")
    check(not way.events("device.vmm_disconnected", "blk0"), "QEMU's connection stayed up throughout")
    g.poweroff()
    way.release("blk0")
    check_eq(tb.stop(), 0, "vhub-test-backend exit code")
    guest.blk_write_model(model, PAR_FIRST, PAR_AREA, counts)
    check_image(img, model, "%d writers' numbered blocks, zeros elsewhere" % PAR_WRITERS)


def scenario_net_restart(t, image):
    way = ThroughVhubd(t)
    pmd, g = direct.net_guest(t, image, way)
    count = 10
    for round_ in range(2):
        r = g.run("net", "eth0", count)
        check(r.int("tx") >= count and r.int("rx") >= count and r.int("in_echos") >= 2 * count,
              "round %d: the guest's frames went out and came back through testpmd (tx %s, rx %s, "
              "Icmp6InEchos +%s)" % (round_ + 1, r["tx"], r["rx"], r["in_echos"]))
        if round_ == 0:
            pmd.kill()
            pmd.start()
            pmd.wait_forwarding()
            ev = way.wait_events("device.reconnected", 1, "net0")[0]
            log("testpmd restarted: device.reconnected %s" % ev)
    g.poweroff()
    way.release("net0")
    check_eq(pmd.stop(), 0, "dpdk-testpmd exit code")


# ---- a hung back-end ------------------------------------------------------

TIMEOUT_MS = 2000


def scenario_hung(t, image):
    way = ThroughVhubd(t, timeout_ms=TIMEOUT_MS)
    bound = TIMEOUT_MS / 1000.0 + 1.0
    img, model, qsd, g = blk_writer(t, image, way)
    qmp = g.qmp()
    check_eq(qmp.execute("query-status")["status"], "running", "QMP query-status")
    os.kill(qsd.pid, signal.SIGSTOP)
    t.defer(lambda: qsd.alive and os.kill(qsd.pid, signal.SIGCONT))
    log("qemu-storage-daemon SIGSTOPped; QMP stop (QEMU sends GET_VRING_BASE for every ring)")
    t0 = time.monotonic()
    try:
        qmp.execute("stop", timeout=bound)
    except QmpTimeout:
        raise TestFailure("FAILED: QMP stop did not answer within %.1fs with the back-end hung" % bound)
    took = time.monotonic() - t0
    check(took <= bound, "QMP stop answered in %.2fs (back-end timeout %d ms + 1 s)" % (took, TIMEOUT_MS))
    qmp.wait_event("STOP", timeout=bound)
    # the monitor answers throughout the outage: restore attempts keep failing meanwhile
    worst, end = 0.0, time.monotonic() + 3 * TIMEOUT_MS / 1000.0
    while time.monotonic() < end:
        t1 = time.monotonic()
        check_eq(qmp.execute("query-status", timeout=bound)["status"], "paused", "QMP query-status") \
            if worst == 0.0 else qmp.execute("query-status", timeout=bound)
        worst = max(worst, time.monotonic() - t1)
        time.sleep(0.1)
    check(worst <= bound, "QMP query-status answered within %.2fs each while the back-end stayed hung" % worst)
    dev = way.device("blk0")
    check(dev["state"] in ("disconnected", "connecting"), "vhubd has the back-end as lost: %s" % dev["state"])
    os.kill(qsd.pid, signal.SIGCONT)
    ev = way.wait_events("device.reconnected", 1, "blk0", timeout=30)[0]
    log("qemu-storage-daemon resumed: device.reconnected %s" % ev)
    qmp.execute("cont", timeout=bound)
    qmp.wait_event("RESUME", timeout=bound)
    resumed = last_n(g, "blk-write")
    g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= resumed + 64)
    g.stop_steps()
    r = g.result("blk-write")
    seq = guest.parse_counts(r)
    check(seq[0] >= resumed + 64, "the guest wrote on after cont: %s blocks, no I/O error" % seq)
    g.run("kmsg-check")
    blk_writer_end(way, g, qsd, img, model, seq, "%d numbered blocks" % seq[0])


# ---- the VMM leaves and comes back ----------------------------------------

def scenario_vmm_return(t, image):
    way = ThroughVhubd(t)
    d = way.dir
    img = blk_image(d)
    model = bytearray(IMAGE_SIZE)
    qsd = t.enter(QsdBackend(img, os.path.join(d, "blk.sock"), num_queues=2, log_dir=d))
    sock = way.socket(qsd.socket, "blk0", "blk")
    g1 = t.enter(Guest(d, [BlkDevice(sock, num_queues=2, chardev_opts=",reconnect=1")], image, name="guest1"))
    g1.wait_ready()
    r = g1.run("blk-write", "/dev/vda", 2, 1024, 64, 48)
    first = guest.parse_counts(r)
    guest.blk_write_model(model, 1024, 64, first)
    # the guest's writes are on the disk (O_DIRECT); QEMU dies without a word
    g1.kill()
    way.wait_events("device.vmm_disconnected", 1, "blk0", timeout=10)
    # qemu-storage-daemon has no RESET_DEVICE: a new connection makes it forget
    # the old QEMU's rings (docs/front-door.md, "The VMM leaves")
    ev = way.wait_events("device.reconnected", 1, "blk0", timeout=10)[0]
    check_eq((ev["reconnects"], ev["vrings"]), (1, []), "the back-end renewed for the next VMM, no ring to restore")
    dev = way.device("blk0")
    check_eq((dev["vmm"], dev["state"]), ("waiting", "stopped"), "QEMU killed: vmm, state (rings stopped)")
    g2 = t.enter(Guest(d, [BlkDevice(sock, num_queues=2, chardev_opts=",reconnect=1")], image, name="guest2"))
    g2.wait_ready()
    way.wait_events("device.vmm_connected", 2, "blk0", timeout=10)
    check_eq(way.device("blk0")["vmm"], "connected", "device.list vmm with the new QEMU")
    pattern = os.urandom(64 * BLOCK)
    with open(img, "r+b") as f:     # the host's data, read by the new guest
        f.seek(0)
        f.write(pattern)
    model[0:len(pattern)] = pattern
    r = g2.run("blk-basic", "/dev/vda", 0, 256, 512, 64, hashlib.sha256(pattern).hexdigest())
    check_eq(r.int("queues"), 2, "the new guest's blk-mq queues")
    model[256 * BLOCK:(256 + 64) * BLOCK] = pattern
    model[512 * BLOCK:(512 + 64) * BLOCK] = pattern
    r = g2.run("blk-write", "/dev/vda", 2, 2048, 64, 48)
    second = guest.parse_counts(r)
    guest.blk_write_model(model, 2048, 64, second)
    g2.poweroff()
    vmm_session_checks(way, "blk0", sessions=2)
    way.wait_events("device.reconnected", 2, "blk0", timeout=10)
    way.release("blk0")
    check_eq(qsd.stop(), 0, "qemu-storage-daemon exit code")
    check_image(img, model, "the first guest's blocks, the pattern and its copies, the second guest's blocks")


# ---- vhubd restarted under QEMU ---------------------------------------------

class ThroughManagedVhubd(ThroughVhubd):
    """ThroughVhubd with vhubd under a played service manager (the fd store,
    docs/restart.md), so that it can be restarted under the guest."""

    def __init__(self, t, vm="vm0", extra=()):
        from test_restart import Managed
        self.t = t
        self.dir = t.tmpdir()
        os.chmod(self.dir, 0o755)
        self.vmm_dir = os.path.join(self.dir, "vmm")
        self.vm = vm
        self.managed = Managed(t, self.dir, extra=["--vmm-dir", self.vmm_dir, "--backend-dir", self.dir] + list(extra))
        self.client = t.enter(Client(self.managed.control, timeout=10))
        self.client.call("vm.create", {"vm": vm})
        self.sockets = {}
        self.seen = []


class IoWatch:
    """The guest's O_DIRECT completions seen from the host: step blk-write's
    writer 0 writes its numbered blocks one at a time into slot n % area of
    its area and reads each back before the next, so block n appearing in
    the image file is its I/O completing.  A thread polls for the next
    block every millisecond and keeps the time each one appeared: the
    longest gap between two of them is the guest's longest I/O pause."""

    def __init__(self, img, first=None, area=None):
        import threading
        self.fd = os.open(img, os.O_RDONLY | os.O_CLOEXEC)
        self.first = SEQ_FIRST if first is None else first
        self.area = SEQ_AREA if area is None else area
        self.times = []     # (monotonic time, n)
        self.n = -1
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _seen(self, n):
        off = (self.first + n % self.area) * BLOCK
        return os.pread(self.fd, BLOCK, off) == guest.blk_block(0, n)

    def _run(self):
        while not self.stopping:
            while self._seen(self.n + 1):
                self.n += 1
                self.times.append((time.monotonic(), self.n))
            time.sleep(0.001)

    def stop(self):
        if self.fd < 0:
            return
        self.stopping = True
        self.thread.join()
        os.close(self.fd)
        self.fd = -1

    def longest_gap(self, t0, t1):
        """The longest time without a completion that overlaps [t0, t1]
        (ms), and the completions it lies between."""
        best = (0.0, None, None)
        for (a, na), (b, nb) in zip(self.times, self.times[1:]):
            if b >= t0 and a <= t1 and (b - a) * 1000 > best[0]:
                best = ((b - a) * 1000, na, nb)
        return best

    def gaps(self, t0, t1):
        """Every gap between completions inside [t0, t1], ms."""
        return [(b - a) * 1000 for (a, _), (b, _) in zip(self.times, self.times[1:]) if a >= t0 and b <= t1]


def qemu_sockets(g):
    """QEMU's connected sockets, by inode: a reconnect makes a new one."""
    found = set()
    for fd in os.listdir("/proc/%d/fd" % g.pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (g.pid, fd))
        except OSError:
            continue
        if link.startswith("socket:"):
            found.add(link)
    return found


def qemu_log(g):
    with open(g.log_path, errors="replace") as f:
        return f.read()


# What QEMU 7.2 logs when its vhost-user connection goes and comes back.
QEMU_VHOST_LOSS = re.compile(r"vhost|Failed to (read|write) msg|[Dd]isconnect|[Rr]econnect")

CARRY_RESTARTS = 5


def vhubd_rig(t, image, fs=None, extra=()):
    """blk0 (qemu-storage-daemon, 2 queues) through a vhubd under a played
    service manager (with vhubd's `extra` arguments), a guest writing
    numbered blocks on it; with fs (a FsShare), fs0 through the same vhubd
    to its virtiofsd too."""
    way = ThroughManagedVhubd(t, extra=extra)
    d = way.dir
    img = blk_image(d)
    qsd = t.enter(QsdBackend(img, os.path.join(d, "blk.sock"), num_queues=2, log_dir=d))
    sock = way.socket(qsd.socket, "blk0", "blk")
    devices = [BlkDevice(sock, num_queues=2, chardev_opts=",reconnect=1")]
    if fs:
        fs.vfs = t.enter(VirtiofsdBackend(os.path.join(d, "fs.sock"), fs.share, log_dir=d))
        devices.append(FsDevice(way.socket(fs.vfs.socket, "fs0", "fs"), tag="fs0"))
    g = t.enter(Guest(d, devices, image))
    g.wait_ready()
    watch = IoWatch(img)
    t.defer(watch.stop)
    g.begin("blk-write", "/dev/vda", 1, SEQ_FIRST, SEQ_AREA, 0)
    g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= 32)
    return way, img, qsd, g, watch


def baseline_gap(watch, seconds=3.0):
    """The longest gap between completions with nothing happening."""
    t0 = time.monotonic()
    time.sleep(seconds)
    gaps = watch.gaps(t0, time.monotonic())
    check(len(gaps) >= 10, "the guest completes blocks steadily (%d in %.0f s)" % (len(gaps), seconds))
    return max(gaps), sorted(gaps)[len(gaps) // 2]


def vhubd_rig_end(way, g, qsd, img, watch, restarts, what):
    g.stop_steps()
    r = g.result("blk-write")
    seq = guest.parse_counts(r)
    check(seq[0] >= 32 * (restarts + 1), "one O_DIRECT writer through %d %s: %s blocks, every one read "
          "back, no I/O error in the guest's kernel log (%s)" % (restarts, what, seq, r["kmsg_errors"]))
    g.run("kmsg-check")
    watch.stop()
    blk_writer_end(way, g, qsd, img, bytearray(IMAGE_SIZE), seq, "%d numbered blocks" % seq[0])


class FsShare:
    """A directory virtiofsd shares, with a host file the guest reads."""

    def __init__(self, t):
        self.share = os.path.join(t.tmpdir(), "share")
        os.mkdir(self.share)
        self.content = os.urandom(256 << 10)
        with open(os.path.join(self.share, "from-host.bin"), "wb") as f:
            f.write(self.content)
        self.vfs = None

    def guest_checks(self, g):
        r = g.run("fs", "fs0", "from-host.bin", hashlib.sha256(self.content).hexdigest(), "from-guest.txt")
        check_eq(r.int("size"), len(self.content), "size of the host file read in the guest through fs0")

    def host_checks(self):
        with open(os.path.join(self.share, "from-guest.txt"), "rb") as f:
            written = f.read()
        check(written == self.content + b"vhubtest guest wrote this\n",
              "the host sees the file the guest wrote through fs0 after the restarts")


def carried_restarts(t, image, sig, restarts):
    """vhubd restarted `restarts` times with sig under a guest whose QEMU is
    idle on its vhost-user connections (every request answered): QEMU's
    sessions are carried (blk0 under I/O, fs0 idle), QEMU notices nothing."""
    fs = FsShare(t)
    way, img, qsd, g, watch = vhubd_rig(t, image, fs)
    socks0 = qemu_sockets(g)
    log0 = len(qemu_log(g))
    base_max, base_median = baseline_gap(watch)
    log("no restart: longest gap between completions %.1f ms (median %.1f ms)" % (base_max, base_median))
    pauses = []
    what, whats = ("planned restart", "planned restarts") if sig == signal.SIGTERM else ("crash", "crashes")
    for i in range(restarts):
        t0 = time.monotonic()
        code = way.managed.restart(sig=sig)
        t1 = time.monotonic()
        check_eq(code, 0 if sig == signal.SIGTERM else -signal.SIGKILL, "%s %d: the old vhubd's exit" % (what, i + 1))
        p = wait_more(g, "blk-write", 32)
        gap, na, nb = watch.longest_gap(t0, t1)
        pauses.append(gap)
        log("%s %d: signal to the new vhubd's READY=1 %.0f ms; the guest's longest pause across it "
            "%.1f ms (blocks %s..%s); it wrote on (block %s)" % (what, i + 1, (t1 - t0) * 1000, gap, na, nb, p["n"]))
    for name in ("blk0", "fs0"):
        check_eq(way.events("device.vmm_disconnected", name), [], "vhubd saw QEMU's %s session go on: no "
                 "device.vmm_disconnected" % name)
        check_eq(len(way.events("device.vmm_connected", name)), 1, "%s: one device.vmm_connected, no new "
                 "accept" % name)
        check_eq(way.events("device.reconnected", name), [], "%s's back-end kept its connection: no "
                 "device.reconnected" % name)
        dev = way.device(name)
        check_eq((dev["state"], dev["vmm"]), ("running", "connected"), "device.list of %s after the restarts"
                 % name)
    check(fs.vfs.alive, "virtiofsd did not exit: its front-end never left")
    fs.guest_checks(g)
    check_eq(qemu_sockets(g), socks0, "QEMU's sockets are the ones it had before the restarts (no reconnect)")
    lines = [l for l in qemu_log(g)[log0:].splitlines() if QEMU_VHOST_LOSS.search(l)]
    check_eq(lines, [], "QEMU's log says nothing of its vhost-user connection during the restarts")
    log("%s: the guest's longest I/O pause across each: %s ms (without a restart: longest "
        "%.1f ms, median %.1f ms)" % (whats, ", ".join("%.1f" % x for x in pauses), base_max, base_median))
    vhubd_rig_end(way, g, qsd, img, watch, restarts, "%s of vhubd" % whats)
    fs.host_checks()
    way.release("fs0")
    check_eq(fs.vfs.wait_exit(10), 0, "virtiofsd exit code once its front-end left")


def scenario_vhubd_carry(t, image):
    """Planned restarts of vhubd (SIGTERM) under a guest: carried."""
    carried_restarts(t, image, signal.SIGTERM, CARRY_RESTARTS)


def scenario_vhubd_restart(t, image):
    """Crashes of vhubd (SIGKILL) under a guest whose QEMU is idle on its
    connections: the snapshot says its sessions are at rest, so they are
    carried as by a planned restart."""
    carried_restarts(t, image, signal.SIGKILL, 3)


# ---- vhubd crashed with QEMU's request in flight: the fallback -------------

FALLBACK_TIMEOUT_MS = 3000


class VhubdLog:
    """vhubd's log under the played service manager (every process of it,
    appended), read from a mark on."""

    def __init__(self, way):
        self.path = way.managed.sm.log_path
        self.start = os.path.getsize(self.path)

    def text(self):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    def wait(self, pattern, timeout, what):
        """The first line matching pattern written since the mark."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text())
            if m:
                return m.group(0)
            if time.monotonic() > deadline:
                raise TestFailure("FAILED: vhubd's log says %s within %.0fs" % (what, timeout))
            time.sleep(0.005)


class HeldRequest:
    """blk0 (qemu-storage-daemon) and fs0 (virtiofsd) through a vhubd under a
    played service manager, a guest writing numbered blocks on blk0; hold()
    then puts QEMU's SET_CONFIG in flight: qemu-storage-daemon SIGSTOPped,
    the guest switches blk0's cache to write back (qsd's disk starts write
    through), QEMU's vCPU thread sends SET_CONFIG and waits for its
    REPLY_ACK holding QEMU's big lock (QMP waits too), vhubd relays it to
    the stopped back-end."""

    def __init__(self, t, image):
        self.t = t
        self.bound = FALLBACK_TIMEOUT_MS / 1000.0 + 1.0
        self.fs = FsShare(t)
        self.way, self.img, self.qsd, self.g, self.watch = vhubd_rig(
            t, image, self.fs, extra=["--log-level", "debug", "--backend-timeout-ms", str(FALLBACK_TIMEOUT_MS)])
        self.qmp = self.g.qmp()
        check_eq(self.qmp.execute("query-status")["status"], "running", "QMP query-status")
        self.socks0 = qemu_sockets(self.g)
        self.qlog0 = len(qemu_log(self.g))
        self.base_max, self.base_median = baseline_gap(self.watch)
        log("no restart: longest gap between completions %.1f ms (median %.1f ms)" % (self.base_max,
                                                                                      self.base_median))
        check_eq(len(self.way.events("device.vmm_connected", "blk0")), 1, "QEMU connected to blk0 once")

    def hold(self):
        """Until QEMU's SET_CONFIG waits on vhubd; the QMP command sent
        meanwhile (answered once SET_CONFIG ends)."""
        self.vlog = VhubdLog(self.way)
        self.t_sigstop = time.monotonic()
        os.kill(self.qsd.pid, signal.SIGSTOP)
        self.t.defer(lambda: self.qsd.alive and os.kill(self.qsd.pid, signal.SIGCONT))
        t_ask = time.monotonic()
        self.g.begin("sh", "echo 'write back' > /sys/block/vda/cache_type; cat /sys/block/vda/cache_type")
        # vhubd wrote the VM's snapshot ("not at rest") before it read
        # QEMU's request; this line comes once it took SET_CONFIG, the
        # answer owed waiting for the stopped back-end
        line = self.vlog.wait(r"device=blk0 request=SET_CONFIG VMM request SET_CONFIG \(answer due\)", 30,
                              "it took QEMU's SET_CONFIG, the back-end stopped")
        self.t_taken = time.monotonic()
        log("vhubd, %.0f ms after the guest was asked: %s" % ((self.t_taken - t_ask) * 1000, line))
        status = self.qmp.send("query-status")
        try:
            self.qmp.answer(status, timeout=0.3)
            raise TestFailure("FAILED: QMP answered while QEMU's SET_CONFIG was in flight: QEMU was not "
                              "waiting for vhubd")
        except QmpTimeout:
            log("ok: QEMU waits for vhubd's answer (QMP silent for 0.3 s)")
        return status

    def restart(self, sig):
        """vhubd restarted with sig, then the back-end resumed: the times
        (signal, new process ready) and the old run's log."""
        t_sig = time.monotonic()
        code = self.way.managed.restart(sig=sig)
        t_ready = time.monotonic()
        check_eq(code, 0 if sig == signal.SIGTERM else -signal.SIGKILL, "the old vhubd's exit")
        os.kill(self.qsd.pid, signal.SIGCONT)
        return t_sig, t_ready, self.vlog.text().split("restoring the state of the earlier run")[0]

    def answered(self, status, t0, what):
        """QMP's answer to `status`, due within the bound from t0."""
        try:
            got = self.qmp.answer(status, timeout=max(0.0, t0 + self.bound - time.monotonic()))
        except QmpTimeout:
            raise TestFailure("FAILED: QMP did not answer within %.1fs of %s" % (self.bound, what))
        t_qmp = time.monotonic()
        check(t_qmp - t0 <= self.bound and got["status"] == "running",
              "QMP answered %.2fs after %s (back-end timeout %d ms + 1 s), the guest running"
              % (t_qmp - t0, what, FALLBACK_TIMEOUT_MS), got)
        return t_qmp

    def writer_on(self, t_sig):
        """The guest's writer goes on; the figures across the restart."""
        p = wait_more(self.g, "blk-write", 64)
        gap, na, nb = self.watch.longest_gap(t_sig, time.monotonic())
        t_next = min(tt for tt, _ in self.watch.times if tt > t_sig)
        r = self.g.result("sh")
        log("the guest's config write: rc=%s, %s" % (r["rc"], r.log))
        return p, gap, na, nb, t_next

    def end(self, what):
        for name in ("blk0", "fs0"):
            dev = self.way.device(name)
            check_eq((dev["state"], dev["vmm"]), ("running", "connected"), "device.list of %s afterwards" % name)
        check_eq(self.way.events("device.vmm_disconnected", "fs0"), [], "fs0's session, at rest, was carried: "
                 "no device.vmm_disconnected")
        check(self.fs.vfs.alive, "virtiofsd did not exit: its front-end never left")
        said = [l for l in qemu_log(self.g)[self.qlog0:].splitlines() if QEMU_VHOST_LOSS.search(l)]
        log("QEMU's log across the restart: %s" % (" | ".join(said) or "nothing"))
        self.fs.guest_checks(self.g)
        vhubd_rig_end(self.way, self.g, self.qsd, self.img, self.watch, 1, what)
        self.fs.host_checks()
        self.way.release("fs0")
        check_eq(self.fs.vfs.wait_exit(10), 0, "virtiofsd exit code once its front-end left")


def scenario_vhubd_fallback(t, image):
    """vhubd crashed (SIGKILL) with QEMU's SET_CONFIG in flight (HeldRequest).
    The last snapshot says blk0's session is not at rest, so the next vhubd
    cannot carry it: it closes QEMU's connection (QEMU goes on),
    device.vmm_disconnected, and QEMU (reconnect=1) connects again by
    itself, sets the device up from scratch and restarts its rings; the
    guest's writer goes on, every block verified.  fs0, idle on the same
    VM, is carried."""
    h = HeldRequest(t, image)
    way, g = h.way, h.g
    status = h.hold()
    t_kill, t_ready, old_run = h.restart(signal.SIGKILL)
    # the old process died with the request unanswered: its back-end
    # deadline had not answered it from the records
    check("SET_CONFIG from the VMM waited" not in old_run,
          "the old vhubd died with QEMU's SET_CONFIG unanswered (killed %.0f ms after it took it)"
          % ((t_kill - h.t_taken) * 1000))
    t_qmp = h.answered(status, t_kill, "the crash")
    gone = way.wait_events("device.vmm_disconnected", 1, "blk0", timeout=10)
    log("the new vhubd could not carry QEMU's blk0 session: %s" % gone[0])
    way.wait_events("device.vmm_connected", 2, "blk0", timeout=10)
    t_back = time.monotonic()
    order = [e["event"] for e in way.events(device="blk0")
             if e["event"] in ("device.vmm_connected", "device.vmm_disconnected")]
    check_eq(order, ["device.vmm_connected", "device.vmm_disconnected", "device.vmm_connected"],
             "blk0's VMM events: QEMU's session closed by the new vhubd, then QEMU back by itself")
    p, gap, na, nb, t_next = h.writer_on(t_kill)
    check(qemu_sockets(g) - h.socks0, "QEMU reconnected blk0 on a new socket of its own")
    ev = way.wait_events("device.reconnected", 1, "blk0", timeout=10)[-1]
    log("blk0's back-end renewed for the new session: device.reconnected %s" % ev)
    log("figures: SIGKILL to the new vhubd's READY=1 %.0f ms; QMP answered %.0f ms after the SIGKILL; QEMU back "
        "(device.vmm_connected seen) %.0f ms after READY=1; SIGKILL to the guest's next completed block %.0f ms; "
        "its longest I/O pause %.0f ms (blocks %s..%s), of which %.0f ms before the SIGKILL with the back-end "
        "stopped (without a crash: longest %.1f ms, median %.1f ms); the writer went on to block %s"
        % ((t_ready - t_kill) * 1000, (t_qmp - t_kill) * 1000, (t_back - t_ready) * 1000, (t_next - t_kill) * 1000,
           gap, na, nb, (t_kill - h.t_sigstop) * 1000, h.base_max, h.base_median, p["n"]))
    h.end("crash with QEMU's SET_CONFIG in flight")


def scenario_vhubd_carry_busy(t, image):
    """vhubd restarted as planned (SIGTERM) with QEMU's SET_CONFIG in flight
    (HeldRequest): the old process lets the request finish -- answered from
    the daemon's state at the back-end timeout -- before its last snapshot,
    which then finds the session at rest: carried.  QEMU keeps its sockets,
    no device.vmm_disconnected; the back-end, lost at the deadline, is
    restored after SIGCONT, and the guest's writer goes on."""
    h = HeldRequest(t, image)
    way, g = h.way, h.g
    status = h.hold()
    t_term, t_ready, old_run = h.restart(signal.SIGTERM)
    check("SET_CONFIG from the VMM waited" in old_run,
          "the old vhubd answered QEMU's SET_CONFIG (from its state, at the back-end timeout) before it exited")
    t_qmp = h.answered(status, h.t_taken, "vhubd took QEMU's SET_CONFIG")
    ev = way.wait_events("device.reconnected", 1, "blk0", timeout=30)[-1]
    log("blk0's back-end restored by the new vhubd: device.reconnected %s" % ev)
    p, gap, na, nb, t_next = h.writer_on(t_term)
    check_eq(way.events("device.vmm_disconnected", "blk0"), [], "QEMU's blk0 session was carried: no "
             "device.vmm_disconnected")
    check_eq(len(way.events("device.vmm_connected", "blk0")), 1, "blk0: one device.vmm_connected, no new accept")
    check_eq(qemu_sockets(g), h.socks0, "QEMU's sockets are the ones it had before the restart (no reconnect)")
    log("figures: SIGTERM to the new vhubd's READY=1 %.0f ms (the old one waited for QEMU's request); QMP "
        "answered %.0f ms after vhubd took SET_CONFIG; SIGTERM to the guest's next completed block %.0f ms; its "
        "longest I/O pause %.0f ms (blocks %s..%s; without a restart: longest %.1f ms, median %.1f ms); the writer "
        "went on to block %s"
        % ((t_ready - t_term) * 1000, (t_qmp - h.t_taken) * 1000, (t_next - t_term) * 1000, gap, na, nb,
           h.base_max, h.base_median, p["n"]))
    h.end("planned restart with QEMU's SET_CONFIG in flight")


def scenario_vhubd_crash_stop(t, image):
    """vhubd crashed (SIGKILL) in the middle of QEMU's device stop (QMP
    `stop`: QEMU disables blk0's rings -- relayed to a SIGSTOPped
    qemu-storage-daemon, awaited -- and asks for the first ring's base, an
    answer owed).  Each of those requests was read whole, carries no fds and
    is harmless to handle twice, so the last snapshot carries the session
    busy with them; the next vhubd adopts QEMU's connection, restores blk0's
    back-end as lost and handles them again once qemu-storage-daemon runs
    again: QMP `stop` is answered, QEMU keeps its sockets, no
    device.vmm_disconnected, and after `cont` the guest's writer goes on,
    every block verified.  (With the fallback -- QEMU's connection closed
    in the middle of its device stop -- QEMU 7.2 never set the disk up
    again, as with qemu-storage-daemon killed at the same point.)"""
    bound = FALLBACK_TIMEOUT_MS / 1000.0 + 1.0
    way, img, qsd, g, watch = vhubd_rig(t, image, extra=["--log-level", "debug",
                                                          "--backend-timeout-ms", str(FALLBACK_TIMEOUT_MS)])
    qmp = g.qmp()
    socks0 = qemu_sockets(g)
    qlog0 = len(qemu_log(g))
    check_eq(len(way.events("device.vmm_connected", "blk0")), 1, "QEMU connected to blk0 once")
    vlog = VhubdLog(way)
    os.kill(qsd.pid, signal.SIGSTOP)
    t.defer(lambda: qsd.alive and os.kill(qsd.pid, signal.SIGCONT))
    t_stop = time.monotonic()
    stop = qmp.send("stop")
    # QEMU disables the rings (relayed to the stopped back-end, awaited),
    # then asks for the first ring's base: an answer owed, in flight, and
    # written in the VM's snapshot before this line
    line = vlog.wait(r"device=blk0 request=GET_VRING_BASE GET_VRING_BASE in flight: the VM's snapshot carries it",
                     bound, "it took QEMU's GET_VRING_BASE, the back-end stopped, and its snapshot carries it")
    log("vhubd: %s" % line)
    t_kill = time.monotonic()
    check_eq(way.managed.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    t_ready = time.monotonic()
    old_run = vlog.text().split("restoring the state of the earlier run")[0]
    after = old_run.split("GET_VRING_BASE in flight")[-1]
    check("GET_VRING_BASE from the VMM waited" not in after and "reply to GET_VRING_BASE" not in after,
          "the old vhubd died with QEMU's GET_VRING_BASE unanswered (killed %.0f ms after it was carried)"
          % ((t_kill - t_stop) * 1000))
    os.kill(qsd.pid, signal.SIGCONT)
    try:
        qmp.answer(stop, timeout=max(0.0, t_kill + bound - time.monotonic()))
    except QmpTimeout:
        raise TestFailure("FAILED: QMP stop did not answer within %.1fs of the crash" % bound)
    t_qmp = time.monotonic()
    qmp.wait_event("STOP", timeout=bound)
    redone = vlog.wait(r"device=blk0 request=GET_VRING_BASE GET_VRING_BASE from the VMM, in flight at the "
                       r"daemon's restart: handled again", 10, "the new vhubd handled QEMU's GET_VRING_BASE again")
    log("new vhubd: %s" % redone)
    ev = way.wait_events("device.reconnected", 1, "blk0", timeout=30)[-1]
    log("blk0's back-end restored by the new vhubd: device.reconnected %s" % ev)
    resumed = last_n(g, "blk-write")
    qmp.execute("cont", timeout=bound)
    qmp.wait_event("RESUME", timeout=bound)
    try:
        g.wait_progress("blk-write", lambda p: int(p.get("n", 0)) >= resumed + 64, timeout=30)
    except TestFailure:
        raise TestFailure("FAILED: the guest's writer did not go on after cont: QEMU did not set blk0 up again "
                          "after vhubd's crash in the middle of its device stop")
    check_eq(way.events("device.vmm_disconnected", "blk0"), [], "QEMU's blk0 session was carried: no "
             "device.vmm_disconnected")
    check_eq(len(way.events("device.vmm_connected", "blk0")), 1, "blk0: one device.vmm_connected, no new accept")
    check_eq(qemu_sockets(g), socks0, "QEMU's sockets are the ones it had before the crash (no reconnect)")
    said = [l for l in qemu_log(g)[qlog0:].splitlines() if QEMU_VHOST_LOSS.search(l)]
    log("QEMU's log across the crash: %s" % (" | ".join(said) or "nothing"))
    log("figures: SIGKILL to the new vhubd's READY=1 %.0f ms; QMP stop answered %.0f ms after the SIGKILL"
        % ((t_ready - t_kill) * 1000, (t_qmp - t_kill) * 1000))
    vhubd_rig_end(way, g, qsd, img, watch, 1, "crash with QEMU's GET_VRING_BASE in flight")


# ---- hostile VMMs ---------------------------------------------------------

def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(path)
    return s


def wait_closed(s, timeout=10.0, what="vhubd closes the connection"):
    """Reads (and drops) what comes until EOF; the bytes it read."""
    s.settimeout(timeout)
    got = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        except socket.timeout:
            raise TestFailure("FAILED: %s within %.0fs" % (what, timeout))
        if not chunk:
            break
        got += len(chunk)
    else:
        raise TestFailure("FAILED: %s within %.0fs" % (what, timeout))
    log("ok: %s (%d bytes read before EOF)" % (what, got))
    s.close()
    return got


def header(request, size, flags=1):
    return struct.pack("<III", request, flags, size)


def scenario_hostile(t, image):
    way = ThroughVhubd(t)
    img, model, qsd, g = blk_writer(t, image, way)
    # the hostile VMMs' device: a second one of the same VM
    null = t.enter(QsdNullBackend([os.path.join(way.dir, "null.sock")], log_dir=way.dir))
    target = way.socket(null.socket, "blk1", "blk")
    fds0 = fd_targets(way)

    rnd = random.Random(11)
    s = connect(target)
    s.sendall(bytes(rnd.getrandbits(8) for _ in range(4096)))
    wait_closed(s, what="garbage bytes: vhubd closes the VMM")
    s = connect(target)
    s.sendall(header(9999, 0))
    wait_closed(s, what="an unknown request: vhubd closes the VMM")
    s = connect(target)
    s.sendall(header(1, 0) + header(8, 8) + struct.pack("<II", 200, 256))   # SET_VRING_NUM of ring 200
    wait_closed(s, what="a ring beyond the device's queues: vhubd closes the VMM")
    s = connect(target)
    s.sendall(header(16, 8) + struct.pack("<Q", 1 << 63))                     # acks what was not offered
    wait_closed(s, what="protocol features beyond the offer: vhubd closes the VMM")

    # one VMM at a time: a second one is accepted and closed at once
    first = connect(target)
    first.sendall(header(1, 0))
    first.settimeout(5)
    check_eq(len(first.recv(20)), 20, "the first VMM gets its GET_FEATURES answer")
    second = connect(target)
    wait_closed(second, what="a second VMM while one is attached: refused")
    first.close()
    way.wait_events("device.vmm_disconnected", 5, "blk1", timeout=10)

    # a flood it never reads: the answers pile up to vhubd's bound, then it is dropped
    s = connect(target)
    s.setblocking(False)
    burst = header(1, 0) * 4096
    sent, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < 20:
        try:
            sent += s.send(burst)
        except BlockingIOError:
            time.sleep(0.01)
        except (BrokenPipeError, ConnectionResetError):
            break
    else:
        raise TestFailure("FAILED: a VMM flooding GET_FEATURES and reading nothing was not dropped in 20 s")
    s.close()
    log("ok: a VMM that floods and never reads was dropped after %d bytes of requests (%.1fs)"
        % (sent, time.monotonic() - t0))

    # everyone else was served meanwhile: the guest, the control socket, and blk1's next VMM
    p = wait_more(g, "blk-write", 32)
    log("ok: the guest on blk0 wrote on throughout (block %s)" % p["n"])
    t1 = time.monotonic()
    way.client.call("daemon.info")
    check(time.monotonic() - t1 < 1.0, "the control socket answers at once")
    with DirectFrontend.connect(target) as fe:
        feats = fe.get_features()
        fe.handshake()
        check_eq(feats, way.device("blk1")["features"], "a well-behaved VMM on blk1 is served its features")
    way.wait_events("device.vmm_disconnected", 7, "blk1", timeout=10)
    check_no_fd_left(way, fds0, "the hostile VMMs left")
    g.stop_steps()
    seq = guest.parse_counts(g.result("blk-write"))
    way.release("blk1")
    blk_writer_end(way, g, qsd, img, model, seq, "the guest's blocks beside the hostile VMMs")


SCENARIOS = {
    "blk": through("blk"),
    "fs": through("fs"),
    "net": through("net"),
    "net-packed": through("net-packed"),
    "blk-restart": scenario_blk_restart,
    "tb-restart": scenario_tb_restart,
    "net-restart": scenario_net_restart,
    "hung": scenario_hung,
    "vmm-return": scenario_vmm_return,
    "hostile": scenario_hostile,
    "vhubd-restart": scenario_vhubd_restart,
    "vhubd-carry": scenario_vhubd_carry,
    "vhubd-fallback": scenario_vhubd_fallback,
    "vhubd-carry-busy": scenario_vhubd_carry_busy,
    "vhubd-crash-stop": scenario_vhubd_crash_stop,
}


def main(t):
    names = sys.argv[1:] or list(SCENARIOS)
    image = guest_image.prepare()
    for name in names:
        log("==== frontdoor-guest-%s" % name)
        SCENARIOS[name](t, image)


if __name__ == "__main__":
    run(main)

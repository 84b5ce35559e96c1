#!/usr/bin/env python3
"""Planned restarts of vhubd (issue 10, docs/restart.md) with the other real
back-ends: test_restart.py planned covers qemu-storage-daemon; this covers
the rest of the matrix, one back-end per run:

    test_restart_matrix.py testpmd    a net device on dpdk-testpmd (vhost PMD,
                                      io forwarding): frames keep looping
                                      TX -> RX through every restart
    test_restart_matrix.py virtiofsd  an fs device on virtiofsd: FUSE requests
                                      keep being answered by the same process,
                                      in the same FUSE session, through every
                                      restart
    test_restart_matrix.py shared     test back-ends with shared objects: a
                                      device's and the VMM's objects exported
                                      before, looked up after each restart; the
                                      back-ends count the messages they get

Each does RESTARTS planned restarts (SIGTERM under the service manager
played by vhubtest/servicemanager.py, the fd store kept) while the guest
side keeps its rings busy -- including while the daemon is down, since the
data path never passes through vhubd.  After each restart: the VMM's
connection is the same socket and its first message is daemon.restarted; the
VM's devices, regions and shared objects are listed exactly as before; no
device event; the back-end is the same process and got no vhost-user
message (testpmd: DPDK logs each message it reads, "read message
VHOST_USER_..."; the test back-end counts them; virtiofsd 7.2 logs none, so
there it is the FUSE session that proves it: a re-handshake would need a new
virtiofsd, which serves one front-end connection and exits after it).
Events keep flowing: the subscribed connection gets device.config_changed
from a back-end after each restart (the test back-end sends
CONFIG_CHANGE_MSG on its channel) and device.stats still answers.

RESTARTS is 20 as the issue asks: a planned restart here takes 20-80 ms, so
the three back-ends together cost about 10 s.
"""

import mmap
import os
import re
import signal
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, fs, net, scenarios                    # noqa: E402
from vhubtest.backends import TestpmdBackend, VirtiofsdBackend  # noqa: E402
from vhubtest.client import Client                              # noqa: E402
from vhubtest.testbackend import AsyncCommand, TestBackend      # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run_parts  # noqa: E402
from vhubtest.vmm import Vmm                                    # noqa: E402
from test_restart import DEVICE_EVENTS, Managed, listing        # noqa: E402

RESTARTS = 20
BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)


def first_after_restart(c, k, step):
    """The first message on the VMM's connection after restart k is
    daemon.restarted, and no device event follows it."""
    end = time.monotonic() + 10
    while True:
        evs = c.events()
        if evs:
            check_eq((evs[0].get("event"), evs[0].get("restarts")), ("daemon.restarted", k),
                     "restart %d: the first message after it is daemon.restarted" % k)
            others = [e for e in evs[1:] if e.get("event") in DEVICE_EVENTS]
            check(not others, "restart %d: no device event" % k, others)
            return
        if time.monotonic() > end:
            raise TestFailure("restart %d: no daemon.restarted" % k)
        step()


def restarts(m, c, backend, step, after=None, messages=None):
    """RESTARTS planned restarts with step() driving the guest side all the
    time; after(k) checks what is back-end specific."""
    c.events()
    before = listing(c)
    pid = backend.pid
    for k in range(1, RESTARTS + 1):
        for _ in range(5):
            step()
        seen = messages() if messages else None
        t0 = time.monotonic()
        code = m.restart(while_down=step)
        dt = time.monotonic() - t0
        check_eq(code, 0, "restart %d: the old vhubd exits 0" % k)
        first_after_restart(c, k, step)
        check(not c.closed, "restart %d: the VMM's connection stays open" % k)
        check_eq(listing(c), before,
                 "restart %d: VMs, devices, regions, shared objects listed as before" % k)
        check(backend.alive and backend.pid == pid, "restart %d: the back-end is the same process" % k)
        if messages:
            check_eq(messages(), seen, "restart %d: the back-end got no vhost-user message" % k)
        if after:
            after(k)
        log("restart %d: %.0f ms SIGTERM to ready" % (k, dt * 1000))
    info = c.call("daemon.info")
    check_eq(info["restarts"], RESTARTS, "daemon.info restarts")


class NetLoop:
    """Frames with increasing sequence numbers sent on TX, at most `window`
    not yet back on RX; each must come back once, byte for byte."""

    def __init__(self, pair, window=64):
        self.p = pair
        self.window = window
        self.seq = 0
        self.got = set()

    def frame(self, seq):
        return net.build_frame(seq % 100000, 60 + (seq * 97) % 1400, tag=7 + seq // 100000)

    def step(self):
        room = self.window - (self.seq - len(self.got))
        if room > 0:
            n = min(room, 16)
            self.p.send([self.frame(self.seq + i) for i in range(n)])
            self.seq += n
        for f in self.p.recv():
            ident = net.parse_frame(f)
            check(ident is not None, "a frame that came back parses", f[:32])
            seq = (ident[0] - 7) * 100000 + ident[1]
            if seq in self.got:
                raise TestFailure("frame %d came back twice" % seq)
            if f != self.frame(seq):
                raise TestFailure("frame %d came back changed" % seq)
            self.got.add(seq)
        self.p.rx.wait_for_used(0.001)

    def drain(self, timeout=5.0):
        end = time.monotonic() + timeout
        while len(self.got) < self.seq and time.monotonic() < end:
            self.p.rx.kick()
            self.step_recv_only()
        check_eq(len(self.got), self.seq, "every frame sent came back, once, byte for byte")

    def step_recv_only(self):
        window, self.window = self.window, self.seq - len(self.got)
        try:
            self.step()
        finally:
            self.window = window


def part_testpmd(t):
    d = t.tmpdir()
    m = Managed(t, d)
    sock = m.socket("net0.sock")
    pmd = t.enter(TestpmdBackend(sock, queues=1, log_dir=d))
    t.add_log("testpmd", pmd.log_path)
    c, mem, vmm = m.vmm(t, 16 << 20)
    vmm.add_device("net0", sock, type="net", queues=2)
    p = net.NetQueuePair(mem, pair=0, size=256)
    vmm.start_device("net0", 1 << 32, p.vqs)
    pmd.wait_forwarding()
    p.post_rx()
    p.rx.kick()

    def messages():
        return len(re.findall(r"read message VHOST_USER_\w+", pmd.log_text()))

    loop = NetLoop(p)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        loop.step()
    check(len(loop.got) > 0, "frames loop through testpmd before the first restart (%d)"
          % len(loop.got))
    check(messages() > 0, "testpmd logs the vhost-user messages it reads (%d so far)" % messages())

    def counters():
        st = c.call("device.stats", {"vm": "vm0", "device": "net0"})
        return {k: st[k] for k in ("state", "requests", "replies", "timeouts", "losses",
                                   "reconnects")}
    stats0 = counters()

    def after(k):
        got = len(loop.got)
        end = time.monotonic() + 5
        while len(loop.got) < got + 32 and time.monotonic() < end:
            loop.step()
        check(len(loop.got) >= got + 32, "restart %d: frames keep coming back" % k)
        check_eq(counters(), stats0, "restart %d: device.stats: same state, no request sent, "
                 "no loss" % k)

    sent0 = loop.seq
    restarts(m, c, pmd, loop.step, after, messages)
    loop.drain()
    log("ok: %d frames looped through testpmd across %d restarts (%d sent meanwhile)"
        % (len(loop.got), RESTARTS, loop.seq - sent0))
    m.finish(c, vmm, "net0", p.vqs)


def part_virtiofsd(t):
    d = t.tmpdir()
    share, content = fs.make_share(d)
    m = Managed(t, d)
    sock = m.socket("fs0.sock")
    vfs = t.enter(VirtiofsdBackend(sock, share, log_dir=d))
    t.add_log("virtiofsd", vfs.log_path)
    c, mem, vmm = m.vmm(t, 16 << 20)
    vmm.add_device("fs0", sock, type="fs")
    fsdev = fs.FsDevice(mem)
    vmm.start_device("fs0", scenarios.FS_FEATURES, fsdev.vqs)
    r = fsdev.init()
    check_eq(r["major"], 7, "FUSE_INIT answered")
    # the node id and the open file handle of the session before the restarts:
    # they stay valid only if the FUSE session (the process and its
    # connection) goes on untouched
    node, _ = fsdev.lookup("data.bin")
    fh = fsdev.open(node)
    served = [0]

    def step():
        off = (served[0] * 4096) % len(content)
        data = fsdev.read(node, fh, off, 4096)
        if data != content[off:off + 4096]:
            raise TestFailure("READ at %d returned other bytes" % off)
        served[0] += 1

    def after(k):
        attr = fsdev.getattr(fs.FUSE_ROOT_ID)
        check_eq(attr["ino"], os.stat(share).st_ino, "restart %d: GETATTR of the root" % k)
        check_eq(fsdev.getattr(node)["size"], len(content),
                 "restart %d: GETATTR of the node id looked up before the restarts" % k)

    for _ in range(10):
        step()
    restarts(m, c, vfs, step, after)
    log("ok: %d READs answered by the same virtiofsd through %d restarts, on the file handle "
        "opened before them" % (served[0], RESTARTS))
    _, _, data = fsdev.read_file("data.bin", len(content) + 4096)
    check(data == content, "a new LOOKUP+OPEN+READ after the restarts returns the file")
    m.finish(c, vmm, "fs0", fsdev.vqs, removed=lambda: check_eq(
        vfs.wait_exit(5), 0, "virtiofsd exits 0 only once vhubd closes its connection"))


def part_shared(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--backend-timeout-ms", "2000"])
    A = t.enter(TestBackend([m.socket("A.sock")], args=["--queues", "1"], log_dir=d))
    B = t.enter(TestBackend([m.socket("B.sock")], args=["--queues", "1"], log_dir=d))
    t.add_log("test back-end A", A.log_path)
    t.add_log("test back-end B", B.log_path)
    c, mem, vmm = m.vmm(t, 8 << 20)
    watcher = t.enter(Client(m.control, timeout=10))
    watcher.call("events.subscribe", {"vm": "vm0"})
    vmm.add_device("A", A.socket)
    vmm.add_device("B", B.socket)
    A.wait_connected()
    B.wait_connected()
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("A", BLK1, [q.vq])
    ua = A.export(size=4096, fill="a1")
    vfd = os.memfd_create("vhubt-vmm-object", os.MFD_CLOEXEC)
    t.defer(os.close, vfd)
    os.ftruncate(vfd, 4096)
    vmap = mmap.mmap(vfd, 4096)
    t.defer(vmap.close)
    uv = str(uuidlib.uuid4())
    c.call("shared_object.add", {"vm": "vm0", "uuid": uv, "fd": 0}, fds=[vfd])
    vmap[0:4] = b"VMM0"
    check_eq(B.lookup(ua, read=4)["data"], "a1" * 4, "B looks up A's object before the restarts")
    check_eq(B.lookup(uv, read=4)["data"], b"VMM0".hex(), "B looks up the VMM's object before")

    def messages():
        return (A.requests(), B.requests())

    def step():
        time.sleep(0.001)

    def after(k):
        # lookups through the restored tables, by both importers
        check_eq(B.lookup(ua, read=4, write="%08x" % k, offset=8)["data"], "a1" * 4,
                 "restart %d: B looks up A's object (exported before the restarts)" % k)
        check_eq(A.lookup(ua, read=12)["data"][16:], "%08x" % k,
                 "restart %d: A's own lookup sees B's write (same memory)" % k)
        vmap[0:4] = b"V%03d" % k
        check_eq(B.lookup(uv, read=4)["data"], (b"V%03d" % k).hex(),
                 "restart %d: B looks up the VMM's object and reads what the VMM wrote" % k)
        for tb, n in ((A, "A"), (B, "B")):
            ch = tb.conn()["chan"]
            check(ch["unexpected"] == 0 and ch["pending"] == 0,
                  "restart %d: %s's channel got exactly its replies" % (k, n), ch)
        check_eq(len(q.read_sectors(0, 1)), 512, "restart %d: A serves its ring" % k)
        # the subscriber's connection is carried too: daemon.restarted first
        ev = watcher.wait_event(None, 5)
        check_eq((ev.get("event"), ev.get("restarts")), ("daemon.restarted", k),
                 "restart %d: the subscriber's first message after it is daemon.restarted" % k)
        # events still flow: a back-end's CONFIG_CHANGE_MSG reaches the owner
        # and the subscriber
        B.config_change()
        for conn, who in ((c, "owner"), (watcher, "subscriber")):
            ev = conn.wait_event(None, 5)
            check_eq((ev.get("event"), ev.get("device")), ("device.config_changed", "B"),
                     "restart %d: device.config_changed from B reaches the %s" % (k, who))
        # a shared object exported after the restart is found too
        un = A.export(size=4096, fill="%02x" % k)
        check_eq(B.lookup(un, read=2)["data"], "%02x" % k * 2,
                 "restart %d: an object exported after it is looked up" % k)
        A.remove(un)

    # a marker through both connections: what came before it is read
    B.config_change()
    for conn in (c, watcher):
        conn.wait_event(lambda e: e.get("event") == "device.config_changed", 5)
        conn.events()
    # the new objects come and go within after(): listing() sees the same set
    restarts(m, c, A, step, after, messages)
    check(B.alive, "B is the same process")
    log("ok: %d restarts, A and B got not one vhost-user message from them; lookups of "
        "objects exported before and after every restart served" % RESTARTS)
    vmm.stop_device("A")
    for n in "AB":
        vmm.remove_device(n)
    vmm.destroy()
    q.vq.close()
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def log_text(m):
    with open(m.sm.log_path, errors="replace") as f:
        return f.read()


def part_channel(t):
    """A back-end request sent while a planned restart is under way waits
    in the channel's socket for the next process, which handles it: a
    VRING_HOST_NOTIFIER_MSG (answered once the VMM replies) sent after the
    old process stopped reading -- it holds the restart open with a
    device.config.get whose GET_CONFIG the back-end S answers late -- is
    forwarded by the new process after daemon.restarted, and the VMM's
    device.backend_reply reaches the back-end: exactly one reply.  (Read by
    the old process instead, the event would reach a VMM whose connection
    is no longer read, and the request would be lost with the restart.)
    Then a request forwarded before the restart began, its event already
    with the VMM: the channel's wait is carried in the device's snapshot and
    the VMM's device.backend_reply to the new process reaches the back-end,
    once."""
    d = t.tmpdir()
    m = Managed(t, d, extra=["--backend-timeout-ms", "5000"])
    X = t.enter(TestBackend([m.socket("X.sock")], log_dir=d))
    S = t.enter(TestBackend([m.socket("S.sock")], log_dir=d))
    c = t.enter(Client(m.control, timeout=10))
    vmm = Vmm(c, "vm0")
    vmm.create()
    vmm.add_device("X", X.socket)
    vmm.add_device("S", S.socket)
    X.wait_connected()
    vmm.config_get("S", 0, 4)
    # a marker through the connection: what came before it is read
    X.config_change()
    c.wait_event(lambda e: e.get("event") == "device.config_changed", 5)
    c.events()
    for k in (1, 2):
        replies0 = X.conn()["chan"]["replies"]
        n = S.requests().get("GET_CONFIG", 0)
        S.misbehave("GET_CONFIG", "delay", delay_ms=800, count=1)
        slow = c.request("device.config.get", {"vm": "vm0", "device": "S", "offset": 0, "size": 4})
        S.wait_request("GET_CONFIG", count=n + 1)
        m.sm.send_signal(signal.SIGTERM)
        mark = "planned restart: reading no more requests"
        m.sm.wait_for(lambda: log_text(m).count(mark) >= k, 5, "the old vhubd to stop reading")
        p = AsyncCommand(X, {"cmd": "host-notifier", "queue": 1, "size": 4096, "offset": 0})
        check_eq(m.sm.wait_exit(10), 0, "round %d: the old vhubd exits 0" % k)
        resp = slow.response(5)
        check(resp.error is None, "round %d: the call in flight was answered before the exit" % k,
              resp.error)
        m.sm.start(m.argv)
        m.sm.wait_ready()
        ev = c.wait_event(None, 10)
        check_eq((ev.get("event"), ev.get("restarts")), ("daemon.restarted", k),
                 "round %d: daemon.restarted first: the request was not read by the old process" % k)
        ev = c.wait_event(lambda e: e.get("event") == "device.backend_request", 10)
        check_eq((ev.get("device"), ev.get("request")), ("X", "VRING_HOST_NOTIFIER_MSG"),
                 "round %d: the new process forwards X's request" % k)
        for fd in ev.get("_fds", []):
            os.close(fd)
        check(not p.done(), "round %d: X waits for the VMM's answer" % k)
        c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0})
        a = p.result(5)
        check(a.get("ok") and a.get("reply") == 0, "round %d: the VMM's reply reaches X" % k, a)
        check_eq(X.conn()["chan"]["replies"], replies0 + 1, "round %d: exactly one reply" % k)
    # a request already forwarded when the restart begins: the VMM has the
    # event and its token, the old process cannot read its answer any more
    # (its connection is not read): the wait is carried, and the VMM's
    # device.backend_reply to the new process reaches the back-end
    for k in (3, 4):
        replies0 = X.conn()["chan"]["replies"]
        p = AsyncCommand(X, {"cmd": "host-notifier", "queue": 1, "size": 4096, "offset": 0})
        ev = c.wait_event(lambda e: e.get("event") == "device.backend_request", 5)
        for fd in ev.get("_fds", []):
            os.close(fd)
        t0 = time.monotonic()
        code = m.restart()
        check_eq(code, 0, "round %d: the old vhubd exits 0" % k)
        check(time.monotonic() - t0 < 2.0, "round %d: the restart did not wait for the VMM's "
              "answer (it could not read it): %.0f ms" % (k, (time.monotonic() - t0) * 1000))
        ev2 = c.wait_event(None, 10)
        check_eq((ev2.get("event"), ev2.get("restarts")), ("daemon.restarted", k),
                 "round %d: daemon.restarted" % k)
        check(not p.done(), "round %d: X still waits for the VMM's answer" % k)
        c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 7})
        a = p.result(5)
        check(a.get("ok") and a.get("reply") == 7,
              "round %d: the VMM's reply to the new process reaches X (the wait was carried)" % k, a)
        check_eq(X.conn()["chan"]["replies"], replies0 + 1, "round %d: exactly one reply" % k)
    check_eq(c.call("daemon.info")["restarts"], 4, "daemon.info restarts")
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


if __name__ == "__main__":
    run_parts({"testpmd": part_testpmd, "virtiofsd": part_virtiofsd, "shared": part_shared,
               "channel": part_channel}, "shared")

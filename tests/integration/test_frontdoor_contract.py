#!/usr/bin/env python3
"""The front door's contract, with the harness's own Python VMM on the
socket instead of QEMU (docs/front-door.md; the guest tests are
test_frontdoor_guest.py).

    test_frontdoor_contract.py rules|io|relay|outage|lifetime

rules     device.add vmm_socket: the result's socket, device.list's vmm_socket
          and vmm; -32004 for vm.memory.* and dirty logging on its VM, for
          device.start/stop/reset/config.set on it, and for vmm_socket on a VM
          with vm.memory regions; device.config.get works; a path too long for
          a socket is -32602; daemon.info names "front-door"; device.remove
          removes the socket and the VM's directory.
io        a VMM's handshake is answered from the back-end's offer (protocol
          features masked), its memory and rings reach qemu-storage-daemon
          with its own addresses and eventfds, blk data checked in the image;
          vmm_connected / vmm_disconnected; the back-end gets a new
          connection for the next VMM (no RESET_DEVICE).
relay     the test back-end's CONFIG_CHANGE_MSG, host notifier (with its fd)
          and in-band VRING_CALL reach the VMM's back-end channel and the
          VMM's answers come back; without a channel the back-end gets a
          failure; RESET_DEVICE keeps the back-end connected when the VMM goes.
outage    the back-end killed under a VMM with a ring running: GET_VRING_BASE
          answered within --backend-timeout-ms from the used index in guest
          memory, later requests at once, GET_INFLIGHT_FD closes the VMM;
          the VMM's connection is never closed for anything else; the back-end
          restarted: restored (the VMM's rings replayed), I/O goes on.
lifetime  a VM with linger_ms whose owner closed is held while a VMM is
          connected, and lingers from when the VMM left.
restart   vhubd under a service manager (the fd store) restarted under VMMs
          doing I/O through the front door.  Planned (SIGTERM) and crashed
          (SIGKILL) with the VMMs idle: their sessions are carried -- the same
          connection and rings go on (blocks read back, more written), no
          device.vmm_disconnected, the back-end keeps its connection, a VM
          held only by its VMM stays held; after the planned one the back-end
          is lost and restored from the carried records.  Crashed with one
          VMM's GET_CONFIG in flight (its back-end stopped): carried, answered
          by the next process from the restored back-end.  Crashed with one
          VMM's SET_CONFIG in flight and another's message half-read: neither
          is carried -- their connections close, device.vmm_disconnected, the
          back-end renewed -- and the socket is there again at the same path:
          the next VMM reads what the first wrote and writes on (the image
          checked); the VM held only by its VMM lingers from the crash and
          goes.  Planned with half of a VMM's message read: not carried
          either, the next VMM is served.
restart-write-fail
          a VMM's GET_CONFIG in flight carried by the VM's snapshot (its
          back-end stopped), then every snapshot write fails (vhubd's
          RLIMIT_FSIZE set to 0: EFBIG) as the back-end answers: the snapshot
          that would drop the request cannot replace the one carrying it, so
          vhubd closes the VMM's connection instead of answering; crashed
          then, the next process does not answer it either (never twice), the
          device waits for the next VMM, which reads what the first wrote.
restart-busy-fail
          a VMM's GET_VRING_BASE for a running ring of a connected back-end,
          read while every snapshot write fails (the stored snapshot does not
          carry the session: half a message was read before): the snapshot
          cannot say the device is busy, so nothing goes to qemu-storage-daemon
          -- and the VMM is not answered from the daemon's records either
          (that answer would say the ring stopped while the back-end runs it
          on): its connection closes; crashed then, the next VMM is served.
restart-read-on
          a VMM's GET_CONFIG (carried, its back-end stopped) and GET_FEATURES
          (not carried) sent together, read in one wake-up; vhubd crashed: the
          VMM gets both answers or its connection closes -- never a carried
          session that lost GET_FEATURES (the turn's commit sees both: it
          carries neither).
restart-read-on-later
          the same with GET_FEATURES sent once the snapshot carrying
          GET_CONFIG is written (another wake-up): that snapshot must not stay
          the one a crash finds once GET_FEATURES is read.
unmapped  a VMM giving a ring addresses outside its memory table is closed,
          the back-end never gets them; the next VMM is served.
budget    what a VMM makes the daemon keep (its regions' dups) counts against
          its VM's uid's --max-fds-per-uid: a VMM of uid 65534's VM adding
          region after region is closed before the uid holds its budget,
          every fd it left is closed, the uid's control connection still
          answers and the next VMM is served.
budget-blocked
          the fd budget stops an ADD_MEM_REG behind REM_MEM_REGs a SIGSTOPped
          test back-end (no REPLY_ACK) does not read: the back-end, sent part
          of the VMM's new table, is declared lost and restored with it
          (before: nothing marked it lost; it held none of the VMM's regions).
"""

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import direct as vu                                # noqa: E402
from vhubtest import scenarios                                   # noqa: E402
from vhubtest.backends import QsdBackend, QsdNullBackend       # noqa: E402
from vhubtest.blk import BlkQueue, pattern                     # noqa: E402
from vhubtest.client import Client, RpcError                   # noqa: E402
from vhubtest.direct import BackendClosed, DirectFrontend      # noqa: E402
from vhubtest.frontdoor import ThroughVhubd                    # noqa: E402
from vhubtest.limits import UnprivAgent                        # noqa: E402
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.procs import fail_file_writes, wait_until        # noqa: E402
from vhubtest.servicemanager import eventfd_id                 # noqa: E402
from vhubtest.testbackend import AsyncCommand, TestBackend     # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run  # noqa: E402

E_STATE, E_PARAMS = -32004, -32602
# never offered to the VMM (docs/front-door.md): PAGEFAULT, XEN_MMAP, SHARED_OBJECT, GPA_ADDRESSES
MASKED = (1 << 8) | (1 << 17) | (1 << 18) | (1 << 21)
VERSION_1, PROTOCOL_FEATURES, BLK_F_MQ, BLK_F_FLUSH = 1 << 32, 1 << 30, 1 << 12, 1 << 9


def vhubctl(control):
    exe = os.environ.get("VHUBCTL")
    if not exe:
        raise TestFailure("VHUBCTL is not set to the vhubctl binary")

    def run_ctl(*args):
        p = subprocess.run([exe, "--socket", control] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=30)
        if p.returncode != 0:
            raise TestFailure("FAILED: vhubctl %s: exit %d: %s" % (" ".join(args), p.returncode, p.stderr.decode()))
        return p.stdout.decode()
    return run_ctl


def expect_code(code, fn, *args, what):
    try:
        fn(*args)
    except RpcError as e:
        check_eq(e.code, code, "%s answers" % what)
        return e
    raise TestFailure("FAILED: %s did not fail" % what)


def blk_image(d, size=16 << 20):
    return scenarios.sparse_image(os.path.join(d, "disk.img"), size)


def vmm_start(path, mem, queues, features=VERSION_1 | BLK_F_FLUSH, want=vu.SUPPORTED_PROTOCOL_FEATURES):
    """A VMM (the harness's front-end) on a front-door socket, its rings started."""
    fe = DirectFrontend.connect(path)
    fe.handshake(want)
    fe.setup(mem, features, [q.vq for q in queues])
    return fe


def scenario_rules(t):
    way = ThroughVhubd(t)
    c = way.client
    null = t.enter(QsdNullBackend([os.path.join(way.dir, "n0.sock"), os.path.join(way.dir, "n1.sock")],
                                  log_dir=way.dir))
    check("front-door" in c.call("daemon.info")["capabilities"], "daemon.info capabilities name front-door")
    path = way.socket(null.sockets[0], "blk0", "blk")
    d = way.device("blk0")
    check_eq((d["vmm_socket"], d["vmm"]), (path, "waiting"), "device.list vmm_socket, vmm")

    mem = GuestMemory(1 << 20)
    t.defer(mem.close)
    r = mem.regions[0]
    expect_code(E_STATE, c.call, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": r.size, "fd": 0}, [r.fd],
                what="vm.memory.add on a VM with a front-door device")
    expect_code(E_STATE, c.call, "vm.memory.remove", {"vm": "vm0", "gpa": 0},
                what="vm.memory.remove on a VM with a front-door device")
    expect_code(E_STATE, c.call, "vm.dirty_log.start", {"vm": "vm0"},
                what="vm.dirty_log.start on a VM with a front-door device")
    dev = {"vm": "vm0", "device": "blk0"}
    expect_code(E_STATE, c.call, "device.stop", dev, what="device.stop of a front-door device")
    expect_code(E_STATE, c.call, "device.reset", dev, what="device.reset of a front-door device")
    expect_code(E_STATE, c.call, "device.config.set", dict(dev, offset=32, data="AQ=="),
                what="device.config.set of a front-door device")
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(2)]
    for fd in efds:
        t.defer(os.close, fd)
    expect_code(E_STATE, c.call, "device.start",
                dict(dev, features=VERSION_1, vrings=[{"index": 0, "size": 8, "desc": 0, "avail": 4096,
                                                       "used": 8192, "kick": 0, "call": 1}]),
                efds, what="device.start of a front-door device")
    got = c.call("device.config.get", dict(dev, offset=0, size=8))
    check("data" in got, "device.config.get of a front-door device works (the capacity: %s)" % got["data"])

    # a VM with regions of its own cannot take a front-door device, and the reverse
    c.call("vm.create", {"vm": "vm1"})
    c.call("vm.memory.add", {"vm": "vm1", "gpa": 0, "size": r.size, "fd": 0}, [r.fd])
    expect_code(E_STATE, c.call, "device.add", {"vm": "vm1", "device": "blk1", "socket": null.sockets[1],
                                               "vmm_socket": True},
                what="device.add vmm_socket on a VM with vm.memory regions")
    long_vm = "v" * 64
    c.call("vm.create", {"vm": long_vm})
    expect_code(E_PARAMS, c.call, "device.add", {"vm": long_vm, "device": "d" * 64, "socket": null.sockets[1],
                                                "vmm_socket": True},
                what="a front-door socket path longer than a sockaddr_un holds")
    check_eq([x["device"] for x in c.call("device.list", {"vm": long_vm})["devices"]], [],
             "the refused device is not left behind")

    way.release("blk0")
    check(not os.path.exists(os.path.dirname(path)), "the VM's directory went with its last socket")

    # vhubctl: the orchestrator's way (a VM that outlives it, then the device)
    ctl = vhubctl(way.daemon.control)
    ctl("vm", "create", "orch", "--linger-ms", "600000")
    out = ctl("device", "add", "orch", "blk9", null.sockets[1], "--type", "blk", "--vmm-socket")
    shown = [line.split(None, 2)[-1] for line in out.splitlines() if line.startswith("vmm socket")]
    want = os.path.join(way.vmm_dir, str(os.getuid()), "orch", "blk9.sock")
    check_eq(shown, [want], "vhubctl device add --vmm-socket prints the socket")
    check(os.path.exists(want), "the socket outlives vhubctl (the VM lingers)")
    rows = [line.split() for line in ctl("device", "list", "orch").splitlines()]
    check_eq((rows[0][3], rows[1][3]), ("VMM", "waiting"), "vhubctl device list: the VMM column")
    one = ctl("device", "list", "orch", "blk9")
    check("vmm socket         %s" % want in one and "vmm                waiting" in one,
          "vhubctl device list VM DEVICE: vmm socket and vmm", one)
    with DirectFrontend.connect(want) as fe:
        fe.get_features()   # answered: the session is up
        check("vmm                connected" in ctl("device", "list", "orch", "blk9"),
              "vhubctl shows the VMM connected")


def scenario_io(t):
    way = ThroughVhubd(t)
    img = blk_image(way.dir)
    qsd = t.enter(QsdBackend(img, os.path.join(way.dir, "blk.sock"), num_queues=2, log_dir=way.dir))
    path = way.socket(qsd.socket, "blk0", "blk")
    added = way.device("blk0")
    mem = GuestMemory(4 << 20)
    t.defer(mem.close)
    q = [BlkQueue(mem, index=i, size=64) for i in range(2)]
    fe = DirectFrontend.connect(path)
    feats = fe.handshake()
    check_eq(feats, added["features"], "GET_FEATURES: what qemu-storage-daemon offered")
    check_eq(fe.protocol_offered, added["protocol_features"] & ~MASKED,
             "GET_PROTOCOL_FEATURES: the negotiated set without PAGEFAULT/XEN_MMAP/SHARED_OBJECT/GPA")
    check_eq(fe.queue_num, 2, "GET_QUEUE_NUM: the export's queues")
    way.wait_events("device.vmm_connected", 1, "blk0")
    fe.setup(mem, VERSION_1 | BLK_F_FLUSH | BLK_F_MQ, [x.vq for x in q])
    check_eq(way.device("blk0")["state"], "running", "device.list state once the VMM started its rings")
    for i in range(32):
        data = pattern(i * 8, 4096, salt=3)
        q[i % 2].write_sectors(i * 8, data)
        check(q[(i + 1) % 2].read_sectors(i * 8, 8) == data, "block %d written on ring %d, read on the other" % (i, i % 2)) \
            if i % 8 == 0 else q[(i + 1) % 2].read_sectors(i * 8, 8)
    with open(img, "rb") as f:
        disk = f.read(32 * 4096)
    check(disk == b"".join(pattern(i * 8, 4096, salt=3) for i in range(32)),
          "the image file holds the VMM's 32 blocks: its rings and memory reached the back-end as sent")
    bases = fe.stop_rings()
    check_eq(bases, {0: q[0].vq.avail_idx, 1: q[1].vq.avail_idx}, "GET_VRING_BASE relayed: each ring's next index")
    check_eq(way.device("blk0")["state"], "stopped", "device.list state once the VMM stopped its rings")
    fe.close()
    way.wait_events("device.vmm_disconnected", 1, "blk0")
    lost = way.wait_events("device.disconnected", 1, "blk0")[0]
    check("RESET_DEVICE" in lost["reason"], "the VMM left: a new connection for the next (%s)" % lost["reason"])
    way.wait_events("device.reconnected", 1, "blk0")
    # the next VMM starts from scratch on a clean back-end
    mem2 = GuestMemory(4 << 20)
    t.defer(mem2.close)
    q2 = [BlkQueue(mem2, index=0, size=64)]
    fe2 = vmm_start(path, mem2, q2)
    check(q2[0].read_sectors(0, 8) == pattern(0, 4096, salt=3), "the next VMM reads the first VMM's block")
    # SIGTERM with the VMM attached and its ring running: a clean exit
    # (0, no leak under ASan), the VMM sees its connection close
    check_eq(way.daemon.stop(), 0, "vhubd exit code on SIGTERM with a VMM attached")
    try:
        fe2.get_features()
        raise TestFailure("FAILED: the VMM's connection outlived vhubd")
    except (BackendClosed, OSError):
        log("ok: the VMM's connection closed with vhubd")
    check(not os.path.exists(path), "no front-door socket left behind")
    fe2.close()
    check_eq(qsd.stop(), 0, "qemu-storage-daemon exit code")


class Channel:
    """The VMM's end of its back-end channel: reads one request, answers it."""

    def __init__(self, fe):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fe.command(vu.SET_BACKEND_REQ_FD, b"", [b.fileno()])
        b.close()
        self.sock = a
        self.sock.settimeout(5)

    def serve(self, result=0):
        """The next back-end request: (request, flags, payload, fds); answered if asked."""
        msg, anc, _, _ = self.sock.recvmsg(4096 + 12, socket.CMSG_SPACE(8 * 4))
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack("%di" % (len(data) // 4), data[:len(data) // 4 * 4]))
        req, flags, size = struct.unpack("<III", msg[:12])
        if flags & 0x8:
            self.sock.sendall(struct.pack("<IIIQ", req, 1 | 0x4, 8, result))
        return req, flags, msg[12:12 + size], fds


def scenario_relay(t):
    way = ThroughVhubd(t, timeout_ms=1000)
    tb = t.enter(TestBackend([os.path.join(way.dir, "tb.sock")], log_dir=way.dir,
                             args=["--protocol-features", "0xdfe2b"]))   # + INBAND_NOTIFICATIONS
    path = way.socket(tb.socket, "blk0", "blk")
    mem = GuestMemory(4 << 20)
    t.defer(mem.close)
    q = [BlkQueue(mem, index=0, size=64)]
    channel_pf = sum(1 << b for b in (vu.PF_BACKEND_REQ, vu.PF_BACKEND_SEND_FD, vu.PF_HOST_NOTIFIER, 14))
    fe = vmm_start(path, mem, q, features=VERSION_1, want=vu.SUPPORTED_PROTOCOL_FEATURES | channel_pf)
    check_eq(fe.protocol_features & channel_pf, channel_pf,
             "the VMM negotiated BACKEND_REQ, BACKEND_SEND_FD, HOST_NOTIFIER, INBAND_NOTIFICATIONS")
    # without a channel: the back-end hears a failure, the VM's owner the event
    r = tb.config_change(need_reply=True)
    check_eq(r["reply"], 1, "CONFIG_CHANGE_MSG without a VMM channel: the back-end gets a failure")
    way.wait_events("device.config_changed", 1, "blk0")
    ch = Channel(fe)
    pending = AsyncCommand(tb, {"cmd": "config-change", "socket": 0, "need_reply": True})
    req, flags, _, _ = ch.serve(0)
    check_eq((req, bool(flags & 0x8)), (2, True), "CONFIG_CHANGE_MSG reached the VMM's channel with NEED_REPLY")
    check_eq(pending.result()["reply"], 0, "the VMM's answer went back to the back-end")
    way.wait_events("device.config_changed", 2, "blk0")
    pending = AsyncCommand(tb, {"cmd": "host-notifier", "socket": 0, "queue": 0, "fd": True, "need_reply": True})
    req, _, payload, fds = ch.serve(7)
    check_eq((req, len(fds), struct.unpack("<QQQ", payload)[1]), (3, 1, 4096),
             "VRING_HOST_NOTIFIER_MSG reached the VMM with its fd and area")
    check(os.fstat(fds[0]).st_size >= 4096, "the notifier's fd is the back-end's memfd")
    for fd in fds:
        os.close(fd)
    check_eq(pending.result()["reply"], 7, "the VMM's failure (7) went back to the back-end as it was")
    pending = AsyncCommand(tb, {"cmd": "vring-call", "socket": 0, "queue": 0, "need_reply": True})
    req, _, payload, _ = ch.serve(0)
    check_eq((req, struct.unpack("<II", payload)[0]), (4, 0), "in-band VRING_CALL relayed for ring 0")
    check_eq(pending.result()["reply"], 0, "its answer went back")
    # each relayed request was answered once: a second answer (the eventfd
    # fallback's as well as the VMM's) would arrive as "unexpected"
    time.sleep(0.2)
    chan = tb.conn()["chan"]
    check_eq((chan["sent"], chan["replies"], chan["unexpected"], chan["pending"]), (4, 4, 0, 0),
             "four requests with NEED_REPLY, four answers, none twice")
    # a VMM that does not answer: the back-end gets a failure at the deadline
    pending = AsyncCommand(tb, {"cmd": "config-change", "socket": 0, "need_reply": True})
    ch.sock.recv(4096)
    answer = pending.result(timeout=10)
    check_eq(answer.get("reply", answer), 1, "a VMM silent on its channel: the back-end's request fails")
    # RESET_DEVICE: the back-end stays connected when the VMM goes
    conns = tb.connections(0)
    fe.close()
    way.wait_events("device.vmm_disconnected", 1, "blk0")
    tb.wait_request("RESET_DEVICE", 1)
    time.sleep(0.3)
    check_eq((tb.connections(0), way.events("device.disconnected", "blk0")), (conns, []),
             "the VMM left: RESET_DEVICE, the back-end kept its connection")
    check_eq(tb.vrings(0)[0]["started"], False, "the back-end's ring was stopped")
    way.release("blk0")


TIMEOUT_MS = 1000


def scenario_outage(t):
    way = ThroughVhubd(t, timeout_ms=TIMEOUT_MS)
    img = blk_image(way.dir)
    tb = t.enter(TestBackend([os.path.join(way.dir, "tb.sock")], log_dir=way.dir,
                             args=["--disk", img, "--disk-size", str(16 << 20), "--queues", "1"]))
    path = way.socket(tb.socket, "blk0", "blk")
    mem = GuestMemory(4 << 20)
    t.defer(mem.close)
    q = BlkQueue(mem, index=0, size=64)
    fe = vmm_start(path, mem, [q], features=VERSION_1 | BLK_F_FLUSH,
                   want=vu.SUPPORTED_PROTOCOL_FEATURES | (1 << vu.PF_INFLIGHT_SHMFD))
    for i in range(8):
        q.write_sectors(i * 8, pattern(i * 8, 4096))
    used = q.vq.used_idx
    tb.kill()   # not restarted yet
    way.wait_events("device.disconnected", 1, "blk0")
    t0 = time.monotonic()
    base = fe.get_vring_base(0)
    took = time.monotonic() - t0
    check(took <= TIMEOUT_MS / 1000.0 + 0.5,
          "GET_VRING_BASE with the back-end gone answered in %.2fs (--backend-timeout-ms %d)" % (took, TIMEOUT_MS))
    check_eq(base, used, "its base: the used index in guest memory")
    t0 = time.monotonic()
    fe.set_vring_num(0, 64)
    fe.set_vring_base(0, base)
    check(time.monotonic() - t0 < 0.5, "once a deadline ran out, the outage's next requests are answered at once")
    check_eq(fe.get_features(), way.device("blk0")["features"], "GET_FEATURES answered from the device's state")
    # the ring starts again in the records: the restore replays it
    fe.set_vring_kick(0, q.vq.kick_fd)
    tb.start()
    ev = way.wait_events("device.reconnected", 1, "blk0")[0]
    check_eq([v["index"] for v in ev["vrings"]], [0], "restored: the VMM's ring replayed (%s)" % ev["vrings"])
    for i in range(8, 16):
        q.write_sectors(i * 8, pattern(i * 8, 4096))
    check(q.read_sectors(0, 8) == pattern(0, 4096), "I/O goes on after the restore, data intact")
    check_eq(way.events("device.vmm_disconnected", "blk0"), [], "the VMM's connection stayed up")
    # no honest answer: GET_INFLIGHT_FD with the back-end gone closes the VMM
    tb.kill()
    way.wait_events("device.disconnected", 2, "blk0")
    fe.send(vu.GET_INFLIGHT_FD, struct.pack("<QQHHI", 0, 0, 1, 64, 0))
    t0 = time.monotonic()
    try:
        fe.recv_reply(vu.GET_INFLIGHT_FD)
        raise TestFailure("FAILED: GET_INFLIGHT_FD answered with the back-end gone")
    except BackendClosed:
        pass
    check(time.monotonic() - t0 <= TIMEOUT_MS / 1000.0 + 0.5,
          "GET_INFLIGHT_FD without the back-end: vhubd closed the VMM's connection in %.2fs"
          % (time.monotonic() - t0))
    way.wait_events("device.vmm_disconnected", 1, "blk0")
    fe.close()
    tb.start()
    way.wait_events("device.reconnected", 2, "blk0")
    way.release("blk0")


def scenario_lifetime(t):
    way = ThroughVhubd(t, vm="held", linger_ms=400)
    null = t.enter(QsdNullBackend([os.path.join(way.dir, "n0.sock")], log_dir=way.dir))
    path = way.socket(null.sockets[0], "blk0", "blk")
    fe = DirectFrontend.connect(path)
    fe.handshake()
    way.wait_events("device.vmm_connected", 1, "blk0")
    other = way.daemon.client()
    way.client.close()      # the owner goes: the VM would linger 400 ms
    time.sleep(1.0)
    vms = other.call("vm.list")["vms"]
    check_eq([v["vm"] for v in vms], ["held"], "a connected VMM holds the VM beyond linger_ms")
    check("linger_remaining_ms" not in vms[0], "it is not counting down: %s" % vms[0])
    fe.close()
    time.sleep(0.15)
    vms = other.call("vm.list")["vms"]
    check(vms and "linger_remaining_ms" in vms[0], "its VMM left: the VM lingers again (%s)" % vms)
    deadline = time.monotonic() + 5
    while other.call("vm.list")["vms"] and time.monotonic() < deadline:
        time.sleep(0.05)
    check_eq(other.call("vm.list")["vms"], [], "linger_ms after the VMM left, the VM is gone")
    check(not os.path.exists(path), "with its front-door socket")


def wait_event(c, name, timeout=10.0):
    found = []

    def seen():
        found.extend(e for e in c.events() if e.get("event") == name)
        return found
    wait_until(seen, timeout, what=name)
    return found[0]


def device_of(c, vm_name):
    return [x for x in c.call("device.list", {"vm": vm_name})["devices"] if x["device"] == "blk0"][0]


def vmm_writes(t, path, salt):
    """A VMM started on path with one ring, its 8 blocks of `salt` written."""
    mem = GuestMemory(4 << 20)
    t.defer(mem.close)
    q = BlkQueue(mem, index=0, size=64)
    fe = vmm_start(path, mem, [q])
    for i in range(8):
        q.write_sectors((salt * 8 + i) * 8, pattern((salt * 8 + i) * 8, 4096, salt=salt))
    return fe, q


AT_REST = b"the VM's snapshot carries the VMM's session (at rest)"


def at_rest_count(m):
    with open(m.sm.log_path, "rb") as f:
        return f.read().count(AT_REST)


def wait_at_rest(m, before):
    """Until the VMM's session, idle after its last request, is in a
    snapshot written since `before` (the daemon waits 20 ms of rest first;
    under load longer): a crash then carries it."""
    wait_until(lambda: at_rest_count(m) > before, 10.0, what="a snapshot carrying the idle VMM's session")
    time.sleep(0.05)    # its write, right after the line


def carried_vmm_goes_on(fe, q, salt, what):
    """The carried session answers on the same connection, and its ring
    reads back the 8 blocks of `salt` and writes 8 more."""
    features = fe.get_features()
    check(features & (1 << 32), "the carried session answers GET_FEATURES on the same connection (0x%x)" % features)
    for i in range(8):
        k = salt * 8 + i
        check(q.read_sectors(k * 8, 8) == pattern(k * 8, 4096, salt=salt),
              "block %d, written before the %s, read back on the same ring after it" % (k, what))
        q.write_sectors((k + 16) * 8, pattern((k + 16) * 8, 4096, salt=salt))


def restart_carried(t, m, c, path, vm_name, sig, salt, qsd=None):
    """A VMM on path writes 8 blocks, vhubd is restarted with sig while the
    VMM is idle (its session at rest): the session is carried -- the same
    connection goes on with the same rings, reads those blocks back and
    writes 8 more, and nothing says it left.  With qsd: the back-end is then
    lost and comes back -- GET_CONFIG answered meanwhile from the carried
    records, the ring restored from them."""
    fe, q = vmm_writes(t, path, salt)
    rested = at_rest_count(m)
    config = fe.get_config(0, 8)
    wait_at_rest(m, rested)
    c.events()
    code = m.restart(sig=sig)
    check_eq(code, 0 if sig == signal.SIGTERM else -signal.SIGKILL, "the old vhubd's exit")
    carried_vmm_goes_on(fe, q, salt, "restart")
    seen = [e.get("event") for e in c.events()]
    wait_until(lambda: seen.extend(e.get("event") for e in c.events()) or "daemon.restarted" in seen, 5.0,
               what="daemon.restarted on the control connection")
    check_eq(seen[0], "daemon.restarted", "the first message after the restart")
    check("device.vmm_disconnected" not in seen and "device.reconnected" not in seen,
          "nothing says the VMM left or the back-end was renewed: %s" % seen)
    dev = device_of(c, vm_name)
    check_eq((dev["vmm_socket"], dev["vmm"], dev["state"]), (path, "connected", "running"),
             "device.list after the restart: the same VMM, still running")
    log("ok: the VMM's session was carried across the %s (events: %s)"
        % ("planned restart" if sig == signal.SIGTERM else "crash", seen))
    if qsd:
        qsd.kill()
        check_eq(fe.get_config(0, 8), config, "GET_CONFIG during an outage after the restart: the answer "
                 "kept before it")
        qsd.start()
        ev = wait_event(c, "device.reconnected")
        check(ev["vrings"] and ev["vrings"][0]["index"] == 0, "the back-end restored with the VMM's carried "
              "ring: %s" % ev)
        for i in range(8):
            k = salt * 8 + i
            check(q.read_sectors((k + 16) * 8, 8) == pattern((k + 16) * 8, 4096, salt=salt),
                  "block %d read back through the restored ring" % (k + 16))
    fe.close()
    wait_until(lambda: device_of(c, vm_name)["vmm"] == "waiting", 5.0, what="the carried VMM's leaving to be seen")


IN_FLIGHT_CARRIED = b"GET_CONFIG in flight: the VM's snapshot carries it"


def restart_carried_busy(t, m, c, path, vm_name, qsd, salt):
    """A crash while a VMM's GET_CONFIG is in flight (its back-end stopped,
    the request relayed and unanswered), once the VM's snapshot says it
    carries it: the next process adopts the VMM's connection, restores the
    back-end as lost and handles GET_CONFIG again -- the VMM gets one answer,
    the right one, on the same connection, nothing says it left, and its
    ring goes on (blocks read back, more written)."""
    fe, q = vmm_writes(t, path, salt)
    config = fe.get_config(0, 8)
    wait_at_rest(m, at_rest_count(m))
    with open(m.sm.log_path, "rb") as f:
        carried0 = f.read().count(IN_FLIGHT_CARRIED)
    c.events()
    os.kill(qsd.pid, signal.SIGSTOP)
    try:
        fe.send(vu.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))

        def carried():
            with open(m.sm.log_path, "rb") as f:
                return f.read().count(IN_FLIGHT_CARRIED) > carried0
        wait_until(carried, 10.0, what="vhubd's snapshot carrying the VMM's GET_CONFIG in flight")
        check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    finally:
        os.kill(qsd.pid, signal.SIGCONT)
    fe.sock.settimeout(10)
    r = fe.recv_reply(vu.GET_CONFIG)
    check_eq(r[12:], config, "GET_CONFIG, in flight at the crash, answered once by the next process, on the "
             "same connection, with the back-end's config")
    carried_vmm_goes_on(fe, q, salt, "crash")
    seen = []

    def restored():
        seen.extend(e.get("event") for e in c.events())
        return "device.reconnected" in seen
    wait_until(restored, 10.0, what="the back-end restored after the crash")
    check("device.vmm_disconnected" not in seen, "nothing says the VMM left: %s" % seen)
    dev = device_of(c, vm_name)
    check_eq((dev["vmm_socket"], dev["vmm"], dev["state"]), (path, "connected", "running"),
             "device.list after the crash: the same VMM, running")
    log("ok: a GET_CONFIG in flight carried across a crash (events: %s)" % seen)
    fe.close()
    wait_until(lambda: device_of(c, vm_name)["vmm"] == "waiting", 5.0, what="the carried VMM's leaving to be seen")


def restart_in_flight(t, m, c, path, vm_name, qsd, hvmm, salt, disk):
    """A crash while a VMM's request that cannot be carried is in flight
    (SET_CONFIG, its back-end stopped) and while another VMM's message is
    half-read: neither session is carried -- both connections close, device.vmm_disconnected
    says so, the back-end is renewed -- and the socket is there again at the
    same path: the next VMM reads what the first wrote and writes on."""
    fe, q = vmm_writes(t, path, salt)
    time.sleep(0.1)
    c.events()
    os.kill(qsd.pid, signal.SIGSTOP)
    try:
        # SET_CONFIG (NEED_REPLY), relayed to a back-end that does not
        # answer -- a request a crash does not carry: its effect is the
        # back-end's own, which no record replays (GET_CONFIG would be
        # carried); and half of GET_FEATURES' header from the other VMM
        fe.sock.sendall(struct.pack("<III", 25, 1 | 8, 20) + struct.pack("<III", 0, 8, 0) + bytes(8))
        hvmm.sock.sendall(struct.pack("<III", 1, 1, 0)[:6])
        time.sleep(0.3)
        check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    finally:
        os.kill(qsd.pid, signal.SIGCONT)
    for who, vmm in (("the VMM with a request in flight", fe), ("the VMM with half a message read", hvmm)):
        vmm.sock.settimeout(5)
        try:
            got = vmm.sock.recv(4096)
        except OSError:
            got = b""
        check_eq(got, b"", "%s sees its connection close at the crash" % who)
        vmm.close()
    seen = []

    def renewed():
        seen.extend(e.get("event") for e in c.events())
        return seen.count("device.vmm_disconnected") >= 1 and "device.reconnected" in seen
    wait_until(renewed, 10.0, what="device.vmm_disconnected and the back-end renewed after the crash")
    check_eq(seen[0], "daemon.restarted", "the first message after the restart")
    log("ok: events after the crash: %s" % seen)
    dev = device_of(c, vm_name)
    check_eq((dev["vmm_socket"], dev["vmm"], dev["state"]), (path, "waiting", "ready"),
             "device.list after the crash: the same socket, waiting for the next VMM")
    # the next VMM: a new session from scratch on the same socket
    mem2 = GuestMemory(4 << 20)
    t.defer(mem2.close)
    q2 = BlkQueue(mem2, index=0, size=64)
    fe2 = vmm_start(path, mem2, [q2])
    check(q2.read_sectors(salt * 64, 8) == pattern(salt * 64, 4096, salt=salt),
          "the next VMM reads what the first wrote before the crash")
    q2.write_sectors(disk - 8, pattern(disk - 8, 4096, salt=salt))
    fe2.close()


def restart_half_read(t, m, c, path, vm_name):
    """A planned restart while vhubd holds half of a VMM's message: the
    session is not at rest, so it is not carried -- the VMM's connection
    closes, device.vmm_disconnected says so -- and the next VMM is served."""
    mem = GuestMemory(4 << 20)
    t.defer(mem.close)
    q = BlkQueue(mem, index=0, size=64)
    fe = vmm_start(path, mem, [q])
    c.events()
    # GET_FEATURES' header, cut after 6 of its 12 bytes: vhubd reads them and waits
    fe.sock.sendall(struct.pack("<III", 1, 1, 0)[:6])
    time.sleep(0.2)
    check_eq(m.restart(sig=signal.SIGTERM), 0, "the old vhubd's exit")
    fe.sock.settimeout(5)
    try:
        got = fe.sock.recv(64)
    except OSError:
        got = b""
    check_eq(got, b"", "the VMM whose message was half-read sees its connection close")
    fe.close()
    seen = []

    def left():
        seen.extend(e.get("event") for e in c.events())
        return "device.vmm_disconnected" in seen
    wait_until(left, 10.0, what="device.vmm_disconnected after a planned restart that could not carry the VMM")
    mem2 = GuestMemory(4 << 20)
    t.defer(mem2.close)
    fe2 = vmm_start(path, mem2, [])
    fe2.get_features()
    fe2.close()
    log("ok: a half-read message at a planned restart: the VMM's connection closed, the next one served")


GET_CONFIG_REPLY = 12 + 12 + 8     # a header, then the config payload's head and 8 bytes
GET_CONFIG_8 = struct.pack("<III", vu.GET_CONFIG, 1, 20) + struct.pack("<III", 0, 8, 0) + bytes(8)


def carry_rig(t, backend_timeout_ms=5000):
    """vhubd under a service manager (--vmm-dir <d>/vmm), VM vm0 with blk0 on
    qemu-storage-daemon (the image <d>/disk.img) behind a front-door socket:
    (managed, qsd, client, socket path, d)."""
    from test_restart import Managed
    d = t.tmpdir()
    os.chmod(d, 0o755)
    vmm_dir = os.path.join(d, "vmm")
    m = Managed(t, d, extra=["--vmm-dir", vmm_dir, "--log-level", "debug", "--backend-timeout-ms",
                             str(backend_timeout_ms)])
    img = blk_image(d)
    qsd = t.enter(QsdBackend(img, m.socket("blk.sock"), num_queues=1, log_dir=d))
    c = t.enter(Client(m.control, timeout=10))
    c.call("vm.create", {"vm": "vm0"})
    path = c.call("device.add", {"vm": "vm0", "device": "blk0", "socket": qsd.socket, "type": "blk",
                                 "vmm_socket": True})["vmm_socket"]
    return m, qsd, c, path, d


def send_carried(m, fe, data):
    """The VMM sends data, GET_CONFIG first (its back-end stopped: in
    flight), until vhubd's log says the VM's snapshot carries it."""
    with open(m.sm.log_path, "rb") as f:
        carried0 = f.read().count(IN_FLIGHT_CARRIED)
    fe.sock.sendall(data)

    def carried():
        with open(m.sm.log_path, "rb") as f:
            return f.read().count(IN_FLIGHT_CARRIED) > carried0
    wait_until(carried, 10.0, what="vhubd's snapshot carrying the VMM's GET_CONFIG in flight")


def recv_until(fe, want, timeout):
    """What the VMM receives until `want` bytes, its connection's end or
    `timeout`: (bytes, closed)."""
    got, end = b"", time.monotonic() + timeout
    while len(got) < want:
        left = end - time.monotonic()
        if left <= 0:
            return got, False
        fe.sock.settimeout(left)
        try:
            b = fe.sock.recv(4096)
        except socket.timeout:
            return got, False
        except OSError:
            return got, True
        if not b:
            return got, True
        got += b
    return got, False


def next_vmm_reads_then_stop(t, m, c, path, salt):
    """After a crash whose session was not taken back: the device waits for
    the next VMM (not failed), which connects to path and reads the 8 blocks
    of `salt` the first one wrote; no fd-store group was left holding an fd
    closed before it left (the store would keep a stale stash).  Then the
    device is removed and the unit stopped."""
    wait_until(lambda: device_of(c, "vm0")["vmm"] == "waiting", 10.0,
               what="the device to wait for the next VMM after the crash (not failed)")
    mem2 = GuestMemory(4 << 20)
    t.defer(mem2.close)
    q2 = BlkQueue(mem2, index=0, size=64)
    fe2 = vmm_start(path, mem2, [q2])
    for i in range(8):
        k = salt * 8 + i
        check(q2.read_sectors(k * 8, 8) == pattern(k * 8, 4096, salt=salt),
              "block %d, written by the first VMM, read by the next one after the crash" % k)
    fe2.close()
    check_eq(m.sm.stale_member_lines(), [], "no fd-store group stored with an fd closed before it left")
    c.call("device.remove", {"vm": "vm0", "device": "blk0"})
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def idle_vmm_carried(t, salt):
    """carry_rig() with a VMM that wrote the 8 blocks of `salt`, idle, its
    session carried by a stored snapshot: (managed, qsd, client, path, vmm)."""
    m, qsd, c, path, _ = carry_rig(t)
    fe, _ = vmm_writes(t, path, salt)
    fe.get_config(0, 8)
    wait_at_rest(m, at_rest_count(m))
    return m, qsd, c, path, fe


def scenario_restart_write_fail(t):
    """A request a snapshot carries is never answered while that snapshot
    may be the newest stored one: a crash would hand it to the next process,
    which answers it again.  Here the write that drops it fails (every
    write: vhubd's RLIMIT_FSIZE is 0, its pwrite() gets EFBIG; SIGXFSZ is
    ignored) as the back-end answers: the VMM's connection is closed
    instead, and the crash that follows answers nothing either."""
    salt = 3
    m, qsd, c, path, fe = idle_vmm_carried(t, salt)
    pid = m.sm.pid
    os.kill(qsd.pid, signal.SIGSTOP)
    try:
        send_carried(m, fe, GET_CONFIG_8)
        time.sleep(0.05)    # its write, right after the line
        # from here every snapshot write fails (and every log line: the
        # log is a file too); the stored snapshot is the one carrying GET_CONFIG
        fail_file_writes(pid)
    finally:
        os.kill(qsd.pid, signal.SIGCONT)
    got, closed = recv_until(fe, GET_CONFIG_REPLY, 10.0)
    log("before the crash the VMM received %d bytes%s" % (len(got), ", then its connection closed" if closed else ""))
    check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit (every write still failing)")
    if not closed:
        more, closed = recv_until(fe, 2 * GET_CONFIG_REPLY - len(got), 10.0)
        got += more
    check(len(got) < 2 * GET_CONFIG_REPLY, "GET_CONFIG answered twice: by the old vhubd, though its snapshot "
          "still carried the request, and by the next process after the crash (%d bytes)" % len(got))
    check_eq((got, closed), (b"", True), "the VMM's connection closed without an answer: its answer could not "
             "be sent once a failed write left the snapshot carrying it the newest")
    fe.close()
    next_vmm_reads_then_stop(t, m, c, path, salt)
    log("ok: a failed write left the carried request unanswered, the VMM's connection closed; not answered twice")


GET_VRING_BASE_0 = struct.pack("<III", vu.GET_VRING_BASE, 1, 8) + struct.pack("<II", 0, 0)
VRING_BASE_REPLY = 12 + 8


def vm_snapshot_writes(m):
    with open(m.sm.log_path, "rb") as f:
        return len(re.findall(rb"snapshot s[0-9]+ written: ", f.read()))


def scenario_restart_busy_fail(t):
    """A VMM's request for the back-end goes out only once a stored snapshot
    says its device is busy (restart.md, the turn's commit).  When that
    write fails, nothing is sent -- and the VMM must not get an answer made
    from the daemon's records instead, as in an outage: the back-end is
    connected and never got the request.  (Before: GET_VRING_BASE answered
    from guest memory, the VMM told ring 0 stopped while qemu-storage-daemon
    ran it on.)  Its connection closes instead, as for any write the front
    door cannot make (restart-write-fail)."""
    salt = 6
    m, _, c, path, fe = idle_vmm_carried(t, salt)
    pid = m.sm.pid
    # half a message: the snapshot carrying the idle session is replaced
    # before it is read (that write still works), and none carries a
    # session with half a message read -- so the rest is read with every
    # write failing, and the failed write is the busy one's
    writes0 = vm_snapshot_writes(m)
    fe.sock.sendall(GET_VRING_BASE_0[:4])
    wait_until(lambda: vm_snapshot_writes(m) > writes0, 10.0,
               what="the snapshot carrying the idle session replaced before the VMM's bytes are read")
    fail_file_writes(pid)
    fe.sock.sendall(GET_VRING_BASE_0[4:])
    got, closed = recv_until(fe, VRING_BASE_REPLY, 10.0)
    log("GET_VRING_BASE with every snapshot write failing: the VMM received %d bytes%s" %
        (len(got), ", then its connection closed" if closed else ""))
    check_eq((got, closed), (b"", True), "the VMM's connection closed without an answer: the back-end never got "
             "its GET_VRING_BASE (the snapshot could not say the device busy), so no answer from the records")
    check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit (every write still failing)")
    fe.close()
    next_vmm_reads_then_stop(t, m, c, path, salt)
    log("ok: a request the snapshot could not call in flight: not sent, not answered, the VMM's connection closed")


def scenario_restart_conn_gone(t):
    """A crash carries the VMM's session (at rest), but the store no longer
    holds its connection: the manager is made to drop it from the front
    door's stash between the two processes, as a failed snapshot write that
    closed the connection and a compaction of the stash before the crash
    leave it (the race frontdoor-restart-write-fail lost under ASan).  The
    next process cannot take the session back: what it claimed of the group
    leaves it as it closes, and the earlier run's socket is made anew, so
    the next VMM connects and reads what the first one wrote.  Before, the
    claimed fds closed still members of the group: the manager kept the old
    listener, its name stayed "in use" and the device failed."""
    m, qsd, c, path, _ = carry_rig(t)
    salt = 5
    fe, q = vmm_writes(t, path, salt)
    fe.get_config(0, 8)
    wait_at_rest(m, at_rest_count(m))
    groups = [n for n in m.sm.names() if n.startswith("f")]
    check_eq(len(groups), 1, "one front-door group in the store (%s)" % groups)

    def vmm_conn(fd):
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            return False        # a directory or the socket's O_PATH inode
        try:
            # accepted on the socket vhubd bound (by a /proc/self/fd path):
            # its name ends as path does; the listener accepts, a channel has none
            return (s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0 and
                    isinstance(s.getsockname(), str) and s.getsockname().endswith("/" + os.path.basename(path)))
        finally:
            s.close()
    dropped = []
    check_eq(m.restart(sig=signal.SIGKILL, before_start=lambda: dropped.append(m.sm.stash_drop(groups[0], vmm_conn))),
             -signal.SIGKILL, "the old vhubd's exit")
    check_eq(dropped, [1], "the VMM's connection dropped from the stash")
    got, closed = recv_until(fe, 1, 10.0)
    check_eq((got, closed), (b"", True), "the VMM's connection, not taken back, closed")
    fe.close()
    next_vmm_reads_then_stop(t, m, c, path, salt)
    log("ok: a session the store could not give back whole: its socket made again, the next VMM served")


def scenario_restart_ring_gone(t):
    """A crash carries the VMM's session (at rest), but the store gives its
    ring back only in part: the manager drops the ring's call eventfd from
    the stored groups between the two processes.  The next process cannot
    carry the session: the ring's fds it did claim leave the group as they
    close, the VMM's connection closes (the fallback, docs/restart.md), the
    next VMM reads what the first one wrote, and the store holds exactly
    the live fds.  Before, the claimed kick closed still a member of the
    device's group (or leaked, the device's own copy)."""
    from test_restart_claims import store_matches_daemon
    m, qsd, c, path, _ = carry_rig(t)
    salt = 6
    fe, q = vmm_writes(t, path, salt)
    fe.get_config(0, 8)
    wait_at_rest(m, at_rest_count(m))
    call = eventfd_id(q.vq.call_fd)
    dropped = {}

    def drop_call():
        dropped.update(m.sm.stash_drop_groups(lambda fd: eventfd_id(fd) == call, kinds="dvf"))

    check_eq(m.restart(sig=signal.SIGKILL, before_start=drop_call), -signal.SIGKILL, "the old vhubd's exit")
    check(dropped, "the VMM's ring's call eventfd dropped from the store", dropped)
    got, closed = recv_until(fe, 1, 10.0)
    check_eq((got, closed), (b"", True), "the VMM's connection, its session not taken back, closed")
    fe.close()
    wait_until(lambda: device_of(c, "vm0")["vmm"] == "waiting", 10.0,
               what="the device to wait for the next VMM after the crash (not failed: %s)" % device_of(c, "vm0"))
    store_matches_daemon(m, "after the crash")
    check_eq(m.restart(sig=signal.SIGTERM), 0, "a second restart (planned): the old vhubd's exit")
    store_matches_daemon(m, "after a second restart")
    next_vmm_reads_then_stop(t, m, c, path, salt)
    log("ok: a carried ring the store could not give back whole: the session fell back, the group consistent")


READ_FEATURES = b"VMM request GET_FEATURES (answer due)"


def scenario_restart_read_on(t, later=False):
    """Two requests: GET_CONFIG, which a crash carries (relayed to a stopped
    back-end, in flight), then GET_FEATURES, which it does not (it waits
    behind GET_CONFIG).  Sent at once they are read in one wake-up, and the
    turn's commit (the one GET_CONFIG's op waits for) sees both: it must not
    carry the session.  Sent later (`later`), GET_FEATURES comes once the
    snapshot carrying GET_CONFIG at the stream's place after it is written:
    reading GET_FEATURES must replace that first, or a crash hands the next
    process a session whose GET_FEATURES is gone -- the VMM then waits for
    its answer forever.  Crashed there: the VMM gets both answers, in
    order, or its connection closes."""
    m, qsd, c, path, _ = carry_rig(t)
    salt = 4
    fe, q = vmm_writes(t, path, salt)
    config = fe.get_config(0, 8)
    features = fe.get_features()
    wait_at_rest(m, at_rest_count(m))
    os.kill(qsd.pid, signal.SIGSTOP)
    try:
        with open(m.sm.log_path, "rb") as f:
            read0 = f.read().count(READ_FEATURES)
        if later:
            send_carried(m, fe, GET_CONFIG_8)
            fe.sock.sendall(struct.pack("<III", vu.GET_FEATURES, 1, 0))
        else:
            fe.sock.sendall(GET_CONFIG_8 + struct.pack("<III", vu.GET_FEATURES, 1, 0))
        wait_until(lambda: open(m.sm.log_path, "rb").read().count(READ_FEATURES) > read0, 10.0,
                   what="vhubd reading GET_FEATURES")
        time.sleep(0.1)
        check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    finally:
        os.kill(qsd.pid, signal.SIGCONT)
    want = GET_CONFIG_REPLY + 12 + 8
    got, closed = recv_until(fe, want, 10.0)
    log("after the crash the VMM received %d bytes%s" % (len(got), ", then its connection closed" if closed else ""))
    if closed:
        check_eq(got, b"", "a connection closed at the crash answered nothing first")
        mem2 = GuestMemory(4 << 20)
        t.defer(mem2.close)
        q2 = BlkQueue(mem2, index=0, size=64)
        wait_until(lambda: device_of(c, "vm0")["vmm"] == "waiting", 10.0,
                   what="the device to wait for the next VMM after the crash")
        fe2 = vmm_start(path, mem2, [q2])
        check(q2.read_sectors(salt * 64, 8) == pattern(salt * 64, 4096, salt=salt),
              "the next VMM reads what the first wrote before the crash")
        fe2.close()
    else:
        check_eq(len(got), want, "GET_CONFIG and GET_FEATURES, both in flight at the crash, both answered "
                 "(GET_FEATURES was read after the snapshot carrying the session was written)")
        check_eq(got[:12 + 12], struct.pack("<III", vu.GET_CONFIG, 1 | 4, 20) + struct.pack("<III", 0, 8, 0),
                 "GET_CONFIG's reply first")
        check_eq(got[12 + 12:GET_CONFIG_REPLY], config, "GET_CONFIG's reply: the back-end's config")
        check_eq(struct.unpack("<IIIQ", got[GET_CONFIG_REPLY:]), (vu.GET_FEATURES, 1 | 4, 8, features),
                 "GET_FEATURES' reply")
        carried_vmm_goes_on(fe, q, salt, "crash")
    fe.close()
    c.call("device.remove", {"vm": "vm0", "device": "blk0"})
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def held_vms(c):
    return {v["vm"]: v for v in c.call("vm.list")["vms"]}


def scenario_restart(t):
    m, qsd, c, path, d = carry_rig(t, backend_timeout_ms=1000)
    img = os.path.join(d, "disk.img")
    null = t.enter(QsdNullBackend([m.socket("n0.sock")], log_dir=d))
    check_eq(path, os.path.join(d, "vmm", str(os.getuid()), "vm0", "blk0.sock"), "the front-door socket")
    # an orchestrator's VM: created, its device added, its owner gone -- its VMM holds it
    c2 = Client(m.control, timeout=10)
    c2.call("vm.create", {"vm": "held", "linger_ms": 1500})
    held = c2.call("device.add", {"vm": "held", "device": "blk0", "socket": null.sockets[0], "type": "blk",
                                  "vmm_socket": True})["vmm_socket"]
    c2.close()
    hvmm = DirectFrontend.connect(held)
    hvmm.handshake()
    time.sleep(2.0)
    check_eq([v for v in held_vms(c) if v == "held"], ["held"], "a VM held by its VMM past linger_ms")
    disk = 16 << 20 >> 9
    for salt, sig in ((1, signal.SIGTERM), (2, signal.SIGKILL)):
        restart_carried(t, m, c, path, "vm0", sig, salt, qsd=qsd if sig == signal.SIGTERM else None)
        time.sleep(2.0)
        vms = held_vms(c)
        check("held" in vms and "linger_remaining_ms" not in vms["held"],
              "the VM its carried VMM holds does not linger after the %s (%s)"
              % (signal.Signals(sig).name, vms.get("held")))
        hvmm.get_features()
    restart_carried_busy(t, m, c, path, "vm0", qsd, 6)            # blocks 48-55, then 64-71
    hvmm.get_features()
    restart_in_flight(t, m, c, path, "vm0", qsd, hvmm, 5, disk)   # blocks 40-47: after 1's and 2's
    # its VMM's session did not survive: the VM lingers from the crash, and goes
    vms = held_vms(c)
    check("held" in vms and "linger_remaining_ms" in vms["held"],
          "the VM its VMM held lingers from the crash (%s)" % vms.get("held"))
    wait_until(lambda: "held" not in held_vms(c), 5.0, what="the VM its VMM held to go after linger_ms")
    check(not os.path.exists(held), "the VM its VMM held went after linger_ms, its socket with it")
    restart_half_read(t, m, c, path, "vm0")
    with open(img, "rb") as f:
        data = f.read()
    for salt in (1, 2, 5, 6):
        want = b"".join(pattern((salt * 8 + i) * 8, 4096, salt=salt) for i in range(8))
        check(data[salt * 64 * 512:salt * 64 * 512 + len(want)] == want,
              "the image holds the blocks written before restart %d" % salt)
    for salt in (1, 2, 6):
        after = b"".join(pattern((salt * 8 + i + 16) * 8, 4096, salt=salt) for i in range(8))
        check(data[(salt * 8 + 16) * 8 * 512:(salt * 8 + 16) * 8 * 512 + len(after)] == after,
              "the image holds the blocks the carried VMM wrote after restart %d" % salt)
    check(data[(disk - 8) * 512:disk * 512] == pattern(disk - 8, 4096, salt=5),
          "the image holds the block the next VMM wrote after the crash")
    c.call("device.remove", {"vm": "vm0", "device": "blk0"})
    check(not os.path.exists(path), "device.remove removes the socket")
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def scenario_unmapped(t):
    """A VMM that gives a ring addresses outside its memory table (QEMU 7.2
    does, restarting a disk on a connection it never set up again:
    docs/front-door.md, "Not done") is closed, the reason in vhubd's log;
    qemu-storage-daemon never gets the addresses (libvhost-user would drop
    its connection: "Invalid vring_addr message"), and the next VMM is
    served with data."""
    way = ThroughVhubd(t)
    img = blk_image(way.dir)
    qsd = t.enter(QsdBackend(img, os.path.join(way.dir, "blk.sock"), num_queues=1, log_dir=way.dir))
    path = way.socket(qsd.socket, "blk0", "blk")
    mem = GuestMemory(1 << 20)
    t.defer(mem.close)
    fe = DirectFrontend.connect(path)
    fe.handshake()
    fe.set_features(VERSION_1 | BLK_F_FLUSH | PROTOCOL_FEATURES)
    fe.set_memory(mem)
    fe.set_vring_num(0, 64)
    fe.set_vring_base(0, 0)
    outside = mem.regions[0].uaddr + mem.regions[0].size + (1 << 30)
    try:
        fe.set_vring_addr(0, outside, outside + 0x1000, outside + 0x800)
        raise TestFailure("FAILED: vhubd took ring addresses outside the VMM's memory table")
    except BackendClosed:
        log("ok: ring addresses outside the VMM's memory table: vhubd closed the VMM")
    fe.close()
    way.wait_events("device.vmm_disconnected", 1, "blk0", timeout=10)
    with open(way.daemon.log_path) as f:
        why = [line for line in f if "closing the VMM's connection" in line and "SET_VRING_ADDR" in line]
    check(why, "vhubd's log says why it closed the VMM")
    log("vhubd: %s" % why[0].strip())
    with open(qsd.log_path, errors="replace") as f:
        panics = [line for line in f if "vu_panic" in line]
    check_eq(panics, [], "qemu-storage-daemon never got the addresses")
    # the next VMM on the same socket: its ring reaches the back-end
    mem2 = GuestMemory(4 << 20)
    t.defer(mem2.close)
    q = BlkQueue(mem2, index=0, size=64)
    fe2 = vmm_start(path, mem2, [q])
    q.write_sectors(8, pattern(8, 4096, salt=9))
    check(q.read_sectors(8, 8) == pattern(8, 4096, salt=9), "the next VMM writes and reads a block")
    fe2.close()
    way.release("blk0")


BUDGET, UNPRIV = 24, 65534


def scenario_budget(t):
    way = ThroughVhubd(t, extra_args=["--max-fds-per-uid", str(BUDGET), "--control-mode", "0666"])
    os.chmod(way.dir, 0o755)
    null = t.enter(QsdNullBackend([os.path.join(way.dir, "n0.sock")], log_dir=way.dir))
    os.chmod(null.sockets[0], 0o666)
    agent = UnprivAgent(way.daemon.control, UNPRIV)
    t.defer(agent.stop)
    agent.connect()
    agent.call("vm.create", {"vm": "vmu"})
    path = agent.call("device.add", {"vm": "vmu", "device": "blk0", "socket": null.sockets[0],
                                     "type": "blk", "vmm_socket": True})["vmm_socket"]
    check_eq(path, os.path.join(way.vmm_dir, str(UNPRIV), "vmu", "blk0.sock"), "uid %d's front-door socket" % UNPRIV)
    base = way.daemon.settled_fd_count(way.client)

    fe = DirectFrontend.connect(path)
    fe.handshake()
    slots = fe.max_mem_slots
    check(slots is not None and slots > BUDGET,
          "the back-end offers more slots (%s) than the uid's fd budget (%d)" % (slots, BUDGET))
    mem = GuestMemory()
    t.defer(mem.close)
    added = 0
    try:
        while added < slots:
            fe.add_mem_reg(mem.add_region(added << 20, 1 << 20))
            added += 1
        raise TestFailure("FAILED: a VMM made the daemon keep %d regions past a budget of %d fds"
                          % (added, BUDGET))
    except BackendClosed:
        pass
    log("the VMM was closed after %d regions (budget %d)" % (added, BUDGET))
    check(0 < added < BUDGET, "regions kept before the VMM was closed: some, fewer than the budget", added)
    fe.close()

    def dev():
        return agent.call("device.list", {"vm": "vmu"})["devices"][0]
    deadline = time.monotonic() + 10
    # the VMM gone; qsd has no RESET_DEVICE: the back-end renewed for the next
    while (dev()["vmm"], dev()["state"]) != ("waiting", "ready") and time.monotonic() < deadline:
        time.sleep(0.05)
    check_eq((dev()["vmm"], dev()["state"]), ("waiting", "ready"), "the device waits for the next VMM")
    way.daemon.check_fd_baseline(base, "every fd the closed VMM left was closed")
    with open(way.daemon.log_path) as f:
        why = [line for line in f if "closing the VMM's connection" in line and "fd" in line]
    check(why, "the daemon's log says why the VMM was closed")
    log("vhubd: %s" % why[0].strip())
    check_eq(agent.call("daemon.info")["pid"], way.daemon.pid, "the uid's control connection still answers")
    with DirectFrontend.connect(path) as fe2:
        fe2.handshake()
        fe2.add_mem_reg(mem.regions[0])
        check_eq(fe2.get_features(), agent.call("device.list", {"vm": "vmu"})["devices"][0]["features"],
                 "the next VMM is served")
    agent.call("device.remove", {"vm": "vmu", "device": "blk0"})
    agent.stop()


BLOCKED_REGIONS = 480


def scenario_budget_blocked(t):
    """A VMM's request whose fds the fd budget keeps from waiting behind bytes
    a back-end does not read (-32008 at the send: device_send_msg()) must
    not be answered from the daemon's records while that back-end, still
    connected, is not in an outage: no restore would replay them.  The
    test back-end without REPLY_ACK holds BLOCKED_REGIONS regions of the
    VMM, then stops (SIGSTOP); the VMM replaces its table with one new region:
    the daemon's REM_MEM_REGs fill the socket, the ADD_MEM_REG's fd would
    pass uid 65534's budget (a second VM of that uid holds the rest of it).
    Before: the VMM's table was taken as the back-end's (the daemon's
    shadow learns a table without REPLY_ACK only at the barrier), nothing
    marked the back-end lost, and once it read again it held no region at
    all.  Now: the back-end got part of the change, so it is lost and its
    restore syncs the VMM's table whole."""
    budget = 2 * BLOCKED_REGIONS + 96    # the model's dup of a region and the device's
    way = ThroughVhubd(t, extra_args=["--max-fds-per-uid", str(budget), "--control-mode", "0666"])
    os.chmod(way.dir, 0o755)
    no_reply_ack = 0xdbe2b & ~(1 << vu.PF_REPLY_ACK)
    tb = t.enter(TestBackend([os.path.join(way.dir, "tb.sock")], log_dir=way.dir,
                             args=["--protocol-features", hex(no_reply_ack), "--mem-slots", "509"]))
    os.chmod(tb.socket, 0o666)
    agent = UnprivAgent(way.daemon.control, UNPRIV)
    t.defer(agent.stop)
    agent.connect()
    agent.call("vm.create", {"vm": "vmu"})
    path = agent.call("device.add", {"vm": "vmu", "device": "blk0", "socket": tb.socket,
                                     "type": "blk", "vmm_socket": True})["vmm_socket"]
    fe = DirectFrontend.connect(path)
    t.defer(fe.close)
    fe.handshake()
    check_eq(fe.protocol_features & (1 << vu.PF_REPLY_ACK), 0, "the VMM negotiated no REPLY_ACK")
    mem = GuestMemory()
    t.defer(mem.close)
    for i in range(BLOCKED_REGIONS):
        fe.add_mem_reg(mem.add_region(i << 16, 4096))
        if i % 16 == 15:
            fe.get_features()   # (no REPLY_ACK) the requests so far processed: their fds are no op's
    fe.get_features()
    check_eq(len(tb.regions()), BLOCKED_REGIONS, "the back-end holds the VMM's regions")
    # the rest of the uid's budget held by its other VMs (at most 512
    # regions a VM), then two fds freed
    filled = 0
    while True:
        if filled % 256 == 0:
            agent.call("vm.create", {"vm": "fill%d" % (filled // 256)})
        res = agent.raw_call("vm.memory.add", {"vm": "fill%d" % (filled // 256), "gpa": filled << 12,
                                               "size": 4096, "fd": 0}, memfds=1)
        if "error" in res:
            check_eq(res["error"]["code"], -32008, "the uid's other VMs filled to the budget")
            break
        filled += 1
        if filled >= budget:
            raise TestFailure("FAILED: the budget did not stop the uid's other VMs")
    for i in (filled - 1, filled - 2):
        agent.call("vm.memory.remove", {"vm": "fill%d" % (i // 256), "gpa": i << 12})
    log("uid %d: %d regions of the VMM, %d of its other VMs (budget %d)" % (UNPRIV, BLOCKED_REGIONS, filled - 2, budget))
    tb.sigstop()
    new = mem.add_region(BLOCKED_REGIONS << 16, 4096)
    fe.set_mem_table([new])

    def blocked_lines():
        with open(way.daemon.log_path) as f:
            return [line.strip() for line in f if "waits for a back-end that does not read" in line]
    wait_until(blocked_lines, 10.0, what="the budget keeps the ADD_MEM_REG from the back-end that does not read")
    log("vhubd: %s" % blocked_lines()[0])
    tb.sigcont()
    try:
        fe.get_features()
        vmm_closed = False
    except BackendClosed:
        vmm_closed = True
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and agent.call("device.list", {"vm": "vmu"})["devices"][0]["reconnects"] < 1:
        time.sleep(0.05)
    dev = agent.call("device.list", {"vm": "vmu"})["devices"][0]
    regions = tb.regions() if tb.connected() else None
    log("after the back-end read again: the VMM %s, device %s with %d reconnects, the back-end holds %s"
        % ("closed" if vmm_closed else "answered", dev["state"], dev["reconnects"],
           "%d regions" % len(regions) if regions is not None else "no connection"))
    check(not vmm_closed, "the VMM's connection stays: the back-end got part of its change, a restore syncs it")
    check(dev["reconnects"] >= 1, "the back-end that was sent only part of the VMM's table is restored",
          dev["reconnects"])
    wait_until(lambda: tb.connected() and [(r["gpa"], r["size"]) for r in tb.regions()] == [(new.gpa, new.size)],
               10.0, what="the restored back-end holds the VMM's table")
    check_eq(fe.get_features(), dev["features"], "the VMM is served on")
    fe.close()
    agent.call("device.remove", {"vm": "vmu", "device": "blk0"})
    agent.stop()


SCENARIOS = {
    "rules": scenario_rules,
    "io": scenario_io,
    "relay": scenario_relay,
    "outage": scenario_outage,
    "lifetime": scenario_lifetime,
    "budget": scenario_budget,
    "budget-blocked": scenario_budget_blocked,
    "restart": scenario_restart,
    "restart-write-fail": scenario_restart_write_fail,
    "restart-busy-fail": scenario_restart_busy_fail,
    "restart-read-on": scenario_restart_read_on,
    "restart-read-on-later": lambda t: scenario_restart_read_on(t, later=True),
    "restart-conn-gone": scenario_restart_conn_gone,
    "restart-ring-gone": scenario_restart_ring_gone,
    "unmapped": scenario_unmapped,
}


def main(t):
    for name in sys.argv[1:] or list(SCENARIOS):
        log("==== frontdoor-%s" % name)
        SCENARIOS[name](t)


if __name__ == "__main__":
    run(main)

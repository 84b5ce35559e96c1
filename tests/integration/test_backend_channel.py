#!/usr/bin/env python3
"""The back-end request channel (SET_BACKEND_REQ_FD) through vhubd, per the contract.

vhubd runs with --backend-timeout-ms 500.  Device X is a vhub-test-backend
with INBAND_NOTIFICATIONS and SHMEM added to its default protocol features,
Y a healthy bystander; M (four sockets) and N (no BACKEND_SEND_FD) misbehave.

- CONFIG_CHANGE_MSG -> event device.config_changed to the owner connection,
  to connections subscribed to that VM or to all the uid's VMs, and not to
  an unsubscribed connection, one subscribed to another VM, or (as root)
  another uid's connection subscribed to all of its VMs -- which cannot
  name root's VM either (events.subscribe, device.backend_reply,
  shared_object.list: -32001);
- VRING_HOST_NOTIFIER_MSG with its memfd -> event device.backend_request
  {request, token, queue, size, offset, fd: 0} carrying the fd ("fds": 1),
  the same memfd (name, size 4096); device.backend_reply result 0 / 5 ->
  the back-end's u64 reply is 0 / 5; without an fd, no fd in the event;
- an unknown token, an answered token, another device's token, an expired
  token, the token of a request without NEED_REPLY, the token of a
  connection lost since -> -32602, and nothing reaches the back-end;
- no device.backend_reply -> the back-end gets a nonzero reply at the
  deadline; while a request waits the channel reads nothing more (a
  CONFIG_CHANGE_MSG behind it is only seen after the reply) yet the device's
  main socket (device.config.get) and everything else keep working;
- SHMEM_MAP (with its fd), SHMEM_UNMAP and IOTLB_MSG forwarded with their fields
  (SHMEM ranges outside the GET_SHMEM_CONFIG regions refused with EINVAL);
- in-band VRING_CALL / VRING_ERR signal the VMM's call / err eventfd; an
  unconfigured ring is refused (nonzero ack);
- a burst of 1500 CONFIG_CHANGE_MSG (under the flood limit) becomes 1500
  events and the device stays;
- garbage, a request whose protocol feature was not negotiated, an fd
  without BACKEND_SEND_FD, a flood (5000 requests at once), and -- written
  raw into the back-end's end of the channel -- an oversized request, a
  header announcing more than 4096 bytes, fds on a request that carries
  none, an unknown request, the REPLY flag, an unknown flag, version 0 ->
  device.disconnected (then the reconnect rules: device.reconnected), and
  the other devices keep working; a request written in pieces is only
  handled once whole, and nothing waits for it meanwhile;
- a VM lingering without its owner: a forwarded request fails at the
  deadline; after vm.attach the new owner receives the next one and answers;
- the daemon's fd count is back to its baseline at the end.
"""

import ctypes
import json
import os
import select
import socket
import stat
import struct
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import scenarios                                        # noqa: E402
from vhubtest.client import INVALID_PARAMS, NO_SUCH_VM, RpcError  # noqa: E402
from vhubtest.daemon import Daemon                                     # noqa: E402
from vhubtest.testbackend import AsyncCommand, TestBackend  # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run   # noqa: E402
from vhubtest.virtq import Virtqueue                                   # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                           # noqa: E402

TIMEOUT_MS = 500
TB_DEFAULT_PF = 0xdbe2b
PF_BACKEND_SEND_FD = 1 << 10
PF_INBAND = 1 << 14
PF_SHMEM = 1 << 22
NOBODY = 65534
SYS_PIDFD_GETFD = 438   # the same on every architecture (new syscall numbering)
VHU_VERSION = 0x1
VHU_FLAG_REPLY = 0x4
BREQ_CONFIG_CHANGE_MSG = 2


class RawConn:
    """A bare control connection (another uid's): JSON lines in and out."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.next_id = 1

    def call(self, method, params):
        i = self.next_id
        self.next_id += 1
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                                      "params": params}).encode() + b"\n")
        for msg in self.read(5.0, until_id=i):
            if msg.get("id") == i:
                return msg
        raise TimeoutError("no response to %s" % method)

    def read(self, timeout, until_id=None):
        """Every message that arrives within timeout (or until until_id's response)."""
        out = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                out.append(json.loads(line))
                if until_id is not None and out[-1].get("id") == until_id:
                    return out
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return out
            chunk = self.sock.recv(65536)
            if not chunk:
                return out
            self.buf += chunk

    def close(self):
        self.sock.close()


def connect_as(path, uid):
    """A control connection whose SO_PEERCRED is uid (connected by a child)."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            parent.close()
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            socket.send_fds(child, [b"x"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    child.close()
    _, status = os.waitpid(pid, 0)
    try:
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("could not connect to %s as uid %d" % (path, uid))
        _, fds, _, _ = socket.recv_fds(parent, 1, 1)
    finally:
        parent.close()
    s = socket.socket(fileno=fds[0])
    s.setblocking(True)
    return s


def raw_msg(request, flags=VHU_VERSION, payload=b"", size=None):
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


# (bytes, extra fds, what): each is a protocol violation on the channel
RAW_CASES = [
    (raw_msg(BREQ_CONFIG_CHANGE_MSG, payload=bytes(64)), 0,
     "an oversized CONFIG_CHANGE_MSG (64-byte payload, 0 allowed)"),
    (raw_msg(BREQ_CONFIG_CHANGE_MSG, size=8192) + bytes(8192), 0,
     "a header announcing 8192 bytes (> 4096)"),
    (raw_msg(BREQ_CONFIG_CHANGE_MSG), 2,
     "a CONFIG_CHANGE_MSG carrying 2 fds (BACKEND_SEND_FD negotiated; it carries none)"),
    (raw_msg(99), 0, "an unknown request number (99)"),
    (raw_msg(BREQ_CONFIG_CHANGE_MSG, flags=VHU_VERSION | VHU_FLAG_REPLY), 0,
     "a request with the REPLY flag"),
    (raw_msg(BREQ_CONFIG_CHANGE_MSG, flags=VHU_VERSION | 0x20), 0, "an unknown flag bit (0x20)"),
    (raw_msg(BREQ_CONFIG_CHANGE_MSG, flags=0), 0, "version 0 in the flags"),
]


def channel_of(tb):
    """A dup of the test back-end's end of its channel (SET_BACKEND_REQ_FD),
    taken with pidfd_getfd: the one unnamed unix socket of a process that
    serves one front-end.  None if the kernel or permissions refuse."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        pidfd = os.pidfd_open(tb.pid)
    except OSError:
        return None
    found = []
    try:
        base = "/proc/%d/fd" % tb.pid
        for n in os.listdir(base):
            try:
                if not os.readlink(os.path.join(base, n)).startswith("socket:"):
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(n), 0)
            if fd < 0:
                continue
            s = socket.socket(fileno=fd)
            if (s.family == socket.AF_UNIX and s.type == socket.SOCK_STREAM
                    and not s.getsockname() and not s.getsockopt(socket.SOL_SOCKET,
                                                                 socket.SO_ACCEPTCONN)):
                found.append(s)
            else:
                s.close()
    finally:
        os.close(pidfd)
    if len(found) != 1:
        for s in found:
            s.close()
        return None
    return found[0]


def eventfd_count(fd):
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def is_event(name, device, request=None):
    return lambda e: (e["event"] == name and e.get("device") == device
                      and (request is None or e.get("request") == request))


def setup(t):
    """vhubd, the test back-ends (X answers everything, the others misbehave
    or linger), vm0 with every device and memory, vm1 empty."""
    d = t.tmpdir()
    extra = ["--backend-timeout-ms", str(TIMEOUT_MS)]
    other_uid = os.getuid() == 0
    if other_uid:  # let uid 65534 reach the control socket
        extra += ["--control-mode", "0666"]
        os.chmod(d, 0o711)
    daemon = t.enter(Daemon(d, extra_args=extra))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    log("daemon fd baseline: %d" % baseline)

    pf_x = TB_DEFAULT_PF | PF_INBAND | PF_SHMEM
    X = t.enter(TestBackend([daemon.backend_socket("x.sock")], log_dir=d,
                            args=["--protocol-features", hex(pf_x), "--shmem", "0,64K,0,1M"]))
    Y = t.enter(TestBackend([daemon.backend_socket("y.sock")], log_dir=d))
    M = t.enter(TestBackend([daemon.backend_socket("m%d.sock" % i) for i in range(3)], log_dir=d))
    R = [t.enter(TestBackend([daemon.backend_socket("r%d.sock" % i)], log_dir=d))
         for i in range(len(RAW_CASES))]
    L = t.enter(TestBackend([daemon.backend_socket("l.sock")], log_dir=d))
    P = t.enter(TestBackend([daemon.backend_socket("p.sock")], log_dir=d))
    N = t.enter(TestBackend([daemon.backend_socket("n.sock")], log_dir=d,
                            args=["--protocol-features", hex(TB_DEFAULT_PF & ~PF_BACKEND_SEND_FD)]))
    mem, vmm = vm_with_memory(t, c, 4 << 20)
    info = vmm.add_device("X", X.socket)
    for bit, name in ((PF_INBAND, "INBAND_NOTIFICATIONS"), (PF_SHMEM, "SHMEM")):
        check(info["protocol_features"] & bit, "X: %s negotiated" % name)
    vmm.add_device("Y", Y.socket)
    for i in range(3):
        vmm.add_device("M%d" % i, M.sockets[i])
    for i in range(len(R)):
        vmm.add_device("R%d" % i, R[i].socket)
    vmm.add_device("P", P.socket)
    info = vmm.add_device("N", N.socket)
    check(not info["protocol_features"] & PF_BACKEND_SEND_FD, "N: no BACKEND_SEND_FD")
    X.wait_connected()
    vmm1 = Vmm(c, "vm1")
    vmm1.create()
    return types.SimpleNamespace(daemon=daemon, c=c, baseline=baseline, other_uid=other_uid, mem=mem,
                                 vmm=vmm, vmm1=vmm1, X=X, M=M, N=N, P=P, R=R, L=L)


def part_config_changed(t, w):
    """CONFIG_CHANGE_MSG -> device.config_changed"""
    daemon, other_uid, X, c = w.daemon, w.other_uid, w.X, w.c
    sub_vm = daemon.client()
    sub_vm.call("events.subscribe", {"vm": "vm0"})
    sub_all = daemon.client()
    sub_all.call("events.subscribe", {})
    sub_other = daemon.client()
    sub_other.call("events.subscribe", {"vm": "vm1"})
    bystander = daemon.client()
    bystander.call("daemon.info")
    nobody = None
    if other_uid:
        nobody = RawConn(connect_as(daemon.control, NOBODY))
        r = nobody.call("vm.create", {"vm": "nobody-vm"})
        check("result" in r, "uid %d creates a VM of its own" % NOBODY, r)
        r = nobody.call("events.subscribe", {})
        check("result" in r, "uid %d subscribes to all its VMs" % NOBODY, r)
        for method, params in (("events.subscribe", {"vm": "vm0"}),
                               ("device.backend_reply", {"vm": "vm0", "device": "X", "token": 1,
                                                         "result": 0}),
                               ("shared_object.list", {"vm": "vm0"})):
            r = nobody.call(method, params)
            check_eq(r.get("error", {}).get("code"), NO_SUCH_VM,
                     "uid %d: %s on root's vm0" % (NOBODY, method))
    else:
        log("not root: the other-uid isolation check is skipped")

    a = X.config_change()
    check_eq(a.get("reply"), 0, "X's CONFIG_CHANGE_MSG (NEED_REPLY) acked 0")
    for conn, who in ((c, "owner"), (sub_vm, "vm0 subscriber"), (sub_all, "all-VMs subscriber")):
        ev = conn.wait_event(is_event("device.config_changed", "X"), 5)
        check_eq(ev.get("vm"), "vm0", "device.config_changed reached the %s" % who)
    a = X.config_change(need_reply=False)
    check(a.get("sent"), "CONFIG_CHANGE_MSG without NEED_REPLY sent", a)
    c.wait_event(is_event("device.config_changed", "X"), 5)
    sub_vm.wait_event(is_event("device.config_changed", "X"), 5)
    log("ok: CONFIG_CHANGE_MSG without NEED_REPLY also becomes the event")
    time.sleep(0.3)
    check_eq([e for e in bystander.events() if e["event"] == "device.config_changed"], [],
             "no event on an unsubscribed connection")
    check_eq([e for e in sub_other.events() if e["event"] == "device.config_changed"], [],
             "no event on a connection subscribed to vm1")
    if nobody:
        check_eq([m for m in nobody.read(0.2) if "id" not in m], [],
                 "no event on uid %d's connection" % NOBODY)
    vars(w).update(sub_vm=sub_vm, sub_all=sub_all, sub_other=sub_other, bystander=bystander,
                   nobody=nobody)


def part_host_notifier(t, w):
    """VRING_HOST_NOTIFIER_MSG round trips"""
    X, c = w.X, w.c
    def host_notifier(result, queue=1, **kw):
        replies0 = X.conn()["chan"]["replies"]
        p = AsyncCommand(X, dict({"cmd": "host-notifier", "queue": queue}, **kw))
        ev = c.wait_event(is_event("device.backend_request", "X", "VRING_HOST_NOTIFIER_MSG"), 5)
        check(not p.done(), "the back-end waits while the VMM has not answered")
        c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"],
                                        "result": result})
        a = p.result(5)
        check(a.get("ok") and a.get("reply") == result,
              "device.backend_reply result %d reaches the back-end as its reply" % result, a)
        check_eq(X.conn()["chan"]["replies"], replies0 + 1, "exactly one reply")
        return ev

    ev = host_notifier(0, queue=1, size=4096, offset=0)
    check(isinstance(ev.get("token"), (int, str)), "event carries a token", ev)
    check_eq((ev.get("queue"), ev.get("size"), ev.get("offset"), ev.get("fd")), (1, 4096, 0, 0),
             "event fields (queue, size, offset, fd)")
    fds = ev.get("_fds", [])
    check_eq(len(fds), 1, "the event carried one fd (\"fds\": 1)")
    try:
        st = os.fstat(fds[0])
        link = os.readlink("/proc/self/fd/%d" % fds[0])
        check(stat.S_ISREG(st.st_mode) and st.st_size == 4096,
              "the fd is the back-end's 4096-byte notifier area", st)
        check(link.startswith("/memfd:vhub-tb-notifier"), "the fd is the back-end's memfd", link)
    finally:
        for fd in fds:
            os.close(fd)
    tok0 = ev["token"]
    ev = host_notifier(5, queue=0, size=4096, offset=8192)
    for fd in ev.get("_fds", []):
        os.close(fd)
    check_eq((ev.get("queue"), ev.get("offset")), (0, 8192), "second event's queue and offset")
    check(ev["token"] != tok0, "each request has its own token")
    ev = host_notifier(0, queue=1, fd=False)
    check("fd" not in ev and not ev.get("_fds"), "VRING_HOST_NOTIFIER_MSG without fd: none in the event", ev)
    w.tok0 = tok0


def part_tokens(t, w):
    """tokens that answer nothing"""
    X, tok0, c = w.X, w.tok0, w.c
    ch0 = X.conn()["chan"]
    for token, what in ((tok0, "an answered token"), (987654321, "an unknown token"),
                        ("0x%x" % (1 << 60), "an unknown hex token")):
        e = expect_error(RpcError, c.call, "device.backend_reply",
                         {"vm": "vm0", "device": "X", "token": token, "result": 0},
                         what="device.backend_reply with %s" % what)
        check_eq(e.code, INVALID_PARAMS, "device.backend_reply with %s" % what)
    p = AsyncCommand(X, {"cmd": "host-notifier", "queue": 1})
    ev = c.wait_event(is_event("device.backend_request", "X", "VRING_HOST_NOTIFIER_MSG"), 5)
    for fd in ev.get("_fds", []):
        os.close(fd)
    e = expect_error(RpcError, c.call, "device.backend_reply",
                     {"vm": "vm0", "device": "Y", "token": ev["token"], "result": 0},
                     what="X's token named with device Y")
    check_eq(e.code, INVALID_PARAMS, "a token is only valid for its own device")
    check(not p.done(), "X still waits after the reply naming Y")
    c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0})
    check_eq(p.result(5).get("reply"), 0, "X's own token still answers it")
    w.ch0 = ch0


def part_no_reply(t, w):
    """no reply: the back-end is answered at the deadline"""
    X, c, vmm, ch0 = w.X, w.c, w.vmm, w.ch0
    p = AsyncCommand(X, {"cmd": "host-notifier", "queue": 1, "timeout_ms": 5000})
    ev = c.wait_event(is_event("device.backend_request", "X", "VRING_HOST_NOTIFIER_MSG"), 5)
    for fd in ev.get("_fds", []):
        os.close(fd)
    behind = AsyncCommand(X, {"cmd": "config-change"})
    lat = []
    while not p.done() and time.monotonic() - p.started < 5:
        t0 = time.monotonic()
        vmm.config_get("X", 0, 8)
        lat.append(time.monotonic() - t0)
        time.sleep(0.02)
    a = p.result(5)
    log("unanswered request: the back-end got %s after %.3fs" % (a, p.elapsed))
    check(a.get("ok") and a.get("reply", 0) != 0, "no device.backend_reply: nonzero reply", a)
    check(TIMEOUT_MS / 1000.0 * 0.8 <= p.elapsed <= TIMEOUT_MS / 1000.0 * 4,
          "answered at the deadline (--backend-timeout-ms %d)" % TIMEOUT_MS)
    check(len(lat) >= 5 and sorted(lat)[len(lat) // 2] < 0.05
          and max(lat) < 0.6 * TIMEOUT_MS / 1000.0,
          "device.config.get on X answered quickly while its channel waited "
          "(%d calls, max %.1f ms)" % (len(lat), 1000 * max(lat)))
    a = behind.result(5)
    check_eq(a.get("reply"), 0, "the CONFIG_CHANGE_MSG queued behind it is handled afterwards")
    ev2 = c.wait_event(is_event("device.config_changed", "X"), 5)
    check(ev2 is not None, "its event follows")
    e = expect_error(RpcError, c.call, "device.backend_reply",
                     {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0},
                     what="device.backend_reply after the deadline")
    check_eq(e.code, INVALID_PARAMS, "an expired token")

    # in order: nothing behind a waiting request is read until it is answered
    p = AsyncCommand(X, {"cmd": "host-notifier", "queue": 1})
    ev = c.wait_event(is_event("device.backend_request", "X", "VRING_HOST_NOTIFIER_MSG"), 5)
    for fd in ev.get("_fds", []):
        os.close(fd)
    behind = AsyncCommand(X, {"cmd": "config-change"})
    time.sleep(0.15)
    check_eq([e for e in c.events() if e["event"] == "device.config_changed"], [],
             "a CONFIG_CHANGE_MSG behind a waiting request is not read yet")
    c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0})
    check_eq(p.result(5).get("reply"), 0, "the waiting request answered first")
    check_eq(behind.result(5).get("reply"), 0, "then the one behind it")
    c.wait_event(is_event("device.config_changed", "X"), 5)
    ch1 = X.conn()["chan"]
    check_eq(ch1["unexpected"], 0, "nothing unexpected ever reached X's channel")
    check_eq(ch1["replies"] - ch0["replies"], 5,
             "X got exactly one reply per request since the token checks")

    # a request without NEED_REPLY: forwarded, but nothing waits for a reply
    a = X.host_notifier(queue=1, need_reply=False)
    check(a.get("sent"), "VRING_HOST_NOTIFIER_MSG without NEED_REPLY sent", a)
    ev = c.wait_event(is_event("device.backend_request", "X", "VRING_HOST_NOTIFIER_MSG"), 5)
    for fd in ev.get("_fds", []):
        os.close(fd)
    e = expect_error(RpcError, c.call, "device.backend_reply",
                     {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0},
                     what="device.backend_reply to a request without NEED_REPLY")
    check_eq(e.code, INVALID_PARAMS, "a token nothing waits for")
    # the connection is lost while a request waits: its token dies with it
    p = AsyncCommand(X, {"cmd": "host-notifier", "queue": 1})
    ev = c.wait_event(is_event("device.backend_request", "X", "VRING_HOST_NOTIFIER_MSG"), 5)
    for fd in ev.get("_fds", []):
        os.close(fd)
    X.disconnect()
    log("pending request when X dropped its connection: %s" % p.result(5))
    c.wait_event(is_event("device.reconnected", "X"), 10)
    e = expect_error(RpcError, c.call, "device.backend_reply",
                     {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0},
                     what="device.backend_reply after the back-end reconnected")
    check_eq(e.code, INVALID_PARAMS, "a token of a lost connection")
    ch = X.conn()["chan"]
    check(ch["replies"] == 0 and ch["unexpected"] == 0,
          "nothing reached the new connection's channel", ch)


def part_shmem_iotlb(t, w):
    """SHMEM_MAP / SHMEM_UNMAP / IOTLB_MSG"""
    X, c = w.X, w.c
    p = AsyncCommand(X, {"cmd": "shmem-map", "shmid": 3, "shm_offset": 0x10000,
                         "fd_offset": 4096, "len": 8192, "flags": 1})
    ev = c.wait_event(is_event("device.backend_request", "X", "SHMEM_MAP"), 5)
    fds = ev.get("_fds", [])
    try:
        check_eq({k: ev.get(k) for k in ("shmid", "shm_offset", "fd_offset", "len", "flags", "fd")},
                 {"shmid": 3, "shm_offset": 0x10000, "fd_offset": 4096, "len": 8192, "flags": 1,
                  "fd": 0}, "SHMEM_MAP fields")
        check(len(fds) == 1 and os.fstat(fds[0]).st_size == 4096 + 8192,
              "SHMEM_MAP carries the back-end's memfd")
    finally:
        for fd in fds:
            os.close(fd)
    c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0})
    check_eq(p.result(5).get("reply"), 0, "SHMEM_MAP answered 0")
    p = AsyncCommand(X, {"cmd": "shmem-unmap", "shmid": 3, "shm_offset": 0x10000, "len": 8192})
    ev = c.wait_event(is_event("device.backend_request", "X", "SHMEM_UNMAP"), 5)
    check_eq({k: ev.get(k) for k in ("shmid", "shm_offset", "len")},
             {"shmid": 3, "shm_offset": 0x10000, "len": 8192}, "SHMEM_UNMAP fields")
    check("fd" not in ev and not ev.get("_fds"), "SHMEM_UNMAP carries no fd")
    c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 22})
    check_eq(p.result(5).get("reply"), 22, "SHMEM_UNMAP answered 22 (EINVAL)")
    # ranges outside the regions GET_SHMEM_CONFIG gave (0, 64K, 0, 1M) never reach the VMM
    for shmid, off, length, why in ((3, (1 << 20) - 4096, 8192, "past the region's end"),
                                    (0, 0, 4096, "an unused shmid (size 0)"),
                                    (4, 0, 4096, "a shmid beyond nregions"),
                                    (1, 0, 0, "an empty range"),
                                    (1, (1 << 64) - 4096, 8192, "an offset that wraps")):
        for cmd in ("shmem-map", "shmem-unmap"):
            r = X.command({"cmd": cmd, "shmid": shmid, "shm_offset": "0x%x" % off,
                           "len": length})
            check_eq(r.get("reply"), 22, "%s of %s answered EINVAL by the daemon" % (cmd, why))
    check(not any(e.get("event") == "device.backend_request" for e in c.events()),
          "none of them was forwarded to the VMM")
    big = (1 << 60) + 0x1000
    p = AsyncCommand(X, {"cmd": "iotlb", "iova": "0x%x" % big, "size": 0x2000,
                         "uaddr": 0x7f0000001000, "perm": 3, "type": 1})
    ev = c.wait_event(is_event("device.backend_request", "X", "IOTLB_MSG"), 5)
    from vhubtest.client import u64
    check_eq({k: u64(ev.get(k)) for k in ("iova", "size", "uaddr", "perm", "type")},
             {"iova": big, "size": 0x2000, "uaddr": 0x7f0000001000, "perm": 3, "type": 1},
             "IOTLB_MSG fields (a 61-bit iova as hex)")
    c.call("device.backend_reply", {"vm": "vm0", "device": "X", "token": ev["token"], "result": 0})
    check_eq(p.result(5).get("reply"), 0, "IOTLB_MSG answered 0")


def part_inband_calls(t, w):
    """in-band VRING_CALL / VRING_ERR"""
    mem, vmm, c, X = w.mem, w.vmm, w.c, w.X
    vq = Virtqueue(mem, size=64, index=0)
    err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    t.defer(os.close, err_fd)
    t.defer(vq.close)
    params, fds = vmm.start_params("X", scenarios.BLK_FEATURES & 0x140001200, [vq])
    fds.append(err_fd)
    params["vrings"][0]["err"] = len(fds) - 1
    c.call("device.start", params, fds=fds)
    time.sleep(0.05)
    eventfd_count(vq.call_fd)
    eventfd_count(err_fd)
    a = X.vring_call(queue=0)
    check_eq(a.get("reply"), 0, "in-band VRING_CALL acked 0")
    check_eq(eventfd_count(vq.call_fd), 1, "VRING_CALL signalled the VMM's call eventfd once")
    a = X.vring_err(queue=0)
    check_eq(a.get("reply"), 0, "in-band VRING_ERR acked 0")
    check_eq(eventfd_count(err_fd), 1, "VRING_ERR signalled the VMM's err eventfd once")
    check_eq(eventfd_count(vq.call_fd), 0, "and not the call eventfd")
    a = X.vring_call(queue=1)
    check(a.get("reply", 0) != 0, "VRING_CALL for a ring the VMM did not start: nonzero ack", a)
    a = X.vring_call(queue=0, need_reply=False)
    procs_wait = time.monotonic() + 2
    while eventfd_count(vq.call_fd) == 0:
        check(time.monotonic() < procs_wait, "VRING_CALL without NEED_REPLY signals too")
        time.sleep(0.01)
    log("ok: VRING_CALL without NEED_REPLY signalled the call eventfd")
    vmm.stop_device("X")


def part_burst(t, w):
    """a burst below the flood limit: every request handled, nothing lost"""
    c, X, vmm, sub_vm, sub_all = w.c, w.X, w.vmm, w.sub_vm, w.sub_all
    c.events()
    time.sleep(1.0)  # a fresh one-second window on X's channel
    a = X.flood(kind="messages", count=1500)
    check_eq(a.get("sent"), 1500, "1500 CONFIG_CHANGE_MSG written at once")
    got = 0
    deadline = time.monotonic() + 10
    while got < 1500 and time.monotonic() < deadline:
        got += len([e for e in [c.wait_event(None, 5)]
                    if e["event"] == "device.config_changed" and e.get("device") == "X"])
    check_eq(got, 1500, "every request of the burst became an event")
    check_eq(vmm.device_state("X")["state"], "stopped", "X not treated as flooding")
    for conn in (sub_vm, sub_all):
        conn.events()


def part_misbehaving(t, w):
    """a misbehaving channel: the device is lost, the rest runs"""
    c, vmm, M, N, R, P, daemon, X = w.c, w.vmm, w.M, w.N, w.R, w.P, w.daemon, w.X
    def lost(dev, action, what):
        action()
        ev = c.wait_event(is_event("device.disconnected", dev), 5)
        log("%s: %s lost: %s" % (what, dev, ev.get("reason")))
        check_eq(vmm.config_get("Y", 0, 8), vmm.config_get("Y", 0, 8),
                 "%s: Y still served" % what)
        ev = c.wait_event(is_event("device.reconnected", dev), 10)
        log("ok: %s: %s restored by the reconnect rules (reconnects %s)"
            % (what, dev, ev.get("reconnects")))

    lost("M0", lambda: M.flood(0, kind="garbage", count=4), "garbage on the channel")
    lost("M1", lambda: M.vring_call(queue=0, sock=1, need_reply=False),
         "VRING_CALL without INBAND_NOTIFICATIONS negotiated")
    lost("M2", lambda: M.flood(2, kind="messages", count=5000), "a flood of 5000 requests")
    lost("N", lambda: N.host_notifier(queue=0, need_reply=False),
         "an fd without BACKEND_SEND_FD")
    # Messages the test back-end's builder refuses to make: written raw into
    # its end of the channel (a dup taken with pidfd_getfd).
    for i, (data, nfds, what) in enumerate(RAW_CASES):
        dev = "R%d" % i
        chan = channel_of(R[i])
        if chan is None:
            log("cannot take %s's channel (pidfd_getfd): raw case '%s' not run" % (dev, what))
            continue
        junk = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(nfds)]
        try:
            lost(dev, lambda: socket.send_fds(chan, [data], junk) if junk else chan.sendall(data),
                 what)
        finally:
            chan.close()
            for fd in junk:
                os.close(fd)
    # a message in pieces: nothing happens until it is whole, nothing blocks
    chan = channel_of(P)
    if chan is None:
        log("cannot take P's channel (pidfd_getfd): the split-message case is not run")
    else:
        try:
            msg = raw_msg(BREQ_CONFIG_CHANGE_MSG)
            for piece in (msg[:5], msg[5:9]):
                chan.sendall(piece)
                time.sleep(0.1)
                check_eq(vmm.config_get("P", 0, 8), vmm.config_get("Y", 0, 8),
                         "P's main socket and the others served with %d bytes of a request "
                         "pending on P's channel" % len(piece))
            check_eq([e for e in c.events() if e.get("device") == "P"], [],
                     "no event and no loss for an incomplete request")
            chan.sendall(msg[9:])
            c.wait_event(is_event("device.config_changed", "P"), 5)
            log("ok: the request completed by its last bytes is handled")
        finally:
            chan.close()
    check(daemon.alive, "vhubd still running")
    check_eq(X.config_change().get("reply"), 0, "X's channel still served")
    c.wait_event(is_event("device.config_changed", "X"), 5)


def part_lingering(t, w):
    """a lingering VM: nobody to ask, then the new owner answers"""
    daemon, L, sub_all = w.daemon, w.L, w.sub_all
    owner = daemon.client()
    Vmm(owner, "vm2").create(linger_ms=10000)
    Vmm(owner, "vm2").add_device("L", L.socket)
    L.wait_connected()
    owner.close()
    ev = sub_all.wait_event(lambda e: e["event"] == "vm.lingering" and e.get("vm") == "vm2", 5)
    check_eq(ev.get("linger_ms"), 10000, "vm.lingering reached the all-VMs subscriber")
    p = AsyncCommand(L, {"cmd": "host-notifier", "queue": 0})
    a = p.result(5)
    check(a.get("ok") and a.get("reply", 0) != 0,
          "a lingering VM's back-end request fails at the deadline (%.3fs)" % p.elapsed, a)
    owner = daemon.client()
    owner.call("vm.attach", {"vm": "vm2"})
    p = AsyncCommand(L, {"cmd": "host-notifier", "queue": 0})
    ev = owner.wait_event(is_event("device.backend_request", "L", "VRING_HOST_NOTIFIER_MSG"), 5)
    for fd in ev.get("_fds", []):
        os.close(fd)
    owner.call("device.backend_reply", {"vm": "vm2", "device": "L", "token": ev["token"],
                                        "result": 0})
    check_eq(p.result(5).get("reply"), 0, "after vm.attach the new owner gets and answers it")
    owner.call("vm.destroy", {"vm": "vm2"})
    owner.close()


def part_cleanup(t, w):
    """clean up: every fd back"""
    sub_vm, sub_all, sub_other, bystander = w.sub_vm, w.sub_all, w.sub_other, w.bystander
    nobody, vmm, vmm1 = w.nobody, w.vmm, w.vmm1
    daemon, baseline = w.daemon, w.baseline
    for conn in (sub_vm, sub_all, sub_other, bystander):
        conn.close()
    if nobody:
        nobody.close()
    vmm.destroy()
    vmm1.destroy()
    daemon.check_fd_baseline(baseline)


def main(t):
    w = setup(t)
    part_config_changed(t, w)
    part_host_notifier(t, w)
    part_tokens(t, w)
    part_no_reply(t, w)
    part_shmem_iotlb(t, w)
    part_inband_calls(t, w)
    part_burst(t, w)
    part_misbehaving(t, w)
    part_lingering(t, w)
    part_cleanup(t, w)


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Self-test of vhubtest/servicemanager.py, the harness that plays systemd's
fd store for the restart tests, against a small service written here that
talks to it through the real libsystemd (sd_pid_notify_with_fds() to push,
sd_listen_fds_with_names() to take back), plus systemd's own tools:
systemd-notify (MAINPID and NotifyAccess=main) and systemd-socket-activate
(the LISTEN_* a socket unit's fds come with, compared with the harness's).
Not against vhubd.

    test_servicemanager_selftest.py
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import procs                                              # noqa: E402
from vhubtest.servicemanager import ServiceError, ServiceManager, same_fd  # noqa: E402
from vhubtest.testing import Skip, check, check_eq, expect_error, log, run  # noqa: E402

# The service: reads commands on stdin, answers one JSON line each on stdout.
CHILD = r'''
import ctypes, json, os, socket, struct, subprocess, sys
lib = ctypes.CDLL("libsystemd.so.0")
lib.sd_pid_notify_with_fds.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                       ctypes.POINTER(ctypes.c_int), ctypes.c_uint]
env_pid = os.environ.get("LISTEN_PID")
names = ctypes.POINTER(ctypes.c_char_p)()
n = lib.sd_listen_fds_with_names(1, ctypes.byref(names))
fds = {}
listen = []
for i in range(max(n, 0)):
    name = names[i].decode()
    listen.append([name, 3 + i])
    fds.setdefault(name, 3 + i)
keep = []

def notify(text, fd_list=()):
    arr = (ctypes.c_int * max(len(fd_list), 1))(*fd_list)
    return lib.sd_pid_notify_with_fds(0, 0, text.encode(), arr, len(fd_list))

def reply(v):
    sys.stdout.write(json.dumps(v) + "\n")
    sys.stdout.flush()

libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p   # the C environment, which libsystemd changed
reply({"pid": os.getpid(), "n": n, "listen": listen, "env_pid": env_pid,
       "env_left": [k for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES") if libc.getenv(k.encode())]})
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "memfd":                          # NAME CONTENT: push a memfd holding CONTENT
        fd = os.memfd_create(args[0])
        os.write(fd, args[1].encode())
        fds[args[0]] = fd
        reply(notify("FDSTORE=1\nFDNAME=%s\nFDPOLL=0" % args[0], [fd]))
    elif cmd == "eventfd":                      # NAME VALUE
        fd = os.eventfd(int(args[1]))
        fds[args[0]] = fd
        reply(notify("FDSTORE=1\nFDNAME=%s\nFDPOLL=0" % args[0], [fd]))
    elif cmd == "socket":                       # NAME [poll]: one end of a socketpair
        a, b = socket.socketpair()
        keep.append(b)
        fds[args[0]] = a.detach()
        fds[args[0] + ".peer"] = b
        poll = len(args) > 1 and args[1] == "poll"
        reply(notify("FDSTORE=1\nFDNAME=%s%s" % (args[0], "" if poll else "\nFDPOLL=0"), [fds[args[0]]]))
    elif cmd == "hangup":                       # NAME: close the peer of a socket
        fds.pop(args[0] + ".peer").close()
        reply(0)
    elif cmd == "dup":                          # NAME NEW: push a dup of NAME's fd as NEW
        fd = os.dup(fds[args[0]])
        fds[args[1]] = fd
        reply(notify("FDSTORE=1\nFDNAME=%s\nFDPOLL=0" % args[1], [fd]))
    elif cmd == "many":                         # N PREFIX LEN: N eventfds, names padded to LEN
        for i in range(int(args[0])):
            name = ("%s%d-" % (args[1], i)).ljust(int(args[2]), "x")
            fd = os.eventfd(0)
            fds[name] = fd
            notify("FDSTORE=1\nFDNAME=%s\nFDPOLL=0" % name, [fd])
        reply(int(args[0]))
    elif cmd == "remove":
        reply(notify("FDSTOREREMOVE=1\nFDNAME=%s" % args[0]))
    elif cmd == "raw":                          # TEXT with \n escapes, no fd
        reply(notify(args[0].replace("\\n", "\n")))
    elif cmd == "rawfd":                        # TEXT with an eventfd
        fd = os.eventfd(0)
        reply(notify(args[0].replace("\\n", "\n"), [fd]))
    elif cmd == "read":                         # NAME: what the fd under NAME holds
        fd = fds[args[0]]
        try:
            reply(os.pread(fd, 100, 0).decode())
        except OSError:
            os.set_blocking(fd, False)
            reply(os.eventfd_read(fd))
    elif cmd == "exec":                         # a shell command, e.g. systemd-notify
        reply(subprocess.run(line.split(None, 1)[1], shell=True).returncode)
    elif cmd == "exit":
        sys.exit(int(args[0]))
'''


class Service:
    """The child above under the harness, with its stdin/stdout pipes."""

    def __init__(self, sm, d):
        self.sm = sm
        self.path = os.path.join(d, "child.py")
        with open(self.path, "w") as f:
            f.write(CHILD)
        self.proc = None
        self.hello = None

    def start(self, restart_sig=None):
        argv = [sys.executable, self.path]
        if restart_sig is None:
            self.proc = self.sm.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        else:
            self.sm.restart(argv, sig=restart_sig, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.proc = self.sm.proc
        self.hello = self.read()
        return self.hello

    def read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise ServiceError("the service closed its stdout (exit %s)" % self.proc.poll())
        return json.loads(line)

    def send(self, text):
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()

    def cmd(self, text):
        self.send(text)
        return self.read()

    def close_pipes(self):
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def setup(t):
    """A service manager with a fd store of 64 and the test service started under it."""
    if not os.path.exists("/usr/lib/x86_64-linux-gnu/libsystemd.so.0") and not shutil.which("systemd-notify"):
        raise Skip("libsystemd is not installed")
    d = t.tmpdir()
    fds_before = len(os.listdir("/proc/self/fd"))

    sm = t.enter(ServiceManager(d, fd_store_max=64))
    svc = Service(sm, d)
    t.defer(svc.close_pipes)
    hello = svc.start()
    check_eq(hello["n"], 0, "a first start passes no fds")
    check_eq(hello["pid"], sm.pid, "the service's pid is the one the manager started (sh and setpriv exec)")
    return types.SimpleNamespace(d=d, fds_before=fds_before, sm=sm, svc=svc)


def part_notify_and_store(t, w):
    """Readiness, status, pushes, a duplicate and removals."""
    svc, sm = w.svc, w.sm
    check_eq(svc.cmd("raw READY=1\\nSTATUS=up"), 1, "sd_notify returns 1")
    sm.wait_ready()
    check_eq(sm.status, "up", "STATUS= recorded")

    # pushes, as sd_pid_notify_with_fds() sends them
    check_eq(svc.cmd("memfd ram/0 alpha"), 1, "push a memfd")
    check_eq(svc.cmd("eventfd ring0.kick 7"), 1, "push an eventfd")
    check_eq(svc.cmd("socket backend/conn"), 1, "push a socket")
    sm.wait_for(lambda: sm.count() == 3, what="3 stored fds")
    check_eq(sm.names(), ["backend/conn", "ring0.kick", "ram/0"], "the store passes newest first (LIST_PREPEND)")

    # systemd's same_fd(): a dup of a stored file is dropped with its name
    svc.cmd("dup ram/0 ram/1")
    sm.wait_for(lambda: any("already stored" in w for w in sm.warnings), what="the dup dropped")
    check_eq(sm.count(), 3, "a dup of a stored file is not stored again")

    # removal; bad names as systemd handles them
    svc.cmd("remove ring0.kick")
    sm.wait_for(lambda: "ring0.kick" not in sm.names(), what="FDSTOREREMOVE")
    svc.cmd("rawfd FDSTORE=1\\nFDNAME=bad:name\\nFDPOLL=0")
    sm.wait_for(lambda: "stored" in sm.names(), what="an invalid FDNAME= stored as 'stored'")
    svc.cmd("raw FDSTOREREMOVE=1\\nFDNAME=bad:name")
    svc.cmd("rawfd STATUS=an-fd-without-FDSTORE")
    sm.wait_for(lambda: sm.status == "an-fd-without-FDSTORE", what="STATUS")
    check_eq(sm.names(), ["stored", "backend/conn", "ram/0"], "invalid removal ignored, stray fd not stored")
    check(any("FDSTOREREMOVE=1 without a valid FDNAME" in w for w in sm.warnings), "the invalid removal was noted")


def part_fdpoll(t, w):
    """FDPOLL."""
    svc, sm = w.svc, w.sm
    svc.cmd("socket polled poll")
    sm.wait_for(lambda: "polled" in sm.names(), what="a polled fd stored")
    svc.cmd("hangup polled")
    sm.wait_for(lambda: "polled" not in sm.names(), what="POLLHUP drops a polled fd")
    svc.cmd("socket unpolled")
    svc.cmd("hangup unpolled")
    time.sleep(0.3)
    check("unpolled" in sm.names(), "with FDPOLL=0 a hang-up keeps the fd")
    svc.cmd("remove unpolled")


def part_notify_access(t, w):
    """NotifyAccess=main."""
    svc, sm = w.svc, w.sm
    tool = shutil.which("systemd-notify")
    if tool:
        svc.cmd("exec %s --status=from-the-tool" % tool)
        sm.wait_for(lambda: any("from-the-tool" in r for _, r in sm.rejected), what="the tool's own pid refused")
        check(sm.status != "from-the-tool", "a message from another pid changes nothing (NotifyAccess=main)")
        if os.geteuid() == 0:
            svc.cmd("exec %s --pid=%d --status=as-main" % (tool, sm.pid))
            sm.wait_for(lambda: sm.status == "as-main", what="systemd-notify --pid=MAINPID heard")
            log("ok: systemd-notify --pid=<main pid> is heard, its own pid is not")


def part_restarts(t, w):
    """Restarts: planned, and after a crash."""
    sm, svc = w.sm, w.svc
    stored = sm.names()
    code = sm.restart(sig=signal.SIGTERM, argv=[sys.executable, svc.path], stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE)
    svc.proc = sm.proc
    hello = svc.read()
    check_eq(code, -signal.SIGTERM, "the old process died of SIGTERM")
    check_eq(hello["n"], len(stored), "LISTEN_FDS counts the stored fds (LISTEN_PID matched)")
    check_eq([n for n, _ in hello["listen"]], stored, "LISTEN_FDNAMES in fd order, newest first")
    check_eq([fd for _, fd in hello["listen"]], list(range(3, 3 + len(stored))), "fds from 3")
    check_eq(hello["env_pid"], str(hello["pid"]), "LISTEN_PID is the new process's pid")
    check_eq(hello["env_left"], [], "sd_listen_fds_with_names(1, ...) unset the variables")
    check_eq(svc.cmd("read ram/0"), "alpha", "the memfd came back with its content")
    check_eq(sm.count(), len(stored), "the store keeps its fds while the service runs")

    # a crash (SIGKILL, Restart=on-failure): the store is kept too
    svc.cmd("eventfd after.crash 3")
    sm.wait_for(lambda: "after.crash" in sm.names(), what="a push before the crash")
    hello = svc.start(restart_sig=signal.SIGKILL)
    check_eq(sm.exit_codes[-1], -signal.SIGKILL, "killed")
    check_eq(hello["listen"][0][0], "after.crash", "after a crash the newest push comes first")
    check_eq(svc.cmd("read after.crash"), 3, "the eventfd came back with its counter")


def part_store_limit_and_stop(t, w):
    """The store's limit, and a stop."""
    sm, svc = w.sm, w.svc
    n = sm.count()
    check_eq(svc.cmd("many %d full- 10" % (64 - n + 5)), 64 - n + 5, "pushed past the limit")
    sm.wait_for(lambda: any("store full" in w for w in sm.warnings), what="the store full")
    check_eq(sm.count(), 64, "the store holds FileDescriptorStoreMax= fds")

    # `systemctl stop`: the store is emptied; the next start gets nothing
    sm.stop_unit()
    check_eq(sm.count(), 0, "a stop releases the store")
    hello = svc.start()
    check_eq(hello["n"], 0, "a start after a stop passes no fds")
    svc.send("exit 0")
    sm.wait_exit()


def part_env_limit(t, w):
    """LISTEN_FDNAMES past the kernel's limit."""
    d = w.d
    sm2 = t.enter(ServiceManager(d, fd_store_max=4096, name="big"))
    svc2 = Service(sm2, d)
    t.defer(svc2.close_pipes)
    svc2.start()
    svc2.cmd("many 600 n 250")
    sm2.wait_for(lambda: sm2.count() == 600, timeout=30, what="600 long names stored")
    sm2.terminate()
    e = expect_error(OSError, sm2.start, [sys.executable, svc2.path], what="exec with LISTEN_FDNAMES of 150 KB")
    check_eq(e.errno, 7, "E2BIG, as systemd's exec of the service would get")
    vars(w).update(sm2=sm2, svc2=svc2)


def part_abstract_socket(t, w):
    """An abstract NOTIFY_SOCKET."""
    d = w.d
    sm3 = t.enter(ServiceManager(d, abstract=True, name="abstract"))
    svc3 = Service(sm3, d)
    t.defer(svc3.close_pipes)
    svc3.start()
    check(sm3.notify_socket.startswith("@"), "abstract socket name")
    svc3.cmd("memfd snap/daemon beta")
    sm3.wait_for(lambda: sm3.count() == 1, what="a push over the abstract socket")
    hello = svc3.start(restart_sig=signal.SIGTERM)
    check_eq(svc3.cmd("read snap/daemon"), "beta", "restart over an abstract socket")
    svc3.send("exit 0")
    sm3.wait_exit()
    vars(w).update(sm3=sm3, svc3=svc3)


def part_socket_units(t, w):
    """Socket units' fds."""
    d, svc = w.d, w.svc
    activate = shutil.which("systemd-socket-activate")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(os.path.join(d, "ctl.sock"))
    listener.listen(8)
    t.defer(listener.close)
    sm4 = t.enter(ServiceManager(d, name="sockets", sockets=[("control", listener)]))
    svc4 = Service(sm4, d)
    t.defer(svc4.close_pipes)
    hello = svc4.start()
    check_eq(hello["listen"], [["control", 3]], "a socket unit's fd is passed at every start")
    svc4.cmd("eventfd stored.one 1")
    sm4.wait_for(lambda: sm4.count() == 1, what="one stored fd")
    hello = svc4.start(restart_sig=signal.SIGTERM)
    check_eq(hello["listen"], [["control", 3], ["stored.one", 4]], "socket fds first, then the store")
    svc4.send("exit 0")
    sm4.wait_exit()
    if activate:
        # it spawns the service on the first connection, as a socket unit does
        real_sock = os.path.join(d, "real.sock")
        out_path = os.path.join(d, "activate.log")
        t.add_log("systemd-socket-activate", out_path)
        p = procs.spawn([activate, "-l", real_sock, "--fdname=control", sys.executable, svc.path],
                        log_path=out_path, stdin=subprocess.PIPE)
        t.defer(procs.reap, p)
        procs.wait_until(lambda: procs.unix_listening(real_sock), 10, what="systemd-socket-activate listening")
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(real_sock)
        t.defer(c.close)
        p.stdin.close()
        real = None
        deadline = time.monotonic() + 20
        while real is None and time.monotonic() < deadline:
            with open(out_path) as f:
                lines = [ln for ln in f if ln.startswith("{")]
            real = json.loads(lines[0]) if lines else None
            time.sleep(0.05)
        check(real is not None, "the service started by systemd-socket-activate said hello")
        c.close()
        procs.reap(p)
        check_eq(real["listen"], [["control", 3]], "systemd-socket-activate passes the same layout")
        check_eq(real["env_pid"], str(real["pid"]), "and the same LISTEN_PID rule")
        log("ok: the harness's LISTEN_* for a socket unit match systemd-socket-activate's")
    else:
        log("note: systemd-socket-activate not installed, the comparison was not made")
    vars(w).update(listener=listener, sm4=sm4, svc4=svc4)


def part_nothing_left_open(t, w):
    """Nothing left open."""
    sm, sm2, sm3, sm4 = w.sm, w.sm2, w.sm3, w.sm4
    svc, svc2, svc3, svc4 = w.svc, w.svc2, w.svc3, w.svc4
    listener, fds_before = w.listener, w.fds_before
    for s in (sm, sm2, sm3, sm4):
        s.close()
    svc.close_pipes()
    svc2.close_pipes()
    svc3.close_pipes()
    svc4.close_pipes()
    listener.close()
    fds_after = len(os.listdir("/proc/self/fd"))
    check_eq(fds_after, fds_before, "the harness leaves no fd open")
    check_eq([p for p in procs._children if p.poll() is None], [], "no service process left")


def main(t):
    w = setup(t)
    part_notify_and_store(t, w)
    part_fdpoll(t, w)
    part_notify_access(t, w)
    part_restarts(t, w)
    part_store_limit_and_stop(t, w)
    part_env_limit(t, w)
    part_abstract_socket(t, w)
    part_socket_units(t, w)
    part_nothing_left_open(t, w)


run(main)

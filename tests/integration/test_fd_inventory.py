#!/usr/bin/env python3
"""Every fd vhubd holds is named by its owner and accounted for
(docs/architecture.md, "fd names and groups"; issue 9 item 3).

The daemon logs, at debug level, a line where each fd it keeps is opened
and closed ("fd N opened: NAME (group G)"), and on SIGHUP its inventory:
every fd its owners' visitors yield, with its name and fd-store group.
Against real back-ends (qemu-storage-daemon in client mode, the test
back-end in server mode with its channel and inflight fd), two VMs with
regions, a shared object, dirty logging, started rings, a lingering VM,
a second control connection, an fd queued on a connection's unfinished
line, and a front-door device with a VMM attached (the harness's
front-end: its regions, a started ring, its back-end channel):

- /proc/PID/fd holds exactly the inventory plus stdin/out/err and
  libevent's own (its epoll instance and its signal pipe, which the daemon
  never names: they are the same fds before anything is made and after);
  every inventoried fd is open and of the kind its name says (memfds for
  regions, log, shared objects and inflight, eventfds for rings, sockets
  for connections, channels and listeners, directories for dirfds);
- names are systemd's FDNAME= (at most 255 printable characters, no ':')
  and say their owner; every fd of one VM (its devices' included, since
  h-devadd) or connection is in that owner's group, no two owners share
  one, and what is held only for a moment (the unfinished line's fd) has
  none;
- replaying the opened/closed lines gives exactly the stored part of the
  inventory (the hooks and the visitors agree), and after everything is
  torn down the inventory is back to the first one;
- under a service manager ($NOTIFY_SOCKET, vhubtest/servicemanager.py):
  the store holds one stash per group and nothing else, each stash the
  group's fds in order (the same open files as the daemon's: kcmp), empty
  groups are removed, --no-fd-store stores nothing, and a daemon killed
  with groups stored starts again, closes them (its back-end sees the
  connection go) and removes them from the store (a front-door device's
  face's group too).
"""

import ctypes
import os
import re
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                             # noqa: E402
from vhubtest import direct as vu                                # noqa: E402
from vhubtest.backends import QsdBackend                         # noqa: E402
from vhubtest.client import Client                               # noqa: E402
from vhubtest.daemon import Daemon, vhubd_path                   # noqa: E402
from vhubtest.direct import BackendClosed, DirectFrontend        # noqa: E402
from vhubtest.memory import GuestMemory                          # noqa: E402
from vhubtest.procs import wait_until                            # noqa: E402
from vhubtest.servicemanager import ServiceManager               # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.testing import check, check_eq, log, run          # noqa: E402
from vhubtest.virtq import Virtqueue                             # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                     # noqa: E402

UUID = "5b1c8c1e-6a0c-4a54-9d3e-7d1f0a2b3c4d"
OPENED = re.compile(r"debug: fd (\d+) (opened|closed): (\S+) \(group (\S+)\)$")
ITEM = re.compile(r"debug: fd (\d+): (\S+) \((?:group (\S+)|not stored)\)$")
# multi-line: the daemon may log more right after its inventory
COUNT = re.compile(r"debug: fd inventory: (\d+) fds$", re.M)
GROUP = re.compile(r"^(L|S|[cdfvosk][0-9a-z]+)$")

# what each kind of name must be in /proc/PID/fd
KINDS = [
    (re.compile(r"^vm/\d+/[^/]+/(region/\d+|log|shared/[0-9a-f-]{36})$"), "/memfd:"),
    (re.compile(r"^dev/\d+/[^/]+/[^/]+/inflight$"), "/memfd:"),
    (re.compile(r"^(vm/\d+/[^/]+|daemon|ctl/conn/\d+)/snapshot$"), "/memfd:"),
    (re.compile(r"^dev/\d+/[^/]+/[^/]+/ring\d+\.(kick|call|err)$"), "anon_inode:[eventfd]"),
    (re.compile(r"^dev/\d+/[^/]+/[^/]+/(sock|chan|listen)$"), "socket:["),
    (re.compile(r"^dev/\d+/[^/]+/[^/]+/dirfd$"), "/"),
    (re.compile(r"^dev/\d+/[^/]+/[^/]+/vmm/(region/\d+|log)$"), "/memfd:"),
    (re.compile(r"^dev/\d+/[^/]+/[^/]+/vmm/ring\d+\.(kick|call|err)$"), "anon_inode:[eventfd]"),
    (re.compile(r"^vmm/\d+/[^/]+/[^/]+/(listen|conn|chan)$"), "socket:["),
    (re.compile(r"^vmm/\d+/[^/]+/[^/]+/(dir/uid|dir/vm|inode)$"), "/"),
    (re.compile(r"^daemon/vmm-dir$"), "/"),
    (re.compile(r"^ctl/(listen|conn/\d+)$"), "socket:["),
    (re.compile(r"^ctl/spare$"), "/dev/null"),
    (re.compile(r"^ctl/conn/\d+/(in|out)$"), ""),
    (re.compile(r"^daemon/backend-dir/\d+$"), "/"),
    (re.compile(r"^daemon/(inotify|fd-store/(notify|queued|aliases|stash))$"), ""),
]

_libc = ctypes.CDLL(None, use_errno=True)
SYS_KCMP, KCMP_FILE = 312, 0


def same_file(pid1, fd1, pid2, fd2):
    return _libc.syscall(SYS_KCMP, pid1, pid2, KCMP_FILE, fd1, fd2) == 0


def log_text(path):
    with open(path, errors="replace") as f:
        return f.read()


def inventory(pid, log_path):
    """SIGHUP, then the inventory the daemon logged: {fd: (name, group)}."""
    before = len(log_text(log_path))

    def logged():
        tail = log_text(log_path)[before:]
        return "debug: fd inventory:\n" in tail and COUNT.search(tail.split("debug: fd inventory:\n", 1)[1])

    os.kill(pid, signal.SIGHUP)
    wait_until(logged, 5.0, what="vhubd to log its fd inventory")
    inv = {}
    for line in log_text(log_path)[before:].split("debug: fd inventory:\n", 1)[1].splitlines():
        m = COUNT.search(line)
        if m:
            check_eq(len(inv), int(m.group(1)), "the inventory's count line")
            return inv
        m = ITEM.search(line)
        if m:
            fd = int(m.group(1))
            if fd in inv:
                check(False, "fd %d is listed once" % fd, line)
            inv[fd] = (m.group(2), m.group(3))
    raise AssertionError("no end of the inventory")


def proc_fds(pid):
    out = {}
    for name in os.listdir("/proc/%d/fd" % pid):
        try:
            out[int(name)] = os.readlink("/proc/%d/fd/%s" % (pid, name))
        except FileNotFoundError:
            pass
    return out


def replay(log_path):
    """The fds the opened/closed lines say are tracked now: {fd: (name, group)}."""
    live = {}
    for line in log_text(log_path).splitlines():
        m = OPENED.search(line)
        if not m:
            continue
        fd, what, name, group = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if what == "opened":
            if fd in live:
                check(False, "fd %d opened while %s still holds it" % (fd, live[fd]), line)
            live[fd] = (name, group)
        elif live.pop(fd, None) != (name, group):
            check(False, "fd %d closed as it was opened" % fd, line)
    return live


def unaccounted(pid, inv):
    return {fd: target for fd, target in proc_fds(pid).items() if fd not in inv and fd > 2}


def check_libevent(extra, what):
    """What no owner names: libevent's epoll instance and its signal pipe
    (a socketpair where pipes are missing)."""
    kinds = sorted(t.split("[")[0] for t in extra.values())
    check(len(extra) <= 3 and kinds.count("anon_inode:") <= 1 and
          all(t == "anon_inode:[eventpoll]" or t.startswith(("pipe:[", "socket:[")) for t in extra.values()),
          "%s: the fds no owner names are libevent's (epoll, signal pipe)" % what, extra)


def owner_of(name):
    """The object a name says holds the fd: a device, a front-door device's
    face, a VM (its shared objects apart), a control connection or the
    listener."""
    parts = name.split("/")
    if name.startswith(("dev/", "vmm/")):
        return "/".join(parts[:4])
    if name.startswith("vm/"):
        return "/".join(parts[:3]) + ("/" + parts[3] if parts[3] in ("shared", "snapshot") else "")
    return name


def grouped_with(name):
    """The object whose fd-store group holds the fd: its owner's, except
    that a device's fds are in its VM's group (since h-devadd: a
    device.add appends to a stored stash rather than pushing one)."""
    o = owner_of(name)
    if o.startswith("dev/"):
        return "vm/" + "/".join(o.split("/")[1:3])
    return o


def check_inventory(pid, inv, what):
    """Every fd open and of its name's kind, every name valid, one group per
    owner and one owner per group; returns {group: owner}."""
    fds = proc_fds(pid)
    bad, groups = [], {}
    for fd, (name, group) in sorted(inv.items()):
        kind = [k for pat, k in KINDS if pat.match(name)]
        if fd not in fds:
            bad.append("%s (fd %d) is not open" % (name, fd))
        elif not (0 < len(name) <= 255 and name.isascii() and name.isprintable() and ":" not in name):
            bad.append("%r is not a valid fd name" % name)
        elif not kind:
            bad.append("%s is no name an owner gives" % name)
        elif not fds[fd].startswith(kind[0]):
            bad.append("%s (fd %d) is %s, not %s" % (name, fd, fds[fd], kind[0]))
        if group is None:
            continue
        if not GROUP.match(group):
            bad.append("%s's group %s is no group name" % (name, group))
        groups.setdefault(group, set()).add(grouped_with(name))
    owners = {}
    for group, os_ in groups.items():
        if len(os_) != 1:
            bad.append("group %s holds fds of %s" % (group, sorted(os_)))
        for o in os_:
            owners.setdefault(o, set()).add(group)
    bad += ["%s is in groups %s" % (o, sorted(g)) for o, g in owners.items() if len(g) != 1]
    check_eq(bad, [], "%s: %d fds open, of their names' kinds, named and grouped by their owners"
             % (what, len(inv)))
    return {g: next(iter(o)) for g, o in groups.items()}


def blk_vm(t, c, d, blk_sock):
    """vm0 with guest memory and a qemu-storage-daemon device blk0, started;
    returns its queue (which holds the ring's eventfds)."""
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, 8 << 20)
    t.enter(QsdBackend(img, blk_sock, num_queues=1, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 16 << 20)
    dev = vmm.add_device("blk0", blk_sock, type="blk")
    q = blk.BlkQueue(mem, index=0, size=64)
    vmm.start_device("blk0", scenarios.BLK_FEATURES & dev["features"], [q.vq])
    return q


def build(t, daemon, d):
    """Two VMs, their devices started; returns what must stay alive."""
    c = daemon.client()
    q = blk_vm(t, c, d, daemon.backend_socket("blk0.sock"))
    obj = os.memfd_create("vhubt-shared", os.MFD_CLOEXEC)
    os.ftruncate(obj, 4096)
    c.call("shared_object.add", {"vm": "vm0", "uuid": UUID, "fd": 0}, fds=[obj])
    os.close(obj)
    _, log_fds = c.call_fds("vm.dirty_log.start", {"vm": "vm0"})
    for fd in log_fds:
        os.close(fd)

    # vm1, made by a second connection that then goes: it lingers with a
    # server-mode device (listener, its directory, channel, inflight, rings)
    c2 = daemon.client()
    mem1 = t.enter(GuestMemory(4 << 20))
    vmm1 = Vmm(c2, "vm1")
    vmm1.create(linger_ms=60000)
    vmm1.add_memory(mem1)
    srv_sock = daemon.backend_socket("s0.sock")
    pend = c2.request("device.add", {"vm": "vm1", "device": "s0", "socket": srv_sock, "mode": "server"})
    wait_until(lambda: os.path.exists(srv_sock), 5.0, what="vhubd to listen on %s" % srv_sock)
    tb = t.enter(TestBackend(connect=[srv_sock], log_dir=d, control=os.path.join(d, "tb.ctl")))
    res = pend.result(5.0)
    vq = Virtqueue(mem1, size=64, index=0)
    vmm1.start_device("s0", int(res["features"]) & ~(1 << 30), [vq])
    tb.wait_connected()
    c2.close()
    wait_until(lambda: "lingering" in log_text(daemon.log_path), 5.0, what="vm1 to linger")

    # an fd on a line the daemon has not got the end of: held, not stored
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    raw.connect(daemon.control)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    raw.sendmsg([b'{"jsonrpc":"2.0","id":1,'], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   efd.to_bytes(4, sys.byteorder))])
    os.close(efd)
    fdoor = front_door_vm(t, c, d)
    c.call("daemon.info")       # everything sent before this is read by now
    return {"c": c, "q": q, "vq": vq, "raw": raw, "tb": tb, "fdoor": fdoor}


def front_door_vm(t, c, d):
    """vm2 with a front-door device to qemu-storage-daemon and a VMM on its
    socket: regions, a started ring and a back-end channel."""
    img = os.path.join(d, "fd.img")
    scenarios.make_image(img, 8 << 20)
    qsd = t.enter(QsdBackend(img, os.path.join(d, "backends", "fd0.sock"), num_queues=1, log_dir=d))
    Vmm(c, "vm2").create()
    path = c.call("device.add", {"vm": "vm2", "device": "fd0", "socket": qsd.socket, "type": "blk",
                                 "vmm_socket": True})["vmm_socket"]
    fe = DirectFrontend.connect(path)
    fe.handshake(vu.SUPPORTED_PROTOCOL_FEATURES | (1 << vu.PF_BACKEND_REQ))
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fe.command(vu.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
    theirs.close()
    mem = t.enter(GuestMemory(4 << 20))
    q = blk.BlkQueue(mem, index=0, size=64)
    fe.setup(mem, (1 << 32) & fe.features, [q.vq])
    return {"fe": fe, "channel": mine, "q": q, "path": path}


def part_inventory(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--vmm-dir", os.path.join(d, "vmm")]))
    c0 = daemon.client()
    c0.call("daemon.info")
    inv0 = inventory(daemon.pid, daemon.log_path)
    check_inventory(daemon.pid, inv0, "idle")
    extra0 = unaccounted(daemon.pid, inv0)
    check_libevent(extra0, "idle")
    log("idle daemon: %d fds named, not named: %s" % (len(inv0), sorted(extra0.values())))

    live = build(t, daemon, d)
    inv = inventory(daemon.pid, daemon.log_path)
    owners = check_inventory(daemon.pid, inv, "busy")
    check_eq(unaccounted(daemon.pid, inv), extra0, "busy: the fds no owner names are the idle daemon's")
    names = sorted(n for n, _ in inv.values())
    for want in ("vm/0/vm0/log", "vm/0/vm0/shared/" + UUID, "dev/0/vm0/blk0/sock", "dev/0/vm0/blk0/chan",
                 "dev/0/vm0/blk0/ring0.kick", "dev/0/vm0/blk0/ring0.call", "dev/0/vm1/s0/listen",
                 "dev/0/vm1/s0/dirfd", "dev/0/vm1/s0/sock", "dev/0/vm1/s0/chan", "dev/0/vm1/s0/inflight",
                 "dev/0/vm1/s0/ring0.kick", "ctl/listen", "ctl/spare",
                 "dev/0/vm2/fd0/sock", "dev/0/vm2/fd0/vmm/ring0.kick", "dev/0/vm2/fd0/vmm/ring0.call",
                 "vmm/0/vm2/fd0/listen", "vmm/0/vm2/fd0/conn", "vmm/0/vm2/fd0/chan", "vmm/0/vm2/fd0/dir/uid",
                 "vmm/0/vm2/fd0/dir/vm", "vmm/0/vm2/fd0/inode", "daemon/vmm-dir"):
        check(want in names, "the inventory names %s" % want)
    check(any(re.match(r"^vm/0/vm1/region/\d+$", n) for n in names), "vm1's region is named")
    check(any(re.match(r"^dev/0/vm2/fd0/vmm/region/\d+$", n) for n in names), "the VMM's region is named")
    check_eq(len({g for n, g in inv.values() if n.startswith(("dev/0/vm2/fd0/", "vmm/0/vm2/fd0/"))}), 2,
             "a front-door device's fds: the device's group and its face's")
    check(any(re.match(r"^ctl/conn/\d+/in$", n) for n in names), "the unfinished line's fd is named")
    transient = [n for n, g in inv.values() if g is None and not n.startswith(("daemon/", "ctl/spare"))]
    check_eq([n for n in transient if not n.endswith("/in")], [], "only the queued fd is held for a moment")
    log("busy daemon: %d fds named in %d groups: %s" % (len(inv), len(owners), sorted(owners)))
    stored = {fd: v for fd, v in inv.items() if v[1] is not None}
    check_eq(replay(daemon.log_path), stored, "the opened/closed lines give the inventory's stored fds")

    # everything goes: back to the idle inventory
    live["raw"].close()
    live["c"].call("vm.destroy", {"vm": "vm0"})
    live["c"].call("vm.destroy", {"vm": "vm1"})
    live["c"].call("vm.destroy", {"vm": "vm2"})
    live["fdoor"]["fe"].close()
    live["fdoor"]["channel"].close()
    live["c"].close()
    # --vmm-dir stays open once the first front-door device opened it
    idle = sorted([n for n, g in inv0.values() if not n.startswith("ctl/conn/")] + ["daemon/vmm-dir"])
    inv_end = {}

    def back_to_idle():
        inv_end.clear()
        inv_end.update(inventory(daemon.pid, daemon.log_path))
        return sorted(n for n, g in inv_end.values() if not n.startswith("ctl/conn/")) == idle

    wait_until(back_to_idle, 5.0, what="the inventory to be the idle one's again")
    check_inventory(daemon.pid, inv_end, "torn down")
    check_eq({fd: v for fd, v in replay(daemon.log_path).items() if not v[0].startswith("ctl/conn/")},
             {fd: v for fd, v in inv_end.items() if v[1] is not None and not v[0].startswith("ctl/conn/")},
             "torn down: every fd opened was closed")
    check_eq(unaccounted(daemon.pid, inv_end), extra0, "torn down: nothing unnamed left behind")


def stash_fds(stash):
    """The fds a stash holds, in order (reading empties it)."""
    out = []
    while True:
        try:
            _, anc, _, _ = stash.recvmsg(1, socket.CMSG_SPACE(253 * 4), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return out
        if not anc:
            return out
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                out += [int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, len(data), 4)]


def managed_daemon(t, d, sm, extra=()):
    os.makedirs(os.path.join(d, "backends"), exist_ok=True)
    argv = [vhubd_path(), "--control", os.path.join(d, "control.sock"), "--backend-dir",
            os.path.join(d, "backends"), "--log-level", "debug"] + list(extra)
    sm.start(argv)
    sm.wait_ready()
    return os.path.join(d, "control.sock")


def part_store(t):
    d = t.tmpdir()
    sm = t.enter(ServiceManager(d, fd_store_max=1024))
    t.add_log("vhubd under the service manager", sm.log_path)
    control = managed_daemon(t, d, sm, extra=["--vmm-dir", os.path.join(d, "vmm")])
    c = t.enter(Client(control, timeout=10))
    q = blk_vm(t, c, d, os.path.join(d, "backends", "blk0.sock"))
    fdoor = front_door_vm(t, c, d)
    c.call("daemon.info")
    inv = inventory(sm.pid, sm.log_path)
    groups = {}
    for fd, (name, group) in inv.items():
        if group:
            groups.setdefault(group, []).append(fd)
    wait_until(lambda: sorted(sm.names()) == sorted(groups), 5.0,
               what="the store to hold one stash per group %s (it holds %s)" % (sorted(groups), sm.names()))
    # a group's stash holds its fds in the order they joined: the log's
    # (vm0's group: its region, then its device's fds, appended)
    order = [int(m.group(1)) for m in OPENED.finditer(log_text(sm.log_path))
             if m.group(2) == "opened" and m.group(4) == "v1"]
    stash = socket.socket(fileno=sm.dup("v1"))
    got = stash_fds(stash)
    stash.close()
    try:
        check_eq(len(got), len(groups["v1"]), "vm0's stash holds its region's and its device's fds")
        check(all(same_file(os.getpid(), g, sm.pid, fd) for g, fd in zip(got, order[-len(got):])),
              "... the daemon's open files, in the order they joined")
    finally:
        for fd in got:
            os.close(fd)
    log("stored groups: %s" % sorted(sm.names()))
    # reading v1's stash emptied the manager's copy too (one queue): a stop
    # and a start change the group (the stopped rings' fds stay in the stash,
    # dead; the new ones are appended), and the store's sweep compacts it --
    # stores it again whole -- within a quarter of a second
    vmm = Vmm(c, "vm0")
    features = vmm.device_state("blk0")["acked_features"]
    vmm.stop_device("blk0")
    q.vq.reset(0)
    vmm.start_device("blk0", features, [q.vq])
    time.sleep(0.6)
    sm.restart(sig=signal.SIGKILL)
    sm.wait_ready()
    check_eq(vmm.device_state("blk0")["state"], "running", "blk0 is back, running")

    # the front-door device's VMM session, at rest when the daemon was
    # killed, is carried across the crash (h-vmmcarry, docs/restart.md
    # "Front-door devices"): the VMM is answered on its connection; then it
    # leaves, and the device's socket serves the next VMM
    check_eq(fdoor["fe"].get_features(), fdoor["fe"].features,
             "the VMM's session, at rest at the crash, is carried: answered on its connection")
    def fd0():
        return c.call("device.list", {"vm": "vm2"})["devices"][0]
    fdoor["fe"].close()
    fdoor["channel"].close()
    wait_until(lambda: fd0()["vmm"] == "waiting", 5.0, what="vm2's device to wait for its next VMM")
    renewed = fd0()["reconnects"]
    with DirectFrontend.connect(fdoor["path"]) as fe:
        check_eq(fe.get_features(), fdoor["fe"].features, "a new VMM on the same socket is served")
    # it left: its back-end gets a new connection for the next (settled before the inventory)
    # (settled: the device waits for its next VMM, its back-end link
    # renewed or not -- a carried session's departure stops the device)
    settled = lambda: fd0()["vmm"] == "waiting" and fd0()["state"] in ("ready", "stopped")  # noqa: E731
    wait_until(settled, 5.0, what="vm2's device to wait for its next VMM again")
    log("vm2's device after its VMMs left: %s, %d reconnects (%d before)"
        % (fd0()["state"], fd0()["reconnects"], renewed))

    # a crash with groups stored: the next start takes every group back
    # (test_restart.py checks what comes back); the store holds the same
    # groups, and the restarted daemon's own inventory is in them
    old_groups = sorted(sm.names())
    check(any(g.startswith("f") for g in old_groups), "a front-door device's face has its group again",
          old_groups)
    c2 = t.enter(Client(control, timeout=10))
    check_eq(sorted(v["vm"] for v in c2.call("vm.list")["vms"]), ["vm0", "vm2"],
             "the restarted daemon has vm0 and vm2 back")
    inv2 = inventory(sm.pid, sm.log_path)
    groups2 = sorted({g for _, (name, g) in inv2.items() if g})
    wait_until(lambda: sorted(sm.names()) == groups2, 5.0,
               what="the store to hold the restarted daemon's groups %s (it holds %s)" % (groups2, sm.names()))
    check_eq(sorted(sm.names()), sorted(set(old_groups) | {"c2", "k2"}),
             "the groups before the crash are all back, and the new connection's c2 and record k2")
    c.close()
    c2.close()
    check_eq(sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")

    # --no-fd-store: nothing is stored
    d2 = t.tmpdir()
    sm2 = t.enter(ServiceManager(d2, fd_store_max=1024, name="nostore"))
    control2 = managed_daemon(t, d2, sm2, extra=["--no-fd-store"])
    c3 = t.enter(Client(control2, timeout=10))
    Vmm(c3, "vm0").create()
    c3.call("daemon.info")
    time.sleep(0.2)
    check_eq(sm2.names(), [], "--no-fd-store: nothing stored")
    c3.close()
    check_eq(sm2.terminate(), 0, "vhubd --no-fd-store exits 0")


def main(t):
    part_inventory(t)
    try:
        part_store(t)
    finally:
        if os.environ.get("VHUB_PRINT_LOGS"):
            t.print_logs()


if __name__ == "__main__":
    run(main)

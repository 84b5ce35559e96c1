#!/usr/bin/env python3
"""What a device.add costs the restart state, and that devices added and
removed in cycles come back from planned and crash restarts (issue 10:
"a memory change or a device.add does not get measurably slower";
docs/restart.md, "Groups" and "Still open"; the timings are
tests/bench/bench_restart.py commit's).  Checked on what the daemon writes
and stores, not on time:

  commits  a device.add (a qemu-storage-daemon export) writes its VM's
           snapshot once -- when its handshake's result is decided, before
           the answer -- and so does its device.remove (never started: no
           request goes to the back-end, so no "busy" snapshot before the
           first), and neither pushes anything to the service manager: the
           device's fds are appended to the VM's stored group (no FDSTORE=1
           of a group of its own, no d<id> in the store), and at its
           removal its back-end (the test back-end, which counts its
           connections) sees the connection end at once, although the
           stash still holds the socket until its compaction.  A crash in
           the middle of a device.add (the test back-end holds ADD_MEM_REG):
           the call is answered -32011, the device is not listed, its
           back-end sees its connection close, and the new process holds
           the fds it held before the add.
  cycles   a started qsd device (an image file, data written), 30
           device.add + device.remove cycles of another export (some after
           a second of quiet, when the VM's stash is no longer appended to),
           then a second started qsd device added; two planned restarts and
           two crashes, each right after a cycle and the add of one more
           device that stays: every device listed as before and the started
           ones serving their rings (data read back on both), the process
           holding the same fds by kind, the store the same groups -- but
           after a planned restart one more group per device that was in
           the VM's (the stop moves them into groups of their own, as a
           format-1 vhubd has them; a crash keeps them in the VM's) -- and
           the VM's stored stash exactly the fds the daemon holds in that
           group (no dead member of a removed device, none missing).
  room     a store of 24 entries ($FDSTORE, as systemd >= 254 says it)
           and root's VM with 20 devices, all in the VM's group: a planned
           stop would move them into groups of their own, for which the store
           has no room.  They stay in the VM's group (one warning), and the
           restart carries every one: listed as before, no loss, their
           back-end sees no new connection.  Before the fix the stop moved
           them anyway: the pushes past the store's room failed, and the
           devices whose own group failed were left in neither (lost at the
           restore: reconnected, or gone).
"""

import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                              # noqa: E402
from vhubtest.backends import QsdBackend, QsdNullBackend         # noqa: E402
from vhubtest.memory import GuestMemory                          # noqa: E402
from vhubtest.procs import wait_until                            # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.testing import check, check_eq, log, run_parts     # noqa: E402
from test_fd_inventory import inventory, same_file                # noqa: E402
from test_restart import Managed, listing, proc_fd_kinds          # noqa: E402
from test_restart_commit import generation, stash_messages       # noqa: E402

BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)


def pushes(m, since):
    """The FDSTORE=1 messages the manager accepted after index since:
    [(name, line list)]."""
    out = []
    for _, _, lines in m.sm.messages[since:]:
        if "FDSTORE=1" in lines:
            name = [x[len("FDNAME="):] for x in lines if x.startswith("FDNAME=")]
            out.append(name[0] if name else None)
    return out


def part_commits(t):
    d = t.tmpdir()
    m = Managed(t, d)
    null = t.enter(QsdNullBackend([m.socket("x.sock")], log_dir=d))
    tb = t.enter(TestBackend([m.socket("tb.sock")], args=["--queues", "1"], log_dir=d))
    t.add_log("test back-end", tb.log_path)
    c, mem, vmm = m.vmm(t, 8 << 20)
    hot = GuestMemory(2 << 20, base=1 << 32).regions[0]
    vmm.add_region(hot)     # the VM's group changes: its stash is appended to from here

    since = len(m.sm.messages)
    writes, removes = [], []
    for i in range(10):
        g0, _ = generation(m, "s1")
        c.call("device.add", {"vm": "vm0", "device": "x", "socket": null.sockets[0], "type": "blk"})
        g1, _ = generation(m, "s1")
        c.call("device.remove", {"vm": "vm0", "device": "x"})
        g2, _ = generation(m, "s1")
        writes.append(g1 - g0)
        removes.append(g2 - g1)
    check_eq(writes, [1] * 10, "each device.add wrote its VM's snapshot once (generations)")
    # its removal sends the back-end nothing (never started): no "busy"
    # snapshot before it, one after
    check_eq(removes, [1] * 10, "each device.remove of a device never started wrote it once")
    got = pushes(m, since)
    log("pushes to the manager during 10 device.add + device.remove: %s" % got)
    check_eq([n for n in got if n is None or not n.startswith("v")], [],
             "no group of a device's own was pushed (its fds joined the VM's group)")
    check(len(got) < 10, "fewer pushes than device.adds: the VM's stash is appended to", got)
    check(not any(n.startswith("d") for n in m.sm.names()), "the store holds no device group",
          m.sm.names())

    # the back-end sees the end when its device is removed, while the
    # removed socket may still be in the stash (dead, shut down)
    c.call("device.add", {"vm": "vm0", "device": "y", "socket": tb.socket, "type": "blk"})
    tb.wait_connected()
    c.call("device.remove", {"vm": "vm0", "device": "y"})
    tb.wait_until(lambda: not tb.connected(), 5.0, what="the test back-end to see its connection end")
    log("the test back-end saw its connection end after device.remove")

    # a crash in the middle of a device.add: the snapshot was not written
    # for it, and need not be
    time.sleep(0.5)
    at_rest = proc_fd_kinds(m.sm.pid)
    names = sorted(m.sm.names())
    n = tb.requests().get("ADD_MEM_REG", 0)
    tb.misbehave("ADD_MEM_REG", "delay", delay_ms=2000, count=1)
    pending = c.request("device.add", {"vm": "vm0", "device": "y", "socket": tb.socket, "type": "blk"})
    tb.wait_request("ADD_MEM_REG", count=n + 1)
    m.restart(sig=signal.SIGKILL)
    ev = c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    check_eq(ev.get("restarts"), 1, "the VMM's connection is carried across the crash")
    resp = pending.response(10)
    check_eq(resp.error and resp.error.get("code"), -32011, "the device.add in flight is answered -32011")
    check_eq(vmm.device_list(), [], "the device being added is not listed after the crash")
    tb.wait_until(lambda: not tb.connected(), 5.0, what="the test back-end to see its connection close")
    time.sleep(0.5)
    check_eq(proc_fd_kinds(m.sm.pid), at_rest, "the new process holds the fds the old one held before the add")
    check_eq(sorted(m.sm.names()), names, "the store holds the groups it held before the add")
    tb.clear_misbehave()
    dev = vmm.add_device("y", tb.socket, type="blk")
    check(dev["features"] != 0, "the back-end serves a device.add after the crash", dev)
    vmm.remove_device("y")
    vmm.destroy()
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def vm_stash_exact(m, group):
    """The stored stash of group, settled (one message: peeked, so the
    manager's copy keeps it), holds exactly the fds the daemon holds in that
    group (its inventory, at debug level): the same open files, no more (a
    removed device's dead fds), no fewer."""
    wait_until(lambda: stash_messages(m, group) == 1, 5.0, what="%s's stash to settle into one message" % group)
    inv = inventory(m.sm.pid, m.sm.log_path)
    live = [fd for fd, (_, g) in inv.items() if g == group]
    stash = socket.socket(fileno=m.sm.dup(group))
    got = []
    try:
        _, anc, _, _ = stash.recvmsg(1, socket.CMSG_SPACE(253 * 4), socket.MSG_PEEK | socket.MSG_DONTWAIT)
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got += [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, len(raw), 4)]
        unmatched = [g for g in got if not any(same_file(os.getpid(), g, m.sm.pid, fd) for fd in live)]
        check_eq(unmatched, [], "%s's stash holds no fd the daemon does not hold in it" % group)
        check_eq(len(got), len(live), "%s's stash holds every fd the daemon holds in it (%d)"
                 % (group, len(live)))
    finally:
        for fd in got:
            os.close(fd)
        stash.close()


def part_cycles(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--log-level", "debug"])
    disks = [os.path.join(d, "disk%d.img" % i) for i in range(2)]
    for p in disks:
        scenarios.make_image(p, 8 << 20)
    qsd = [t.enter(QsdBackend(disks[i], m.socket("blk%d.sock" % i), num_queues=1, log_dir=d)) for i in range(2)]
    null = t.enter(QsdNullBackend([m.socket(n + ".sock") for n in ("x", "z1", "z2", "z3", "z4")], log_dir=d))
    c, mem, vmm = m.vmm(t, 8 << 20)
    queues = {}
    data = {}

    def add_started(name, i):
        vmm.add_device(name, m.socket("blk%d.sock" % i), type="blk")
        q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
        vmm.start_device(name, BLK1, [q.vq])
        data[name] = os.urandom(4096)
        q.write_sectors(8 * i, data[name])
        queues[name] = (q, i)

    def served(what):
        for name, (q, i) in queues.items():
            check_eq(q.read_sectors(8 * i, 8), data[name], "%s: %s serves its ring, the data there" % (what, name))

    add_started("blk0", 0)
    for i in range(30):
        if i % 10 == 9:
            time.sleep(1.2)     # the VM's stash settles: the next change rebuilds it
        c.call("device.add", {"vm": "vm0", "device": "x", "socket": null.sockets[0], "type": "blk"})
        c.call("device.remove", {"vm": "vm0", "device": "x"})
    add_started("blk1", 1)
    served("before the restarts")
    check(not any(n.startswith("d") for n in m.sm.names()), "the store holds no device group",
          m.sm.names())
    time.sleep(1.5)     # settled: what the store holds is what the daemon holds
    vm_stash_exact(m, "v1")
    joined = {"blk0", "blk1"}   # devices whose fds are in the VM's group
    for k, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL), 1):
        what = "%s %d" % ("planned restart" if sig == signal.SIGTERM else "crash", k)
        # the crashes come right after a cycle: the stash holds a removed
        # device's dead fds and appended messages when they happen
        c.call("device.add", {"vm": "vm0", "device": "x", "socket": null.sockets[0], "type": "blk"})
        c.call("device.remove", {"vm": "vm0", "device": "x"})
        # and one that stays: its fds in the VM's group when it happens
        vmm.add_device("z%d" % k, null.sockets[k], type="blk")
        joined.add("z%d" % k)
        before = listing(c)
        if sig == signal.SIGTERM:
            time.sleep(0.3)
        at_rest = proc_fd_kinds(m.sm.pid)
        names = sorted(m.sm.names())
        if sig == signal.SIGTERM:
            # a planned stop writes what a format-1 vhubd reads: each device
            # in a group of its own (docs/restart.md, "Versions")
            names = sorted(names + ["d?"] * len(joined))
            joined = set()
        m.restart(sig=sig)
        ev = c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
        check_eq(ev.get("restarts"), k, "%s: daemon.restarted first" % what)
        check_eq(listing(c), before, "%s: every device, region and VM listed as before" % what)
        served("after the " + what)
        time.sleep(1.5)
        check_eq(proc_fd_kinds(m.sm.pid), at_rest, "%s: the new process holds the same fds by kind" % what)
        def stored():
            return sorted("d?" if n[:1] == "d" and n not in names else n for n in m.sm.names())
        wait_until(lambda: stored() == names, 5.0,
                   what="%s: the store to hold the groups %s (it holds %s)" % (what, names, m.sm.names()))
        vm_stash_exact(m, "v1")
    for name in queues:
        vmm.stop_device(name)
        vmm.remove_device(name)
    vmm.destroy()
    for q, _ in queues.values():
        q.vq.close()
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def part_room(t):
    store, n = 24, 20
    d = t.tmpdir()
    m = Managed(t, d, fd_store_max=store, env=dict(os.environ, FDSTORE=str(store)))
    socks = [m.socket("tb%d.sock" % i) for i in range(n)]
    tb = t.enter(TestBackend(socks, log_dir=d))
    c, _mem, vmm = m.vmm(t, 1 << 20)
    c.call("events.subscribe", {})
    for i in range(n):
        vmm.add_device("dev%d" % i, socks[i], type="blk")
    before = listing(c)
    conns = [tb.socket_status(i)["connections"] for i in range(n)]
    check_eq(m.restart(), 0, "a planned restart: the old vhubd exits 0")
    ev = c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    log("carried: %s" % ev)
    check_eq(listing(c), before, "every device listed as before the restart")
    lost = [e for e in c.events() if e.get("event") in ("device.disconnected", "device.reconnected",
                                                         "device.failed", "device.removed")]
    check_eq(lost, [], "no device lost or restored")
    check_eq([tb.socket_status(i)["connections"] for i in range(n)], conns,
             "no back-end saw a new connection")
    with open(m.sm.log_path, errors="replace") as f:
        text = f.read()
    check("stay in their VMs' fd-store groups" in text, "the stop said the devices stay in their VM's group")
    check(len(m.sm.names()) <= store, "the store within its size", m.sm.names())
    for i in range(n):
        vmm.remove_device("dev%d" % i)
    vmm.destroy()
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


if __name__ == "__main__":
    run_parts({"commits": part_commits, "cycles": part_cycles, "room": part_room}, "commits")

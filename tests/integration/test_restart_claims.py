#!/usr/bin/env python3
"""A restore that cannot take an object back whole (docs/restart.md, "A
group missing a member"): the manager is made to drop one fd from a stored
group between two processes (ServiceManager.stash_drop_groups), so that the
owner's restore claims part of what it needs and fails half-way.  What it
claimed must leave the group before it is closed, or the store keeps trying
to rebuild the group's stash with a closed fd ("not stored (Bad file
descriptor)": the group would not survive the next restart) -- or, kept
open by nobody, leaks.

    test_restart_claims.py ring-gone   a started device's ring: its call
                                       eventfd gone from the store
    test_restart_claims.py listener-half
                                       two server-mode devices: one's
                                       listener's directory, the other's
                                       listening socket gone from the store;
                                       each makes its socket again
"""

import os
import signal
import socket
import stat
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk                                         # noqa: E402
from vhubtest.client import Client                               # noqa: E402
from vhubtest.servicemanager import eventfd_id                   # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.procs import wait_until                            # noqa: E402
from vhubtest.testing import check_eq, log, run_parts            # noqa: E402
from vhubtest.vmm import Vmm                                     # noqa: E402
from test_fd_inventory import check_libevent, inventory, unaccounted  # noqa: E402
from test_restart import BLK1, Managed, one_blk_device           # noqa: E402


def store_matches_daemon(m, what):
    """The store holds exactly the daemon's live groups, no group lost a
    stash rebuild to a closed member, and every fd the process holds is one
    an owner names (libevent's apart)."""
    check_eq(m.sm.stale_member_lines(), [], "%s: no group stored with an fd closed before it left" % what)
    time.sleep(0.3)     # the loop's rebuilds, the manager's removals
    inv = inventory(m.sm.pid, m.sm.log_path)
    live = sorted({g for _, (name, g) in inv.items() if g})
    check_eq(sorted(m.sm.names()), live, "%s: the store holds exactly the daemon's live groups" % what)
    check_libevent(unaccounted(m.sm.pid, inv), "%s: no fd held that no owner names" % what)


def part_ring_gone(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--log-level", "debug", "--backend-timeout-ms", "3000"])
    qsd, c, mem, vmm, q = one_blk_device(t, m, d)
    check_eq(len(q.read_sectors(0, 1)), 512, "blk0 serves its ring")
    call = eventfd_id(q.vq.call_fd)
    dropped = {}

    def drop_call():
        dropped.update(m.sm.stash_drop_groups(lambda fd: eventfd_id(fd) == call))

    c.events()
    m.restart(sig=signal.SIGKILL, before_start=drop_call)
    check_eq(sum(dropped.values()), 1, "the ring's call eventfd dropped from the store (%s)" % dropped)
    c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    # a ring the store could not give back whole: the device is restored as
    # lost (docs/restart.md), its ring not configured; the VMM starts it again
    ev = c.wait_event(lambda e: e.get("device") == "blk0", 10)
    check_eq(ev.get("event"), "device.disconnected", "blk0, its ring not passed back whole, restored as lost")
    ev = c.wait_event(lambda e: e.get("device") == "blk0", 15)
    check_eq(ev.get("event"), "device.reconnected", "blk0 restored through the reconnect path")
    store_matches_daemon(m, "after the restart")
    vmm.stop_device("blk0")
    q.vq.close()
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)     # a ring anew, as a VMM's reset
    vmm.start_device("blk0", BLK1, [q.vq])
    check_eq(len(q.read_sectors(0, 1)), 512, "blk0, started again, serves its ring")
    m.restart(sig=signal.SIGTERM)
    c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    check_eq(len(q.read_sectors(0, 1)), 512, "blk0 serves its ring after a second restart")
    store_matches_daemon(m, "after a second restart")
    m.finish(c, vmm, "blk0", [q.vq])
    log("ok: a ring the store could not give back whole: what came back of it closed out of its group")


def is_listener(fd):
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False        # not a socket
    try:
        return s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        s.close()


def is_dir(fd):
    return stat.S_ISDIR(os.fstat(fd).st_mode)


def listener_inodes(m, inv):
    """The inodes of the listening sockets the daemon's devices hold now."""
    return sorted(int(os.readlink("/proc/%d/fd/%d" % (m.sm.pid, fd))[len("socket:["):-1])
                  for fd, (name, _) in inv.items() if name.startswith("dev/") and name.endswith("/listen"))


def part_listener_half(t):
    """Two server-mode devices, each in its own VM: A's listener's directory
    and B's listening socket gone from the store.  The half of each
    listener that came back leaves the group as it closes, each device keeps
    its connected back-end and makes its socket again, where a new back-end
    connects; the stashes then hold the new listeners, not the old ones."""
    d = t.tmpdir()
    m = Managed(t, d, extra=["--log-level", "debug", "--backend-timeout-ms", "3000"])
    c = t.enter(Client(m.control, timeout=15))
    backends = {}
    for vm in ("a", "b"):
        srv = m.socket(vm + ".sock")
        Vmm(c, vm).create()
        pend = c.request("device.add", {"vm": vm, "device": "S", "socket": srv, "mode": "server"})
        wait_until(lambda: os.path.exists(srv), 5.0, what="the device's socket")
        backends[vm] = t.enter(TestBackend(connect=[srv], log_dir=d, control=os.path.join(d, vm + ".ctl")))
        pend.result(5.0)
    time.sleep(0.3)
    inv = inventory(m.sm.pid, m.sm.log_path)
    group = {vm: [g for _, (name, g) in inv.items() if name == "dev/0/%s/S/listen" % vm][0] for vm in ("a", "b")}
    log("the devices' groups: %s" % group)
    dropped = {}

    def drop_halves():
        dropped["a"] = m.sm.stash_drop(group["a"], is_dir)
        dropped["b"] = m.sm.stash_drop(group["b"], is_listener)

    c.events()
    m.restart(sig=signal.SIGKILL, before_start=drop_halves)
    check_eq(dropped, {"a": 1, "b": 1}, "A's listener's directory and B's listening socket dropped")
    c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    for vm in ("a", "b"):
        check_eq(Vmm(c, vm).device_state("S")["state"], "ready", "%s's device kept its back-end" % vm)

    def listening_again():
        with open(m.sm.log_path, "rb") as f:
            return f.read().count(b"listens again on") >= 2
    wait_until(listening_again, 10.0, what="both devices to make their sockets again")
    for vm in ("a", "b"):
        backends[vm].kill()
        ev = c.wait_event(lambda e: e.get("vm") == vm and e.get("device") == "S", 10)
        check_eq(ev.get("event"), "device.disconnected", "%s's back-end gone" % vm)
        backends[vm].start()
        ev = c.wait_event(lambda e: e.get("vm") == vm and e.get("device") == "S", 15)
        check_eq(ev.get("event"), "device.reconnected", "%s's device: a new back-end connected to the socket "
                 "made again" % vm)
    store_matches_daemon(m, "after the restart")
    live = listener_inodes(m, inventory(m.sm.pid, m.sm.log_path))
    check_eq(len(live), 2, "both devices listen")
    stashed = []

    def look():
        # what the devices' stashes hold (rewritten whole, nothing dropped)
        m.sm.stash_drop_groups(lambda fd: is_listener(fd) and stashed.append(os.fstat(fd).st_ino))

    m.restart(sig=signal.SIGKILL, before_start=look)
    # a listener that left its group is out of its stash (a socket leaving
    # compacts it): the manager holds the devices' new listeners, not the
    # earlier run's (whose names would stay in use)
    check_eq(sorted(stashed), live, "the devices' stashes hold exactly their live listeners")
    c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
    for vm in ("a", "b"):
        check_eq(Vmm(c, vm).device_state("S")["state"], "ready", "%s's device after a second restart" % vm)
    store_matches_daemon(m, "after a second restart")
    for vm in ("a", "b"):
        Vmm(c, vm).destroy()
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")
    log("ok: half a listener passed back: the half closed out of its group, the socket made again")


if __name__ == "__main__":
    run_parts({"ring-gone": part_ring_gone, "listener-half": part_listener_half}, "ring-gone")

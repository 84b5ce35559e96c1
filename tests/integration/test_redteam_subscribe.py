#!/usr/bin/env python3
"""Red team: events.subscribe without a VM, for root and for others.

The contract (events.subscribe): "this connection also receives the events
of that VM (or of all VMs of its uid; for root without `vm`: of every VM
of every uid)".  conn_wants() in control-server.c matched a subscription
without a VM only against the connection's own uid, so root's {} brought
root's VMs' events and nothing of anyone else's -- an operator's monitor
subscribed as root missed every other uid's device.disconnected.

Checked both ways with vm.lingering (a VM of root's, of uid 4321's and of
uid 65534's left by its connection): root's subscriber gets all three,
uid 65534's subscriber its own only -- and no event at all of the
others' VMs (vm.created, vm.destroyed... come too).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import OTHER, USER, Child, run_as, start_daemon, workdir  # noqa: E402
from vhubtest.client import Client                           # noqa: E402
from vhubtest.testing import check, check_eq, log, run       # noqa: E402


def vm_life(control, name):
    """A VM created, left to linger, attached and destroyed."""
    c = Client(control)
    c.call("vm.create", {"vm": name, "linger_ms": 60000})
    c.close()
    c = Client(control)
    c.call("vm.attach", {"vm": name})
    c.call("vm.destroy", {"vm": name})
    c.close()


def seen(sub, timeout=0.5):
    """(event, vm) of every event the subscriber got, in order."""
    out = []
    while True:
        try:
            ev = sub.wait_event(None, timeout)
        except Exception:  # noqa: BLE001 - none within the time
            return out
        out.append((ev["event"], ev.get("vm")))


def main(t):
    daemon = start_daemon(t, workdir(t))

    root_sub = daemon.client()
    root_sub.call("events.subscribe", {})

    def user_part(w_fd, r_fd):
        sub = Client(daemon.control)
        sub.call("events.subscribe", {})
        os.write(w_fd, b"s")
        os.read(r_fd, 1)              # the others' VMs live and die meanwhile
        vm_life(daemon.control, "mine")
        got = seen(sub, 1.0)
        os.write(w_fd, repr(got).encode() + b"\n")
    uid = Child(USER, user_part)
    check_eq(uid.read(), b"s", "uid %d subscribed" % USER)
    vm_life(daemon.control, "roots")
    check_eq(run_as(OTHER, vm_life, daemon.control, "others"), 0, "uid %d's VM lived and died" % OTHER)
    uid.write(b"g")
    user_seen = eval(uid.readline())     # noqa: S307 - our own child's repr
    uid.wait()
    root_seen = seen(root_sub, 1.0)
    log("root's subscriber saw %s" % root_seen)
    log("uid %d's subscriber saw %s" % (USER, user_seen))

    check_eq([e for e in user_seen if e[0] == "vm.lingering"], [("vm.lingering", "mine")],
             "uid %d's subscriber gets its own VM's vm.lingering" % USER)
    check_eq(sorted(set(vm for _, vm in user_seen)), ["mine"],
             "uid %d's subscriber gets no event of another uid's VM" % USER)
    missing = ["uid %d's" % uid for uid, name in ((0, "roots"), (OTHER, "others"), (USER, "mine"))
               if ("vm.lingering", name) not in root_seen]
    check(not missing, "root's events.subscribe {} gets the events of every uid's VMs",
          "missing: %s" % ", ".join(missing))


run(main)

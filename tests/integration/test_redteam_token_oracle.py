#!/usr/bin/env python3
"""Red team: back-end request tokens count every uid's back-end requests.

A device.backend_request event carries a token for device.backend_reply;
channel_forward() and channel_lookup() take it from one counter of the
whole daemon (++ctx->next_token).  A uid that watches the tokens of its
own device's requests learns how many back-end requests (host notifiers,
SHMEM_MAP/UNMAP, IOTLB misses, shared-object lookups of exporters) the
other uids' VMs made in between -- and when: a trace of VMs that are not
its own, which the contract rules out ("Another uid sees no trace of a VM
that is not its own").

The test: uid 65534 and uid 4321 each have a VM with a device on a
back-end of their own.  uid 65534's back-end sends a host-notifier
request, uid 4321's sends ten, uid 65534's sends another: the tokens uid
65534 sees must not tell it that ten requests happened elsewhere (they
must not be 11 apart).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import OTHER, USER, Child, start_daemon, workdir  # noqa: E402
from vhubtest.client import Client                           # noqa: E402
from vhubtest.testbackend import TestBackend                 # noqa: E402
from vhubtest.testing import check, check_eq, log, run       # noqa: E402


def vmm(control, sock, w_fd, r_fd):
    """As a uid: its VM and device; told a number, waits for that many more
    events and reports the tokens of all its events; anything else ends it."""
    c = Client(control)
    c.call("vm.create", {"vm": "v"})
    c.call("device.add", {"vm": "v", "device": "x", "socket": sock})
    os.write(w_fd, b"ready\n")
    tokens = []
    while True:
        cmd = os.read(r_fd, 64).strip()
        if not cmd.isdigit():
            break
        want = len(tokens) + int(cmd)
        while len(tokens) < want:
            ev = c.wait_event(lambda e: e["event"] == "device.backend_request", 5)
            tokens.append(int(ev["token"], 0) if isinstance(ev["token"], str) else ev["token"])
            for fd in ev.get("_fds", []):
                os.close(fd)
        os.write(w_fd, (" ".join(map(str, tokens)) + "\n").encode())
    c.close()


class Side:
    def __init__(self, t, daemon, uid, name):
        self.sock = daemon.backend_socket(name)
        self.tb = t.enter(TestBackend([self.sock], log_dir=daemon.workdir))
        os.chmod(self.sock, 0o666)
        self.child = Child(uid, vmm, daemon.control, self.sock)
        check_eq(self.child.readline(), b"ready", "uid %d has its VM and device" % uid)

    def requests(self, n):
        for _ in range(n):
            self.tb.host_notifier(queue=0, fd=False, need_reply=False)
        self.child.write(b"%d\n" % n)
        return [int(x) for x in self.child.readline().split()]

    def stop(self):
        self.child.wait()


def main(t):
    d = workdir(t)
    daemon = start_daemon(t, d)
    me = Side(t, daemon, USER, "me.sock")
    t.defer(me.stop)
    other = Side(t, daemon, OTHER, "other.sock")
    t.defer(other.stop)

    me.requests(1)
    theirs = other.requests(10)
    mine = me.requests(1)
    log("uid %d's tokens: %s; uid %d's: %s" % (USER, mine, OTHER, theirs))
    check(mine[1] - mine[0] != 1 + len(theirs),
          "uid %d's tokens do not count uid %d's back-end requests" % (USER, OTHER),
          "%d then %d: the %d requests of uid %d's back-end in between show" % (mine[0], mine[1],
                                                                                 len(theirs), OTHER))


run(main)

#!/usr/bin/env python3
"""Red team: a VM root created for a uid lends that uid root's rights.

Root may create a VM for another uid ("uid": N); the VM then keeps root's
credentials for every back-end path operation (docs/security.md: "a VM
root creates for another uid keeps root's"), so that root's own
device.add on it works with root's rights.  But the VM belongs to uid N:
every method takes it by uid, not by owning connection, so any
connection of uid N may call device.add on it too -- and the daemon then
resolves, connects, binds and unlinks with root's identity for uid N.
The owner rule (socket of uid N or root) lets root's sockets through, so
uid N reaches what docs/security.md says it never does: "root's 0600
socket or a root-only directory are refused (-32010) whatever the path
looks like".  vm.attach by uid N would have replaced the credentials with
its own; calling methods without attaching never does.

The test: root creates vm "t" for uid 65534 (an orchestrator's
pre-created VM) and keeps owning it; ROOTDIR is root's 0700 directory
inside --backend-dir with root's 0600 back-end socket in it.  Over its own
connection uid 65534 then (1) adds a client-mode device on root's socket
and (2) a server-mode device inside ROOTDIR.  Both must answer -32010;
nothing may connect to root's back-end and nothing may appear in ROOTDIR.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, mkdir, start_daemon, workdir         # noqa: E402
from vhubtest.client import BACKEND_NOT_ALLOWED                 # noqa: E402
from vhubtest.limits import UnprivAgent                         # noqa: E402
from vhubtest.testbackend import TestBackend                    # noqa: E402
from vhubtest.testing import check, log, run                    # noqa: E402
from vhubtest.victims import check_unchanged, snapshot          # noqa: E402


def main(t):
    d = workdir(t)
    daemon = start_daemon(t, d, ["--backend-timeout-ms", "1000"])
    rootdir = mkdir(os.path.join(daemon.backend_dir, "rootdir"), 0, 0o700)
    rsock = os.path.join(rootdir, "r.sock")
    tb = t.enter(TestBackend([rsock], log_dir=d))
    os.chmod(rsock, 0o600)
    before = snapshot(rootdir)

    root = daemon.client()
    root.call("vm.create", {"vm": "t", "uid": USER})
    agent = UnprivAgent(daemon.control, uid=USER)
    t.defer(agent.stop)
    check(agent.connect() == {}, "uid %d connects" % USER)
    vms = agent.call("vm.list")["vms"]
    check([v["vm"] for v in vms] == ["t"], "uid %d sees the VM root created for it" % USER, vms)

    wrong = []
    a = agent.raw_call("device.add", {"vm": "t", "device": "c", "socket": rsock})
    log("uid %d: client-mode device.add on root's 0600 socket in root's 0700 directory: %s" % (USER, a))
    if a.get("error", {}).get("code") != BACKEND_NOT_ALLOWED:
        wrong.append("client mode on root's private socket answered %s" % a)
    planted = os.path.join(rootdir, "planted.sock")
    a = agent.raw_call("device.add", {"vm": "t", "device": "s", "socket": planted, "mode": "server"})
    log("uid %d: server-mode device.add inside root's 0700 directory: %s" % (USER, a))
    if a.get("error", {}).get("code") != BACKEND_NOT_ALLOWED:
        wrong.append("server mode inside root's private directory answered %s" % a)
    if tb.connections(0):
        wrong.append("root's private back-end got %d connection(s)" % tb.connections(0))
    check(not wrong, "uid %d gets no more than its own rights through a VM root created for it" % USER,
          "; ".join(wrong))
    check_unchanged(before, snapshot(rootdir), "root's private directory")


run(main)

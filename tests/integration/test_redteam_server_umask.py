#!/usr/bin/env python3
"""Red team: who may be a server-mode device's back-end.

In server mode the daemon binds the socket (vhub-backend-path.c
bind_listen()) with whatever umask it was started with -- the unit's
UMask=0077 makes it 0700, but vhubd started by hand from a shell with
umask 0002 or 0000 creates it group- or world-writable -- and
device_accept_cb() takes the first connection that comes, without asking
SO_PEERCRED who it is.  Client mode has a rule for this (the contract:
"only to sockets whose owner uid is the requesting uid or root"); server
mode has none, so under such a umask any uid can be another uid's
back-end: it connects first and is sent the VM's memory table -- the
guest's RAM fds -- and every ring's eventfds.

The test: vhubd under umask 0000; uid 65534 adds a server-mode device in
its own directory (0755, so others can reach the name); uid 4321 runs the
back-end that connects to it; uid 65534 then adds a memory region.
Either the daemon refuses uid 4321's back-end (the device is not ready
with it) or uid 4321 cannot connect at all (a socket mode that does not
depend on the umask); uid 4321's back-end must never see the region.
"""

import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import OTHER, USER, mkdir, start_daemon, workdir  # noqa: E402
from vhubtest.daemon import Daemon                            # noqa: E402
from vhubtest.limits import UnprivAgent                       # noqa: E402
from vhubtest.testbackend import TestBackend, TestBackendAs   # noqa: E402
from vhubtest.testing import Skip, check, log, run            # noqa: E402


class UmaskDaemon(Daemon):
    """vhubd started from a shell whose umask is 0000."""

    def argv(self):
        return ["sh", "-c", 'umask 0000; exec "$@"', "sh"] + super().argv()


def main(t):
    d = workdir(t)
    if not shutil.which("setpriv"):
        raise Skip("setpriv is needed to run the back-end as another uid")
    daemon = start_daemon(t, d, cls=UmaskDaemon)

    udir = mkdir(os.path.join(daemon.backend_dir, "u"), USER, 0o755)
    sock = os.path.join(udir, "s.sock")
    odir = mkdir(os.path.join(d, "other"), OTHER, 0o755)
    binary = os.path.join(odir, "vhub-test-backend")
    shutil.copy(TestBackend(["/nonexistent"]).binary, binary)
    os.chmod(binary, 0o755)

    agent = UnprivAgent(daemon.control, uid=USER)
    t.defer(agent.stop)
    check(agent.connect() == {}, "uid %d connects" % USER)
    agent.call("vm.create", {"vm": "v"})
    # uid 4321's back-end keeps trying to connect to uid 65534's socket
    tb = t.enter(TestBackendAs(binary, OTHER, connect=[sock], log_dir=odir))
    add = agent.raw_call("device.add", {"vm": "v", "device": "s", "socket": sock, "mode": "server"})
    mode = oct(os.stat(sock).st_mode & 0o777) if os.path.exists(sock) else None
    log("device.add: %s; the socket's mode: %s" % (add, mode))
    region = agent.raw_call("vm.memory.add", {"vm": "v", "gpa": 0, "size": 4096, "fd": 0}, memfds=1)
    log("vm.memory.add: %s" % region)
    time.sleep(0.5)
    conn = tb.conn(0)
    got = conn["regions"] if conn else []
    check(not got, "uid %d's back-end never gets uid %d's guest memory through its server-mode socket"
          % (OTHER, USER), "it mapped %s" % got)


run(main)

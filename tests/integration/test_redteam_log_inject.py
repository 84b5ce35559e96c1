#!/usr/bin/env python3
"""Red team: a socket name writes lines into the daemon's log.

A back-end socket path is the one free-form string a client hands the
daemon (names are [A-Za-z0-9._-]); any byte but NUL is allowed, and a
file name may hold a newline.  The daemon logs the path ("device added
(client mode, socket %s)", "cannot connect to back-end socket %s", ...)
as it is: on stderr -- vhubd run by hand, under a supervisor that keeps
stderr, or in a container -- a uid's newline starts a line of its own
choosing, e.g. a forged "vhubd[...] warning: vm=prod uid=0 ..." that
whoever reads the log (or a script that parses its key=value context, as
the tests do) takes for the daemon's.  Terminal escapes pass through too.

The test: uid 65534 names its back-end socket
  "x\\nvhubd[1.000] err: vm=prod uid=0 device=disk0 FORGED\\x1b[2J"
in its own directory, adds a device on it, lets the back-end die (more
lines naming the path) and removes it.  Every line the daemon wrote to
stderr must be its own -- none may start with the uid's forged text --
and no line may carry an escape byte.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, mkdir, start_daemon, workdir         # noqa: E402
from vhubtest.limits import UnprivAgent                        # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, log, run                   # noqa: E402

NAME = "x\nvhubd[1.000] err: vm=prod uid=0 device=disk0 FORGED\x1b[2J"


def main(t):
    d = workdir(t)
    daemon = start_daemon(t, d, log_level="info")
    udir = mkdir(os.path.join(daemon.backend_dir, "u"), USER, 0o755)
    sock = os.path.join(udir, NAME)
    check(len(sock.encode()) <= 107, "the socket path fits a sockaddr_un (%d bytes)" % len(sock.encode()))
    plain = os.path.join(udir, "x.sock")
    tb = t.enter(TestBackend([plain], log_dir=d))
    os.chmod(plain, 0o666)
    os.rename(plain, sock)          # the listener answers under its new name

    agent = UnprivAgent(daemon.control, uid=USER)
    t.defer(agent.stop)
    check(agent.connect() == {}, "uid %d connects" % USER)
    agent.call("vm.create", {"vm": "v"})
    agent.call("device.add", {"vm": "v", "device": "x", "socket": sock, "reconnect_ms": 100})
    tb.kill()                       # the loss and the restore attempts name the path too
    time.sleep(0.5)
    agent.call("device.remove", {"vm": "v", "device": "x"})
    time.sleep(0.2)

    with open(daemon.log_path, "rb") as f:
        lines = f.read().split(b"\n")
    own = [ln for ln in lines if ln and not ln.startswith(b"==== ")]   # the harness's own marker
    forged = NAME.split("\n", 1)[1].split(" FORGED")[0].encode()
    foreign = [ln for ln in own if ln.startswith(forged)]
    escapes = [ln for ln in own if b"\x1b" in ln]
    log("the daemon wrote %d lines; %d are uid %d's forged line, %d carry ESC" %
        (len(own), len(foreign), USER, len(escapes)))
    for ln in (foreign + escapes)[:4]:
        log("  %r" % ln)
    check(not foreign and not escapes, "every line on the daemon's stderr is its own: uid %d's socket name "
          "neither starts a line nor carries terminal escapes" % USER)


run(main)

#!/usr/bin/env python3
"""Red team: the crash cleanup removes sockets by name, as root.

daemon/main.c crash_cleanup() runs on a fatal signal (SIGABRT from
systemd's watchdog or an abort(), SIGSEGV, SIGBUS, ... see
vhub-signals.c) and unlink()s every server-mode device's socket_path --
the canonical path the socket had when device.add created it -- with the
daemon's own (root) credentials, by walking that path from "/" again.
docs/security.md promises the opposite: the socket is removed "relative to
the directory fd and only if the name still holds the inode bind()
created", with the VM uid's file-system identity.

A non-root uid that owns the socket's directory swaps it for a symlink to
a root-only directory that holds a file of the socket's name; the next
crash deletes root's file.  The uid chooses both the directory and the
name, so any file of root's can be deleted (e.g. /etc/shadow with a
socket named "shadow").

The test: uid 65534 adds a server-mode device at BACKENDS/u/d/shadow (its
own 0700 directory; a vhub-test-backend connects to it), moves d away and
puts a symlink d -> ROOTONLY in its place (ROOTONLY: root's 0700
directory, outside --backend-dir, holding root's 0600 file "shadow").
Then the daemon gets SIGABRT, as from the watchdog.  Root's file must be
untouched; the daemon's own socket (in the moved directory) must be gone
("no signal leaves sockets behind").
"""

import os
import resource
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, mkdir, run_as, workdir, write_file          # noqa: E402
from vhubtest.daemon import Daemon                                   # noqa: E402
from vhubtest.limits import UnprivAgent                              # noqa: E402
from vhubtest.procs import wait_until                                # noqa: E402
from vhubtest.testbackend import TestBackend                         # noqa: E402
from vhubtest.testing import check, check_eq, log, run               # noqa: E402
from vhubtest.victims import check_unchanged, snapshot               # noqa: E402


def swap_for_symlink(d, target):
    os.rename(d, d + ".moved")
    os.symlink(target, d)


def main(t):
    d = workdir(t)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # SIGABRT would dump a core
    daemon = Daemon(d, extra_args=["--control-mode", "0666"])
    os.chmod(daemon.backend_dir, 0o755)
    t.add_log("vhubd", daemon.log_path)
    daemon.start()
    t.defer(lambda: daemon.proc.poll() is None and daemon.kill())

    udir = mkdir(os.path.join(daemon.backend_dir, "u"), USER, 0o755)
    sockdir = mkdir(os.path.join(udir, "d"), USER, 0o700)
    rootonly = mkdir(os.path.join(d, "rootonly"), 0, 0o700)
    victim = write_file(os.path.join(rootonly, "shadow"), "root:secret\n")
    before = snapshot(rootonly)
    sock = os.path.join(sockdir, "shadow")

    agent = UnprivAgent(daemon.control, uid=USER)
    t.defer(agent.stop)
    check_eq(agent.connect(), {}, "uid %d connects" % USER)
    agent.call("vm.create", {"vm": "vm0"})
    # the back-end connects to the socket the daemon listens on (root's
    # back-end: it may connect to anything; what matters is the daemon)
    # device.add answers once the back-end connected and the handshake ran:
    # start the back-end first (it retries until the socket exists), then add
    tb = t.enter(TestBackend(connect=[sock], log_dir=d))
    add = agent.raw_call("device.add", {"vm": "vm0", "device": "s", "socket": sock,
                                        "mode": "server"})
    check("result" in add, "uid %d: server-mode device.add in its own directory" % USER,
          add)
    wait_until(lambda: tb.connected(0), 5.0, what="the back-end to be connected")
    log("ok: uid %d's server-mode socket %s is live" % (USER, sock))

    # the uid, in its own directory: the socket's directory becomes a symlink
    check_eq(run_as(USER, swap_for_symlink, sockdir, rootonly), 0,
             "uid %d swapped its directory for a symlink to root's" % USER)
    check(os.path.exists(os.path.join(sockdir + ".moved", "shadow")),
          "the daemon's socket moved with the directory")

    # a crash, as systemd's watchdog makes one
    os.kill(daemon.pid, signal.SIGABRT)
    code = daemon.proc.wait(10)
    check(code != 0, "vhubd died of SIGABRT (exit status %s)" % code)
    daemon.exit_code = code

    check_unchanged(before, snapshot(rootonly),
                    "root's directory and its file %s after the crash cleanup" % victim)
    check(not os.path.exists(os.path.join(sockdir + ".moved", "shadow")),
          "the daemon's own socket (now in %s.moved) was removed by the crash cleanup" % sockdir)


run(main)

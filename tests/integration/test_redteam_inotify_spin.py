#!/usr/bin/env python3
"""Red team: a uid's chmod loop in its own directory stops the daemon.

A disconnected client-mode device's socket directory is watched with
inotify (IN_CREATE | IN_MOVED_TO | IN_ATTRIB, vhub-socket-watch.c).
watch_cb() reads the inotify fd until it is empty -- `while (read() > 0)`
-- and for every event naming a device's socket it tries a reconnect
at once (path checks with the uid's credentials, a connect()), each tens
of microseconds.  The directory is the uid's own: it can make events as
fast as it can call chmod(), faster than the daemon handles them, so the
loop never finds the fd empty and never returns to anything else.
Alternating two names keeps inotify from merging the events.

Measured: one process of uid 65534 chmod()ing its stale socket and
another file in a loop; root's daemon.info was not answered for the 80 s
the attack lasted, the daemon at 80% CPU.  Under systemd the watchdog
kills it after 30 s (SIGABRT, with the crash cleanup of
test_redteam_crash_unlink.py).

The test: uid 65534 adds a device on its own back-end in its own
directory (reconnect_ms one hour), the back-end dies, and uid 65534 runs
the chmod loop for 8 seconds.  Meanwhile WATCHDOG=1 must keep coming
within WATCHDOG_USEC (4 s) and root's daemon.info must be answered.
"""

import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, Child, mkdir, workdir                 # noqa: E402
from vhubtest.agent import drop_to, python_for                  # noqa: E402
from vhubtest.client import Client, ClientError                 # noqa: E402
from vhubtest.procs import wait_until                           # noqa: E402
from vhubtest.sdnotify import start_watched                     # noqa: E402
from vhubtest.testbackend import TestBackend                    # noqa: E402
from vhubtest.testing import check, log, run                    # noqa: E402

WATCHDOG_USEC = 4000000
ATTACK_S = 8.0

CHMODDER = r'''
import os, sys, time
a, b = sys.argv[1], sys.argv[2]
end = time.monotonic() + float(sys.argv[3])
n = 0
while time.monotonic() < end:
    for _ in range(1000):
        os.chmod(a, 0o755)
        os.chmod(b, 0o644)
    n += 2000
print(n, flush=True)
'''


def vmm(control, sock, w_fd, r_fd):
    """As USER: its VM and device; held until told."""
    c = Client(control)
    c.call("vm.create", {"vm": "v"})
    c.call("device.add", {"vm": "v", "device": "x", "socket": sock, "reconnect_ms": 3600000})
    os.write(w_fd, b"a")
    os.read(r_fd, 1)
    c.close()


def main(t):
    d = workdir(t)
    bdir = mkdir(os.path.join(d, "backends"), 0, 0o755)
    udir = mkdir(os.path.join(bdir, "u"), USER, 0o755)
    p, n, control = start_watched(t, d, ["--control-mode", "0666", "--log-level", "info"], WATCHDOG_USEC)
    n.wait_for("READY", value="1")
    wait_until(lambda: os.path.exists(control), 5.0, what="the control socket")

    sock = os.path.join(udir, "x.sock")
    tb = t.enter(TestBackend([sock], log_dir=d))
    os.chmod(sock, 0o666)
    uid = Child(USER, vmm, control, sock)
    try:
        check(uid.read() == b"a", "uid %d added its device" % USER)
        tb.kill()                                   # its back-end dies: the directory is watched
        os.chown(sock, USER, USER)                  # the stale socket, as the uid's own
        other = os.path.join(udir, "y")
        with open(other, "w"):
            pass
        os.chown(other, USER, USER)
        time.sleep(0.5)

        root = Client(control)
        pings, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                m = n.recv(0.2, quiet=True)
                if m and m[2].get("WATCHDOG") == "1":
                    pings.append(m[0])
        th = threading.Thread(target=watch)
        th.start()
        attacker = subprocess.Popen([python_for(USER), "-c", CHMODDER, sock, other, str(ATTACK_S)],
                                    stdout=subprocess.PIPE, cwd="/", preexec_fn=drop_to(USER), close_fds=True)
        t.defer(lambda: attacker.poll() is None and attacker.kill())
        time.sleep(1.0)
        answered = None
        try:
            root.call("daemon.info", timeout=ATTACK_S + 20)
            answered = time.monotonic()
        except ClientError as e:
            log("root's daemon.info: %s" % e)
        events = attacker.communicate(timeout=ATTACK_S + 30)[0].strip()
        end = time.monotonic()
        time.sleep(WATCHDOG_USEC / 1e6)
        stop.set()
        th.join()
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        worst = max(gaps) if gaps else float("inf")
        log("uid %d made %s chmod events in %.0f s; root's daemon.info answered %s; longest WATCHDOG=1 gap "
            "%.1f s" % (USER, events.decode(), ATTACK_S,
                        "%.1f s before the attack ended" % (end - answered) if answered else "never",
                        worst))
        check(p.poll() is None, "vhubd is still running")
        wrong = []
        if answered is None or answered > end - 1.0:
            wrong.append("root's daemon.info waited for the attack to end")
        if worst >= WATCHDOG_USEC / 1e6:
            wrong.append("no WATCHDOG=1 for %.1f s (WATCHDOG_USEC %.1f s)" % (worst, WATCHDOG_USEC / 1e6))
        check(not wrong, "the daemon keeps serving while uid %d chmods files in its own directory" % USER,
              "; ".join(wrong))
    finally:
        uid.wait()


run(main)

#!/usr/bin/env python3
"""Red team: one write of a non-root client holds the whole daemon for
seconds -- past the systemd watchdog.

vhubd is one event loop; rpc-conn hands every complete line of a read to
the server at once, and the server runs each line (each batch element)
to the end before the loop sees anything else.  The output bound (issue
15, "Amplification") limits what answers a line can make the daemon
build, but not the work:

  notifications  a request without "id" is run and never answered, so no
                 bound applies: one 1 MiB write of vm.memory.list
                 notifications on a VM with 512 regions (about 16,000 of
                 them) builds and frees 8 million JSON objects;
  batch refusal  a batch too long to be answered within the output bound
                 is refused whole, but only after control_batch_new() has
                 built and serialized a -32008 for each of its elements
                 (a 1 MiB line "[1,1,1,...]" has 524,000 of them).

Each keeps the loop away from everything else for seconds per MiB
(measured on a 2-core machine shared with other work: 8 to 16 s for the
first, 9 to 19 s for four of the second): every other uid's requests,
back-end replies and deadlines wait, and so does the WATCHDOG=1
that systemd expects every WatchdogSec/2 (vhubd.service: WatchdogSec=30s,
which a handful of such writes from a few connections passes).  systemd
then kills the daemon with SIGABRT -- and its crash cleanup runs (see
test_redteam_crash_unlink.py for what a non-root uid can make that do).

The test plays systemd's notify socket with WATCHDOG_USEC = 4 s and lets
uid 65534 make each of the two attacks once (its own connections, its
own VM).  WATCHDOG=1 must keep arriving within WATCHDOG_USEC throughout,
as it does when nobody attacks; what systemd judges as "hung" is judged
the same way here.
"""

import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, run_as, workdir                    # noqa: E402
from vhubtest.client import Client                           # noqa: E402
from vhubtest.procs import wait_until                        # noqa: E402
from vhubtest.sdnotify import start_watched                   # noqa: E402
from vhubtest.testing import check, log, run                 # noqa: E402

WATCHDOG_USEC = 4000000
MIB = 1 << 20
REGIONS = 512


def region_vm(control):
    """As USER: a VM with 512 one-page regions (its own memfd)."""
    c = Client(control, timeout=300)
    c.call("vm.create", {"vm": "big", "linger_ms": 600000})
    fd = os.memfd_create("redteam", os.MFD_CLOEXEC)
    os.ftruncate(fd, REGIONS * 4096)
    for i in range(REGIONS):
        c.call("vm.memory.add", {"vm": "big", "gpa": i * 4096, "size": 4096, "offset": i * 4096,
                                 "fd": 0}, fds=[fd])
    os.close(fd)
    c.close()


def attack_notifications(control):
    """As USER: one 1 MiB batch line of vm.memory.list notifications on its
    512-region VM (about 16,000 elements, none answered)."""
    one = b'{"jsonrpc":"2.0","method":"vm.memory.list","params":{"vm":"big"}}'
    n = MIB // (len(one) + 1)
    flood(control, [b"[" + b",".join([one] * n) + b"]\n"])


def attack_batches(control):
    """As USER: four connections, each with one 1 MiB batch line of
    524,000 elements, completed in the same instant."""
    line = b"[" + b"1," * (MIB // 2 - 2) + b"1]\n"
    flood(control, [line] * 4)


def flood(control, lines):
    """Each line on a connection of its own: all but their last byte first,
    then the last bytes together (so the daemon has every line complete at
    once), then a request behind each; returns once all are answered."""
    conns = []
    for line in lines:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(control)
        s.settimeout(300)
        s.sendall(line[:-1])
        conns.append(s)
    time.sleep(1.0)                 # the daemon reads what it can meanwhile
    for s in conns:
        s.sendall(b'\n{"jsonrpc":"2.0","id":"end","method":"daemon.info"}\n')
    for s in conns:
        buf = b""
        while b'"id":"end"' not in buf:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
        s.close()


def watch_pings(n, stop, pings):
    while not stop.is_set():
        m = n.recv(0.2, quiet=True)
        if m and m[2].get("WATCHDOG") == "1":
            pings.append(m[0])


def phase(t, n, control, what, attack):
    pings, stop = [], threading.Event()
    th = threading.Thread(target=watch_pings, args=(n, stop, pings))
    th.start()
    try:
        time.sleep(WATCHDOG_USEC / 1e6)         # a few pings before
        start = time.monotonic()
        code = run_as(USER, attack, control)
        took = time.monotonic() - start
        time.sleep(WATCHDOG_USEC / 1e6)         # and after
    finally:
        stop.set()
        th.join()
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    worst = max(gaps) if gaps else float("inf")
    log("%s: the attack took %.1f s; %d WATCHDOG=1 pings, longest gap %.1f s (WATCHDOG_USEC %.1f s)"
        % (what, took, len(pings), worst, WATCHDOG_USEC / 1e6))
    return code, worst


def main(t):
    d = workdir(t)
    p, n, control = start_watched(t, d, ["--control-mode", "0666", "--log-level", "info"], WATCHDOG_USEC)
    n.wait_for("READY", value="1")
    wait_until(lambda: os.path.exists(control), 5.0, what="the control socket")

    check(run_as(USER, region_vm, control) == 0, "uid %d made a VM with %d regions" % (USER, REGIONS))
    results = []
    for what, attack in (("a 1 MiB batch of vm.memory.list notifications", attack_notifications),
                         ("four 1 MiB batch lines of 524,000 elements each, completed at once",
                          attack_batches)):
        code, worst = phase(t, n, control, what, attack)
        check(code == 0, "%s: the attack ran as uid %d" % (what, USER))
        check(p.poll() is None, "vhubd is still running after: %s" % what)
        results.append((what, worst))
    late = ["%s (%.1f s)" % (what, worst) for what, worst in results if worst >= WATCHDOG_USEC / 1e6]
    check(not late, "WATCHDOG=1 kept arriving within WATCHDOG_USEC while uid %d wrote to its own "
          "connections; systemd would have killed vhubd during" % USER, "; ".join(late))


run(main)

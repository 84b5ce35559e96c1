#!/usr/bin/env python3
"""A long partial line fed in small writes (red team, issue 10): what the
daemon's restart records of control connections cost while one uid trickles
its lines, and what other uids' calls see meanwhile.  docs/performance.md,
"Partial lines under the fd store", has the figures.  Not a pass/fail test.

vhubd under the service manager (the fd store and snapshots on).  uid 65534
opens CONNS connections and sends each PREFIX bytes of a line that never
ends, then one byte more to each in turn for SECONDS (under a line's 10 s
deadline).  Root's client times `device.list` of its VM all along; before
the trickle the same number of calls is timed with nobody trickling.
Reported: the calls' median and 99th percentile and the daemon's CPU time
over each phase, and the bytes of the connections' records written
(the daemon's debug log).

    bench_trickle.py [CONNS [PREFIX_KIB [SECONDS]]]   (default 16 512 4)
    meson test -C build --benchmark --suite bench -v trickle

Needs root (to connect as another uid).
"""

import os
import re
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from test_backend_channel import connect_as             # noqa: E402
from test_restart import Managed                        # noqa: E402
from vhubtest.client import Client                      # noqa: E402
from vhubtest.testing import Skip, log, run             # noqa: E402
from vhubtest.vmm import Vmm                            # noqa: E402

ATTACKER = 65534


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record_bytes(path):
    """Bytes of control connections' records written, per the debug log."""
    total = 0
    with open(path, errors="replace") as f:
        for m in re.finditer(r"snapshot k\w+ written: (\d+) bytes", f.read()):
            total += int(m.group(1))
    return total


def timed_calls(client, until):
    out = []
    while time.monotonic() < until:
        t0 = time.perf_counter()
        client.call("device.list", {"vm": "vm0"})
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def phase(name, pid, calls, cpu0):
    calls.sort()
    log("%-9s device.list: %5d calls, median %7.0f us, p99 %8.0f us, max %8.0f us; vhubd CPU %.2f s"
        % (name, len(calls), statistics.median(calls), calls[int(len(calls) * 0.99)], calls[-1],
           cpu_seconds(pid) - cpu0))


def main(t):
    if os.geteuid() != 0:
        raise Skip("needs root to connect as another uid")
    args = [int(a) for a in sys.argv[1:]]
    conns, prefix_kib, seconds = (args + [16, 512, 4][len(args):])[:3]
    d = t.tmpdir()
    os.chmod(d, 0o755)
    m = Managed(t, d, extra=["--control-mode", "0666", "--log-level", "debug"])
    root = t.enter(Client(m.control, timeout=30))
    Vmm(root, "vm0").create()
    pid = root.call("daemon.info")["pid"]

    cpu0 = cpu_seconds(pid)
    phase("idle", pid, timed_calls(root, time.monotonic() + seconds), cpu0)

    hoard = [socket.socket(fileno=connect_as(m.control, ATTACKER).detach()) for _ in range(conns)]
    for s in hoard:
        t.defer(s.close)
    root.call("daemon.info")
    head = b'{"jsonrpc":"2.0","id":1,"method":"vm.list","params":{"pad":"'
    for s in hoard:
        s.sendall(head + b"x" * (prefix_kib * 1024 - len(head)))
    time.sleep(0.3)
    before = record_bytes(m.sm.log_path)
    sent = 0
    cpu0 = cpu_seconds(pid)
    until = time.monotonic() + seconds
    import threading

    def trickle():
        nonlocal sent
        while time.monotonic() < until:
            for s in hoard:
                s.send(b"x")
                sent += 1
            time.sleep(0.0005)

    th = threading.Thread(target=trickle)
    th.start()
    calls = timed_calls(root, until)
    th.join()
    phase("trickle", pid, calls, cpu0)
    time.sleep(0.3)
    log("uid %d: %d connections, %d KiB each, %d bytes trickled; connections' records written: %d MiB"
        % (ATTACKER, conns, prefix_kib, sent, (record_bytes(m.sm.log_path) - before) >> 20))


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Red team (issue 10): a long request line fed a few bytes at a time.

A control connection's restart record ("k<id>", control/control-snapshot.c)
was rewritten after every read with everything it had read and not handled,
its partial line included: uid 65534 sending a line of hundreds of KiB one
byte per write had the daemon copy (and checksum, and write into the
record's file) the whole line so far per byte -- quadratic work on the loop
every uid shares (tests/bench/bench_trickle.py: 16 such lines made other
uids' device.list 110 times slower, and 7 GiB of records were written for
94 KB received).

Now a partial line longer than an ordinary request (4 KiB) is in a record
only at a planned restart's last commit; a record that leaves one out says
so, and is not written again while only that line grows; a crash-restart
closes such a connection (the rest of its line cannot be told from its
start) and carries one with a short half request.

    test_redteam_partial_line.py    the record of the connection trickling
                                    a 256 KiB line is written at most twice
                                    for 100 one-byte reads and does not hold
                                    the line; after a crash that connection
                                    is closed without daemon.restarted, uid
                                    65533's with half a request is carried
                                    and answered; after a planned restart a
                                    long line's start is carried whole: its
                                    end completes it and it is answered.
"""

import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_backend_channel import connect_as                          # noqa: E402
from test_restart_carry import RawReader                            # noqa: E402
from test_restart_limits import ended, managed_for_all, newest_record, restarted, wait_lines  # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run  # noqa: E402

ATTACKER = 65534
OTHER = 65533
PREFIX = 256 * 1024
TRICKLED = 100


def records(sm):
    return {n for n in sm.names() if n[:1] == "k" and n[1:].isalnum()}


def conn_id(name):
    """A record's connection id (its name is k and the id in base 36)."""
    return int(name[1:], 36)


def connect_recorded(m, uid, root):
    """A raw connection as uid, and the name of its record once stored
    (the newest connection's: the highest id)."""
    before = max(map(conn_id, records(m.sm)), default=0)
    s = socket.socket(fileno=connect_as(m.control, uid).detach())
    root.call("daemon.info")            # accepted: its record is written before it reads
    new = []
    m.sm.wait_for(lambda: new.extend(n for n in records(m.sm) if conn_id(n) > before) or new, 5,
                  "the new connection's record")
    return s, max(new, key=conn_id)


def wait_record(m, name, pred, poke, what):
    end = time.monotonic() + 10
    while True:
        head = newest_record(m.sm, name)
        if head and pred(head):
            return head
        if time.monotonic() > end:
            raise TestFailure("FAILED: %s (record %s: %s)" % (what, name, head))
        poke()
        time.sleep(0.02)


def main(t):
    m, root = managed_for_all(t)
    root.call("daemon.info")
    m.sm.wait_for(lambda: records(m.sm), 5, "root's connection's record")

    # uid 65533: half of an ordinary request; uid 65534: a long line
    half = [b'{"jsonrpc":"2.0","id":"mine","meth', b'od":"daemon.info"}\n']
    small, small_rec = connect_recorded(m, OTHER, root)
    t.defer(small.close)
    small.sendall(half[0])
    wait_record(m, small_rec, lambda h: h[1] >= len(half[0]), lambda: root.call("daemon.info"),
                "uid %d's record holds its half request" % OTHER)
    longc, long_rec = connect_recorded(m, ATTACKER, root)
    t.defer(longc.close)
    readers = [RawReader(small), RawReader(longc)]
    longc.sendall(b'{"jsonrpc":"2.0","id":"long","method":"daemon.info","params":{"pad":"'.ljust(PREFIX, b"x"))
    root.call("daemon.info")
    time.sleep(0.2)
    root.call("daemon.info")
    gen0, len0 = newest_record(m.sm, long_rec)
    for _ in range(TRICKLED):
        longc.sendall(b"x")
        root.call("daemon.info")        # a loop pass after the byte's read
    time.sleep(0.1)
    root.call("daemon.info")
    gen1, len1 = newest_record(m.sm, long_rec)
    log("uid %d's record over %d one-byte reads of a %d KiB line: generation %d -> %d, %d -> %d bytes"
        % (ATTACKER, TRICKLED, PREFIX >> 10, gen0, gen1, len0, len1))
    check(gen1 - gen0 <= 2, "the record of a connection whose long partial line grows is not rewritten per read",
          gen1 - gen0)
    check(len1 < 8192, "the record leaves the long partial line out", len1)

    m.restart(sig=signal.SIGKILL)
    small.sendall(half[1])
    lines = wait_lines(readers[0], lambda ls, closed: any(x.get("id") == "mine" for x in ls) or closed, 10,
                       "uid %d's half request answered" % OTHER)
    check(restarted(lines) and lines[0] is restarted(lines)[0], "uid %d's connection was carried" % OTHER, lines[:2])
    answer = [x for x in lines if x.get("id") == "mine"]
    check(answer and answer[0].get("result", {}).get("restarts") == 1,
          "its half request completed after the crash and answered", lines[-2:])
    end = time.monotonic() + 10
    while not ended(readers[1]) and time.monotonic() < end:
        time.sleep(0.02)
    check(ended(readers[1]) and not readers[1].lines,
          "the connection mid-way into a long line at the crash is closed, without daemon.restarted",
          readers[1].lines[:2])
    with open(m.sm.log_path, errors="replace") as f:
        check("more than 4096 bytes into a line" in f.read(), "the log says why it was closed")
    m.sm.wait_for(lambda: long_rec not in m.sm.names(), 5, "its record to leave the store")
    log("ok: crash: the half request carried and answered, the long line's connection closed")

    # a planned restart carries a long line's start whole
    longc2, _ = connect_recorded(m, ATTACKER, root)
    t.defer(longc2.close)
    reader = RawReader(longc2)
    longc2.sendall(b'{"jsonrpc":"2.0","id":"long","method":"daemon.info","params":{"pad":"'.ljust(PREFIX, b"x"))
    root.call("daemon.info")
    time.sleep(0.2)
    check_eq(m.restart(), 0, "the old vhubd exits 0 (planned restart)")
    longc2.sendall(b'"}}\n')
    lines = wait_lines(reader, lambda ls, closed: any(x.get("id") == "long" for x in ls) or closed, 10,
                       "the long line answered")
    check(restarted(lines), "the connection with a long partial line was carried by the planned restart", lines[:1])
    check([x for x in lines if x.get("id") == "long"], "its line, completed after the restart, was answered "
          "(its id read back: the line was whole)", lines[-1:])
    log("ok: planned: the long line's start carried whole and answered")
    root.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


if __name__ == "__main__":
    run(main)

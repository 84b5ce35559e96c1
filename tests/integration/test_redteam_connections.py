#!/usr/bin/env python3
"""Red team: one uid takes every control connection.

--max-connections (256) is one pool for everybody: cs_accept_cb() refuses
the 257th connection whoever makes it, and nothing reserves any for root
or bounds what one uid holds (the per-uid fd budget, 14,336 with the
unit's LimitNOFILE, counts a connection as one fd: it never gets near).
So a non-root uid that opens 256 connections and sits on them locks
everyone else out -- root's own VMM or vhubctl included -- for as long as
it likes; each refusal also writes a warning line, unthrottled, to the
journal.

The test: uid 65534 connects until refused (at most 300 times) and keeps
its connections; then root and uid 4321 connect and ask daemon.info.
Both must be served (the uid may be refused, they must not).
"""

import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import OTHER, USER, Child, run_as, start_daemon, workdir  # noqa: E402
from vhubtest.client import Client, ClientError, RpcError    # noqa: E402
from vhubtest.testing import check, log, run                 # noqa: E402

MAX = 300


def hog(control, w_fd, r_fd):
    """As USER: connect until refused, each answered once (so the daemon
    has accepted it), report how many, hold them until told."""
    conns, refused = [], None
    for _ in range(MAX):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(5)
        try:
            s.connect(control)
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.info"}\n')
            answer = s.recv(65536)
        except OSError as e:
            refused = str(e)
            s.close()
            break
        if b'"result"' not in answer:
            refused = answer.decode(errors="replace")[:200]
            s.close()
            break
        conns.append(s)
    os.write(w_fd, ("%d %s\n" % (len(conns), refused)).encode())
    os.read(r_fd, 1)
    for s in conns:
        s.close()


def served(control):
    try:
        Client(control, timeout=5).call("daemon.info", timeout=5)
        return None
    except (OSError, ClientError, RpcError) as e:
        return "%s: %s" % (type(e).__name__, e)


def other_served(control):
    return 0 if served(control) is None else 1


def main(t):
    daemon = start_daemon(t, workdir(t), log_level="info")
    hogger = Child(USER, hog, daemon.control)
    try:
        line = hogger.readline().decode().split(" ", 1)
        log("uid %d holds %s connections (then: %s)" % (USER, line[0], line[1].strip()))
        why = served(daemon.control)
        other = run_as(OTHER, other_served, daemon.control)
        wrong = []
        if why:
            wrong.append("root was refused (%s)" % why)
        if other:
            wrong.append("uid %d was refused" % OTHER)
        check(not wrong, "root and uid %d are served while uid %d holds every connection it could get"
              % (OTHER, USER), "; ".join(wrong))
    finally:
        hogger.wait()


run(main)

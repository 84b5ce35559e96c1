#!/usr/bin/env python3
"""Red team: fds queued toward a back-end that stops reading escape the
per-uid fd budget.

A message to a back-end holds dups of its fds until it is written
(vhu_writer: "Messages being sent hold their own dups").  A device's
handshake pipelines one ADD_MEM_REG per region, each with a dup of the
region's fd; the kernel takes a few hundred of them into the socket and
the rest wait in the daemon's writer queue.  vhub-fd-budget.c counts a
device's socket, channel, listen and inflight fds, its rings' eventfds
and what its ops own -- not the dups in its writer queue.  So a back-end
that stops reading makes every device of its VM hold (regions - what
the socket took) fds that no budget sees, for the whole --backend-timeout-ms,
and again after every reconnect.

Measured (RLIMIT_NOFILE 20000, a budget of 4,375 per non-root uid): one
VM of uid 65534 with 500 regions and 60 devices whose back-end stops
reading at the first ADD_MEM_REG: the daemon holds 13,891 fds (about 223
per device), more than all non-root uids together may (13,125).

The test: RLIMIT_NOFILE 4096 (896 per non-root uid); uid 65534's VM with
500 regions and 40 devices on such a back-end.  The daemon must hold no
more for it than its budget (plus the part of the reserve fds already
received may use); root, over a connection opened before, adds 32
regions to its own VM in one write, and a new root connection asks
daemon.info.  (When the daemon runs out of fds itself, the dup fails and
that device is lost: the queues fill the daemon up to its limit and no
further, so only requests that need more than the few fds left fail.)
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, Child, limited_daemon, start_daemon, workdir  # noqa: E402
from vhubtest.client import Client, ClientError, RpcError  # noqa: E402
from vhubtest.limits import fd_count                       # noqa: E402
from vhubtest.testbackend import TestBackend               # noqa: E402
from vhubtest.testing import check, log, run               # noqa: E402

NOFILE = 4096
REGIONS = 500
DEVICES = 40


def attacker(control, socks, w_fd, r_fd):
    """As USER: a VM with REGIONS regions, then a device on each socket."""
    c = Client(control, timeout=30)
    c.call("vm.create", {"vm": "v"})
    fd = os.memfd_create("redteam", os.MFD_CLOEXEC)
    os.ftruncate(fd, REGIONS * 4096)
    for i in range(REGIONS):
        c.call("vm.memory.add", {"vm": "v", "gpa": i * 4096, "size": 4096, "offset": i * 4096, "fd": 0},
               fds=[fd])
    os.close(fd)
    for i, s in enumerate(socks):
        c.request("device.add", {"vm": "v", "device": "d%d" % i, "socket": s})
    os.write(w_fd, b"a")
    os.read(r_fd, 1)
    c.close()


def main(t):
    d = workdir(t)
    daemon = start_daemon(t, d, ["--backend-timeout-ms", "10000"], cls=limited_daemon(NOFILE))
    socks = [daemon.backend_socket("s%d.sock" % i) for i in range(DEVICES)]
    tb = t.enter(TestBackend(socks, log_dir=d, args=["--mem-slots", "509"]))
    for i, s in enumerate(socks):
        os.chmod(s, 0o666)
        tb.misbehave("ADD_MEM_REG", "hang", sock=i)     # stops reading there

    root = daemon.client()
    root.call("vm.create", {"vm": "rootvm"})
    base = daemon.settled_fd_count(root)
    uid = Child(USER, attacker, daemon.control, socks)
    try:
        check(uid.read() == b"a", "uid %d made its VM and asked for %d devices" % (USER, DEVICES))
        time.sleep(1.5)
        held = fd_count(daemon.pid)
        budget = (NOFILE - NOFILE // 8) // 4
        log("the daemon holds %d fds (%d before; RLIMIT_NOFILE %d, %d per non-root uid)"
            % (held, base, NOFILE, budget))
        wrong = []
        # docs/control-api.md "Limits": what one non-root uid makes the daemon
        # hold stays within its budget (and the quarter of the reserve that
        # fds already received may use)
        if held - base > budget + NOFILE // 8 // 4:
            wrong.append("uid %d makes the daemon hold %d fds, its budget is %d" % (USER, held - base, budget))
        # root's 32 regions: 32 requests in one write, their 32 fds with it
        fds = []
        for i in range(32):
            fd = os.memfd_create("rootmem", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4096)
            fds.append(fd)
        try:
            lines = b"".join(json.dumps({"jsonrpc": "2.0", "id": 100 + i, "method": "vm.memory.add", "fds": 1,
                                         "params": {"vm": "rootvm", "gpa": i * 4096, "size": 4096, "fd": 0}},
                                        separators=(",", ":")).encode() + b"\n" for i in range(32))
            root.send_raw(lines, fds)
            answers = [root.wait_response(100 + i, timeout=5) for i in range(32)]
            bad = [a for a in answers if a.error]
            if bad:
                wrong.append("root's 32 regions: %d refused, e.g. %s" % (len(bad), bad[0].error))
        except (RpcError, ClientError) as e:
            wrong.append("root's 32 regions in one write: %s: %s" % (type(e).__name__, e))
        finally:
            for fd in fds:
                os.close(fd)
        try:
            Client(daemon.control).call("daemon.info", timeout=5)
        except (RpcError, ClientError, OSError) as e:
            wrong.append("a new root connection: %s: %s" % (type(e).__name__, e))
        check(not wrong, "uid %d's back-end that stops reading costs the daemon no more than the uid's "
              "budget, and root is served" % USER, "; ".join(wrong))
    finally:
        uid.wait()


run(main)

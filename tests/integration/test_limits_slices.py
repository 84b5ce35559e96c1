#!/usr/bin/env python3
"""One connection's long run of lines does not hold the others.

vhubd is one event loop.  The lines of one read are handed over for at most
10 ms at a time (rpc-conn's RPC_SLICE_USEC; a batch's elements likewise):
then the loop polls every connection and runs every due timer before it
comes back to the rest, and reads nothing more from that connection
meanwhile.  Notifications are never answered, so no output bound limits
the work a write of them asks for.

The test: on a VM with 512 regions (each vm.memory.list builds about 40 KB),
a connection first sends most of a 1 MiB blank line (its input buffer grows
to 1 MiB, and stays that big while a partial line follows the lines it
reads), then the line's end, 2000 vm.memory.list notification lines and a
request "end" at once: each read now takes everything the socket holds, a
second of work or more.  0.2 s later another connection asks daemon.info.
It is answered before "end" is, and every line of the first connection is
still run, in order ("end" comes, the connection stays).
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.daemon import Daemon                 # noqa: E402
from vhubtest.testing import check, check_eq, log, run  # noqa: E402

REGIONS = 512
LINES = 2000


def fill_vm(c, name):
    c.call("vm.create", {"vm": name})
    fd = os.memfd_create("vhubt-slices", os.MFD_CLOEXEC)
    os.ftruncate(fd, REGIONS * 4096)
    for i in range(REGIONS):
        c.call("vm.memory.add", {"vm": name, "gpa": i * 4096, "size": 4096, "offset": i * 4096, "fd": 0},
               fds=[fd])
    os.close(fd)


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, log_level="info"))
    c = daemon.client()
    fill_vm(c, "big")

    one = json.dumps({"jsonrpc": "2.0", "method": "vm.memory.list", "params": {"vm": "big"}},
                     separators=(",", ":")).encode() + b"\n"
    end = b'{"jsonrpc":"2.0","id":"end","method":"daemon.info"}\n'
    busy = daemon.client()
    start = time.monotonic()
    busy.send_raw(b" " * (1000 * 1024))
    time.sleep(0.5)
    busy.send_raw(b"\n" + one * LINES + end)
    time.sleep(0.2)
    other = daemon.client()
    check_eq(other.call("daemon.info", timeout=60)["pid"], daemon.pid, "another connection is served")
    first = not busy.has_response("end")
    other.close()
    check_eq(busy.wait_response("end", 120).result["pid"], daemon.pid,
             "the first connection's lines all ran and \"end\" was answered")
    log("%d lines and \"end\" took %.1f s; the other connection was answered %s"
        % (LINES, time.monotonic() - start, "first" if first else "after \"end\""))
    check(first, "the other connection was answered while the %d lines were still being run" % LINES)
    busy.close()


run(main)

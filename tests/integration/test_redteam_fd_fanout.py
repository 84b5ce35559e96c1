#!/usr/bin/env python3
"""Red team: a back-end's fds fanned out to subscribers escape the per-uid
fd budget.

A device.backend_request event (VRING_HOST_NOTIFIER_MSG, SHMEM_MAP, ...)
carries the back-end's fds; cs_server_emit() queues a dup of each for every
connection that wants the VM's events (conn_wants(): the owner, and every
subscriber of the VM's uid).  Only the owner's queue stops the back-end's
channel (a quarter of the bound); any other subscriber pins up to
max_out_fds (1024) dups until it is dropped, and nothing of that is ever
checked against --max-fds-per-uid: the budget is consulted when a request
or a connection brings fds, never when an event fans them out.

So a non-root uid with one VM, a back-end of its own and a few
connections that subscribe to its VM and never read makes the daemon hold
(connections x 1024) fds -- far past its budget, into the reserve: root's
next fd-carrying request is refused and its connection closed (its VM
destroyed with it), new connections are refused.  Measured: RLIMIT_NOFILE
2048 (a budget of 448 per non-root uid), 8 such connections and 1,500
host-notifier messages with one memfd each: the daemon holds 2,046 fds.

The test: that attack, then root (connected before) adds a memory region
to its VM and a new root connection asks daemon.info.  Both must work;
the uid's connections may be refused or dropped, root's must not.
"""

import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, Child, limited_daemon, start_daemon, workdir  # noqa: E402
from vhubtest.client import Client, ClientError, RpcError  # noqa: E402
from vhubtest.limits import fd_count                       # noqa: E402
from vhubtest.testbackend import TestBackend               # noqa: E402
from vhubtest.testing import check, log, run               # noqa: E402

NOFILE = 2048
SUBSCRIBERS = 8
MESSAGES = 1500


def attacker(control, sock, ready_w, done_r):
    """As USER: a VM with the device, SUBSCRIBERS connections that subscribe
    to it and never read; holds them until told."""
    c = Client(control)
    c.call("vm.create", {"vm": "v"})
    c.call("device.add", {"vm": "v", "device": "x", "socket": sock})
    subs = []
    for _ in range(SUBSCRIBERS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(control)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe","params":{"vm":"v"}}\n')
        subs.append(s)
    time.sleep(0.5)
    os.write(ready_w, b"r")
    os.read(done_r, 1)
    for s in subs:
        s.close()
    c.close()


def main(t):
    d = workdir(t)
    daemon = start_daemon(t, d, cls=limited_daemon(NOFILE))
    sock = daemon.backend_socket("x.sock")
    tb = t.enter(TestBackend([sock], log_dir=d))
    os.chmod(sock, 0o666)      # the uid's back-end (root's socket: allowed for any uid)

    root = daemon.client()
    root.call("vm.create", {"vm": "rootvm"})
    base = daemon.settled_fd_count(root)

    uid = Child(USER, attacker, daemon.control, sock)
    try:
        check(uid.read() == b"r", "uid %d set up its VM, device and %d subscribers"
              % (USER, SUBSCRIBERS))
        # the uid's back-end: VRING_HOST_NOTIFIER_MSG with a memfd, no reply
        # wanted, kept under the channel's 2000/s rate limit
        sent = 0
        for i in range(MESSAGES):
            tb.host_notifier(queue=0, fd=True, need_reply=False)
            sent += 1
            if i % 100 == 99:
                time.sleep(0.06)
        time.sleep(1.0)
        held = fd_count(daemon.pid)
        log("uid %d's back-end sent %d fds; the daemon holds %d fds (%d before; RLIMIT_NOFILE %d)"
            % (USER, sent, held, base, NOFILE))

        fd = os.memfd_create("rootmem", os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 20)
        try:
            root.call("vm.memory.add", {"vm": "rootvm", "gpa": 0, "size": 1 << 20, "fd": 0},
                      fds=[fd], timeout=5)
            ok, why = True, None
        except (RpcError, ClientError) as e:
            ok, why = False, "%s: %s" % (type(e).__name__, e)
        finally:
            os.close(fd)
        check(ok, "root's vm.memory.add (connection opened before the attack) still works", why)
        try:
            Client(daemon.control).call("daemon.info", timeout=5)
            ok, why = True, None
        except (RpcError, ClientError, OSError) as e:
            ok, why = False, "%s: %s" % (type(e).__name__, e)
        check(ok, "a new root connection is served", why)
    finally:
        uid.wait()


run(main)

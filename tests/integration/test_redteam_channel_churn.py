#!/usr/bin/env python3
"""Red team (issue 10): a front-door VMM replacing its back-end channel
over and over (SET_BACKEND_REQ_FD, a new socket each time).

A socket that leaves an fd-store group cannot stay in the group's stash as
a dead fd the way an eventfd or a memfd does (its peer must see it close
when the daemon closes it), so each one made the daemon rebuild the stash
through the service manager: a removal and a push for every request of the
VMM, a `same_fd()` walk over every stored fd on PID 1 for each push
(tests/bench/bench_trickle.py vmm-channel: 10,183 messages to the manager
for 48,545 requests in 4.5 s, other VMs' device.list median 66 -> 641 us).

Now a socket leaving a group compacted less than 250 ms ago stays in the
stash, dead, until the sweep (at most 250 ms; at once past 32 dead fds):
its peer sees it close then.

    test_redteam_channel_churn.py  200 SET_BACKEND_REQ_FD one after the
                                   other: at most 40 messages to the
                                   service manager; each replaced channel's
                                   peer sees its end within 2 s; the last
                                   channel relays a back-end request and a
                                   crash right after the churn (dead
                                   sockets in the stash) carries the
                                   VMM's session, its channel answering
                                   again, and closes the dead ones.
"""

import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_frontdoor_contract import Channel                        # noqa: E402
from test_redteam_breq_flood import finish, settled                 # noqa: E402
from test_redteam_vmm_flood import vm_snapshot                      # noqa: E402
from test_restart import Managed                                    # noqa: E402
from test_restart_limits import newest_record                       # noqa: E402
from vhubtest import direct as vu                                   # noqa: E402
from vhubtest.client import Client                                  # noqa: E402
from vhubtest.direct import DirectFrontend                          # noqa: E402
from vhubtest.procs import wait_until                               # noqa: E402
from vhubtest.testbackend import AsyncCommand, TestBackend          # noqa: E402
from vhubtest.testing import check, check_eq, log, run              # noqa: E402

REQUESTS = 200


def closed_within(socks, seconds):
    """The sockets whose peer closed within seconds."""
    end = time.monotonic() + seconds
    left, done = list(socks), []
    while left and time.monotonic() < end:
        ready, _, _ = select.select(left, [], [], max(0.0, end - time.monotonic()))
        for s in ready:
            if s.recv(64) == b"":
                done.append(s)
                left.remove(s)
    return done


def main(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--vmm-dir", os.path.join(d, "vmm")])
    tb = t.enter(TestBackend([m.socket("tb.sock")], log_dir=d))
    c = t.enter(Client(m.control, timeout=10))
    c.call("vm.create", {"vm": "churn"})
    path = c.call("device.add", {"vm": "churn", "device": "d0", "socket": tb.socket, "type": "blk",
                                 "vmm_socket": True})["vmm_socket"]
    name = vm_snapshot(m.sm)
    fe = DirectFrontend.connect(path)
    t.defer(fe.close)
    fe.handshake(vu.SUPPORTED_PROTOCOL_FEATURES | (1 << vu.PF_BACKEND_REQ))
    settled(m, name)
    before = len(m.sm.messages)
    ours = []
    for _ in range(REQUESTS):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fe.command(vu.SET_BACKEND_REQ_FD, b"", [b.fileno()])
        b.close()
        ours.append(a)
    features = fe.get_features()
    sent = len(m.sm.messages) - before
    log("%d SET_BACKEND_REQ_FD: %d messages to the service manager" % (REQUESTS, sent))
    check(sent <= 40, "a VMM replacing its channel does not have its group rebuilt through the manager per request",
          sent)
    replaced, last = ours[:-1], ours[-1]
    gone = closed_within(replaced, 2.0)
    check_eq(len(gone), len(replaced), "every replaced channel's peer saw its end within 2 s")
    for s in replaced:
        s.close()

    # the last channel is the VMM's: it relays, before and after a crash
    ch = Channel.__new__(Channel)
    ch.sock = last
    last.settimeout(5)
    pending = AsyncCommand(tb, {"cmd": "config-change", "socket": 0, "need_reply": True})
    req, _, _, _ = ch.serve(0)
    check_eq((req, pending.result()["reply"]), (2, 0), "the last channel relays a back-end request and its answer")
    for _ in range(REQUESTS // 4):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        fe.command(vu.SET_BACKEND_REQ_FD, b"", [b.fileno()])
        b.close()
        last.close()
        last = a
    ch.sock = last
    last.settimeout(5)
    gen = newest_record(m.sm, name)[0]
    check_eq(fe.get_features(), features, "the VMM's connection answers after the churn")
    # the snapshot saying the session is at rest (20 ms after its last
    # request), before the sweep (250 ms) compacts the dead sockets away
    wait_until(lambda: newest_record(m.sm, name)[0] > gen, 5.0, interval=0.002,
               what="the snapshot saying the session is at rest")
    check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    check_eq(fe.get_features(), features, "the session carried across the crash answers on the same connection")
    pending = AsyncCommand(tb, {"cmd": "config-change", "socket": 0, "need_reply": True})
    req, _, _, _ = ch.serve(0)
    check_eq((req, pending.result()["reply"]), (2, 0), "after the crash the channel relays again")
    dev = c.call("device.list", {"vm": "churn"})["devices"][0]
    check_eq(dev["vmm"], "connected", "device.list after the crash: the same VMM")
    with open(m.sm.log_path, errors="replace") as f:
        text = f.read()
    check("fds of group f" in text and "that no snapshot names were closed" in text,
          "the dead sockets left in the stash were closed by the restore")
    log("ok: the session and its last channel carried across a crash right after a churn")
    finish(m, fe, c)


if __name__ == "__main__":
    run(main)

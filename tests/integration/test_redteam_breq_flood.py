#!/usr/bin/env python3
"""Red team (issue 10): a hostile back-end's flood of tiny channel requests
to a front-door device.

Every request a front-door device's back-end sends on its channel that the
daemon relays to the VMM (CONFIG_CHANGE_MSG, in-band VRING_CALL/ERR, IOTLB,
host notifiers, SHMEM_MAP/UNMAP) took a token from the VM's counter, and
each token marked the VM changed: its snapshot -- every device of it --
was written again per request (per wake-up of the channel), on the loop
every VM shares, also when the request was not relayed at all (no VMM, no
channel of the VMM's) and also for a request nobody answers (no
NEED_REPLY: an honest back-end's in-band VRING_CALL is one per interrupt).
A relay's token is never sent out: it only pairs the VMM's answer with the
back-end's request, and a snapshot that records the wait holds the count
past it.  Now a relay takes its token without a snapshot of its own.

    test_redteam_breq_flood.py   the test back-end of a front-door device
                                 sends 200 CONFIG_CHANGE_MSG one after the
                                 other, then 200 with NEED_REPLY (no VMM
                                 channel: each answered a failure): the
                                 VM's snapshot is written at most 4 times
                                 for each 200; then a VMM with a channel
                                 answers a relayed request (the relay
                                 still works), and a crash after it
                                 carries the VMM's session.
"""

import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_frontdoor_contract import Channel                        # noqa: E402
from test_redteam_vmm_flood import vm_snapshot                      # noqa: E402
from test_restart import Managed                                    # noqa: E402
from test_restart_limits import newest_record                       # noqa: E402
from vhubtest.client import Client                                  # noqa: E402
from vhubtest import direct as vu                                   # noqa: E402
from vhubtest.direct import DirectFrontend                          # noqa: E402
from vhubtest.procs import wait_until                               # noqa: E402
from vhubtest.testbackend import AsyncCommand, TestBackend          # noqa: E402
from vhubtest.testing import check, check_eq, log, run              # noqa: E402

REQUESTS = 200
RELAYS = 12


def settled(m, name):
    """The VM snapshot's generation once it stopped changing."""
    last = []
    wait_until(lambda: last.append(newest_record(m.sm, name)) or (len(last) > 5 and last[-1] == last[-6]), 5.0,
               what="the VM's snapshot to stay the same")
    return last[-1][0]


def finish(m, *conns):
    """The VMM's and the client's connections closed, then `systemctl stop`."""
    for x in conns:
        x.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def main(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--vmm-dir", os.path.join(d, "vmm")])
    # + INBAND_NOTIFICATIONS: in-band VRING_CALL
    tb = t.enter(TestBackend([m.socket("tb0.sock"), m.socket("tb1.sock")], log_dir=d,
                             args=["--protocol-features", "0xdfe2b"]))
    c = t.enter(Client(m.control, timeout=10))
    c.call("vm.create", {"vm": "flood"})
    path = c.call("device.add", {"vm": "flood", "device": "d0", "socket": tb.sockets[0], "type": "blk",
                                 "vmm_socket": True})["vmm_socket"]
    c.call("device.add", {"vm": "flood", "device": "plain", "socket": tb.sockets[1], "type": "blk"})
    name = vm_snapshot(m.sm)
    floods = [("CONFIG_CHANGE_MSG to the front-door device", lambda: tb.config_change(need_reply=False)),
              ("CONFIG_CHANGE_MSG with NEED_REPLY to the front-door device (no VMM channel: a failure)",
               lambda: tb.config_change(need_reply=True)),
              ("in-band VRING_CALL with NEED_REPLY to the front-door device (no VMM: a failure)",
               lambda: tb.vring_call(0, need_reply=True)),
              ("CONFIG_CHANGE_MSG to a device without a front door (an event for its VM's owner)",
               lambda: tb.config_change(sock=1, need_reply=False)),
              ("IOTLB_MSG without NEED_REPLY to a device without a front door (device.backend_request, "
               "need_reply false)", lambda: tb.iotlb(sock=1, need_reply=False, iova=4096, size=4096))]
    for what, send in floods:
        gen0 = settled(m, name)
        for _ in range(REQUESTS):
            send()
        # the last one handled (a request with NEED_REPLY was answered: it was)
        c.call("device.list", {"vm": "flood"})
        gen1 = newest_record(m.sm, name)[0]
        log("%d x %s: the VM's snapshot written %d times (generation %d -> %d)"
            % (REQUESTS, what, gen1 - gen0, gen0, gen1))
        check(gen1 - gen0 <= 4, "a back-end's channel requests do not have its VM's snapshot written per request",
              gen1 - gen0)
    events = c.events()
    plain = [e for e in events if e.get("event") == "device.config_changed" and e.get("device") == "plain"]
    check_eq(len(plain), REQUESTS, "the VM's owner got each CONFIG_CHANGE_MSG of the device without a front door "
             "as device.config_changed")
    tokens = [e["token"] for e in events if e.get("event") == "device.backend_request" and e.get("device") == "plain"]
    check_eq((len(tokens), len(set(tokens))), (REQUESTS, REQUESTS),
             "the VM's owner got each IOTLB_MSG as device.backend_request, each with a token of its own")
    # a request awaiting the owner's answer: its token was saved before the
    # event went out, and a crash keeps it from being given out again
    pending = AsyncCommand(tb, {"cmd": "iotlb", "socket": 1, "need_reply": True, "iova": 4096, "size": 4096})
    ev = []
    wait_until(lambda: ev.extend(e for e in c.events() if e.get("event") == "device.backend_request") or ev, 5.0,
               what="the awaited IOTLB_MSG's event")
    check(ev[0]["need_reply"] and ev[0]["token"] > max(tokens), "the awaited request's token is a new one",
          (ev[0], max(tokens)))
    c.call("device.backend_reply", {"vm": "flood", "device": "plain", "token": ev[0]["token"], "result": 0})
    check_eq(pending.result()["reply"], 0, "the owner's answer reached the back-end")

    # the relay itself still works: a VMM with a channel answers
    fe = DirectFrontend.connect(path)
    t.defer(fe.close)
    fe.handshake(vu.SUPPORTED_PROTOCOL_FEATURES | (1 << vu.PF_BACKEND_REQ))
    ch = Channel(fe)
    pending = AsyncCommand(tb, {"cmd": "config-change", "socket": 0, "need_reply": True})
    req, flags, _, _ = ch.serve(0)
    check_eq((req, bool(flags & 0x8)), (2, True), "CONFIG_CHANGE_MSG reached the VMM's channel with NEED_REPLY")
    check_eq(pending.result()["reply"], 0, "the VMM's answer went back to the back-end")
    features = fe.get_features()
    settled(m, name)
    time.sleep(0.1)
    check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    check_eq(fe.get_features(), features, "the session carried across the crash answers on the same connection")
    pending = AsyncCommand(tb, {"cmd": "config-change", "socket": 0, "need_reply": True})
    req, _, _, _ = ch.serve(0)
    check_eq(pending.result()["reply"], 0, "after the crash a relayed request is answered by the VMM again")
    log("ok: the relay works before and after a crash")
    unread_channel(m, tb, fe, name)
    finish(m, fe, c)


def unread_channel(m, tb, fe, name):
    """A VMM that does not read its channel: relays the daemon could not
    write wait in its writer.  A crash then must not carry the session as
    if at rest (a relay's token writes no snapshot any more): they would be
    lost -- an in-band VRING_CALL is an interrupt.  Either every relay
    reaches the VMM after the crash, or its session falls back."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)    # the least: a few messages
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    fe.command(vu.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
    theirs.close()
    for _ in range(RELAYS):
        tb.config_change(need_reply=False)
        time.sleep(0.01)    # one at a time: not a flood of the channel
    settled(m, name)
    check_eq(m.restart(sig=signal.SIGKILL), -signal.SIGKILL, "the old vhubd's exit")
    mine.settimeout(2)
    got = b""
    try:
        while len(got) < RELAYS * 12:
            x = mine.recv(4096)
            if not x:
                break
            got += x
    except socket.timeout:
        pass
    try:
        fe.get_features()
        carried = True
    except (vu.BackendClosed, OSError):
        carried = False
    log("a channel the VMM does not read: %d relays sent, %d bytes read after the crash, session %s"
        % (RELAYS, len(got), "carried" if carried else "fell back"))
    check(not carried or len(got) == RELAYS * 12,
          "relays waiting for a VMM that does not read its channel are not lost by a carried session",
          (len(got), carried))
    mine.close()


if __name__ == "__main__":
    run(main)

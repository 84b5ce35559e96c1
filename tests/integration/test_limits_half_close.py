#!/usr/bin/env python3
"""A client that shuts down its sending side still gets every answer.

docs/control-api.md's own socat example pipes requests in; at the end of
its input socat shuts down its side of the socket (SHUT_WR) and waits for
the daemon.  device.add waits on its back-end, so the daemon must keep the
connection open for writing until every request it read is answered, then
close it (socat then exits on its own, well before its -t timeout).

- a real qemu-storage-daemon: vm.attach, device.add, device.list written and
  SHUT_WR at once, over a plain socket: all three answered (device.add with
  the back-end's features), then EOF from the daemon; the lingering VM keeps
  its device;
- the same through the documented socat command line, when socat is there;
- deterministic: the test back-end holds GET_FEATURES for 300 ms, so
  device.add is certainly still waiting when EOF arrives;
- a client that closes its socket outright (not a half-close) is still let
  go at once: its VM without linger_ms is destroyed while device.add waits.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.backends import QsdNullBackend       # noqa: E402
from vhubtest.client import request_line           # noqa: E402
from vhubtest.contract import half_closed_session  # noqa: E402
from vhubtest.daemon import Daemon                 # noqa: E402
from vhubtest.testbackend import TestBackend       # noqa: E402
from vhubtest.testing import check, check_eq, log, run  # noqa: E402


def check_session(answers, what):
    # the attached VM's events (device.added) come too: notifications, no id
    by_id = {a.get("id"): a for a in answers if "id" in a}
    check(all(a.get("method") == "event" for a in answers if "id" not in a),
          "%s: nothing but answers and events" % what, answers)
    check_eq(sorted(by_id), [1, 2, 3], "%s: every request answered before EOF" % what)
    for i in (1, 2, 3):
        check("result" in by_id[i], "%s: request %d succeeded" % (what, i), by_id[i])
    check("features" in by_id[2]["result"] and "max_mem_slots" in by_id[2]["result"],
          "%s: device.add answered with the back-end's features" % what)
    return by_id


def session_lines(vm, dev, sock):
    return [request_line(1, "vm.attach", {"vm": vm}),
            request_line(2, "device.add", {"vm": vm, "device": dev, "socket": sock}),
            request_line(3, "device.list", {"vm": vm})]


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    socks = [daemon.backend_socket("null%d.sock" % i) for i in range(2)]
    t.enter(QsdNullBackend(socks, log_dir=d))
    c.call("vm.create", {"vm": "vm0", "linger_ms": 600000})
    c.call("vm.create", {"vm": "vm1", "linger_ms": 600000})
    # the VMs must be nobody's for vm.attach: let them linger
    c.close()
    c = daemon.client()
    base = daemon.settled_fd_count(c)

    answers, secs = half_closed_session(daemon.control, session_lines("vm0", "blk0", socks[0]))
    check_session(answers, "plain socket, SHUT_WR")
    log("answered and closed %.3f s after SHUT_WR" % secs)
    devs = c.call("device.list", {"vm": "vm0"})["devices"]
    check_eq([x["device"] for x in devs], ["blk0"], "the lingering VM keeps its device")
    check_eq(devs[0]["state"], "ready", "... connected to qemu-storage-daemon")

    socat = shutil.which("socat")
    if socat:
        inp = b"".join(session_lines("vm1", "blk1", socks[1]))
        start = time.monotonic()
        p = subprocess.run([socat, "-t", "5", "-", "UNIX-CONNECT:%s" % daemon.control],
                           input=inp, stdout=subprocess.PIPE, timeout=30)
        secs = time.monotonic() - start
        answers = [json.loads(x) for x in p.stdout.split(b"\n") if x.strip()]
        check_session(answers, "the documented socat example")
        check(secs < 4.0, "socat exits because the daemon closed, not at its -t 5 timeout", secs)
    else:
        log("note: socat is not installed; the plain-socket half-close above covers it")

    # deterministic: device.add certainly waits when EOF arrives
    tb = t.enter(TestBackend([daemon.backend_socket("slow.sock")], log_dir=d))
    tb.misbehave("GET_FEATURES", "delay", delay_ms=300, count=1)
    c.call("vm.create", {"vm": "vm2", "linger_ms": 600000})
    c.close()
    c = daemon.client()
    answers, secs = half_closed_session(daemon.control,
                                        session_lines("vm2", "slow0", tb.sockets[0]))
    check_session(answers, "a back-end holding GET_FEATURES 300 ms")
    check(secs >= 0.25, "the answer came after the back-end's delay (%.3f s)" % secs)

    # a client that closes outright is let go at once
    tb.misbehave("GET_FEATURES", "delay", delay_ms=3000, count=1)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(daemon.control)
    s.sendall(request_line(1, "vm.create", {"vm": "gone"}))
    s.settimeout(5)
    check(b'"result"' in s.recv(4096), "vm.create on the closing connection")
    s.sendall(request_line(2, "device.add", {"vm": "gone", "device": "g", "socket": tb.sockets[0]}))
    time.sleep(0.1)
    s.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if all(v["vm"] != "gone" for v in c.call("vm.list")["vms"]):
            break
        time.sleep(0.02)
    check(all(v["vm"] != "gone" for v in c.call("vm.list")["vms"]),
          "a fully closed connection's VM is destroyed without waiting for device.add")

    for vm in ("vm0", "vm1", "vm2"):
        if any(v["vm"] == vm for v in c.call("vm.list")["vms"]):
            c.call("vm.destroy", {"vm": vm})
    tb.clear_misbehave()
    daemon.check_fd_baseline(base - 0, "fd count back to baseline")


run(main)

#!/usr/bin/env python3
"""Back-ends that flood their channel must never get their VMM disconnected.

Four vhub-test-backend processes serve four devices of one VM; each sends
VRING_HOST_NOTIFIER_MSG with a fresh memfd and without NEED_REPLY, 1200
times at up to 1000 a second (under the daemon's per-channel rate limit).  Every
one becomes a device.backend_request event carrying an fd, for the VM's
owner.  The VMM is a plain socket that does not read for a second, then
reads slowly, then catches up.  Back-pressure must go to the back-ends
(their channels stop being read while the VMM is behind), never to the VMM:

- 5 runs: the VMM's connection stays and answers, the VM and its four
  devices stay (state ready, no loss), and the VMM receives every event the
  back-ends sent, each with its fd;
- a VMM that does not read for longer than --backend-timeout-ms (1000
  here): the back-ends' requests for it are refused once their channel has
  waited that long (one that wants a reply gets a failure then, it is not
  left hanging),
  its connection still stays, and once it reads it gets what was forwarded
  before, each with its fd, and the channels forward again;
- the daemon's fd count is back to its baseline after each run.
"""

import array
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testbackend import TestBackend, TestBackendError  # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402

N_BACKENDS = 4
PER_BACKEND = 1200
RATE = 1000          # at most, per second and back-end; the daemon's limit is 2000
RUNS = 5


class RawVmm:
    """A VMM on a plain socket that reads only when told to."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.s.connect(path)
        self.buf = b""
        self.fds = []           # received, in order
        self.responses = {}
        self.events = []        # (params, fds)
        self.next_id = 1
        self.closed = False

    def send(self, method, params=None):
        req_id = self.next_id
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.s.sendall(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        return req_id

    def recv_once(self, timeout):
        """One recvmsg; False when nothing came within timeout."""
        self.s.settimeout(timeout)
        fds = array.array("i")
        try:
            data, anc, flags, _ = self.s.recvmsg(65536, socket.CMSG_SPACE(253 * fds.itemsize))
        except socket.timeout:
            return False
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        self.fds.extend(fds)
        if not data:
            self.closed = True
            return False
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            n = msg.get("fds", 0)
            mine, self.fds = self.fds[:n], self.fds[n:]
            if msg.get("method") == "event":
                self.events.append((msg["params"], mine))
            else:
                self.responses[msg.get("id")] = msg
            if msg.get("method") == "event" and msg["params"]["event"] == "device.backend_request":
                pass
            for fd in mine:
                os.close(fd)
        return True

    def call(self, method, params=None, timeout=10.0):
        req_id = self.send(method, params)
        deadline = time.monotonic() + timeout
        while req_id not in self.responses:
            if self.closed or time.monotonic() > deadline:
                raise AssertionError("no answer to %s (closed: %s)" % (method, self.closed))
            self.recv_once(0.2)
        msg = self.responses.pop(req_id)
        if "error" in msg:
            raise AssertionError("%s failed: %s" % (method, msg["error"]))
        return msg["result"]

    def read_slowly(self, seconds, pause):
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.closed:
            self.recv_once(0.05)
            time.sleep(pause)

    def read_until_quiet(self, quiet=0.5, limit=30.0):
        end = time.monotonic() + limit
        while time.monotonic() < end and not self.closed:
            if not self.recv_once(quiet):
                return

    def backend_requests(self):
        return [(p, f) for p, f in self.events if p["event"] == "device.backend_request"]

    def close(self):
        self.s.close()


def flood(tb, count, rate, out, key):
    """count host notifier messages with an fd, no reply wanted, at rate/s."""
    sent = errors = 0
    give_up = time.monotonic() + 20
    last = 0.0
    while sent < count and time.monotonic() < give_up:
        # never faster than rate, also after a stall (no catching up)
        wait = last + 1.0 / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        last = time.monotonic()
        try:
            tb.host_notifier(queue=0, fd=True, need_reply=False)
            sent += 1
        except (TestBackendError, OSError):
            errors += 1      # its own writer is full, or it lost the channel
            time.sleep(0.01)
    out[key] = (sent, errors)


def setup_vm(daemon, vmm, name, tbs):
    vmm.call("vm.create", {"vm": name})
    for k, tb in enumerate(tbs):
        vmm.call("device.add", {"vm": name, "device": "d%d" % k, "socket": tb.sockets[0]})
    for tb in tbs:
        tb.wait_until(lambda tb=tb: tb.conn(0) and tb.conn(0).get("backend_channel"), 5,
                      "the back-end channel to be set up")


def check_vm_intact(daemon, name, what):
    c = daemon.client()
    vms = [v["vm"] for v in c.call("vm.list")["vms"]]
    check(name in vms, "%s: the VM is still there" % what)
    devs = c.call("device.list", {"vm": name})["devices"]
    check_eq(sorted((x["device"], x["state"], x["reconnects"]) for x in devs),
             [("d%d" % k, "ready", 0) for k in range(N_BACKENDS)],
             "%s: the four devices are still there, ready, never lost" % what)
    c.close()


def one_run(t, daemon, tbs, i, base):
    vmm = RawVmm(daemon.control)
    name = "vm%d" % i
    setup_vm(daemon, vmm, name, tbs)
    results = {}
    threads = [threading.Thread(target=flood, args=(tb, PER_BACKEND, RATE, results, k))
               for k, tb in enumerate(tbs)]
    for th in threads:
        th.start()
    time.sleep(1.0)                       # the VMM does not read at all
    vmm.read_slowly(1.0, 0.002)           # then slowly
    for th in threads:
        th.join()
    vmm.read_until_quiet()                # then catches up
    sent = sum(results[k][0] for k in results)
    errors = sum(results[k][1] for k in results)
    got = vmm.backend_requests()
    log("run %d: %d sent (%d refused by the back-ends' own bound), %d events received"
        % (i, sent, errors, len(got)))
    check(not vmm.closed, "run %d: the VMM's connection is still open" % i)
    check_eq(vmm.call("daemon.info")["pid"], daemon.pid, "run %d: ... and answers" % i)
    check_vm_intact(daemon, name, "run %d" % i)
    check_eq(sent, N_BACKENDS * PER_BACKEND, "run %d: every back-end sent all its requests" % i)
    check_eq(len(got), sent, "run %d: the VMM received every one as an event" % i)
    check(all(p["request"] == "VRING_HOST_NOTIFIER_MSG" and p.get("fd") == 0 and len(f) == 1
              for p, f in got), "run %d: ... each with its fd" % i)
    vmm.call("vm.destroy", {"vm": name})
    vmm.close()
    daemon.check_fd_baseline(base, "run %d: fd count back to baseline" % i)


def refusing(t, d):
    wd = os.path.join(d, "refuse")
    os.makedirs(wd)
    daemon = t.enter(Daemon(wd, extra_args=["--backend-timeout-ms", "1000"]))
    tbs = [t.enter(TestBackend([daemon.backend_socket("r%d.sock" % k)], log_dir=wd))
           for k in range(2)]
    base = daemon.settled_fd_count(daemon.client())
    vmm = RawVmm(daemon.control)
    vmm.call("vm.create", {"vm": "slow"})
    for k, tb in enumerate(tbs):
        vmm.call("device.add", {"vm": "slow", "device": "d%d" % k, "socket": tb.sockets[0]})
        tb.wait_until(lambda tb=tb: tb.conn(0) and tb.conn(0).get("backend_channel"), 5,
                      "the back-end channel to be set up")
    results = {}
    flood(tbs[0], 600, RATE, results, 0)      # the VMM reads nothing meanwhile
    time.sleep(1.5)                           # past the 1000 ms deadline
    start = time.monotonic()
    r = tbs[1].host_notifier(queue=0, fd=True, need_reply=True, timeout_ms=4000)
    secs = time.monotonic() - start
    log("a request wanting a reply while the VMM does not read: %s after %.3f s" % (r, secs))
    check(r.get("reply", 0) != 0, "it is refused (a nonzero reply)")
    check(secs < 2.0, "... once the channel has waited the deadline (1 s), not left hanging", secs)
    flood(tbs[0], 600, RATE, results, 1)      # refused, not queued for the VMM
    vmm.read_until_quiet()
    got = vmm.backend_requests()
    sent = results[0][0] + results[1][0]
    log("VMM that stopped reading: %d sent, %d events received" % (sent, len(got)))
    check(not vmm.closed, "the VMM's connection stays")
    check(0 < len(got) < sent, "what was forwarded before the deadline arrives, the rest was refused")
    check(all(len(f) == 1 for p, f in got), "... each event with its fd")
    # reading again: forwarded again
    before = len(vmm.backend_requests())
    tbs[0].host_notifier(queue=0, fd=True, need_reply=False)
    vmm.read_until_quiet()
    check_eq(len(vmm.backend_requests()), before + 1, "once the VMM reads, requests are forwarded again")
    c = daemon.client()
    devs = c.call("device.list", {"vm": "slow"})["devices"]
    check(all(x["state"] == "ready" and x["reconnects"] == 0 for x in devs), "the devices were never lost")
    c.close()
    vmm.call("vm.destroy", {"vm": "slow"})
    vmm.close()
    daemon.check_fd_baseline(base, "fd count back to baseline")
    daemon.stop()


def main(t):
    d = t.tmpdir()
    which = sys.argv[1:] or ["runs", "refuse"]
    if "runs" in which:
        wd = os.path.join(d, "runs")
        os.makedirs(wd)
        daemon = t.enter(Daemon(wd))
        tbs = [t.enter(TestBackend([daemon.backend_socket("f%d.sock" % k)], log_dir=wd))
               for k in range(N_BACKENDS)]
        base = daemon.settled_fd_count(daemon.client())
        for i in range(RUNS):
            one_run(t, daemon, tbs, i, base)
        daemon.stop()
    if "refuse" in which:
        refusing(t, d)


run(main)

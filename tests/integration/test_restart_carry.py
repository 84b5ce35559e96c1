#!/usr/bin/env python3
"""What the red-team fixes hold must survive a restart with guests running
(docs/restart.md; vhubd under the service manager of
vhubtest/servicemanager.py, as in test_restart.py).

    test_restart_carry.py pipelined    a connection's pipelined requests and
                                       a batch running in slices across a
                                       planned restart
    test_restart_carry.py credentials  a device acts with its adder's
                                       credentials after a restart too
    test_restart_carry.py tokens       back-end request tokens of a VM are
                                       never given out twice across planned
                                       restarts and crashes

pipelined: one write holds a batch B (vm.create "mark", then about 20,000
vm.list) and 50 daemon.info requests.  A batch runs in slices of 10 ms with
its connection's input paused, so the 50 lines that came in the same read
wait in the connection's input.  Once "mark" exists (another connection
sees it: B is running), SIGSTOP; B not answered yet, SIGTERM and SIGCONT.
A planned restart lets requests in flight finish -- B is one, the 50 lines
are not: they were never taken from the input.  So: B's whole answer (every
element a result) comes before daemon.restarted; the 50 answers come after
it, in order, from the new process, which took the 50 lines over with the
connection's unhandled input (its log says so).  B answered with -32011s:
the restart did not wait for it; the 50 never answered: the new process did
not hand over the lines it was given.  A second restart the same way, but
with a device.config.get in flight on another connection (its GET_CONFIG
held 2 s by the test back-end): the restart waits for it well after B is
done, when B's end resumes the connection's input -- the 50 answered
before daemon.restarted: the old process went on after it had stopped
reading.

credentials: root creates VM "t" for uid 65534 (the red-team root-VM
scenario) and keeps owning it; uid 65534 adds a device on a back-end in its
own directory.  After a planned restart uid 65534 still cannot add a
device on root's 0600 socket in root's 0700 directory (-32010), and the
device it added acts with its rights, not root's: its back-end goes, uid
65534 makes the socket's name a symlink to root's socket, and the
reconnects that follow reach nothing (root's back-end gets no connection,
no device.reconnected) -- a device restored without its credentials acts
as root and reconnects to root's back-end.  Its own back-end back at the
name, the device reconnects: the reconnects were running all along.

tokens: a device's back-end sends host-notifier requests; the tokens of
their device.backend_request events only go up, across a planned restart
and across a SIGKILL of vhubd.
"""

import json
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, mkdir, run_as, workdir                    # noqa: E402
from test_restart import Managed                                    # noqa: E402
from vhubtest.client import BACKEND_NOT_ALLOWED, Client             # noqa: E402
from vhubtest.limits import UnprivAgent                             # noqa: E402
from vhubtest.testbackend import TestBackend                        # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run  # noqa: E402

RESTARTED = -32011
LINE_MAX = 1024 * 1024


class RawReader:
    """Every line the daemon writes to a raw connection, read by a thread
    (the restart flushes what is queued: someone must read)."""

    def __init__(self, sock):
        self.sock = sock
        self.lines = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        buf = b""
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                with self.lock:
                    self.lines.append(json.loads(line))

    def wait(self, n, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.lines) >= n:
                    return list(self.lines)
            time.sleep(0.01)
        with self.lock:
            return list(self.lines)


def pipelined_round(t, m, obs, tb, k, with_call):
    """Restart k: B and 50 lines in one write, SIGTERM while B runs; with
    with_call a config.get in flight keeps the restart waiting after B."""
    mark = "mark%d" % k
    elements = [{"jsonrpc": "2.0", "id": "b0", "method": "vm.create", "params": {"vm": mark}}]
    size = 2
    while True:
        e = {"jsonrpc": "2.0", "id": len(elements), "method": "vm.list"}
        n = len(json.dumps(e, separators=(",", ":"))) + 1
        if size + n > LINE_MAX - 64 * 1024:
            break
        elements.append(e)
        size += n
    batch = json.dumps(elements, separators=(",", ":")).encode() + b"\n"
    singles = b"".join(b'{"jsonrpc":"2.0","id":"n%d","method":"daemon.info"}\n' % i for i in range(50))
    log("restart %d: one write of a batch of %d elements (%d bytes) and 50 daemon.info lines%s"
        % (k, len(elements), len(batch), ", a config.get in flight" if with_call else ""))

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(m.control)
    t.defer(s.close)
    reader = RawReader(s)
    config = None
    if with_call:
        n = tb.requests().get("GET_CONFIG", 0)
        tb.misbehave("GET_CONFIG", "delay", delay_ms=2000, count=1)
        config = obs.request("device.config.get", {"vm": "w", "device": "cfg", "offset": 0, "size": 4})
        tb.wait_request("GET_CONFIG", count=n + 1)
    s.sendall(batch + singles)
    end = time.monotonic() + 10
    while not any(v["vm"] == mark for v in obs.call("vm.list")["vms"]):
        if time.monotonic() > end:
            raise TestFailure("the batch never ran")
    # held still while the test makes sure B has not finished: SIGTERM then
    # comes while it runs, however loaded the machine is
    m.sm.send_signal(signal.SIGSTOP)
    time.sleep(0.1)
    with reader.lock:
        early = [x for x in reader.lines if isinstance(x, list) or x.get("method") != "event"]
    check(not early, "restart %d: B is still running when SIGTERM is sent (nothing answered yet)" % k, early)

    def resume():
        os.kill(m.sm.pid, signal.SIGCONT)
        time.sleep(0.001)
    code = m.restart(while_down=resume)
    check_eq(code, 0, "restart %d: the old vhubd exits 0" % k)
    if config:
        resp = config.response(10)
        check(resp.error is None and "data" in resp.result,
              "restart %d: the config.get in flight finished before the old process exited" % k, resp.error)

    # its own VM's lifecycle events aside
    got = [x for x in reader.wait(52, 30) if isinstance(x, list) or x.get("method") != "event" or
           x["params"]["event"] == "daemon.restarted"]
    kinds = []
    for msg in got:
        if isinstance(msg, list):
            kinds.append("batch")
        elif msg.get("method") == "event":
            kinds.append(msg["params"]["event"])
        else:
            kinds.append(msg.get("id"))
    log("restart %d: after the write %s ... (%d messages)" % (k, kinds[:4], len(got)))
    check(len(got) >= 1 and isinstance(got[0], list), "restart %d: the batch is answered first" % k, kinds[:3])
    answers = got[0]
    check_eq(len(answers), len(elements), "restart %d: every element of the batch is answered" % k)
    errors = [a for a in answers if "error" in a]
    check(not errors, "restart %d: the batch finished before the old process exited: no element answered "
          "with an error (-32011: the restart did not wait for it)" % k, errors[:3])
    check_eq([a["id"] for a in answers[:3]], ["b0", 1, 2], "restart %d: the batch's answers in order" % k)
    check(len(got) >= 2 and kinds[1] == "daemon.restarted",
          "restart %d: daemon.restarted comes right after the batch's answer (no single line was answered "
          "by the old process, which had stopped reading)" % k, kinds[:6])
    rest = got[2:]
    check_eq([r.get("id") for r in rest], ["n%d" % i for i in range(50)],
             "restart %d: the 50 requests held in the connection's input are answered by the new process, "
             "in order" % k)
    check(all("result" in r and r["result"]["restarts"] == k for r in rest),
          "restart %d: each of them answered by the new process (daemon.info: restarts %d)" % (k, k))
    with open(m.sm.log_path, errors="replace") as f:
        text = f.read()
    check(text.count("were not handled are carried") >= k,
          "restart %d: the new process took over the connection's unhandled input (its log says so)" % k)
    s.close()


def part_pipelined(t):
    d = t.tmpdir()
    m = Managed(t, d)
    tb = t.enter(TestBackend([m.socket("cfg.sock")], log_dir=d))
    obs = t.enter(Client(m.control, timeout=10))
    obs.call("vm.create", {"vm": "w"})
    obs.call("device.add", {"vm": "w", "device": "cfg", "socket": m.socket("cfg.sock")})
    pipelined_round(t, m, obs, tb, 1, with_call=False)
    pipelined_round(t, m, obs, tb, 2, with_call=True)
    check_eq(obs.call("daemon.info")["restarts"], 2, "two restarts")
    obs.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def part_credentials(t):
    d = workdir(t)
    m = Managed(t, d, extra=["--control-mode", "0666", "--backend-timeout-ms", "1000"])
    os.chmod(m.backends, 0o755)
    rootdir = mkdir(os.path.join(m.backends, "rootdir"), 0, 0o700)
    rsock = os.path.join(rootdir, "r.sock")
    root_tb = t.enter(TestBackend([rsock], log_dir=d))
    os.chmod(rsock, 0o600)
    userdir = mkdir(os.path.join(m.backends, "userdir"), USER, 0o755)
    usock = os.path.join(userdir, "u.sock")
    user_tb = t.enter(TestBackend([usock], log_dir=d))
    os.chmod(usock, 0o666)

    root = t.enter(Client(m.control, timeout=10))
    root.call("vm.create", {"vm": "t", "uid": USER})
    agent = UnprivAgent(m.control, uid=USER)
    t.defer(agent.stop)
    check(agent.connect() == {}, "uid %d connects" % USER)
    agent.call("device.add", {"vm": "t", "device": "u", "socket": usock, "reconnect_ms": 20})
    check_eq(user_tb.connections(0), 1, "uid %d's device is connected to its own back-end" % USER)

    # root owns the VM: its device.added comes to root's connection, which
    # may be after the agent's answer (it was the first message after the
    # restart once, under load)
    root.wait_event(lambda e: e.get("event") == "device.added" and e.get("device") == "u", 10)
    root.events()
    check_eq(m.restart(), 0, "the old vhubd exits 0")
    ev = root.wait_event(None, 10)
    check_eq(ev.get("event"), "daemon.restarted", "root's connection is carried")

    a = agent.raw_call("device.add", {"vm": "t", "device": "c", "socket": rsock})
    check(a.get("error", {}).get("code") == BACKEND_NOT_ALLOWED,
          "after the restart uid %d still cannot add a device on root's private socket: -32010" % USER, a)

    # the carried device: its back-end goes, its name becomes a symlink to root's socket
    user_tb.kill()
    ev = root.wait_event(lambda e: e.get("device") == "u", 10)
    check_eq(ev.get("event"), "device.disconnected", "uid %d's back-end is gone" % USER)

    def swap():
        os.unlink(usock)
        os.symlink(os.path.join("..", "rootdir", "r.sock"), usock)
    check_eq(run_as(USER, swap), 0, "uid %d points the name at root's socket" % USER)
    time.sleep(1.5)
    state = [x for x in root.call("device.list", {"vm": "t", "uid": USER})["devices"] if x["device"] == "u"][0]
    log("after 1.5 s of reconnects: %s; root's back-end had %d connections" % (state["state"],
                                                                             root_tb.connections(0)))
    check_eq(root_tb.connections(0), 0,
             "the restored device reconnects with uid %d's rights: root's private back-end gets no connection"
             % USER)
    evs = [e for e in root.events() if e.get("device") == "u"]
    check(not any(e.get("event") == "device.reconnected" for e in evs),
          "no reconnect through root's socket", evs)

    # its own back-end back at the name: it was retrying all along
    run_as(USER, os.unlink, usock)
    user_tb.start()
    os.chmod(usock, 0o666)
    ev = root.wait_event(lambda e: e.get("device") == "u" and e.get("event") == "device.reconnected", 15)
    check_eq(root_tb.connections(0), 0, "root's back-end never heard of it")
    agent.close()
    root.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def part_tokens(t):
    d = t.tmpdir()
    m = Managed(t, d)
    sock = m.socket("tb.sock")
    tb = t.enter(TestBackend([sock], log_dir=d))
    c = t.enter(Client(m.control, timeout=10))
    c.call("vm.create", {"vm": "v"})
    c.call("device.add", {"vm": "v", "device": "x", "socket": sock})
    seen = []

    def requests(n, what):
        for _ in range(n):
            tb.host_notifier(queue=0, fd=False, need_reply=False)
        for _ in range(n):
            ev = c.wait_event(lambda e: e.get("event") == "device.backend_request", 10)
            tok = ev["token"]
            seen.append(int(tok, 0) if isinstance(tok, str) else tok)
        log("%s: tokens %s" % (what, seen[-n:]))

    requests(3, "before")
    for k, sig in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM), 1):
        m.restart(sig=sig)
        ev = c.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
        check_eq(ev.get("restarts"), k, "restart %d" % k)
        requests(2, "after restart %d (%s)" % (k, signal.Signals(sig).name))
    check(all(b > a for a, b in zip(seen, seen[1:])),
          "the VM's tokens only go up across planned restarts and crashes: none is given out twice", seen)
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


PARTS = {"pipelined": part_pipelined, "credentials": part_credentials, "tokens": part_tokens}


def main(t):
    mode = sys.argv[1] if len(sys.argv) > 1 else "pipelined"
    if mode not in PARTS:
        raise SystemExit("usage: test_restart_carry.py [%s]" % "|".join(PARTS))
    PARTS[mode](t)


if __name__ == "__main__":
    run(main)

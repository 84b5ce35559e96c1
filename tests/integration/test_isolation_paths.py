#!/usr/bin/env python3
"""Back-end paths for a non-root uid: the root daemon creates, removes and
connects only where that uid could itself (issue 15, "Isolation"; contract
"Identity and isolation").

A VMM runs as uid USER (with one supplementary group, GROUP) over its own
control connection; another uid (OTHER) and root own the victims.  Each hole
of the issue is one part:

1. server mode over a live socket (root's, OTHER's, USER's own) or over
   root's stale one: -32010 and the socket is exactly as it was (inode,
   owner, mode), nothing connected to root's or OTHER's;
2. server mode into OTHER's private (0700) directory: -32010, the directory
   untouched;
3. check-then-use races: USER swaps a directory of its own for a symlink to
   a root-only directory outside --backend-dir (renameat2 RENAME_EXCHANGE in
   a loop) while asking for server-mode sockets in it and client-mode
   connections through it: the root-only directory's files and root's
   listener there are never touched;
4. client mode to sockets USER could not connect to itself (root's 0600
   socket, root's socket inside root's 0700 directory, a socket inside
   OTHER's 0700 directory): -32010, nothing connected.

Parts 1, 2 and 4 run once and then again, hundreds of times, while the swap
loop of part 3 runs; afterwards every victim is compared with a snapshot
taken before.  What USER may do still works, with a real back-end (the
project's vhub-test-backend) running as USER: server mode in its own 0700
directory, in a root:GROUP 0770 directory through its supplementary group,
over its own stale socket; the socket is created owned by USER, and removing
the device never removes a socket that replaced the daemon's.
"""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.agent import AgentProcess, child_env, drop_to, python_for  # noqa: E402
from vhubtest.client import BACKEND_ERROR, BACKEND_NOT_ALLOWED            # noqa: E402
from vhubtest.contract import FakeListener, FdBaseline, check_error       # noqa: E402
from vhubtest.daemon import Daemon                                        # noqa: E402
from vhubtest.testbackend import TestBackend, TestBackendAs               # noqa: E402
from vhubtest.testing import Skip, TestFailure, check, check_eq, log, run  # noqa: E402
from vhubtest.victims import check_unchanged, snapshot                    # noqa: E402

USER = 65534       # the VMM's uid (nobody)
OTHER = 4321       # another unprivileged uid, owner of a private directory
GROUP = 4242       # a supplementary group of USER only
RACE_SECONDS = 4.0

AGENT = r'''
import json, os, sys, time
from vhubtest.client import Client, RpcError
c = None
out = sys.stdout

def answer(p, timeout=15):
    try:
        return {"result": p.result(timeout)}
    except RpcError as e:
        return {"error": {"code": e.code, "message": e.message, "data": e.data}}

for line in sys.stdin:
    cmd = json.loads(line)
    try:
        if cmd["op"] == "whoami":
            res = {"resuid": list(os.getresuid()), "groups": os.getgroups()}
        elif cmd["op"] == "connect":
            c = Client(cmd["path"])
            res = {}
        elif cmd["op"] == "call":
            res = answer(c.request(cmd["method"], cmd["params"]))
        elif cmd["op"] == "race":
            # device.add of each target pipelined with its device.remove,
            # round after round, for `seconds`; tallies the answers
            tally = {}
            end = time.monotonic() + cmd["seconds"]
            n = 0
            while time.monotonic() < end:
                for i, (mode, path) in enumerate(cmd["targets"]):
                    name = "r%d-%d" % (i, n)
                    add = c.request("device.add", {"vm": cmd["vm"], "device": name,
                                                   "socket": path, "mode": mode})
                    rm = c.request("device.remove", {"vm": cmd["vm"], "device": name})
                    a = answer(add)
                    answer(rm)
                    key = "%d:%s" % (i, a["error"]["code"] if "error" in a else "ok")
                    tally[key] = tally.get(key, 0) + 1
                n += 1
            res = {"tally": tally, "rounds": n}
        else:
            res = {"fatal": "unknown op"}
    except Exception as e:
        res = {"fatal": "%s: %s" % (type(e).__name__, e)}
    out.write(json.dumps(res) + "\n")
    out.flush()
'''

# Exchanges two names as fast as it can until SIGTERM; prints the count.
SWAPPER = r'''
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
a, b = sys.argv[1].encode(), sys.argv[2].encode()
stop = []
signal.signal(signal.SIGTERM, lambda *x: stop.append(1))
n = fails = 0
print("ready", flush=True)
while not stop:
    if libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE) == 0:
        n += 1
    else:
        fails += 1
print("%d %d" % (n, fails), flush=True)
'''


class Agent(AgentProcess):
    """A VMM process running as USER (groups [GROUP]) on its own connection."""

    def __init__(self, control):
        super().__init__(AGENT, USER, groups=[GROUP])
        self.cmd(op="connect", path=control)

    def call(self, method, params):
        return self.result(self.cmd(op="call", method=method, params=params))

    def error(self, what, method, params):
        res = self.cmd(op="call", method=method, params=params)
        if "error" not in res:
            raise TestFailure("FAILED: %s: expected an error, got %r" % (what, res))
        return res["error"]


class Swapper:
    """USER exchanging two of its names (a directory and a symlink) in a loop."""

    def __init__(self, a, b):
        self.p = subprocess.Popen([python_for(USER), "-c", SWAPPER, a, b], stdout=subprocess.PIPE,
                                  env=child_env(), cwd="/", preexec_fn=drop_to(USER, groups=[GROUP]),
                                  close_fds=True)
        check_eq(self.p.stdout.readline().strip(), b"ready", "the swap loop runs as uid %d" % USER)

    def stop(self):
        """(swaps, failed swaps)"""
        if self.p.poll() is None:
            self.p.terminate()
        out = self.p.communicate(timeout=10)[0].split()
        return (int(out[0]), int(out[1])) if len(out) == 2 else (0, 0)


def UserTestBackend(binary, **kw):
    """vhub-test-backend running as USER (groups [GROUP]), from a copy USER can execute."""
    return TestBackendAs(binary, USER, groups=[GROUP], **kw)


def stale_socket(path, owner=0, mode=None):
    """A socket file nobody listens on (bound, then closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    os.chown(path, owner, owner)
    if mode is not None:
        os.chmod(path, mode)
    return path


def mkdir(path, owner, group, mode):
    os.mkdir(path)
    os.chown(path, owner, group)
    os.chmod(path, mode)
    return path


class World:
    """The directories, sockets and files of the test, and their owners."""

    def __init__(self, t, d, daemon):
        self.bdir = daemon.backend_dir
        os.chmod(self.bdir, 0o755)
        b = self.bdir
        # USER's own directories: one it shares (0755) and a private one
        self.udir = mkdir(os.path.join(b, "u"), USER, USER, 0o755)
        self.u700 = mkdir(os.path.join(b, "u700"), USER, USER, 0o700)
        # a directory USER may write only through its supplementary group
        self.gdir = mkdir(os.path.join(b, "g"), 0, GROUP, 0o770)
        # OTHER's private directory, with a file and a root socket USER may
        # not reach (the directory stops it)
        self.odir = mkdir(os.path.join(b, str(OTHER)), OTHER, OTHER, 0o700)
        with open(os.path.join(self.odir, "keep"), "w") as f:
            f.write("uid %d's data\n" % OTHER)
        os.chown(os.path.join(self.odir, "keep"), OTHER, OTHER)
        # root's private directory inside --backend-dir with an open socket
        self.rdir = mkdir(os.path.join(b, "rootdir"), 0, 0, 0o700)
        # root-only directory OUTSIDE --backend-dir: the race's target
        self.rootonly = mkdir(os.path.join(d, "rootonly"), 0, 0, 0o700)
        self.root_file = os.path.join(self.rootonly, "x.sock")
        with open(self.root_file, "w") as f:
            f.write("root's private data\n")
        os.chmod(self.root_file, 0o600)

        L = lambda *a, **kw: t.enter(FakeListener(*a, **kw))   # noqa: E731
        self.root_live = L(os.path.join(b, "root-live.sock"))
        os.chmod(self.root_live.path, 0o666)          # USER may connect, never replace
        self.other_live = L(os.path.join(b, "other-live.sock"), owner=OTHER)
        os.chmod(self.other_live.path, 0o666)
        self.own_live = L(os.path.join(b, "own-live.sock"), owner=USER)
        self.root_stale = stale_socket(os.path.join(b, "root-stale.sock"), 0, 0o666)
        # USER's stale socket where USER may not remove it (root's 0755 directory)
        self.own_stale_here = stale_socket(os.path.join(b, "own-stale-here.sock"), USER)
        self.root_0600 = L(os.path.join(b, "root-0600.sock"))
        os.chmod(self.root_0600.path, 0o600)
        self.root_in_rdir = L(os.path.join(self.rdir, "r.sock"))
        os.chmod(self.root_in_rdir.path, 0o666)
        self.root_in_odir = L(os.path.join(self.odir, "o.sock"))
        os.chmod(self.root_in_odir.path, 0o666)
        self.victim = L(os.path.join(self.rootonly, "victim.sock"))
        os.chmod(self.victim.path, 0o666)
        self.root_open = L(os.path.join(b, "root-open.sock"), "close")
        os.chmod(self.root_open.path, 0o666)

        # the race: u/d is USER's directory (with a decoy stale socket of
        # USER's named like root's victim), u/s a symlink to rootonly
        self.race_dir = mkdir(os.path.join(self.udir, "d"), USER, USER, 0o755)
        stale_socket(os.path.join(self.race_dir, "victim.sock"), USER)
        self.race_link = os.path.join(self.udir, "s")
        os.symlink(self.rootonly, self.race_link)
        os.lchown(self.race_link, USER, USER)

        self.untouchable = [self.root_live, self.other_live, self.root_0600, self.root_in_rdir,
                            self.root_in_odir, self.victim]

    def victims(self):
        """What USER must never change (the race directory itself does change)."""
        b = self.bdir
        return snapshot(self.rootonly, self.odir, self.rdir, self.root_live.path,
                        self.other_live.path, self.own_live.path, self.root_stale,
                        self.own_stale_here,
                        self.root_0600.path, self.root_open.path, os.path.join(b, "g"),
                        self.u700)

    def connections_to_untouchables(self):
        return {fl.path: fl.connections() for fl in self.untouchable}


def refusals(w, holes="1234", racing=False):
    """(what, mode, path) USER must be refused with -32010, for the holes
    named; while racing, not the paths through the swapped names."""
    cases = [
        ("1: server mode over root's live socket", "server", w.root_live.path),
        ("1: server mode over uid %d's live socket" % OTHER, "server", w.other_live.path),
        ("1: server mode over its own live socket", "server", w.own_live.path),
        ("1: server mode over root's stale socket", "server", w.root_stale),
        ("1: server mode over its own stale socket in a directory it may not write", "server",
         w.own_stale_here),
        ("2: server mode into uid %d's 0700 directory" % OTHER, "server",
         os.path.join(w.odir, "x.sock")),
        ("2: server mode over a file in uid %d's 0700 directory" % OTHER, "server",
         os.path.join(w.odir, "keep")),
        ("4: client mode to root's 0600 socket", "client", w.root_0600.path),
        ("4: client mode to root's socket in root's 0700 directory", "client",
         w.root_in_rdir.path),
        ("4: client mode to a socket in uid %d's 0700 directory" % OTHER, "client",
         w.root_in_odir.path),
        ("3: server mode into root's directory outside --backend-dir", "server",
         os.path.join(w.race_link, "y.sock")),
        ("3: client mode through the symlink to root's directory", "client",
         os.path.join(w.race_link, "victim.sock")),
    ]
    return [c for c in cases if c[0][0] in holes and not (racing and c[0][0] == "3")]


def part_refusals(agent, w, fb, holes):
    before = w.victims()
    for i, (what, mode, path) in enumerate(refusals(w, holes)):
        e = agent.error(what, "device.add", {"vm": "uvm", "device": "x%d" % i, "socket": path,
                                             "mode": mode})
        check_error(e, BACKEND_NOT_ALLOWED, "uid %d, %s" % (USER, what))
        fb.after(what)
    check_eq(w.connections_to_untouchables(), {fl.path: 0 for fl in w.untouchable},
             "nothing connected to any socket USER may not reach")
    check_unchanged(before, w.victims(), "every victim after the refusals")
    check_eq(agent.call("device.list", {"vm": "uvm"})["devices"], [], "no device was added")


def part_allowed(agent, w, fb, binary, d, daemon, c):
    """What USER may do still works, with a back-end running as USER."""
    tbdir = mkdir(os.path.join(d, "tb"), USER, USER, 0o700)   # its control socket
    # client mode to root's socket that anyone may connect to: connected
    e = agent.error("client mode to root's 0666 socket", "device.add",
                    {"vm": "uvm", "device": "open", "socket": w.root_open.path})
    check_error(e, BACKEND_ERROR, "uid %d: client mode to root's 0666 socket (closes at once)"
                % USER)
    check(w.root_open.connections() >= 1, "... the daemon connected to it")
    fb.after("client mode to root's 0666 socket")

    own_stale = stale_socket(os.path.join(w.udir, "own-stale.sock"), USER)
    st = os.lstat(own_stale)
    stale_id = (st.st_ino, st.st_ctime_ns)
    cases = [
        ("its own 0700 directory", os.path.join(w.u700, "s.sock")),
        ("a root:%d 0770 directory through its supplementary group" % GROUP,
         os.path.join(w.gdir, "s.sock")),
        ("its own stale socket", own_stale),
    ]
    for i, (what, path) in enumerate(cases):
        tb = UserTestBackend(binary, connect=[path], args=["--reconnect-ms", "10"],
                             log_dir=tbdir)
        with tb:
            agent.call("device.add", {"vm": "uvm", "device": "ok%d" % i, "socket": path,
                                      "mode": "server"})
            st = os.lstat(path)
            check(stat.S_ISSOCK(st.st_mode) and st.st_uid == USER,
                  "server mode in %s: a back-end running as uid %d connected; the socket is "
                  "owned by uid %d" % (what, USER, USER), "uid %d mode %o" % (st.st_uid, st.st_mode))
            if path == own_stale:
                check((st.st_ino, st.st_ctime_ns) != stale_id, "... the stale socket was replaced")
            agent.call("device.remove", {"vm": "uvm", "device": "ok%d" % i})
            check(not os.path.lexists(path), "... device.remove removed the socket it created")
        fb.after("server mode in %s" % what)

    # device.remove must not remove a socket that replaced the daemon's
    path = os.path.join(w.u700, "repl.sock")
    tb = UserTestBackend(binary, connect=[path], args=["--reconnect-ms", "10"], log_dir=tbdir)
    with tb:
        agent.call("device.add", {"vm": "uvm", "device": "repl", "socket": path, "mode": "server"})
    os.unlink(path)
    stale_socket(path, USER)
    repl = os.lstat(path)
    agent.call("device.remove", {"vm": "uvm", "device": "repl"})
    st = os.lstat(path) if os.path.lexists(path) else None
    check(st is not None and (st.st_ino, st.st_dev, st.st_ctime_ns) ==
          (repl.st_ino, repl.st_dev, repl.st_ctime_ns),
          "device.remove left the socket that replaced the daemon's alone")
    os.unlink(path)
    if os.path.lexists(own_stale):
        os.unlink(own_stale)
    fb.after("a replaced server-mode socket")

    # root making a VM for USER acts with root's rights and hands the socket to USER
    c.call("vm.create", {"vm": "rootmade", "uid": USER})
    path = os.path.join(w.bdir, "root-made.sock")
    with UserTestBackend(binary, connect=[path], args=["--reconnect-ms", "10"], log_dir=tbdir):
        c.call("device.add", {"vm": "rootmade", "uid": USER, "device": "b", "socket": path,
                              "mode": "server"})
        st = os.lstat(path)
        check(stat.S_ISSOCK(st.st_mode) and st.st_uid == USER,
              "root's server-mode device for uid %d's VM: created in root's directory, owned by "
              "uid %d, a back-end of uid %d connected" % (USER, USER, USER))
        c.call("device.remove", {"vm": "rootmade", "uid": USER, "device": "b"})
    check(not os.path.lexists(path), "... and removed with the device")
    c.call("vm.destroy", {"vm": "rootmade", "uid": USER})
    fb.after("root's server-mode device for uid %d" % USER)

    # vm.attach by USER: the VM acts with USER's rights from then on
    rc = daemon.client()
    rc.call("vm.create", {"vm": "lent", "uid": USER, "linger_ms": 60000})
    rc.close()
    deadline = time.monotonic() + 5
    while True:
        res = agent.cmd(op="call", method="vm.attach", params={"vm": "lent"})
        if "result" in res or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    check("result" in res, "uid %d attached the VM root made for it" % USER, res)
    path = os.path.join(w.bdir, "lent.sock")
    e = agent.error("server mode after vm.attach", "device.add",
                    {"vm": "lent", "device": "b", "socket": path, "mode": "server"})
    check_error(e, BACKEND_NOT_ALLOWED, "after vm.attach by uid %d, server mode in root's "
                "directory is refused (its creator root's rights went with root)" % USER)
    check(not os.path.lexists(path), "... nothing was created")
    agent.call("vm.destroy", {"vm": "lent"})
    fb.after("vm.attach by uid %d" % USER)


def part_race(agent, w, fb, holes="124"):
    """The swap loop, with the refusals of the holes named repeated meanwhile."""
    before = w.victims()
    targets = [("server", os.path.join(w.race_dir, "x.sock")),
               ("client", os.path.join(w.race_dir, "victim.sock"))]
    fixed = [(mode, path) for _, mode, path in refusals(w, holes, racing=True)]
    swapper = Swapper(w.race_dir, w.race_link)
    try:
        res = agent.cmd(op="race", vm="uvm", seconds=RACE_SECONDS, targets=targets + fixed)
    finally:
        swaps, failed = swapper.stop()
    tally = res["tally"]
    log("race: %d rounds, %d swaps (%d failed), answers %s" % (res["rounds"], swaps, failed,
                                                                json.dumps(tally, sort_keys=True)))
    check_eq(w.connections_to_untouchables(), {fl.path: 0 for fl in w.untouchable},
             "during the swap loop nothing connected to root's victim or any other socket "
             "USER may not reach")
    check_unchanged(before, w.victims(),
                    "the root-only directory, uid %d's directory and every root socket after "
                    "the swap loop" % OTHER)
    check(swaps > 1000, "the swap loop exchanged the directory and the symlink (%d times)" % swaps)
    check(res["rounds"] >= 20, "%d rounds of requests during the swap loop" % res["rounds"])
    # the race targets landed on both sides of the swap: the test exercised it
    check(tally.get("0:%d" % BACKEND_NOT_ALLOWED, 0) > 0,
          "server mode through the swapped name was refused at least once (%s)"
          % tally.get("0:%d" % BACKEND_NOT_ALLOWED))
    check(sum(v for k, v in tally.items() if k.startswith("0:") and
              k != "0:%d" % BACKEND_NOT_ALLOWED) > 0,
          "server mode in USER's own directory got past the checks at least once")
    check(tally.get("1:%d" % BACKEND_NOT_ALLOWED, 0) > 0 and tally.get("1:%d" % BACKEND_ERROR, 0) > 0,
          "client mode saw both the symlink (-32010) and its own stale decoy (-32006)")
    unexpected = {k: v for k, v in tally.items()
                  if int(k.split(":")[0]) >= len(targets) and
                  k.split(":")[1] != str(BACKEND_NOT_ALLOWED)}
    check(not unexpected, "every fixed refusal stayed -32010 for %d rounds" % res["rounds"],
          unexpected)
    check(not any(k.endswith(":ok") and k.startswith("1:") for k in tally),
          "no client-mode device.add through the swapped name succeeded")
    # the loop stopped with either name on the directory
    real = w.race_dir if not os.path.islink(w.race_dir) else w.race_link
    check_eq(sorted(os.listdir(real)), ["victim.sock"],
             "USER's race directory holds only its decoy (every socket made there was removed)")
    check_eq(agent.call("device.list", {"vm": "uvm"})["devices"], [], "no device left")
    fb.after("the swap loop")


def main(t):
    if os.geteuid() != 0:
        raise Skip("needs root to run clients and back-ends as uid %d" % USER)
    if not shutil.which("setpriv"):
        raise Skip("setpriv (util-linux) is needed to run the test back-end as uid %d" % USER)
    d = t.tmpdir()
    os.chmod(d, 0o755)
    # a copy of the test back-end uid USER can execute wherever the build lives
    binary = os.path.join(d, "vhub-test-backend")
    src = TestBackend(connect=[os.path.join(d, "x")], log_dir=d).binary
    shutil.copy(src, binary)
    os.chmod(binary, 0o755)
    daemon = t.enter(Daemon(d, extra_args=["--control-mode", "0666",
                                           "--backend-timeout-ms", "2000"]))
    c = daemon.client()
    w = World(t, d, daemon)
    agent = Agent(daemon.control)
    t.defer(agent.stop)
    check_eq(agent.cmd(op="whoami"), {"resuid": [USER] * 3, "groups": [GROUP]},
             "the VMM runs as uid %d with supplementary group %d" % (USER, GROUP))
    agent.call("vm.create", {"vm": "uvm"})
    fb = FdBaseline(daemon, c)

    # meson runs every part; single ones help to check that each fails
    # without the fix: "refuse1", "refuse2", "refuse4", "race-" (the swap
    # loop alone), "allowed"
    parts = sys.argv[1:] or ["refuse1234", "allowed", "race124"]
    for part in parts:
        if part.startswith("refuse"):
            part_refusals(agent, w, fb, part[len("refuse"):])
        elif part == "allowed":
            part_allowed(agent, w, fb, binary, d, daemon, c)
        elif part.startswith("race"):
            part_race(agent, w, fb, part[len("race"):] or "124")
        else:
            raise TestFailure("FAILED: unknown part %s" % part)

    agent.stop()
    # the daemon sees the close and tears the VM down asynchronously
    deadline = time.monotonic() + 10
    while c.call("vm.list")["vms"] and time.monotonic() < deadline:
        time.sleep(0.05)
    check_eq(c.call("vm.list")["vms"], [], "the VM went with its connection")
    daemon.stop()


if __name__ == "__main__":
    run(main)

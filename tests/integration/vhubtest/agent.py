"""Children that run as another uid: unprivileged VMMs and attackers.

    a = AgentProcess(SCRIPT, uid=65534)    # python3 -c SCRIPT as that uid, groups []
    res = a.cmd(op="connect", path=...)    # one JSON line in, one JSON line back
    a.stop()
    p = subprocess.Popen([python_for(uid), "-c", SCRIPT], preexec_fn=drop_to(uid),
                         env=child_env(), ...)   # any other child as that uid

SCRIPT reads one JSON command a line on stdin and answers each with one JSON
line; an answer {"fatal": why} fails the test.
"""

import json
import os
import subprocess
import sys

from .client import RpcError
from .testing import Skip, TestFailure

# tests/integration: where a child finds the vhubtest package
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reachable_by(path, uid, bits):
    """Every directory on the way is searchable by uid and the file grants
    it `bits` (0o4 read, 0o1 execute) -- as its owner, or as anyone else
    (the children drop every group)."""
    def grants(st, b):
        return bool(st.st_mode & (b << 6)) if st.st_uid == uid else bool(st.st_mode & b)
    parts = os.path.abspath(path).split("/")
    for i in range(2, len(parts)):
        if not grants(os.stat("/".join(parts[:i])), 0o1):
            return False
    return grants(os.stat(path), bits)


def python_for(uid):
    """A python3 uid can execute (this one may live under /root)."""
    for cand in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        path = os.path.realpath(cand)
        if os.path.isfile(path) and reachable_by(path, uid, 0o1):
            return cand
    raise Skip("no python3 executable by uid %d" % uid)


def drop_to(uid, gid=None, groups=()):
    """A preexec_fn: the child runs as uid:gid with exactly `groups`."""
    gid = uid if gid is None else gid

    def drop():
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    return drop


def child_env():
    """The environment of a python child: the vhubtest package, nothing else."""
    return {"PYTHONPATH": PACKAGE_DIR, "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"}


class AgentProcess:
    """python3 -c script running as uid (gid, groups), driven line by line."""

    def __init__(self, script, uid, gid=None, groups=()):
        self.uid = uid
        self.p = subprocess.Popen([python_for(uid), "-c", script], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, env=child_env(), cwd="/",
                                  preexec_fn=drop_to(uid, gid, groups), close_fds=True)

    def cmd(self, **kw):
        self.p.stdin.write((json.dumps(kw) + "\n").encode())
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise TestFailure("FAILED: the agent of uid %d died (exit %s)" % (self.uid, self.p.poll()))
        res = json.loads(line)
        if "fatal" in res:
            raise TestFailure("FAILED: agent %s: %s" % (kw, res["fatal"]))
        return res

    @staticmethod
    def result(res):
        """A call's {"result"}, or its {"error"} raised as RpcError."""
        if "error" in res:
            e = res["error"]
            raise RpcError(e["code"], e["message"], e["data"])
        return res["result"]

    def stop(self):
        if self.p.poll() is None:
            self.p.stdin.close()
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)

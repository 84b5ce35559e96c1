"""Shared pieces of the red-team tests (tests/integration/test_redteam_*.py).

Each attack runs as a uid that is not root: the file-system moves through
run_as() (a forked child with that uid's credentials), the control calls
through vhubtest.limits.UnprivAgent (a child process with its own
connections).  Victims are files and directories of root's (or of another
uid's) that the attacking uid cannot touch itself; snapshot() records what
must not change.
"""

import hashlib
import os
import signal
import socket
import stat
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import procs                              # noqa: E402
from vhubtest.daemon import vhubd_path                  # noqa: E402
from vhubtest.testing import Skip, TestFailure, check  # noqa: E402

USER = 65534        # the attacker (nobody)
OTHER = 4321        # another unprivileged uid


def need_root():
    if os.geteuid() != 0:
        raise Skip("the red-team tests need root to act as other uids")


def run_as(uid, fn, *args, gid=None):
    """fn(*args) in a forked child with uid's credentials (no groups);
    returns what it returned (an int exit status, 0..255) or raises if it
    raised."""
    gid = uid if gid is None else gid
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            r = fn(*args)
            code = 0 if r is None else int(r)
        except BaseException as e:  # noqa: BLE001 - reported through the status
            sys.stderr.write("run_as(%d): %s: %s\n" % (uid, type(e).__name__, e))
            code = 99
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 99:
        raise TestFailure("FAILED: the step run as uid %d raised (see above)" % uid)
    return code


def mkdir(path, owner, mode, group=None):
    os.mkdir(path)
    os.chown(path, owner, owner if group is None else group)
    os.chmod(path, mode)
    return path


def write_file(path, data, owner=0, mode=0o600):
    with open(path, "w") as f:
        f.write(data)
    os.chown(path, owner, owner)
    os.chmod(path, mode)
    return path


def snapshot(*paths):
    """inode, owner, mode, size, mtime, content (files) and entries
    (directories, recursively) of each path."""
    snap = {}

    def one(p):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            snap[p] = None
            return
        entry = (st.st_ino, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), stat.S_IFMT(st.st_mode),
                 st.st_size, st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                entry += (hashlib.sha256(f.read()).hexdigest(),)
        snap[p] = entry
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(p))
            snap[p + "/"] = names
            for n in names:
                one(os.path.join(p, n))
    for p in paths:
        one(p)
    return snap


def check_unchanged(before, after, what):
    changed = sorted(set(before) ^ set(after)) + \
        sorted(k for k in set(before) & set(after) if before[k] != after[k])
    check(not changed, "%s: exactly as before" % what,
          "; ".join("%s: %s -> %s" % (k, before.get(k), after.get(k)) for k in changed[:6]))


class NotifyListener:
    """systemd's side of sd_notify(): a datagram socket that learns the
    sender's pid (SO_PASSCRED); messages are (monotonic time, pid, fields)."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)

    def recv(self, timeout):
        """One message, or None after timeout seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            return None
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
        return (time.monotonic(), pid, fields)

    def wait_for(self, key, value, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.recv(deadline - time.monotonic())
            if m and m[2].get(key) == value:
                return m
        raise TestFailure("FAILED: no %s=%s notification within %.1fs" % (key, value, timeout))

    def close(self):
        self.sock.close()


def spawn_vhubd_watched(t, d, args, env, name="vhubd"):
    """vhubd through `sh -c 'WATCHDOG_PID=$$ exec ...'` (the pid systemd
    would know is the daemon's own), its log in d; killed at the end."""
    log_path = os.path.join(d, name + ".log")
    t.add_log(name + " log", log_path)
    argv = ["sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", vhubd_path()] + list(args)
    p = procs.spawn(argv, log_path=log_path, env=env)
    t.defer(procs.reap, p, signal.SIGKILL)
    return p


def service_env(**extra):
    """The environment without what a service manager would have set."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES", "JOURNAL_STREAM", "RUNTIME_DIRECTORY")}
    env.update(extra)
    return env

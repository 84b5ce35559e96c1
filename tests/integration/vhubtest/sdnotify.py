"""Playing systemd for vhubd: the notify socket (sd_notify's other end) and
vhubd started as a service would start it (its own pid is the one systemd
knows; no service-manager variables leaking in from the test's own
environment)."""

import os
import signal
import socket
import struct
import time

from . import procs
from .daemon import vhubd_path
from .testing import TestFailure, log


class NotifyListener:
    """The daemon side of sd_notify(): a datagram socket that also learns
    the sender's pid (SO_PASSCRED), as systemd does for NotifyAccess=main."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(path)
        self.messages = []      # (monotonic time, pid, {key: value})

    def recv(self, timeout, quiet=False):
        """One message, or None after timeout seconds (logged unless quiet)."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except socket.timeout:
            return None
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        fields = {}
        for line in data.decode().split("\n"):
            if line:
                k, _, v = line.partition("=")
                fields[k] = v
        m = (time.monotonic(), pid, fields)
        self.messages.append(m)
        if not quiet:
            log("notify from pid %s: %s" % (pid, data.decode().replace("\n", " | ")))
        return m

    def wait_for(self, key, timeout=10.0, value=None):
        """The next message carrying key (and value, if given)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestFailure("FAILED: no %s%s notification within %.1fs"
                                  % (key, "" if value is None else "=" + value, timeout))
            m = self.recv(left)
            if m and key in m[2] and (value is None or m[2][key] == value):
                return m

    def close(self):
        self.sock.close()


def spawn_vhubd(t, d, args, env, name="vhubd"):
    """vhubd through `sh -c 'WATCHDOG_PID=$$ exec ...'`: the pid systemd would
    know is the daemon's own (setpriv and sh both exec in place).  Its log
    in d, shown with the test's; killed at the end.  (process, log path)"""
    log_path = os.path.join(d, name + ".log")
    t.add_log(name + " log", log_path)
    argv = ["sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh", vhubd_path()] + list(args)
    p = procs.spawn(argv, log_path=log_path, env=env)
    t.defer(procs.reap, p, signal.SIGKILL)
    return p, log_path


def service_env(**extra):
    """The environment without what a service manager would have set, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                        "LISTEN_FDNAMES", "JOURNAL_STREAM", "RUNTIME_DIRECTORY")}
    env.update(extra)
    return env


def start_watched(t, d, args=(), watchdog_usec=None, name="vhubd"):
    """vhubd with its control socket at d/control.sock and back-ends in
    d/backends, started as systemd would (spawn_vhubd()) with a notify
    socket (closed at the end) and, given watchdog_usec, the watchdog.
    (process, NotifyListener, control path)"""
    control = os.path.join(d, "control.sock")
    backends = os.path.join(d, "backends")
    os.makedirs(backends, exist_ok=True)
    n = NotifyListener(os.path.join(d, "notify.sock"))
    t.defer(n.close)
    env = {"NOTIFY_SOCKET": n.path}
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    p, _ = spawn_vhubd(t, d, ["--control", control, "--backend-dir", backends] + list(args),
                       service_env(**env), name=name)
    return p, n, control

"""Start and stop vhubd for a test.

    with Daemon(t.tmpdir()) as d:       # or Daemon.start_in(t)
        c = d.client()
        ...
    # leaving the block: SIGTERM, exit code must be 0 (DaemonError otherwise)

The binary comes from env VHUBD (meson sets it when the daemon is built);
unset is a failure, not a skip.  The daemon runs with --control
<dir>/control.sock --backend-dir <dir>/backends --log-level debug; its
stderr goes to <dir>/vhubd.log, printed when something fails.
"""

import os
import signal
import socket
import subprocess
import time

from . import procs
from .client import Client
from .testing import check_eq, log


class DaemonError(Exception):
    pass


def vhubd_path():
    path = os.environ.get("VHUBD")
    if not path:
        raise DaemonError("VHUBD is not set: point it at the vhubd binary "
                          "(meson test sets it once daemon/vhubd is built)")
    if not os.access(path, os.X_OK):
        raise DaemonError("VHUBD=%s is not an executable file" % path)
    return path


class Daemon:
    def __init__(self, workdir, extra_args=(), env=None, log_level="debug", control=None,
                 backend_dirs=None):
        self.workdir = workdir
        self.control = control or os.path.join(workdir, "control.sock")
        self.backend_dir = os.path.join(workdir, "backends")
        self.backend_dirs = list(backend_dirs) if backend_dirs else [self.backend_dir]
        for d in self.backend_dirs:
            os.makedirs(d, exist_ok=True)
        self.log_path = os.path.join(workdir, "vhubd.log")
        self.extra_args = list(extra_args)
        self.env = env
        self.log_level = log_level
        self.proc = None
        self.clients = []
        self.exit_code = None

    def argv(self):
        argv = [vhubd_path(), "--control", self.control]
        for d in self.backend_dirs:
            argv += ["--backend-dir", d]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        return argv + self.extra_args

    def start(self, timeout=10.0):
        argv = self.argv()
        with open(self.log_path, "ab") as f:
            f.write(b"==== %s\n" % " ".join(argv).encode())
        self.proc = procs.spawn(argv, log_path=self.log_path, env=self.env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout=10.0):
        """Until the control socket accepts a connection."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.print_log()
                raise DaemonError("vhubd exited with %d before its control socket accepted"
                                  % self.proc.returncode)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.control)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.print_log()
                    raise DaemonError("vhubd's control socket %s did not accept within %.1fs"
                                      % (self.control, timeout))
                time.sleep(0.01)
            finally:
                s.close()

    @property
    def pid(self):
        return self.proc.pid

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def backend_socket(self, name):
        """A socket path under the (first) --backend-dir."""
        return os.path.join(self.backend_dir, name)

    def client(self, timeout=10.0):
        c = Client(self.control, timeout=timeout)
        self.clients.append(c)
        return c

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % self.pid))

    def fd_list(self):
        out = []
        base = "/proc/%d/fd" % self.pid
        for n in sorted(os.listdir(base), key=int):
            try:
                out.append("%s -> %s" % (n, os.readlink(os.path.join(base, n))))
            except OSError:
                pass
        return out

    def settled_fd_count(self, client=None, settle=0.1, timeout=5.0):
        """The fd count once it holds still for `settle` seconds.

        With a client, a daemon.info round trip first: a connect() succeeds
        before the daemon accept()s, so only an answered request proves the
        connection's fd exists in the daemon."""
        if client is not None:
            client.call("daemon.info")
        deadline = time.monotonic() + timeout
        last, since = self.fd_count(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.01)
            n = self.fd_count()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= settle:
                break
        return last

    def wait_fd_count(self, want, timeout=5.0):
        """Until fd_count() == want (fds close asynchronously); returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.fd_count()
            if n == want or time.monotonic() > deadline:
                return n
            time.sleep(0.02)

    def check_fd_baseline(self, baseline, what="daemon fd count back to baseline",
                          timeout=5.0):
        """Assert the daemon holds exactly `baseline` fds again (waiting up to
        `timeout` for asynchronous closes); lists its fds when it does not."""
        n = self.wait_fd_count(baseline, timeout)
        if n != baseline:
            log("\n".join(self.fd_list()))
        check_eq(n, baseline, what)

    def stop(self, timeout=10.0, expect_code=0):
        """SIGTERM; the daemon must exit with expect_code within timeout."""
        for c in self.clients:
            c.close()
        self.clients = []
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                procs.reap(self.proc, signal.SIGKILL)
                self.print_log()
                raise DaemonError("vhubd did not exit within %.1fs of SIGTERM" % timeout)
        if self.proc is not None:
            procs.reap(self.proc)
        self.exit_code = code
        if expect_code is not None and code != expect_code:
            self.print_log()
            raise DaemonError("vhubd exited with %r after SIGTERM, expected %d"
                              % (code, expect_code))
        return code

    def kill(self):
        for c in self.clients:
            c.close()
        self.clients = []
        return procs.reap(self.proc, signal.SIGKILL)

    def print_log(self, limit=300):
        procs.print_log(self.log_path, "vhubd log", limit)

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.print_log()
            if self.alive:
                self.stop(expect_code=None)
            return False
        self.stop()
        return False

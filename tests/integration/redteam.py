"""Shared pieces of the red-team tests (tests/integration/test_redteam_*.py).

Each attack runs as a uid that is not root: the file-system moves through
run_as() (a forked child with that uid's credentials), the control calls
through Child (the same, talking to the test over two pipes) or
vhubtest.limits.UnprivAgent (a child process with its own connections).
Victims are files and directories of root's (or of another uid's) that the
attacking uid cannot touch itself; vhubtest.victims.snapshot() records
what must not change.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.agent import drop_to                      # noqa: E402
from vhubtest.daemon import Daemon                      # noqa: E402
from vhubtest.testing import Skip, TestFailure          # noqa: E402

USER = 65534        # the attacker (nobody)
OTHER = 4321        # another unprivileged uid


def need_root():
    if os.geteuid() != 0:
        raise Skip("the red-team tests need root to act as other uids")


def run_as(uid, fn, *args, gid=None):
    """fn(*args) in a forked child with uid's credentials (no groups);
    returns what it returned (an int exit status, 0..255) or raises if it
    raised."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            drop_to(uid, gid)()
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


class Child:
    """fn(*args, to_test, from_test) run as uid in a forked child (run_as()):
    it writes to the test through to_test and reads from_test; the test
    reads (read(), readline()) and writes (write()) the other ends, and
    wait()s for it."""

    def __init__(self, uid, fn, *args):
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(r1)
                os.close(w2)
                code = run_as(uid, fn, *args, w1, r2)
            finally:
                os._exit(code)     # never back into the test's own code
        os.close(w1)
        os.close(r2)
        self.r = os.fdopen(r1, "rb", buffering=0)
        self.w = w2

    def read(self, n=1):
        return self.r.read(n)

    def readline(self):
        """One line (bytes, without its newline)."""
        line = b""
        while not line.endswith(b"\n"):
            c = self.r.read(1)
            if not c:
                break
            line += c
        return line.strip()

    def write(self, data):
        try:
            os.write(self.w, data)
        except BrokenPipeError:
            pass                # it is gone already; wait() says how

    def wait(self):
        """Tells it to finish (one byte) and waits; its exit status."""
        self.write(b"x")
        _, status = os.waitpid(self.pid, 0)
        self.r.close()
        os.close(self.w)
        return os.waitstatus_to_exitcode(status)


def workdir(t):
    """Root's work directory for an attack, that every uid may traverse."""
    need_root()
    d = t.tmpdir(prefix="vhubrt-")
    os.chmod(d, 0o755)
    return d


def start_daemon(t, d, args=(), cls=Daemon, **kw):
    """vhubd in d with a control socket every uid may connect to and a
    back-end directory every uid may traverse; its log shown with the
    test's."""
    daemon = t.enter(cls(d, extra_args=["--control-mode", "0666"] + list(args), **kw))
    os.chmod(daemon.backend_dir, 0o755)
    t.add_log("vhubd", daemon.log_path)
    return daemon


def limited_daemon(nofile):
    """A Daemon class whose vhubd runs under prlimit --nofile (prlimit execs
    it: the same pid)."""
    class LimitedDaemon(Daemon):
        def argv(self):
            return ["prlimit", "--nofile=%d:%d" % (nofile, nofile), "--"] + super().argv()
    return LimitedDaemon

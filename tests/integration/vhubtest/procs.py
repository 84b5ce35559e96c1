"""Child processes that never outlive the test.

Every process the harness starts goes through spawn(): it runs under
`setpriv --pdeathsig SIGKILL` when setpriv exists (so even a SIGKILLed test
leaves nothing behind), is registered for an atexit sweep, and a SIGTERM to
the test (meson's timeout) turns into SystemExit so context managers and
atexit run.
"""

import atexit
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

_children = []
_SETPRIV = shutil.which("setpriv")


def spawn(argv, log_path=None, env=None, stdin=subprocess.DEVNULL, cwd=None):
    """Start argv with stdout+stderr to log_path (or inherited)."""
    _install_sigterm()
    cmd = list(argv)
    if _SETPRIV:
        cmd = [_SETPRIV, "--pdeathsig", "KILL", "--"] + cmd
    out = open(log_path, "ab") if log_path else None
    try:
        p = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=subprocess.STDOUT if out else None,
                             env=env, cwd=cwd, close_fds=True)
    finally:
        if out:
            out.close()
    _children.append(p)
    return p


def reap(p, sig=signal.SIGKILL, timeout=5.0):
    """Signal p (if alive) and wait for it; returns its exit code or None."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    if p in _children:
        _children.remove(p)
    return p.returncode


def _sweep():
    for p in list(_children):
        try:
            reap(p, signal.SIGKILL, 2.0)
        except Exception:  # noqa: BLE001 - atexit must not stop halfway
            pass


atexit.register(_sweep)

_sigterm_installed = False


def _install_sigterm():
    global _sigterm_installed
    if _sigterm_installed:
        return
    _sigterm_installed = True

    def _on_term(signum, frame):
        raise SystemExit("terminated by signal %d" % signum)
    try:
        signal.signal(signal.SIGTERM, _on_term)
    except ValueError:
        pass  # not the main thread: atexit and pdeathsig still cover us


def wait_until(pred, timeout, interval=0.005, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def fail_file_writes(pid):
    """From now on every write of process pid's to a regular file fails
    (EFBIG: its RLIMIT_FSIZE soft limit is 0; vhubd ignores the SIGXFSZ) --
    its snapshot memfds' and its log file's alike.  A fault injected in the
    kernel's own path, not a hook in the daemon."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, hard))


def unlink_if_exists(path):
    """os.unlink, for a path that may be gone already (a stale socket, a
    listener's own at its close)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def unix_listening(path):
    """True if some process has a listening unix socket bound to `path`.

    Read from /proc/net/unix (flag __SO_ACCEPTCON 0x10000) so no probe
    connection is made: virtiofsd exits when its first front-end goes away.
    """
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
    except FileNotFoundError:
        return os.path.exists(path)
    return False


def unix_peers(path):
    """How many sockets are connected to the unix socket bound to `path`
    (accepted or still in its listener's queue: the kernel gives each the
    listener's address), from /proc/net/unix: nothing is connected to
    count them."""
    with open("/proc/net/unix") as f:
        next(f)
        return sum(1 for line in f if len(line.split()) >= 8 and line.split()[7] == path
                   and not int(line.split()[3], 16) & 0x10000)


def print_log(path, title, limit=200):
    try:
        with open(path, "r", errors="replace") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return
    sys.stdout.write("---- %s (%s, last %d lines) ----\n" % (title, path, min(limit, len(lines))))
    sys.stdout.writelines(lines[-limit:])
    sys.stdout.write("---- end of %s ----\n" % title)
    sys.stdout.flush()

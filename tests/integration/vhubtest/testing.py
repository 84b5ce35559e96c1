"""Test-script plumbing: exit codes, checks, temp dirs.

    from vhubtest.testing import run, check, Skip

    def main(t):          # t: a TestContext
        d = t.tmpdir()    # removed at the end, pass or fail
        check(1 + 1 == 2, "arithmetic works")

    run(main)

Exit 0 = pass, 1 = fail (traceback and the logs registered with
t.add_log printed), 77 = genuine skip with the reason printed.
"""

import contextlib
import os
import reprlib
import shutil
import sys
import tempfile
import time
import traceback

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_SKIP = 77


class Skip(Exception):
    """A genuine skip: something the test needs is not installed."""


class TestFailure(AssertionError):
    pass


def user_cache_dir(env, name):
    """A cache kept across runs and build dirs: $<env>, else
    $XDG_CACHE_HOME/<name>, else ~/.cache/<name> (made if missing)."""
    d = os.environ.get(env)
    if not d:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, name)
    os.makedirs(d, exist_ok=True)
    return d


def run_seed():
    """The run's random seed: $VHUB_TEST_SEED, else one from the time and
    pid (the caller logs it, so a failing run can be replayed)."""
    return int(os.environ.get("VHUB_TEST_SEED", str(int(time.time()) ^ os.getpid())))


def log(msg):
    sys.stdout.write("%s\n" % msg)
    sys.stdout.flush()


def check(cond, what, detail=None):
    """Assert `cond`; print 'ok: what' so the log says what was verified."""
    if not cond:
        raise TestFailure("FAILED: %s%s" % (what, "" if detail is None else " (%s)" % (detail,)))
    log("ok: %s" % what)


def check_eq(got, want, what):
    check(got == want, "%s == %s" % (what, _short(want)), "got %s" % _short(got))


def _short(v):
    r = reprlib.Repr()
    r.maxlist = r.maxdict = 8
    r.maxstring = r.maxother = 120
    return r.repr(v)


def expect_error(exc_type, fn, *args, what=None, **kw):
    """fn(*args) must raise exc_type; returns the exception."""
    try:
        fn(*args, **kw)
    except exc_type as e:
        log("ok: %s raised %s: %s" % (what or getattr(fn, "__name__", fn), exc_type.__name__, e))
        return e
    raise TestFailure("FAILED: %s did not raise %s" % (what or fn, exc_type.__name__))


class TestContext:
    def __init__(self, name):
        self.name = name
        self.stack = contextlib.ExitStack()
        self._logs = []   # (title, path) printed on failure

    def tmpdir(self, prefix=None):
        """A fresh temp dir removed at the end, pass or fail (short path:
        unix socket paths are limited to 107 bytes)."""
        d = tempfile.mkdtemp(prefix=prefix or "vhubt-", dir=os.environ.get("VHUB_TEST_TMPDIR"))
        self.stack.callback(shutil.rmtree, d, ignore_errors=True)
        # Runs before the rmtree (LIFO): logs are printed while they exist.
        self.stack.push(self._print_logs_on_failure)
        return d

    def _print_logs_on_failure(self, exc_type, exc, tb):
        if exc_type is not None and not issubclass(exc_type, Skip):
            self.print_logs()
            self._logs = []
        return False

    def enter(self, cm):
        return self.stack.enter_context(cm)

    def defer(self, fn, *args, **kw):
        self.stack.callback(fn, *args, **kw)

    def add_log(self, title, path):
        self._logs.append((title, path))

    def enter_logged(self, title, proc):
        """enter() a back-end whose log (proc.log_path) is printed under
        title if the test fails; returns it, started."""
        self.add_log(title, proc.log_path)
        return self.enter(proc)

    def print_logs(self):
        from .procs import print_log
        for title, path in self._logs:
            print_log(path, title)


def run_parts(parts, default):
    """run() a test file made of parts ({name: fn(t)}): the one argv[1]
    names, else default."""
    def main(t):
        mode = sys.argv[1] if len(sys.argv) > 1 else default
        if mode not in parts:
            raise SystemExit("usage: %s [%s]" % (os.path.basename(sys.argv[0]), "|".join(parts)))
        parts[mode](t)
    run(main)


def run(main, name=None):
    """Run main(TestContext) and exit with the test protocol's code."""
    name = name or os.path.basename(sys.argv[0])
    t = TestContext(name)
    start = time.monotonic()
    code = EXIT_PASS
    try:
        with t.stack:   # exit callbacks see the exception (backends print logs)
            main(t)
    except Skip as e:
        log("SKIP: %s: %s" % (name, e))
        code = EXIT_SKIP
    except KeyboardInterrupt:
        log("FAIL: %s: interrupted" % name)
        code = EXIT_FAIL
    except BaseException as e:  # noqa: BLE001 - any other outcome is a failure
        traceback.print_exc(file=sys.stdout)
        log("FAIL: %s: %s: %s" % (name, type(e).__name__, e))
        code = EXIT_FAIL
    else:
        log("PASS: %s (%.2fs)" % (name, time.monotonic() - start))
    sys.stdout.flush()
    sys.exit(code)

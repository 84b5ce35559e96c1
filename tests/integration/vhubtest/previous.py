"""vhubd built from an earlier commit of this source tree's git history, for
the upgrade and downgrade test (issue 10; docs/restart.md, "Versions").

    path = previous.vhubd(previous.FORMAT_1_COMMIT)

The commit's tree is exported with `git archive` (the source tree is not
touched) into a cache outside it, configured with meson (a plain build) and
only its vhubd compiled.  The cache is $VHUB_PREVIOUS_CACHE, else
$XDG_CACHE_HOME/vhub-previous, else ~/.cache/vhub-previous: one directory
per commit, kept across runs and shared by every build directory (build/
and build-asan/ use the same binary, so tests/run-all.sh builds it once).
A lock file serializes builders running in parallel; a build that fails
leaves nothing that looks finished.

A source tree without git history, or whose history lacks the commit (a
tarball, a shallow clone), is a Skip naming which.
"""

import fcntl
import os
import shutil
import subprocess
import tempfile
import time

from .testing import Skip, log, user_cache_dir

SOURCE_ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
# The last main commit whose vhubd writes and reads snapshot format 1 (main
# just before "Merge branch 'h-restart4'", which made format 2).
FORMAT_1_COMMIT = "08a404f7bd16960dc344e7a064bb4800043b32d7"


def cache_dir():
    return user_cache_dir("VHUB_PREVIOUS_CACHE", "vhub-previous")


def _git(*args):
    return subprocess.run(["git", "-C", SOURCE_ROOT] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=60)


def _check_history(commit):
    if not shutil.which("git"):
        raise Skip("git is not installed: cannot build vhubd at %s from the source tree's history" % commit)
    if _git("rev-parse", "--git-dir").returncode != 0:
        raise Skip("the source tree %s has no git history: cannot build vhubd at %s" % (SOURCE_ROOT, commit))
    if _git("cat-file", "-e", commit + "^{commit}").returncode != 0:
        raise Skip("the source tree's git history lacks commit %s (a shallow clone?): cannot build "
                   "vhubd at it" % commit)


def vhubd(commit):
    """The path of vhubd built at commit (built once, under a lock)."""
    _check_history(commit)
    d = os.path.join(cache_dir(), commit)
    os.makedirs(d, exist_ok=True)
    binary = os.path.join(d, "vhubd")
    with open(os.path.join(d, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.access(binary, os.X_OK):
            log("vhubd at %s: %s (cached)" % (commit[:12], binary))
            return binary
        started = time.monotonic()
        work = tempfile.mkdtemp(prefix=".work-", dir=d)
        try:
            src, build = os.path.join(work, "src"), os.path.join(work, "build")
            os.makedirs(src)
            archive = subprocess.Popen(["git", "-C", SOURCE_ROOT, "archive", "--format=tar", commit],
                                       stdout=subprocess.PIPE)
            untar = subprocess.run(["tar", "-x", "-C", src], stdin=archive.stdout, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=120)
            archive.stdout.close()
            if archive.wait(60) != 0 or untar.returncode != 0:
                raise RuntimeError("git archive %s | tar -x failed: %s"
                                   % (commit, untar.stdout.decode(errors="replace")[-2000:]))
            for argv in (["meson", "setup", build, src, "--buildtype=debugoptimized"],
                         ["meson", "compile", "-C", build, "daemon/vhubd"]):
                p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600,
                                   env=_build_env())
                if p.returncode != 0:
                    raise RuntimeError("building vhubd at %s: `%s` failed:\n%s"
                                       % (commit, " ".join(argv), p.stdout.decode(errors="replace")[-4000:]))
            # the finished binary appears under its final name last
            shutil.copy2(os.path.join(build, "daemon", "vhubd"), binary + ".new")
            os.rename(binary + ".new", binary)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log("vhubd at %s built in %.1f s: %s" % (commit[:12], time.monotonic() - started, binary))
    return binary


def _build_env():
    """The test's environment without what a sanitized run sets for its
    own processes (the old tree is a plain build)."""
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("ASAN_", "UBSAN_", "LSAN_", "MESON_")):
            del env[k]
    return env

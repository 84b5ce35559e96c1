#!/usr/bin/env python3
"""Restart under the unit's system call filter and capability bounding set
(systemd/vhubd.service).

These machines do not run systemd as PID 1, so `systemd-run -p
SystemCallFilter=...` is not available; this applies the same filter
itself.  The allow-list is computed from the unit file's own
SystemCallFilter= lines (each group expanded by `systemd-analyze
syscall-filter`, "~" lines subtracted, as systemd does) and loaded with
libseccomp (python3-seccomp) in a small exec-in-place wrapper, with
SystemCallErrorNumber=EPERM's action and no_new_privs (NoNewPrivileges=yes),
right before vhubd is exec'ed, after dropping every capability outside the
unit's CapabilityBoundingSet= -- so vhubd runs as filtered and with the
capabilities it has under the unit (no CAP_SYS_RESOURCE: the kernel's
limit on fds in flight in unix sockets, which the fd store's stashes are,
applies), under the same pid (LISTEN_PID holds).

Then the restart paths run under it: test_restart.py's planned restarts
(20, qsd under verified I/O), its crash restarts (20 SIGKILLs: the
reconnect path, -32011, fds back at rest) and test_restart_matrix.py's
shared objects (20 planned restarts, test back-ends).  kcmp, memfd_create,
fcntl seals, socketpair, SIOCINQ, pwrite on memfds are what the restart
adds; a call the filter refused would fail these tests (EPERM).  That the
filter is in force is checked first: the wrapper refuses setpriority
(@resources) to a probe.
"""

import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.daemon import vhubd_path                          # noqa: E402
from vhubtest.testing import Skip, check, check_eq, log, run               # noqa: E402
import test_restart                                              # noqa: E402
import test_restart_matrix                                       # noqa: E402

UNIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "systemd",
                    "vhubd.service")
SYSTEM_PYTHON = "/usr/bin/python3"

WRAPPER = r'''#!/usr/bin/python3 -I
# Keep the unit's capability bounding set, load its system call filter,
# then exec vhubd in place.
import ctypes, errno, os, sys
import seccomp
ALLOW, VHUBD, KEEP = %r, %r, %r
PR_CAPBSET_DROP = 24
libc = ctypes.CDLL(None, use_errno=True)
for cap in range(64):
    if cap not in KEEP and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
        if ctypes.get_errno() != errno.EINVAL:      # EINVAL: past the last capability
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP %%d" %% cap)
with open(ALLOW) as f:
    allowed = f.read().split()
f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
for name in allowed:
    try:
        f.add_rule(seccomp.ALLOW, name)
    except (RuntimeError, ValueError, OSError):
        pass            # a name this libseccomp or architecture does not know
f.set_attr(seccomp.Attr.CTL_NNP, 1)
f.load()
os.execv(VHUBD or sys.argv[1], [VHUBD] + sys.argv[1:] if VHUBD else sys.argv[1:])
'''


# linux/capability.h: the capabilities the unit may name
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2, "CAP_FOWNER": 3,
        "CAP_FSETID": 4, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7, "CAP_SETPCAP": 8,
        "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_IPC_LOCK": 14, "CAP_SYS_PTRACE": 19,
        "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}


def unit_caps():
    """CapabilityBoundingSet= of the unit, as numbers."""
    with open(UNIT) as f:
        m = re.search(r"^CapabilityBoundingSet=(.*)$", f.read(), re.M)
    check(m is not None, "the unit sets CapabilityBoundingSet=")
    return sorted(CAPS[n] for n in m.group(1).split())


def expand(group, cache={}):
    if group not in cache:
        out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                             text=True, check=True).stdout
        names = set()
        for line in out.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or line == group:
                continue
            names |= expand(line) if line.startswith("@") else {line}
        cache[group] = names
    return cache[group]


def unit_allow_list():
    """The set SystemCallFilter= lines of the unit allow, in order."""
    with open(UNIT) as f:
        lines = [m.group(1).strip() for m in re.finditer(r"^SystemCallFilter=(.*)$", f.read(), re.M)]
    check(lines, "the unit has SystemCallFilter= lines")
    allowed = set()
    for line in lines:
        deny = line.startswith("~")
        names = set()
        for item in line.lstrip("~").split():
            names |= expand(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


def main(t):
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", "import seccomp"], capture_output=True).returncode != 0:
        raise Skip("python3-seccomp (libseccomp for %s) is not installed" % SYSTEM_PYTHON)
    try:
        subprocess.run(["systemd-analyze", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise Skip("systemd-analyze is not installed")
    with open(UNIT) as f:
        unit = f.read()
    check("SystemCallErrorNumber=EPERM" in unit and "NoNewPrivileges=yes" in unit,
          "the unit refuses with EPERM and sets NoNewPrivileges (what the wrapper does)")
    allowed = unit_allow_list()
    for name in ("kcmp", "memfd_create", "fcntl", "socketpair", "ioctl", "pwrite64", "sendmsg",
                 "recvmsg", "execve"):
        check(name in allowed, "the unit's filter allows %s" % name)
    d = t.tmpdir()
    allow_file = os.path.join(d, "allowed")
    with open(allow_file, "w") as f:
        f.write("\n".join(sorted(allowed)) + "\n")
    real = vhubd_path()
    keep = unit_caps()
    # vhubd itself: the wrapper execs it in place, with the arguments given
    launcher = os.path.join(d, "vhubd")
    with open(launcher, "w") as f:
        f.write(WRAPPER % (allow_file, real, keep))
    os.chmod(launcher, 0o755)
    # the same filter for any program (the probe below)
    wrapper = os.path.join(d, "filtered")
    with open(wrapper, "w") as f:
        f.write(WRAPPER % (allow_file, "", keep))
    os.chmod(wrapper, 0o755)
    # the filter really is in force: a call outside it fails with EPERM
    probe = subprocess.run([wrapper, SYSTEM_PYTHON, "-I", "-c",
                            "import os; os.setpriority(os.PRIO_PROCESS, 0, 1)"],
                           capture_output=True, text=True)
    check(probe.returncode != 0 and "Operation not permitted" in probe.stderr,
          "the wrapper's filter refuses setpriority (@resources) with EPERM", probe.stderr[-200:])
    caps = subprocess.run([wrapper, "/bin/grep", "^CapBnd", "/proc/self/status"], capture_output=True,
                          text=True).stdout.split()
    check_eq(int(caps[1], 16), sum(1 << c for c in keep),
             "the wrapper keeps the unit's capability bounding set (%s)" % keep)
    log("%d system calls allowed; vhubd runs as %s" % (len(allowed), launcher))
    with open(real, "rb") as f:
        sanitized = b"__asan_init" in f.read()
    if sanitized:
        # LeakSanitizer's exit-time check stops the process's threads with
        # ptrace, which the unit's filter refuses ("LeakSanitizer has
        # encountered a fatal error"); a build for the unit has no LSan.
        # ASan and UBSan themselves stay on; leaks are checked by the same
        # restart parts outside the filter (restart-planned, restart-crash).
        opts = [o for o in os.environ.get("ASAN_OPTIONS", "").split(":")
                if o and not o.startswith("detect_leaks=")]
        os.environ["ASAN_OPTIONS"] = ":".join(opts + ["detect_leaks=0"])
        log("ASan build: LeakSanitizer off under the filter (it needs ptrace)")
    os.environ["VHUBD"] = launcher
    for name, part in (("planned", test_restart.part_planned), ("crash", test_restart.part_crash),
                       ("shared objects", test_restart_matrix.part_shared)):
        log("---- %s restarts under the unit's system call filter ----" % name)
        part(t)
    log("ok: planned and crash restarts, shared objects: nothing refused by the filter")


if __name__ == "__main__":
    run(main)

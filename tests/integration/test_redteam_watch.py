#!/usr/bin/env python3
"""Red team: the reconnect watch resolves a uid's path as root.

When a client-mode device loses its back-end, device_watch_socket() adds
an inotify watch on dirname(socket_path) -- the path string the VMM gave,
looked up again from "/" with the daemon's own credentials (inotify needs
read permission on the directory; root has it everywhere).  docs/security.md:
"Every resolution, open, bind, unlink and connect for that VM's back-ends
-- also reconnects -- runs between setgroups/setfsgid/setfsuid to that
identity".  This one does not.

uid 65534 adds a device at BACKENDS/u/d/x.sock (its own directory), swaps
d for a symlink to ROOTONLY (root's 0700 directory) while the back-end
runs, and lets the back-end die: the daemon, reconnecting, watches
ROOTONLY -- a directory the uid could not watch (or even list) itself.
The uid then puts d back.  From now on, whenever anything named x.sock is
created in, moved into or changes attributes in ROOTONLY, the daemon
reconnects the device at once, and the uid sees device.reconnected: an
oracle on activity in root's private directory.  (With reconnect_ms and
--reconnect-max-ms one hour, nothing else reconnects it.)  It also lets any uid make root's
inotify instance pin watches, and the kernel memory behind them, on
arbitrary inodes.

The test checks that the daemon holds no inotify watch on ROOTONLY, and
that root creating ROOTONLY/x.sock does not reconnect uid 65534's device.
"""

import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, Child, mkdir, run_as, start_daemon, workdir  # noqa: E402
from vhubtest.client import Client                              # noqa: E402
from vhubtest.procs import wait_until                           # noqa: E402
from vhubtest.testbackend import TestBackend                    # noqa: E402
from vhubtest.testing import check, check_eq, log, run          # noqa: E402

IN_CREATE = 0x100


def inotify_watches(pid):
    """Inode numbers the process's inotify instances watch (fdinfo)."""
    inodes = set()
    base = "/proc/%d/fd" % pid
    for n in os.listdir(base):
        try:
            if os.readlink(os.path.join(base, n)) != "anon_inode:inotify":
                continue
            with open("/proc/%d/fdinfo/%s" % (pid, n)) as f:
                for line in f:
                    if line.startswith("inotify wd:"):
                        fields = dict(x.split(":", 1) for x in line.split()[1:])
                        inodes.add(int(fields["ino"], 16))
        except OSError:
            continue
    return inodes


def try_watch(path):
    """Exit status 0 if this process may watch path, 13 (EACCES) if not."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(0)
    wd = libc.inotify_add_watch(fd, path.encode(), IN_CREATE)
    return 0 if wd >= 0 else ctypes.get_errno()


def swap(a, b):
    """Exchange two names of the caller's (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, a.encode(), -100, b.encode(), 2) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def main(t):
    d = workdir(t)
    # the backoff may reach an hour: only the watch can reconnect the device in this test
    daemon = start_daemon(t, d, ["--reconnect-max-ms", "3600000"])

    udir = mkdir(os.path.join(daemon.backend_dir, "u"), USER, 0o755)
    real = mkdir(os.path.join(udir, "d"), USER, 0o755)
    rootonly = mkdir(os.path.join(d, "rootonly"), 0, 0o700)
    link = os.path.join(udir, "link")
    run_as(USER, os.symlink, rootonly, link)
    check_eq(run_as(USER, try_watch, rootonly), 13,
             "uid %d cannot watch root's 0700 directory itself (EACCES)" % USER)

    sock = os.path.join(real, "x.sock")
    tb = t.enter(TestBackend([sock], log_dir=d))
    os.chmod(sock, 0o666)

    # the uid's VMM: a connection of its own for the whole test
    def vmm(w, r):
        c = Client(daemon.control)
        c.call("vm.create", {"vm": "v"})
        c.call("device.add", {"vm": "v", "device": "x", "socket": sock, "reconnect_ms": 3600000})
        os.write(w, b"added\n")
        cmd = os.read(r, 64)          # "wait": the test made the device lose its back-end
        ev = None
        try:
            ev = c.wait_event(lambda e: e["event"] == "device.reconnected", float(cmd.split()[1]))
        except Exception:  # noqa: BLE001 - no event within the time
            pass
        os.write(w, b"reconnected\n" if ev else b"quiet\n")
        os.read(r, 64)
        c.close()
    uid = Child(USER, vmm)
    try:
        check_eq(uid.readline(), b"added", "uid %d added its device" % USER)
        # while the back-end runs: d becomes the symlink to ROOTONLY
        run_as(USER, swap, real, link)
        tb.kill()
        root = Client(daemon.control)

        def disconnected():
            devs = root.call("device.list", {"vm": "v", "uid": USER})["devices"]
            return devs and devs[0]["state"] == "disconnected"
        wait_until(disconnected, 5.0, what="uid %d's device to be disconnected" % USER)
        time.sleep(0.3)              # its first restore attempt failed: the watch is set by now
        watched = inotify_watches(daemon.pid)
        log("the daemon watches inodes %s; ROOTONLY is %d" % (sorted(watched), os.stat(rootonly).st_ino))
        # the uid puts its directory back and restarts its back-end there
        run_as(USER, swap, real, link)
        tb.start()
        os.chmod(sock, 0o666)
        time.sleep(0.5)
        uid.write(b"wait 3\n")
        time.sleep(0.5)
        # root, in its own private directory
        with open(os.path.join(rootonly, "x.sock"), "w") as f:
            f.write("root's\n")
        seen = uid.readline().decode()
        wrong = []
        if os.stat(rootonly).st_ino in watched:
            wrong.append("the daemon watched root's 0700 directory for uid %d" % USER)
        if seen != "quiet":
            wrong.append("root creating x.sock there reconnected uid %d's device at once "
                         "(device.reconnected; reconnect_ms is one hour)" % USER)
        check(not wrong, "uid %d's reconnect watch stays out of root's private directory" % USER,
              "; ".join(wrong))
    finally:
        uid.wait()


run(main)

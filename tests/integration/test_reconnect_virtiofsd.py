#!/usr/bin/env python3
"""virtiofsd SIGKILLed and started again on the same socket through vhubd.

QEMU 7.2's C virtiofsd serves exactly one front-end connection per process
and exits when it goes away; it leaves its socket file behind.  A restart is
therefore a new process with a fresh FUSE session: the harness deletes the
stale socket file and starts it again on the same path; vhubd (client mode)
sees the socket appear (inotify), connects, redoes the handshake, memory
table and rings at the used index, and says device.reconnected.

What the guest side has to do after that, found here and asserted:

- The new process has not seen FUSE_INIT: any other request is answered
  with EIO (libfuse's "!se->got_init" check), including a request that was
  in flight at the kill and that the restored ring hands to the new
  process.  The guest's FUSE driver must send FUSE_INIT again.
- Node ids and file handles from the old session mean nothing to the new
  process (its inode table starts with the root only): the guest must look
  its paths up again (GETATTR of an old node id fails: EBADF with QEMU 7.2;
  the errno is printed, only the failure is asserted).
- After FUSE_INIT, GETATTR / LOOKUP / OPEN / READ work again.

Three kills: one idle, one with a GETATTR in flight (virtiofsd and its
serving child - it forks, --sandbox=namespace - SIGSTOPped first, so the
request is surely unanswered; both then SIGKILLed),
one idle again; every outage gives one device.disconnected and one
device.reconnected (reconnects 1, 2, 3; exact true: one FUSE request at a
time is at most one outstanding per ring).  The in-flight GETATTR completes
exactly once after the restore - with EIO from the new, un-INITed session.
"""

import os
import signal
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.events import no_event, wait_event                # noqa: E402
from vhubtest import fs, scenarios                             # noqa: E402
from vhubtest.backends import VirtiofsdBackend                 # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.procs import wait_until                          # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

EIO = 5


def process_tree(pid):
    """pid and all its descendants."""
    children = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open("/proc/%s/stat" % p) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def all_stopped(pid):
    """Every thread of pid is stopped (SIGSTOP is not synchronous)."""
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/stat" % (pid, tid)) as f:
            if f.read().rsplit(")", 1)[1].split()[0] != "T":
                return False
    return True


def fuse_init(fsdev, what):
    r = fsdev.init()
    check(r["major"] == 7, "%s: FUSE_INIT answered %d.%d" % (what, r["major"], r["minor"]))


def fuse_works(fsdev, share, content, what):
    attr = fsdev.getattr(fs.FUSE_ROOT_ID)
    check_eq(attr["ino"], os.stat(share).st_ino, "%s: GETATTR of the root" % what)
    nodeid, fattr, data = fsdev.read_file("data.bin", len(content) + 4096)
    check(data == content, "%s: LOOKUP+OPEN+READ of data.bin returned its %d bytes"
          % (what, len(content)))
    return nodeid


def main(t):
    d = t.tmpdir()
    share = os.path.join(d, "share")
    os.mkdir(share)
    content = os.urandom(100000)
    with open(os.path.join(share, "data.bin"), "wb") as f:
        f.write(content)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    sock = daemon.backend_socket("fs0.sock")
    vfs = t.enter_logged("virtiofsd", VirtiofsdBackend(sock, share, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 16 << 20)
    vmm.add_device("fs0", sock, type="fs")
    fsdev = fs.FsDevice(mem)
    vmm.start_device("fs0", scenarios.FS_FEATURES, fsdev.vqs)
    fuse_init(fsdev, "first session")
    old_node = fuse_works(fsdev, share, content, "first session")

    reqq = fsdev.requests[0]
    for k in (1, 2, 3):
        inflight = None
        if k == 2:
            # a GETATTR the old process never answers: freeze it, queue, kill
            # virtiofsd forks (--sandbox=namespace): the child serves
            tree = process_tree(vfs.pid)
            for pid in tree:
                os.kill(pid, signal.SIGSTOP)
            wait_until(lambda: all(all_stopped(p) for p in tree), 5.0,
                       what="virtiofsd to stop")
            inflight = fsdev._unique = fsdev._unique + 2
            hdr = fs.IN_HEADER.pack(fs.IN_HEADER.size + 16, fs.FUSE_GETATTR, inflight,
                                    fs.FUSE_ROOT_ID, 0, 0, os.getpid(), 0, 0)
            mem.write(fsdev._in, hdr + struct.pack("<IIQ", 0, 0, 0))
            mem.fill(fsdev._out, fs.OUT_HEADER.size, 0xEE)
            reqq.add([(fsdev._in, len(hdr) + 16, False), (fsdev._out, 4096, True)],
                     token=inflight)
            reqq.kick()
            time.sleep(0.05)
            check_eq(reqq.used_idx, (reqq.avail_idx - 1) & 0xFFFF,
                     "cycle 2: the frozen virtiofsd leaves the GETATTR unanswered")
        used_at_kill = {vq.index: vq.used_idx for vq in fsdev.vqs}
        avail_at_kill = {vq.index: vq.avail_idx for vq in fsdev.vqs}
        # SIGKILL the serving child as well: its parent-death signal is a
        # SIGTERM, which stays pending while it is stopped
        for pid in reversed(process_tree(vfs.pid)):
            os.kill(pid, signal.SIGKILL)
        vfs.kill()
        check(os.path.exists(sock), "cycle %d: the killed virtiofsd left its socket file" % k)
        disc = wait_event(c, "device.disconnected", "fs0")
        log("cycle %d: device.disconnected: %s" % (k, disc["reason"]))
        t0 = time.monotonic()
        # start() deletes the stale socket file first.  No waiting for it to
        # listen: virtiofsd closes its listener once it accepted its one
        # front-end, and vhubd (inotify) may well connect before a poll of
        # /proc/net/unix could see it listening.
        vfs.start(wait=False)
        ev = wait_event(c, "device.reconnected", "fs0")
        log("cycle %d: device.reconnected %.0f ms after the restart began: %s"
            % (k, (time.monotonic() - t0) * 1000, ev))
        check_eq(ev["reconnects"], k, "cycle %d: reconnects" % k)
        check_eq(ev["exact"], True, "cycle %d: exact (at most one request outstanding)" % k)
        for v in ev["vrings"]:
            check_eq(v["base"], used_at_kill[v["index"]], "cycle %d ring %d: base" % (k, v["index"]))
            check_eq(v["outstanding"], (avail_at_kill[v["index"]] - used_at_kill[v["index"]]) & 0xFFFF,
                     "cycle %d ring %d: outstanding" % (k, v["index"]))
        check_eq(vmm.device_state("fs0")["state"], "running", "cycle %d: device.list state" % k)

        if inflight is not None:
            (head, token, used_len), = reqq.wait_used(1, 5.0)
            out = mem.read(fsdev._out, fs.OUT_HEADER.size)
            olen, err, ounique = fs.OUT_HEADER.unpack_from(out)
            log("cycle %d: the GETATTR in flight at the kill was answered by the new process: "
                "error %d, unique %d" % (k, err, ounique))
            check_eq((token, ounique, err), (inflight, inflight, -EIO),
                     "cycle %d: the in-flight GETATTR completed once after the restore, with "
                     "EIO (the new session has not seen FUSE_INIT)" % k)
        # Before FUSE_INIT the new session answers nothing but EIO.
        r = fsdev.call(fs.FUSE_GETATTR, fs.FUSE_ROOT_ID, struct.pack("<IIQ", 0, 0, 0),
                       reply_size=104)
        check_eq(r.error, -EIO, "cycle %d: GETATTR before a new FUSE_INIT fails with EIO" % k)
        fuse_init(fsdev, "cycle %d, new session" % k)
        # The old session's node id of data.bin, before this session looked it up.
        r = fsdev.call(fs.FUSE_GETATTR, old_node, struct.pack("<IIQ", 0, 0, 0), reply_size=104)
        log("cycle %d: GETATTR of the old session's node id %d after the new FUSE_INIT: error %d"
            % (k, old_node, r.error))
        check(r.error < 0, "cycle %d: the old session's node id is unknown to the new process "
              "(the guest must look its paths up again)" % k)
        old_node = fuse_works(fsdev, share, content, "cycle %d, after a new FUSE_INIT" % k)
        no_event(c, "device.failed", "fs0")

    check_eq(vmm.device_state("fs0")["reconnects"], 3, "device.list reconnects")
    vmm.stop_device("fs0")
    vmm.remove_device("fs0")
    check_eq(vfs.wait_exit(5), 0, "the last virtiofsd exits 0 once vhubd closed its connection")
    vmm.destroy()
    for vq in fsdev.vqs:
        vq.close()
    daemon.check_fd_baseline(baseline)


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""How fast a device comes back after its back-end restarts.

Not a pass/fail test: it prints, per back-end, the median, p90 and max over
RUNS runs (after WARMUP) of

  restore   the back-end's socket re-created -> device.reconnected at the
            client: vhubd's inotify wake-up, connect (retried every 10 ms
            while the socket exists but does not listen yet), the full
            handshake, the memory table, the kept inflight buffer where
            negotiated, both rings rebased to the used index in guest
            memory, the kick; the event's arrival at the client;
  fresh     device.add + device.start of the same device on the same,
            already listening back-end (what the VMM would do itself to
            bring a device up from nothing), at the client;
  exec      for context: back-end process spawned -> its socket created
            (the part of an outage vhubd cannot shorten).

The last column counts the runs over 5 ms.  A restore is bimodal: the
socket's name appears at bind(), a moment before the back-end listen()s;
when vhubd's connect() wins that race it is refused and retried after the
daemon's fast-retry interval (10 ms), otherwise it gets through at once.

"Socket re-created" is the IN_CREATE of the socket's name in its directory,
read by this process through its own inotify watch (ctypes), the same kind
of wake-up vhubd gets; device.reconnected's time is when the client's
reader thread hands it over.  Each run: the device is running with 2 rings
of 128 and idle, the back-end is SIGKILLed, device.disconnected awaited,
the back-end started again.  For `fresh`: device.stop + device.remove,
then device.add + device.start timed, on the back-end left running.

Back-ends: qemu-storage-daemon (null-co export, 2 queues: no INFLIGHT_SHMFD)
and the project's test back-end (INFLIGHT_SHMFD: GET_INFLIGHT_FD on a fresh
start, SET_INFLIGHT_FD with the kept buffer on a restore).  vhubd runs with
--log-level warning.  A missing back-end binary skips its rows.

    VHUBD=build/daemon/vhubd VHUB_TEST_BACKEND=build/tests/backend/vhub-test-backend \\
        PYTHONPATH=tests/integration python3 tests/bench/bench_reconnect.py
    meson test -C build --benchmark --suite bench -v reconnect
"""

import ctypes
import os
import select
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest import scenarios                                 # noqa: E402
from vhubtest.backends import QsdNullBackend                   # noqa: E402
from vhubtest.client import ClientError                        # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import Skip, log, run                    # noqa: E402
from vhubtest.virtq import Virtqueue                           # noqa: E402
from vhubtest.vmm import Vmm                                   # noqa: E402

RUNS = int(os.environ.get("BENCH_RECONNECT_RUNS", "30"))
WARMUP = int(os.environ.get("BENCH_RECONNECT_WARMUP", "3"))

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
_libc = ctypes.CDLL(None, use_errno=True)


class DirWatch:
    """inotify on a directory: wait for `name` to be created."""

    def __init__(self, path):
        self.fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, path.encode(), IN_CREATE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def drain(self):
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait_created(self, name, timeout):
        """The monotonic time at which we learned `name` was created."""
        deadline = time.monotonic() + timeout
        want = name.encode()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("%s was not created within %.1fs" % (name, timeout))
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            now = time.monotonic()
            buf = os.read(self.fd, 65536)
            off = 0
            while off < len(buf):
                _, mask, _, ln = struct.unpack_from("iIII", buf, off)
                ev_name = buf[off + 16:off + 16 + ln].rstrip(b"\0")
                off += 16 + ln
                if ev_name == want:
                    return now

    def close(self):
        os.close(self.fd)


def stats(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2], xs[min(n - 1, int(n * 0.9))], xs[-1]


def wait_event(c, name, device, timeout=10.0):
    """(event, time the client's reader had it) for the first matching event."""
    ev = c.wait_event(lambda e: e.get("event") == name and e.get("device") == device, timeout)
    return ev, time.monotonic()


def make_rings(mem):
    return [Virtqueue(mem, size=128, index=i) for i in range(2)]


def bench_backend(t, d, daemon, c, mem, label, backend, features):
    sock = backend.socket
    name = os.path.basename(sock)
    vmm = Vmm(c, "vm-" + label.replace(" ", "-"))
    vmm.create()
    vmm.add_memory(mem)
    watch = DirWatch(os.path.dirname(sock))
    t.defer(watch.close)

    vmm.add_device("dev", sock, type="blk")
    vqs = make_rings(mem)
    vmm.start_device("dev", features, vqs)
    restore, spawn = [], []
    for i in range(WARMUP + RUNS):
        backend.kill()
        wait_event(c, "device.disconnected", "dev")
        watch.drain()
        # start without the harness's listen poll: nothing but our watch
        # and vhubd's look at the directory meanwhile
        t_exec = time.monotonic()
        backend.start(wait=False)
        t_created = watch.wait_created(name, 10.0)
        ev, t_back = wait_event(c, "device.reconnected", "dev")
        if ev["reconnects"] != i + 1:
            raise RuntimeError("reconnects %r, want %d" % (ev["reconnects"], i + 1))
        if i >= WARMUP:
            restore.append(t_back - t_created)
            spawn.append(t_created - t_exec)
    backend.wait_for_socket()

    fresh = []
    for i in range(WARMUP + RUNS):
        vmm.stop_device("dev")
        vmm.remove_device("dev")
        for vq in vqs:
            vq.close()
        vqs = make_rings(mem)
        params, fds = vmm.start_params("dev", features, vqs)
        t0 = time.monotonic()
        c.call("device.add", {"vm": vmm.vm, "device": "dev", "socket": sock, "type": "blk"})
        c.call("device.start", params, fds=fds)
        t1 = time.monotonic()
        if i >= WARMUP:
            fresh.append(t1 - t0)
    vmm.remove_device("dev")
    vmm.destroy()
    for vq in vqs:
        vq.close()
    return restore, fresh, spawn


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, log_level="warning"))
    c = daemon.client()
    mem = t.enter(GuestMemory(16 << 20))
    rows = []

    def row(label, make, features):
        try:
            backend = make()
        except Skip as e:
            log("skipping %s: %s" % (label, e))
            return
        t.enter(backend)
        try:
            r, f, s = bench_backend(t, d, daemon, c, mem, label, backend, features)
        except (ClientError, TimeoutError, RuntimeError):
            daemon.print_log()
            backend.print_log()
            raise
        rows.append((label, r, f, s))

    row("qsd", lambda: QsdNullBackend([daemon.backend_socket("qsd.sock")], size=1 << 20,
                                      num_queues=2, log_dir=d), scenarios.BLK_FEATURES)
    row("test back-end", lambda: TestBackend([daemon.backend_socket("tb.sock")],
                                             args=["--queues", "2", "-q"], log_dir=d),
        scenarios.BLK_FEATURES)

    log("")
    log("reconnect benchmark: %d runs after %d warm-up, 2 rings of 128, vhubd --log-level "
        "warning; milliseconds" % (RUNS, WARMUP))
    log("%-15s %-34s %8s %8s %8s %6s" % ("back-end", "what", "median", "p90", "max", ">5ms"))
    for label, r, f, s in rows:
        for what, xs in (("restore: socket -> reconnected", r),
                         ("fresh: device.add + device.start", f),
                         ("exec -> socket created", s)):
            med, p90, mx = stats(xs)
            log("%-15s %-34s %8.2f %8.2f %8.2f %3d/%d" % (label, what, med * 1e3, p90 * 1e3,
                                                          mx * 1e3, sum(x > 0.005 for x in xs),
                                                          len(xs)))
    if not rows:
        raise Skip("no back-end installed")


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Restart with guests running (issue 10): what a restart costs, and what
keeping the snapshots costs normal operation.  docs/performance.md,
"Restart", has the method and the figures.  Not a pass/fail test.

    bench_restart.py time [N...]   planned restarts (SIGTERM under the service
                                   manager, vhubtest/servicemanager.py) with N
                                   running devices (default 1 100 1000):
                                   qemu-storage-daemon null-co exports, up to
                                   100 per qsd process, 100 devices per VM,
                                   each started with one ring.  Per restart:
                                   SIGTERM -> the old process's exit, SIGTERM
                                   -> the new process's READY=1 (as the
                                   service manager receives it), and the
                                   daemon's own "down" figure (its last
                                   snapshot write to the restore's end).
    bench_restart.py gap           the longest gap between two I/O completions
                                   of a guest's virtio-blk rings (qsd on an
                                   image file, 2 rings x 32 in flight) over
                                   GAP_SECONDS without restarts, then over the
                                   same time with a planned restart every
                                   GAP_EVERY seconds; interleaved, GAP_ROUNDS.
    bench_restart.py commit [IDLE] vm.memory.add + vm.memory.remove of a 2 MiB
                                   memfd, and device.add + device.remove of a
                                   qsd null-co export, on a vhubd with the fd
                                   store and snapshots against one with
                                   --no-fd-store (both under the service
                                   manager); interleaved rounds, the median of
                                   each round, then the median and the range
                                   of those.  With IDLE, that many idle
                                   control connections are open to each
                                   daemon meanwhile (connected, silent).
                                   With $BENCH_RESTART_BASELINE (another
                                   vhubd binary, e.g. an earlier commit's),
                                   a third daemon runs it with snapshots,
                                   interleaved with the other two.
    bench_restart.py               all three

The harness starts vhubd through a small Python wrapper that moves the
passed fds to 3, 4, ... and execs in place (docs/restart.md): it is inside
every SIGTERM -> READY=1 figure (~15 ms here); the "down" figure is the
daemon's own.

    meson test -C build --benchmark --suite bench -v restart
"""

import gc
import os
import pickle
import re
import signal
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest import blk, scenarios                             # noqa: E402
from vhubtest.backends import QsdBackend, QsdNullBackend        # noqa: E402
from vhubtest.client import Client, u64_json                    # noqa: E402
from vhubtest.memory import GuestMemory                         # noqa: E402
from vhubtest.testing import log, run                           # noqa: E402
from vhubtest.virtq import Virtqueue                            # noqa: E402
from vhubtest.vmm import Vmm                                    # noqa: E402
from test_reconnect_qsd import BlkRing, Workload                # noqa: E402
from test_restart import Managed                                # noqa: E402

BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)
PER_QSD = 100
PER_VM = 100
RESTARTS = {1: 10, 100: 10, 1000: 5}
GAP_SECONDS = float(os.environ.get("BENCH_RESTART_GAP_SECONDS", "3"))
GAP_EVERY = float(os.environ.get("BENCH_RESTART_GAP_EVERY", "0.25"))
GAP_ROUNDS = int(os.environ.get("BENCH_RESTART_GAP_ROUNDS", "5"))
COMMIT_ROUNDS = int(os.environ.get("BENCH_RESTART_ROUNDS", "5"))
COMMIT_ITER = int(os.environ.get("BENCH_RESTART_ITER", "40"))


def stats(xs):
    return "median %7.1f  min %7.1f  max %7.1f" % (statistics.median(xs), min(xs), max(xs))


def downtimes(path):
    with open(path, errors="replace") as f:
        return [int(x) for x in re.findall(r"state carried across the restart \(restart \d+, down (\d+) ms\)",
                                           f.read())]


def part_time(t, counts):
    rows = []
    for n in counts:
        d = t.tmpdir()
        m = Managed(t, d, extra=["--log-level", "notice", "--max-devices-per-vm", str(PER_VM)],
                    fd_store_max=16384)
        socks = [m.socket("e%d.sock" % i) for i in range(n)]
        for k in range(0, n, PER_QSD):
            t.enter(QsdNullBackend(socks[k:k + PER_QSD], log_dir=d))
        c = t.enter(Client(m.control, timeout=60))
        t0 = time.monotonic()
        for v in range((n + PER_VM - 1) // PER_VM):
            mem = t.enter(GuestMemory(8 << 20))
            vmm = Vmm(c, "vm%d" % v)
            vmm.create()
            vmm.add_memory(mem)
            for i in range(v * PER_VM, min(n, (v + 1) * PER_VM)):
                dev = vmm.add_device("d%d" % i, socks[i], type="blk")
                vq = Virtqueue(mem, size=16)
                t.defer(vq.close)
                vmm.start_device("d%d" % i, BLK1 & dev["features"], [vq])
        log("%d devices running (set up in %.1f s); daemon holds %d fds, the store %d entries"
            % (n, time.monotonic() - t0, len(os.listdir("/proc/%d/fd" % m.sm.pid)), m.sm.count()))
        c.events()
        stop, ready, spawn = [], [], []
        for k in range(1, RESTARTS.get(n, 5) + 1):
            time.sleep(0.2)
            t0 = time.monotonic()
            m.sm.send_signal(signal.SIGTERM)
            m.sm.wait_exit(60)
            t1 = time.monotonic()
            m.sm.start(m.argv)
            spawn.append((time.monotonic() - t1) * 1e3)
            tr = m.sm.wait_ready(60)
            stop.append((t1 - t0) * 1e3)
            ready.append((tr - t0) * 1e3)
            c.wait_event(lambda e: e.get("event") == "daemon.restarted", 60)
        down = downtimes(m.sm.log_path)
        if os.environ.get("BENCH_RESTART_LOG"):
            import shutil
            shutil.copy(m.sm.log_path, os.environ["BENCH_RESTART_LOG"])
        check_n = c.call("daemon.info")
        log("%5d devices: SIGTERM -> exit      %s ms" % (n, stats(stop)))
        log("%5d devices: SIGTERM -> READY=1   %s ms" % (n, stats(ready)))
        log("%5d devices: daemon's own 'down'  %s ms   (restarts %d)"
            % (n, stats(down), check_n["restarts"]))
        log("%5d devices: the harness's start() %s ms" % (n, stats(spawn)))
        rows.append((n, stop, ready, down, spawn))
        c.close()
        m.sm.stop_unit(60)
    log("")
    log("| devices | restarts | SIGTERM -> old exit | SIGTERM -> READY=1 | daemon's 'down' | "
        "harness start() |")
    log("|---:|---:|---:|---:|---:|---:|")
    for n, stop, ready, down, spawn in rows:
        log("| %d | %d | %.1f (%.1f-%.1f) | %.1f (%.1f-%.1f) | %.0f (%d-%d) | %.1f (%.1f-%.1f) |"
            % (n, len(ready), statistics.median(stop), min(stop), max(stop),
               statistics.median(ready), min(ready), max(ready),
               statistics.median(down), min(down), max(down),
               statistics.median(spawn), min(spawn), max(spawn)))


def drive(wl, t0, span, out):
    """The guest's driver, in a process of its own (as a guest's vCPU is not
    the service manager): keep the rings busy from t0 for span seconds,
    note when completions came, then drain, check every request completed
    exactly once, and send (times, completed, requests) to out."""
    gc.disable()        # a collection of the workload's objects would stall the driver
    code = 1
    try:
        while time.monotonic() < t0:
            wl.step(wait=0.0005)
        times = []
        end = t0 + span
        while time.monotonic() < end:
            before = wl.completed
            wl.step(wait=0.0005)
            if wl.completed != before:
                times.append(time.monotonic())
        wl.drain(10)
        wl.check_completed_once()
        data = pickle.dumps((times, wl.completed, len(wl.all_reqs)))
        with os.fdopen(out, "wb") as f:
            f.write(data)
        code = 0
    finally:
        os._exit(code)


def part_gap(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--log-level", "notice"])
    disk_bytes = 256 << 20
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, disk_bytes)
    qsd = t.enter(QsdBackend(img, m.socket("blk0.sock"), num_queues=2, log_dir=d))
    c, mem, vmm = m.vmm(t, 16 << 20)
    dev = vmm.add_device("blk0", qsd.socket, type="blk")
    rings = [BlkRing(mem, i) for i in range(2)]
    for r in rings:
        t.defer(r.close)
    vmm.start_device("blk0", scenarios.BLK_FEATURES & dev["features"], rings)
    wl = Workload(rings, disk_bytes, 32, 1, read_ratio=0.5)
    # windows: without restarts, with, without, ... back to back
    pause = 0.2
    windows = []
    t0 = time.monotonic() + 0.5
    for i in range(2 * GAP_ROUNDS):
        start = t0 + i * (GAP_SECONDS + pause)
        windows.append((i % 2 == 1, start, start + GAP_SECONDS))
    span = windows[-1][2] - t0
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        drive(wl, t0, span, wfd)
    os.close(wfd)
    restarts = []       # (SIGTERM sent, READY=1 received)
    for restarting, start, end in windows:
        while time.monotonic() < start:
            time.sleep(0.001)
        if not restarting:
            continue
        nxt = start + GAP_EVERY / 2
        while True:
            while time.monotonic() < nxt:
                time.sleep(0.001)
            if time.monotonic() > end - GAP_EVERY / 2:
                break
            r0 = time.monotonic()
            m.restart()
            restarts.append((r0, m.sm.wait_ready()))
            nxt = time.monotonic() + GAP_EVERY
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError("the driver process failed (status %d): see above" % status)
    times, completed, nreqs = pickle.loads(data)
    rows = []
    for restarting, start, end in windows:
        ts = [x for x in times if start <= x < end]
        gaps = [(b - a, a, b) for a, b in zip(ts, ts[1:])]
        mine = [(r0, r1) for r0, r1 in restarts if start <= r0 < end]
        during = [g for g, a, b in gaps if any(a < r1 and b > r0 for r0, r1 in mine)]
        gs = sorted(g for g, _, _ in gaps)
        row = (restarting, gs[-1] * 1e3, max(during, default=0) * 1e3,
               gs[int(len(gs) * 0.999)] * 1e3, len(ts) / GAP_SECONDS, len(mine))
        rows.append(row)
        log("%-13s longest gap %6.1f ms (across a restart %6.1f ms), p99.9 %5.2f ms, "
            "%6.0f reaps/s, %d restarts" % (("with restarts" if restarting else "without",) + row[1:]))
    log("")
    log("| run | windows | restarts | longest gap, ms: median (range) | longest gap across a restart, "
        "ms: median (range) | p99.9 gap, ms | reaps/s |")
    log("|---|---:|---:|---:|---:|---:|---:|")
    for restarting in (False, True):
        sel = [r for r in rows if r[0] == restarting]
        longest = [r[1] for r in sel]
        during = [r[2] for r in sel]
        log("| %s | %d | %d | %.1f (%.1f-%.1f) | %s | %.2f | %.0f |"
            % ("with restarts" if restarting else "without", len(sel), sum(r[5] for r in sel),
               statistics.median(longest), min(longest), max(longest),
               "%.1f (%.1f-%.1f)" % (statistics.median(during), min(during), max(during))
               if restarting else "-",
               statistics.median(r[3] for r in sel), statistics.median(r[4] for r in sel)))
    log("(all %d requests completed exactly once, data checked, %d completions)" % (nreqs, completed))
    c.close()
    m.sm.stop_unit()


def part_commit(t, idle=0):
    daemons = {}
    kinds = [("snapshots", [], None), ("--no-fd-store", ["--no-fd-store"], None)]
    baseline = os.environ.get("BENCH_RESTART_BASELINE")
    if baseline:
        kinds.append(("baseline", [], baseline))
    for name, extra, binary in kinds:
        d = t.tmpdir()
        mine = os.environ.get("VHUBD")
        if binary:
            os.environ["VHUBD"] = binary
        try:
            m = Managed(t, d, extra=["--log-level", "warning", "--max-connections", str(idle + 64)] + extra)
        finally:
            if binary:
                os.environ["VHUBD"] = mine
        qsd = t.enter(QsdNullBackend([m.socket("e0.sock"), m.socket("e1.sock")], log_dir=d))
        daemons[name] = (m, qsd)
    # the calls are made from a process of their own: the service manager
    # played here is a thread of this one, and the pushes it receives
    # (FDSTORE=1 and FDSTOREREMOVE=1 at every change of a group) must not
    # take the GIL from the client being timed -- under systemd that work
    # is PID 1's
    held = []
    for m, qsd in daemons.values():
        for _ in range(idle):
            x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            x.connect(m.control)
            held.append(x)
    if idle:
        # the manager played here takes each push in its own time (its
        # same_fd() check is O(stored) and in Python): the rounds start once
        # every daemon's store has settled, not while it is still filling
        for m, qsd in daemons.values():
            last, since = -1, time.monotonic()
            while time.monotonic() - since < 1.0:
                n = len(m.sm.names())
                if n != last:
                    last, since = n, time.monotonic()
                time.sleep(0.1)
            log("%s: %d names stored with %d idle connections" % (m.argv[0], last, idle))
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        code = 1
        try:
            res = commit_rounds(t, daemons)
            with os.fdopen(wfd, "wb") as f:
                f.write(pickle.dumps(res))
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        raise RuntimeError("the client process failed (status %d)" % status)
    res = pickle.loads(data)
    log("")
    names = list(daemons)
    log("| call | %s |" % " | ".join("%s: median (range) ms" % n for n in names))
    log("|---|%s" % ("---:|" * len(names)))
    for w in ("memory.add", "memory.remove", "device.add", "device.remove"):
        cells = []
        for name in names:
            v = res[(name, w)]
            cells.append("%.3f (%.3f-%.3f)" % (statistics.median(v), min(v), max(v)))
        log("| %s | %s |" % (w, " | ".join(cells)))
    log("(%d rounds of %d calls each, interleaved; each figure a round's median; %d idle control "
        "connections open to each daemon; load average %s)"
        % (COMMIT_ROUNDS, COMMIT_ITER, idle, " ".join("%.2f" % x for x in os.getloadavg())))
    for x in held:
        x.close()
    for m, qsd in daemons.values():
        m.sm.stop_unit()


def commit_rounds(t, daemons):
    """In the client process: a VM with a running qsd device on each daemon,
    then interleaved rounds; {(daemon, call): [round medians]}."""
    setups = {}
    for name, (m, qsd) in daemons.items():
        c = Client(m.control, timeout=10)
        mem = GuestMemory(8 << 20)
        vmm = Vmm(c, "vm0")
        vmm.create()
        vmm.add_memory(mem)
        dev = vmm.add_device("blk0", qsd.sockets[0], type="blk")
        vq = Virtqueue(mem, size=16)
        vmm.start_device("blk0", BLK1 & dev["features"], [vq])
        hot = GuestMemory(2 << 20, base=1 << 32).regions[0]
        setups[name] = (c, qsd, hot)

    def mem_round(name):
        c, qsd, r = setups[name]
        add = {"vm": "vm0", "gpa": u64_json(r.gpa), "size": r.size, "fd": 0, "uaddr": u64_json(r.uaddr)}
        rem = {"vm": "vm0", "gpa": u64_json(r.gpa)}
        adds, rems = [], []
        for _ in range(COMMIT_ITER):
            t0 = time.perf_counter()
            c.call("vm.memory.add", add, fds=[r.fd])
            t1 = time.perf_counter()
            c.call("vm.memory.remove", rem)
            t2 = time.perf_counter()
            adds.append((t1 - t0) * 1e3)
            rems.append((t2 - t1) * 1e3)
        return statistics.median(adds), statistics.median(rems)

    def dev_round(name):
        c, qsd, r = setups[name]
        adds, rems = [], []
        for _ in range(COMMIT_ITER):
            t0 = time.perf_counter()
            c.call("device.add", {"vm": "vm0", "device": "x", "socket": qsd.sockets[1], "type": "blk"})
            t1 = time.perf_counter()
            c.call("device.remove", {"vm": "vm0", "device": "x"})
            t2 = time.perf_counter()
            adds.append((t1 - t0) * 1e3)
            rems.append((t2 - t1) * 1e3)
        return statistics.median(adds), statistics.median(rems)

    res = {(n, w): [] for n in setups for w in ("memory.add", "memory.remove", "device.add",
                                                  "device.remove")}
    for name in setups:          # warm-up, not counted
        mem_round(name)
        dev_round(name)
    for rnd in range(COMMIT_ROUNDS):
        order = list(setups) if rnd % 2 == 0 else list(reversed(list(setups)))
        for name in order:
            a, b = mem_round(name)
            res[(name, "memory.add")].append(a)
            res[(name, "memory.remove")].append(b)
            a, b = dev_round(name)
            res[(name, "device.add")].append(a)
            res[(name, "device.remove")].append(b)
    return res


def main(t):
    args = sys.argv[1:]
    mode = args[0] if args else "all"
    if mode in ("time", "all"):
        counts = [int(x) for x in args[1:]] if mode == "time" and len(args) > 1 else [1, 100, 1000]
        part_time(t, counts)
    if mode in ("gap", "all"):
        part_gap(t)
    if mode in ("commit", "all"):
        part_commit(t, int(args[1]) if mode == "commit" and len(args) > 1 else 0)
    if mode not in ("time", "gap", "commit", "all"):
        raise SystemExit("usage: bench_restart.py [time [N...]|gap|commit [IDLE]]")


if __name__ == "__main__":
    run(main)

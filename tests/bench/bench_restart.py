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
    bench_restart.py commit        vm.memory.add + vm.memory.remove of a 2 MiB
                                   memfd, and device.add + device.remove of a
                                   qsd null-co export, on a vhubd with the fd
                                   store and snapshots against one with
                                   --no-fd-store (both under the service
                                   manager); interleaved rounds, the median of
                                   each round, then the median and the range
                                   of those.
    bench_restart.py               all three

The harness starts vhubd through a small Python wrapper that moves the
passed fds to 3, 4, ... and execs in place (docs/restart.md): it is inside
every SIGTERM -> READY=1 figure (~15 ms here); the "down" figure is the
daemon's own.

    meson test -C build --benchmark --suite bench -v restart
"""

import os
import re
import signal
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
GAP_ROUNDS = int(os.environ.get("BENCH_RESTART_GAP_ROUNDS", "3"))
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
        stop, ready = [], []
        for k in range(1, RESTARTS.get(n, 5) + 1):
            time.sleep(0.2)
            t0 = time.monotonic()
            m.sm.send_signal(signal.SIGTERM)
            m.sm.wait_exit(60)
            t1 = time.monotonic()
            m.sm.start(m.argv)
            tr = m.sm.wait_ready(60)
            stop.append((t1 - t0) * 1e3)
            ready.append((tr - t0) * 1e3)
            c.wait_event(lambda e: e.get("event") == "daemon.restarted", 60)
        down = downtimes(m.sm.log_path)
        check_n = c.call("daemon.info")
        log("%5d devices: SIGTERM -> exit      %s ms" % (n, stats(stop)))
        log("%5d devices: SIGTERM -> READY=1   %s ms" % (n, stats(ready)))
        log("%5d devices: daemon's own 'down'  %s ms   (restarts %d)"
            % (n, stats(down), check_n["restarts"]))
        rows.append((n, stop, ready, down))
        c.close()
        m.sm.stop_unit(60)
    log("")
    log("| devices | restarts | SIGTERM -> old exit | SIGTERM -> READY=1 | daemon's 'down' |")
    log("|---:|---:|---:|---:|---:|")
    for n, stop, ready, down in rows:
        log("| %d | %d | %.1f (%.1f-%.1f) | %.1f (%.1f-%.1f) | %.0f (%d-%d) |"
            % (n, len(ready), statistics.median(stop), min(stop), max(stop),
               statistics.median(ready), min(ready), max(ready),
               statistics.median(down), min(down), max(down)))


def part_gap(t):
    d = t.tmpdir()
    m = Managed(t, d, extra=["--log-level", "notice"])
    disk_bytes = 256 << 20
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(disk_bytes)
    qsd = t.enter(QsdBackend(img, m.socket("blk0.sock"), num_queues=2, log_dir=d))
    c = t.enter(Client(m.control, timeout=10))
    mem = t.enter(GuestMemory(16 << 20))
    vmm = Vmm(c, "vm0")
    vmm.create()
    vmm.add_memory(mem)
    dev = vmm.add_device("blk0", qsd.socket, type="blk")
    rings = [BlkRing(mem, i) for i in range(2)]
    for r in rings:
        t.defer(r.close)
    vmm.start_device("blk0", scenarios.BLK_FEATURES & dev["features"], rings)
    wl = Workload(rings, disk_bytes, 32, 1, read_ratio=0.5)
    # reads only of what was written: a workload of 2 x 32 in flight writes
    # each 4 KiB extent once; 256 MiB lasts ~65,000 writes
    wl.run_for(0.5)
    state = {"last": None, "gap": 0.0, "n": 0}

    def step():
        before = wl.completed
        wl.step(wait=0.0005)
        now = time.monotonic()
        if wl.completed != before:
            if state["last"] is not None:
                state["gap"] = max(state["gap"], now - state["last"])
            state["last"] = now
            state["n"] += wl.completed - before

    def window(restarting):
        state.update(last=None, gap=0.0, n=0)
        end = time.monotonic() + GAP_SECONDS
        nxt = time.monotonic() + GAP_EVERY
        k = 0
        while time.monotonic() < end:
            step()
            if restarting and time.monotonic() >= nxt:
                m.restart(while_down=step)
                k += 1
                nxt = time.monotonic() + GAP_EVERY
        return state["gap"] * 1e3, state["n"] / GAP_SECONDS, k

    rows = []
    for rnd in range(GAP_ROUNDS):
        for restarting in (False, True):
            gap, rate, k = window(restarting)
            rows.append((restarting, gap, rate, k))
            log("round %d %-15s longest gap %6.1f ms, %6.0f completions/s, %d restarts"
                % (rnd + 1, "with restarts" if restarting else "without", gap, rate, k))
    wl.drain(10)
    wl.check_completed_once()
    log("")
    log("| run | windows | restarts | longest gap, ms (median, range) | completions/s (median) |")
    log("|---|---:|---:|---:|---:|")
    for restarting in (False, True):
        sel = [r for r in rows if r[0] == restarting]
        gaps = [r[1] for r in sel]
        log("| %s | %d | %d | %.1f (%.1f-%.1f) | %.0f |"
            % ("with restarts" if restarting else "without", len(sel), sum(r[3] for r in sel),
               statistics.median(gaps), min(gaps), max(gaps),
               statistics.median(r[2] for r in sel)))
    log("(all %d requests completed exactly once, data checked)" % len(wl.all_reqs))
    c.close()
    m.sm.stop_unit()


def part_commit(t):
    setups = {}
    for name, extra in (("snapshots", []), ("--no-fd-store", ["--no-fd-store"])):
        d = t.tmpdir()
        m = Managed(t, d, extra=["--log-level", "warning"] + extra)
        qsd = t.enter(QsdNullBackend([m.socket("e0.sock"), m.socket("e1.sock")], log_dir=d))
        c = t.enter(Client(m.control, timeout=10))
        mem = t.enter(GuestMemory(8 << 20))
        vmm = Vmm(c, "vm0")
        vmm.create()
        vmm.add_memory(mem)
        dev = vmm.add_device("blk0", qsd.sockets[0], type="blk")
        vq = Virtqueue(mem, size=16)
        t.defer(vq.close)
        vmm.start_device("blk0", BLK1 & dev["features"], [vq])
        hot = t.enter(GuestMemory(2 << 20, base=1 << 32)).regions[0]
        setups[name] = (m, c, vmm, qsd, hot)
    check_store = [n for n in setups["snapshots"][0].sm.names() if n.startswith("s")]
    log("with snapshots the store holds %s; with --no-fd-store: %d entries"
        % (sorted(check_store), setups["--no-fd-store"][0].sm.count()))

    def mem_round(name):
        m, c, vmm, qsd, r = setups[name]
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
        m, c, vmm, qsd, r = setups[name]
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
        log("round %d: %s" % (rnd + 1, ", ".join("%s %s %.3f" % (n, w, v[-1])
                                                 for (n, w), v in res.items())))
    log("")
    log("| call | snapshots: median (range) ms | --no-fd-store: median (range) ms |")
    log("|---|---:|---:|")
    for w in ("memory.add", "memory.remove", "device.add", "device.remove"):
        cells = []
        for name in ("snapshots", "--no-fd-store"):
            v = res[(name, w)]
            cells.append("%.3f (%.3f-%.3f)" % (statistics.median(v), min(v), max(v)))
        log("| %s | %s | %s |" % (w, cells[0], cells[1]))
    log("(%d rounds of %d calls each, interleaved, one round's median per cell entry)"
        % (COMMIT_ROUNDS, COMMIT_ITER))
    for name, (m, c, vmm, qsd, r) in setups.items():
        c.close()
        m.sm.stop_unit()


def main(t):
    args = sys.argv[1:]
    mode = args[0] if args else "all"
    if mode in ("time", "all"):
        counts = [int(x) for x in args[1:]] if mode == "time" and len(args) > 1 else [1, 100, 1000]
        part_time(t, counts)
    if mode in ("gap", "all"):
        part_gap(t)
    if mode in ("commit", "all"):
        part_commit(t)
    if mode not in ("time", "gap", "commit", "all"):
        raise SystemExit("usage: bench_restart.py [time [N...]|gap|commit]")


if __name__ == "__main__":
    run(main)

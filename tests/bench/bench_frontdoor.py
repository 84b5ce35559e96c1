#!/usr/bin/env python3
"""A VMM's device setup through vhubd's front door against straight to the back-end.

Not a pass/fail test.  The VMM is the harness's synchronous front-end
(vhubtest.direct), sending its model of QEMU 7.2's start of a 2-queue
vhost-user-blk device, the same as bench_guest.py's "vmm setup" --
SET_FEATURES, ADD_MEM_REG, per ring SET_VRING_NUM / BASE / ADDR / CALL /
KICK / ENABLE (14 requests, every one with REPLY_ACK awaited before the
next) -- and its stop (two GET_VRING_BASE).  The handshake before it is untimed.  Paths, run
interleaved (round k starts with path k mod the number of paths):

  direct    the VMM on the back-end's own socket
  vhubd     the VMM on a front-door device's vmm_socket, vhubd relaying to
            the back-end (--log-level info: what a production daemon logs)
  vhubd-B   the same through another vhubd build (VHUBD_COMPARE, optional:
            a before/after comparison in the same rounds)

Both paths use the same back-end process: one qemu-storage-daemon with one
null-co export per path (one front-end per export at a time).  After each
front-door run the VMM has left and vhubd renews its back-end connection;
the next round waits for that, untimed.

Per path it prints the setup and the stop (median, p10 - p90), the median
of every request's round trip at the VMM, and the CPU per setup of vhubd
and of qemu-storage-daemon (/proc/PID/schedstat) with their context
switches: the wall time minus the CPU is waiting (wake-ups).

    VHUBD=build/daemon/vhubd PYTHONPATH=tests/integration \\
        python3 tests/bench/bench_frontdoor.py [ROUNDS [WARMUP]]    # default 300, 20
    meson test -C build --benchmark --suite bench -v frontdoor
"""

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest import direct as vdirect                         # noqa: E402
from vhubtest.backends import QsdNullBackend                   # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.direct import DirectFrontend                     # noqa: E402
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.testing import log, run                          # noqa: E402
from vhubtest.virtq import Virtqueue                           # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 300
WARMUP = int(sys.argv[2]) if len(sys.argv) > 2 else 20
DRIVER_FEATURES = 1 << 32   # VERSION_1, as bench_guest.py's VMM acks


class TimedFrontend(DirectFrontend):
    """DirectFrontend that times every request up to its reply or ack."""

    def __init__(self, sock, timeout=5.0):
        super().__init__(sock, timeout)
        self.times = None           # [(name, seconds)] while timing

    def _timed(self, request, fn):
        t0 = time.perf_counter()
        r = fn()
        if self.times is not None:
            self.times.append((vdirect.REQUEST_NAMES.get(request, str(request)), time.perf_counter() - t0))
        return r

    def request(self, request, payload=b"", fds=()):
        return self._timed(request, lambda: super(TimedFrontend, self).request(request, payload, fds))

    def command(self, request, payload=b"", fds=(), ack=True):
        return self._timed(request, lambda: super(TimedFrontend, self).command(request, payload, fds, ack))


def schedstat(pid):
    """(CPU ns, context switches) of every thread of pid."""
    cpu = sw = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                cpu += int(f.read().split()[0])
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        sw += int(line.split()[1])
        except FileNotFoundError:
            pass    # a thread that ended
    return cpu, sw


class Path:
    def __init__(self, name, sock, qsd_pid, daemon=None, client=None):
        self.name = name
        self.sock = sock
        self.qsd_pid = qsd_pid
        self.daemon = daemon
        self.client = client
        self.reconnects = 0
        self.fig = {"setup": [], "stop": [], "vhubd cpu": [], "qsd cpu": [], "vhubd sw": [], "qsd sw": []}
        self.req = {}

    def once(self, mem, rings, keep):
        for vq in rings:
            vq.reset(0)
        pids = [self.qsd_pid] + ([self.daemon.pid] if self.daemon else [])
        with TimedFrontend.connect(self.sock) as fe:
            fe.handshake()
            fe.times = []
            s0 = [schedstat(p) for p in pids]
            t0 = time.perf_counter()
            fe.setup(mem, DRIVER_FEATURES, rings)
            t1 = time.perf_counter()
            s1 = [schedstat(p) for p in pids]
            fe.stop_rings()
            t2 = time.perf_counter()
        if not keep:
            return
        self.fig["setup"].append((t1 - t0) * 1e6)
        self.fig["stop"].append((t2 - t1) * 1e6)
        self.fig["qsd cpu"].append((s1[0][0] - s0[0][0]) / 1e3)
        self.fig["qsd sw"].append(s1[0][1] - s0[0][1])
        if self.daemon:
            self.fig["vhubd cpu"].append((s1[1][0] - s0[1][0]) / 1e3)
            self.fig["vhubd sw"].append(s1[1][1] - s0[1][1])
        for name, dt in fe.times:
            self.req.setdefault(name, []).append(dt * 1e6)

    def settle(self):
        """The VMM left: wait (untimed) until vhubd has renewed its back-end
        connection and waits for the next VMM."""
        if not self.client:
            return
        self.reconnects += 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            dev = self.client.call("device.list", {"vm": "vm0"})["devices"][0]
            if dev["state"] == "stopped" and dev["vmm"] == "waiting" and dev["reconnects"] == self.reconnects:
                return
            time.sleep(0.002)
        raise RuntimeError("%s: the device did not return to waiting for a VMM: %s" % (self.name, dev))


def front_door(stack, d, name, sock):
    os.makedirs(os.path.join(d, name))
    daemon = stack.enter_context(Daemon(os.path.join(d, name), extra_args=["--vmm-dir",
                                                                           os.path.join(d, name, "vmm")],
                                        backend_dirs=[d], log_level="info").start())
    c = daemon.client()
    stack.callback(c.close)
    c.call("vm.create", {"vm": "vm0"})
    door = c.call("device.add", {"vm": "vm0", "device": "blk0", "socket": sock, "type": "blk",
                                 "vmm_socket": True})["vmm_socket"]
    return daemon, c, door


def pct(v, p):
    s = sorted(v)
    return s[int(p * (len(s) - 1) + 0.5)]


def main(t):
    d = t.tmpdir()
    compare = os.environ.get("VHUBD_COMPARE")
    mem = t.enter(GuestMemory(4 << 20))
    rings = []
    for i in range(2):
        rings.append(Virtqueue(mem, size=128, index=i))
        t.defer(rings[-1].close)
    with contextlib.ExitStack() as stack:
        socks = [os.path.join(d, "e%d.sock" % i) for i in range(3 if compare else 2)]
        qsd = stack.enter_context(QsdNullBackend(socks, num_queues=2, log_dir=d))
        paths = [Path("direct", socks[0], qsd.pid)]
        daemon, c, door = front_door(stack, d, "vhubd", socks[1])
        paths.append(Path("vhubd", door, qsd.pid, daemon, c))
        if compare:
            saved = os.environ["VHUBD"]
            os.environ["VHUBD"] = compare
            try:
                daemon2, c2, door2 = front_door(stack, d, "vhubd-B", socks[2])
            finally:
                os.environ["VHUBD"] = saved
            paths.append(Path("vhubd-B", door2, qsd.pid, daemon2, c2))
        for r in range(WARMUP + ROUNDS):
            for k in range(len(paths)):
                p = paths[(r + k) % len(paths)]
                p.once(mem, rings, keep=r >= WARMUP)
                p.settle()

    log("front door benchmark: %d rounds after %d warm-up, interleaved; one qemu-storage-daemon "
        "(null-co, 2 queues, one export per path); vhubd --log-level info%s"
        % (ROUNDS, WARMUP, "; vhubd-B = %s" % compare if compare else ""))
    log("load average: %s" % " ".join(open("/proc/loadavg").read().split()[:3]))
    log("")
    log("| path | setup median us | p10 - p90 | stop median us | vhubd CPU us | qsd CPU us "
        "| context switches vhubd / qsd |")
    log("|---|---:|---:|---:|---:|---:|---:|")
    for p in paths:
        f = p.fig
        log("| %s | %.0f | %.0f - %.0f | %.0f | %s | %.0f | %s / %.1f |"
            % (p.name, statistics.median(f["setup"]), pct(f["setup"], 0.1), pct(f["setup"], 0.9),
               statistics.median(f["stop"]),
               "%.0f" % statistics.mean(f["vhubd cpu"]) if f["vhubd cpu"] else "-",
               statistics.mean(f["qsd cpu"]),
               "%.1f" % statistics.mean(f["vhubd sw"]) if f["vhubd sw"] else "-",
               statistics.mean(f["qsd sw"])))
    log("")
    for p in paths[1:]:
        ratio = [a / b for a, b in zip(p.fig["setup"], paths[0].fig["setup"])]
        diff = [a - b for a, b in zip(p.fig["setup"], paths[0].fig["setup"])]
        log("%s - direct per round: setup +%.0f us (p10 - p90 %+.0f - %+.0f), %.2fx"
            % (p.name, statistics.median(diff), pct(diff, 0.1), pct(diff, 0.9), statistics.median(ratio)))
    log("")
    log("| request (median us at the VMM) | %s |" % " | ".join(p.name for p in paths))
    log("|---|%s" % ("---:|" * len(paths)))
    for name in paths[0].req:
        log("| %s | %s |" % (name, " | ".join("%.0f" % statistics.median(p.req.get(name, [0]))
                                           for p in paths)))


if __name__ == "__main__":
    run(main)

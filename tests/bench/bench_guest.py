#!/usr/bin/env python3
"""A real guest's disk: boot, device setup and O_DIRECT throughput.

Not a pass/fail test.  Per path to the back-end, over RUNS interleaved runs
(run 1 of every path, then run 2 of every path, ... so that a change in the
machine's load hits every path alike), it prints the median and the range
(min-max) of

  boot-to-ready   QEMU spawned -> the guest's GUEST-READY (firmware, kernel,
                  /init, every virtio module loaded)
  first-I/O       QEMU spawned -> the guest's GUEST-FIRST-IO: the first
                  O_DIRECT 4 KiB read of /dev/vda, done right after
                  virtio_blk's insmod (its probe: the vhost-user handshake
                  QEMU does at DRIVER_OK, the partition scan, then the read)
  blk probe       the guest kernel's own timing (initcall_debug, in us) of
                  virtio_blk's probe of the device: features, rings, the
                  guest's DRIVER_OK write (inside which QEMU starts the
                  vhost-user device: memory table, vring setup, kicks) and
                  the partition scan.  The device's setup, without the
                  firmware's and the kernel's boot around it
  write, read     sequential O_DIRECT MiB/s: MIB MiB at BS bytes a request,
                  one dd each (timed on the host between the guest's
                  console markers), 1 MiB and 4 KiB requests

Each run: a fresh qemu-storage-daemon (2 queues, a sparse raw image file),
QEMU (TCG, -smp 2, 512 MiB memfd RAM) with vhost-user-blk-pci (2 queues),
the guest from tests/guest (vhubtest.guest).  TCG makes absolute figures
slow and noisy; compare paths within one run of this script.

Paths: "direct" (QEMU connected to qemu-storage-daemon's socket) and
"vhubd" (QEMU connected to vhubd's front-door socket, vhubd to the same
kind of qemu-storage-daemon); nothing else changes (same guest, same steps,
same back-end).

Then, because the guest's own timings under TCG spread by tens of
milliseconds, the device's setup through the front door is also measured
where microseconds show: the harness's VMM (vhubtest.direct, a synchronous
front-end that waits for every ack) does what QEMU 7.2 does when a
vhost-user-blk device starts -- SET_FEATURES, ADD_MEM_REG, per ring
NUM/BASE/ADDR/CALL/KICK/ENABLE for 2 rings -- and stops it (GET_VRING_BASE
x2), SETUP_RUNS times per path, interleaved:

  vmm setup (us)  the start sequence, wall time at the VMM
  vmm stop (us)   the two GET_VRING_BASE

    PYTHONPATH=tests/integration python3 tests/bench/bench_guest.py [RUNS [SETUP_RUNS]]
    meson test -C build --benchmark --suite bench -v guest
"""

import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest import guest_image                              # noqa: E402
from vhubtest.backends import QsdBackend                      # noqa: E402
from vhubtest.daemon import Daemon                            # noqa: E402
from vhubtest.direct import DirectFrontend                    # noqa: E402
from vhubtest.guest import BlkDevice, Guest                   # noqa: E402
from vhubtest.memory import GuestMemory                       # noqa: E402
from vhubtest.testing import log, run                         # noqa: E402
from vhubtest.virtq import Virtqueue                          # noqa: E402

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
SETUP_RUNS = int(sys.argv[2]) if len(sys.argv) > 2 else 200
IMAGE_SIZE = 256 << 20
MIB = 128
# (label, request size in bytes, MiB moved)
THROUGHPUT = [("1 MiB", 1 << 20, MIB), ("4 KiB", 4096, 16)]


def path_direct(stack, d, qsd):
    """QEMU straight to the back-end's socket."""
    return qsd.socket


def path_vhubd(stack, d, qsd):
    """QEMU to vhubd's front door, vhubd to the back-end (info logging: what a
    production daemon logs)."""
    daemon = stack.enter_context(Daemon(d, extra_args=["--vmm-dir", os.path.join(d, "vmm")],
                                        backend_dirs=[d], log_level="info").start())
    c = daemon.client()
    c.call("vm.create", {"vm": "vm0"})
    return c.call("device.add", {"vm": "vm0", "device": "blk0", "socket": qsd.socket, "type": "blk",
                                 "vmm_socket": True})["vmm_socket"]


PATHS = [("direct", path_direct), ("vhubd", path_vhubd)]


def one_run(t, image, path_fn, figures):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with contextlib.ExitStack() as stack:
        qsd = stack.enter_context(QsdBackend(img, os.path.join(d, "blk.sock"), num_queues=2, log_dir=d))
        g = stack.enter_context(Guest(d, [BlkDevice(path_fn(stack, d, qsd), num_queues=2)], image))
        g.wait_ready()
        figures["boot-to-ready (s)"].append(g.t_ready - g.t_spawn)
        figures["first-I/O (s)"].append(g.first_io_time())
        figures["blk probe (ms)"].append(int(g.first_io()["probe_us"]) / 1000)
        first = 0
        for label, bs, mib in THROUGHPUT:
            g.begin("blk-throughput", "/dev/vda", first, mib, bs)
            start = g.wait_progress("blk-throughput", lambda p: "write-start" in p)
            wrote = g.wait_progress("blk-throughput", lambda p: "write-done" in p, timeout=300)
            read = g.wait_progress("blk-throughput", lambda p: "read-done" in p, timeout=300)
            g.result("blk-throughput", timeout=300)
            figures["write %s (MiB/s)" % label].append(mib / (wrote.t - start.t))
            figures["read %s (MiB/s)" % label].append(mib / (read.t - wrote.t))
            first += mib * 256
        g.poweroff()


# ---- the device's setup, at the VMM ---------------------------------------

def vmm_setup_once(path, mem, rings, figures):
    """What QEMU 7.2 sends when a vhost-user-blk device with 2 queues
    starts and stops (its handshake untimed), every ack awaited."""
    for vq in rings:
        vq.reset(0)
    with DirectFrontend.connect(path) as fe:
        fe.handshake()
        t0 = time.perf_counter()
        fe.setup(mem, 1 << 32, rings)
        t1 = time.perf_counter()
        fe.stop_rings()
        t2 = time.perf_counter()
    figures["vmm setup (us)"].append((t1 - t0) * 1e6)
    figures["vmm stop (us)"].append((t2 - t1) * 1e6)


def setup_latency(t, results):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    mem = GuestMemory(4 << 20)
    rings = [Virtqueue(mem, size=128, index=i) for i in range(2)]
    with contextlib.ExitStack() as stack:
        stack.callback(mem.close)
        for vq in rings:
            stack.callback(vq.close)
        qsd = stack.enter_context(QsdBackend(img, os.path.join(d, "blk.sock"), num_queues=2, log_dir=d))
        qsd2 = stack.enter_context(QsdBackend(img, os.path.join(d, "blk2.sock"), num_queues=2, log_dir=d))
        daemon = stack.enter_context(Daemon(d, extra_args=["--vmm-dir", os.path.join(d, "vmm")],
                                            backend_dirs=[d], log_level="info").start())
        c = daemon.client()
        c.call("vm.create", {"vm": "vm0"})
        door = c.call("device.add", {"vm": "vm0", "device": "blk0", "socket": qsd2.socket, "type": "blk",
                                     "vmm_socket": True})["vmm_socket"]
        for name in ("direct", "vhubd"):
            results[name].setdefault("vmm setup (us)", [])
            results[name].setdefault("vmm stop (us)", [])
        for i in range(SETUP_RUNS):
            vmm_setup_once(qsd.socket, mem, rings, results["direct"])
            vmm_setup_once(door, mem, rings, results["vhubd"])
            # the VMM left: vhubd renews its back-end connection for the next (untimed)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                dev = c.call("device.list", {"vm": "vm0"})["devices"][0]
                if dev["state"] == "stopped" and dev["vmm"] == "waiting" and dev["reconnects"] == i + 1:
                    break
                time.sleep(0.005)


def fmt(v):
    return "%.0f" % v if v >= 100 else "%.3g" % v


def main(t):
    image = guest_image.prepare()
    results = {name: {} for name, _ in PATHS}
    for i in range(RUNS):
        for name, fn in PATHS:
            figures = results[name]
            for key in ("boot-to-ready (s)", "first-I/O (s)", "blk probe (ms)"):
                figures.setdefault(key, [])
            for label, _, _ in THROUGHPUT:
                figures.setdefault("write %s (MiB/s)" % label, [])
                figures.setdefault("read %s (MiB/s)" % label, [])
            one_run(t, image, fn, figures)
            log("run %d/%d %s: %s" % (i + 1, RUNS, name, ", ".join(
                "%s %s" % (k, fmt(v[-1])) for k, v in figures.items())))
    setup_latency(t, results)
    log("")
    log("%d interleaved runs per path (vmm setup/stop: %d); median [min - max]" % (RUNS, SETUP_RUNS))
    log("%-24s %s" % ("", "".join("%-30s" % name for name, _ in PATHS)))
    for key in results[PATHS[0][0]]:
        cells = []
        for name, _ in PATHS:
            v = results[name][key]
            cells.append("%-30s" % ("%s [%s - %s]" % (fmt(statistics.median(v)), fmt(min(v)),
                                                      fmt(max(v)))))
        log("%-24s %s" % (key, "".join(cells)))


if __name__ == "__main__":
    run(main)

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

Paths: "direct" (QEMU connected to qemu-storage-daemon's socket).  The
front door adds a path that returns vhubd's socket for the same back-end;
nothing else changes (same guest, same steps, same back-end).

    PYTHONPATH=tests/integration python3 tests/bench/bench_guest.py [RUNS]
    meson test -C build --benchmark --suite bench -v guest
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest import guest_image                              # noqa: E402
from vhubtest.backends import QsdBackend                      # noqa: E402
from vhubtest.guest import BlkDevice, Guest                   # noqa: E402
from vhubtest.testing import log, run                         # noqa: E402

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
IMAGE_SIZE = 256 << 20
MIB = 128
# (label, request size in bytes, MiB moved)
THROUGHPUT = [("1 MiB", 1 << 20, MIB), ("4 KiB", 4096, 16)]


def path_direct(t, d, qsd):
    """QEMU straight to the back-end's socket."""
    return qsd.socket


PATHS = [("direct", path_direct)]


def one_run(t, image, path_fn, figures):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    with open(img, "wb") as f:
        f.truncate(IMAGE_SIZE)
    with QsdBackend(img, os.path.join(d, "blk.sock"), num_queues=2, log_dir=d) as qsd, \
            Guest(d, [BlkDevice(path_fn(t, d, qsd), num_queues=2)], image) as g:
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
    log("")
    log("%d interleaved runs per path; median [min - max]" % RUNS)
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

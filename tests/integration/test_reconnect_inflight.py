#!/usr/bin/env python3
"""INFLIGHT_SHMFD: the test back-end SIGKILLed and restarted 20 times mid-I/O.

vhub-test-backend (tests/backend) serves virtio-blk from a disk file,
negotiates INFLIGHT_SHMFD, holds every request 2..6 ms and completes the
ready ones in random order (--complete random --delay-ms 4), so at each kill
many requests per ring are fetched and not completed, and the used ring's
order has nothing to do with the avail ring's.  The driver keeps 32
requests in flight on each of two rings (writes of known patterns to
distinct 1 KiB extents, reads of extents already written), never pausing,
not even between the kill and the daemon noticing.

On restore the daemon re-sends the inflight buffer it kept (the memfd the
first back-end gave with GET_INFLIGHT_FD; the daemon's reference keeps it
alive across the kill) with SET_INFLIGHT_FD and SET_VRING_BASE = the used
index; the back-end (like libvhost-user) resubmits every head still marked
in flight, in counter order, and continues at used + inflight.  So:

- every device.reconnected says exact=true, with the base and outstanding
  counts the driver knows (as in test_reconnect_qsd.py), reconnects 1..20;
- every request completes exactly once (no used entry for a head that is
  not in flight; FIFO slot reuse makes a duplicate land on a free head),
  with status OK and, for reads, the data of the extent's one write;
- the back-end really resubmitted requests from the kept buffer (its
  per-ring `resubmitted` counters, summed over the restarts, are > 0);
- at the end every written extent reads back right and the disk file equals
  the model; device.list reconnects == 20; the daemon's fds are back to
  their baseline.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_reconnect_qsd import (BlkRing, Workload, check_recovered_and_finish,  # noqa: E402
                                kill_and_restore)
from vhubtest import scenarios                                 # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, check_eq, log, run, run_seed  # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

VHU_PF_INFLIGHT_SHMFD = 12
KILLS = 20
DEPTH = 32


def main(t):
    seed = run_seed()
    log("%d in flight per ring, %d kills, seed %d (VHUB_TEST_SEED)" % (DEPTH, KILLS, seed))
    d = t.tmpdir()
    disk_bytes = 64 << 20
    img = scenarios.sparse_image(os.path.join(d, "disk.img"), disk_bytes)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    sock = daemon.backend_socket("tb0.sock")
    tb = t.enter_logged("test back-end",
                        TestBackend([sock], args=["--disk", img, "--disk-size", str(disk_bytes), "--queues", "2",
                                                  "--complete", "random", "--delay-ms", "4",
                                                  "--seed", str(seed & 0x7fffffff)], log_dir=d))
    mem, vmm = vm_with_memory(t, c, 16 << 20)
    dev = vmm.add_device("blk0", sock, type="blk")
    check(dev["protocol_features"] & (1 << VHU_PF_INFLIGHT_SHMFD), "INFLIGHT_SHMFD negotiated")
    features = scenarios.BLK_FEATURES & dev["features"]
    check_eq(features, scenarios.BLK_FEATURES, "test back-end offers VERSION_1|FLUSH|MQ")
    rings = [BlkRing(mem, i) for i in range(2)]
    vmm.start_device("blk0", features, rings)
    conn = tb.conn(0)
    check(conn["inflight"] is not None, "the back-end has an inflight buffer (%s)"
          % conn["inflight"])

    wl = Workload(rings, disk_bytes, DEPTH, seed)
    wl.run_for(0.2)
    check(wl.completed > 0, "I/O flows before the first kill (%d requests)" % wl.completed)

    resubmitted = 0
    deep = 0
    for k in range(1, KILLS + 1):
        wl.run_for(wl.rnd.uniform(0.03, 0.12))
        if wl.rnd.random() < 0.5:
            wl.fill()
        ev, bounds = kill_and_restore(wl, c, "blk0", tb, tb.start, k)
        check_eq(ev["reconnects"], k, "cycle %d: reconnects counts up" % k)
        check_eq(ev["exact"], True, "cycle %d: exact (INFLIGHT_SHMFD negotiated)" % k)
        if max(v["outstanding"] for v in ev["vrings"]) > 1:
            deep += 1
        # the restored rings run on; the back-end's counters say what it resubmitted
        wl.run_for(0.02)
        rs = [v["resubmitted"] for v in tb.vrings(0)]
        resubmitted += sum(rs)
        log("cycle %d: the restarted back-end resubmitted %s requests from the kept inflight "
            "buffer" % (k, rs))
    wl.drain(10.0)
    log("%d requests submitted, %d completed, %d stray completions; %d restores with more "
        "than one request outstanding on a ring; %d requests resubmitted in all"
        % (len(wl.all_reqs), wl.completed, wl.strays(), deep, resubmitted))
    check(deep > 0, "some kill caught a ring with more than one request outstanding (%d of %d)"
          % (deep, KILLS))
    check(resubmitted > 0, "the back-ends resubmitted requests from the kept inflight buffer (%d)"
          % resubmitted)
    check_eq(wl.strays(), 0, "no used entry for a head that was not in flight (nothing completed "
             "twice)")
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion had status OK and reads the extent's one write")
    check_recovered_and_finish(c, vmm, wl, img, disk_bytes, KILLS)
    daemon.check_fd_baseline(baseline)


if __name__ == "__main__":
    run(main)

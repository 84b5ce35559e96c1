#!/usr/bin/env python3
"""A device with many queues: device.start of 64 rings at once.

The start pipelines ~6 awaited requests per ring (NUM, BASE, ADDR, CALL,
KICK with REPLY_ACK) plus the enables: hundreds of replies in flight on one
back-end connection.  Every ring must then carry real I/O (verified data)
and device.stop must return 64 bases.  Uses the project's test back-end,
which offers up to 64 queues.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk                                       # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check_eq, run              # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

QUEUES = 64


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--log-level", "info"]))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    s = daemon.backend_socket("tb.sock")
    t.enter(TestBackend(sockets=[s], args=["--queues", str(QUEUES), "--disk-size", str(4 << 20)],
                        log_dir=d))
    mem, vmm = vm_with_memory(t, c, 64 << 20)
    dev = vmm.add_device("tb", s, type="blk")
    check_eq(dev["queues"], QUEUES, "device.add queues (the back-end's GET_QUEUE_NUM)")
    qs = [blk.BlkQueue(mem, index=i, size=16, max_io=4096) for i in range(QUEUES)]
    vmm.start_device("tb", dev["features"] & ~(1 << 30), [q.vq for q in qs])
    for q in qs:
        q.write_sectors(q.index * 8, bytes([q.index]) * 4096)
    bad = [q.index for q in qs if q.read_sectors(q.index * 8, 8) != bytes([q.index]) * 4096]
    check_eq(bad, [], "every one of the %d rings wrote and read back its own sector" % QUEUES)
    bases = vmm.stop_device("tb")
    check_eq(sorted(bases.items()), [(i, 2) for i in range(QUEUES)],
             "device.stop: %d bases, 2 requests each" % QUEUES)
    for q in qs:
        q.vq.close()
    vmm.remove_device("tb")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()


if __name__ == "__main__":
    run(main)

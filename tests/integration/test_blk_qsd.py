#!/usr/bin/env python3
"""virtio-blk through vhubd to qemu-storage-daemon, per the control contract.

vm.create, vm.memory.add (memfd), device.add, device.config.get (capacity),
device.start (2 rings, kick/call eventfds), concurrent writes+reads on both
rings checked against the image, device.stop (bases == requests made
available), a restart at those bases with more I/O, device.remove,
vm.destroy; the daemon's fd count is back to its baseline and it exits 0
on SIGTERM.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                           # noqa: E402
from vhubtest.backends import QsdBackend                       # noqa: E402
from vhubtest.client import u64                                # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

IMAGE_SIZE = 16 << 20


def main(t):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    initial = scenarios.make_image(img, IMAGE_SIZE)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    info = c.call("daemon.info")
    check_eq(info["pid"], daemon.pid, "daemon.info pid")
    baseline = daemon.settled_fd_count(c)
    log("daemon fd baseline with one control connection: %d" % baseline)

    sock = daemon.backend_socket("blk0.sock")
    qsd = t.enter(QsdBackend(img, sock, num_queues=2, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 32 << 20)
    regs = vmm.memory_list()
    r = mem.regions[0]
    check_eq(regs, [{"gpa": r.gpa, "size": r.size, "offset": r.offset, "uaddr": r.uaddr}],
             "vm.memory.list")

    dev = vmm.add_device("blk0", sock, type="blk")
    log("device.add: features %#x protocol_features %#x queues %r max_mem_slots %r"
        % (dev["features"], dev["protocol_features"], dev["queues"], dev.get("max_mem_slots")))
    check(dev["features"] & scenarios.BLK_FEATURES == scenarios.BLK_FEATURES,
          "back-end offers VERSION_1|FLUSH|MQ")
    check_eq(dev["queues"], 2, "device.add queues (qsd exports 2)")
    cfg = blk.parse_config(vmm.config_get("blk0", 0, 60))
    check_eq(cfg["capacity"], IMAGE_SIZE // 512, "device.config.get capacity (sectors)")
    check_eq(vmm.device_state("blk0")["state"], "ready", "device state after device.add")

    queues = [blk.BlkQueue(mem, index=i, size=128) for i in range(2)]
    features = scenarios.BLK_FEATURES & dev["features"]
    # A request made available before device.start and never kicked by us:
    # only the daemon's own kick after start can get it processed.
    early = [q.submit(blk.VIRTIO_BLK_T_IN, 8 * q.index, length=4096) for q in queues]
    vmm.start_device("blk0", features, [q.vq for q in queues])
    for q, req in zip(queues, early):
        q.wait(1, 5.0)
        check(req.done and req.status == 0 and req.data == initial[q.index * 4096:(q.index + 1) * 4096],
              "ring %d: a request made available before device.start completed "
              "without a kick from the driver (the daemon kicks every ring)" % q.index)
    st = vmm.device_state("blk0")
    check_eq(st["state"], "running", "device state after device.start")
    check_eq(u64(st["acked_features"]) & ~(1 << 30), features,
             "device.list acked_features (bit 30 aside)")

    # Requests on one connection are independent: several in flight at once.
    pend = [c.request("daemon.info"), c.request("device.list", {"vm": "vm0"}),
            c.request("vm.memory.list", {"vm": "vm0"})]
    for p in reversed(pend):
        p.result(5)
    log("ok: three pipelined requests answered")

    scenarios.blk_first_sectors(queues[0], initial)
    scenarios.blk_io(queues, img, initial, nreq=256)
    bases = vmm.stop_device("blk0")
    for q in queues:
        check_eq(bases.get(q.index), q.vq.submitted,
                 "device.stop base of ring %d (requests made available)" % q.index)
    check_eq(vmm.device_state("blk0")["state"], "stopped", "device state after device.stop")

    # Start again where the rings stopped: the base travels through device.start.
    for q in queues:
        q.vq.reset(bases[q.index])
    vmm.start_device("blk0", features, [q.vq for q in queues])
    scenarios.blk_io(queues, img, open(img, "rb").read(), nreq=64, seed=3)
    bases2 = vmm.stop_device("blk0")
    for q in queues:
        check_eq(bases2.get(q.index), (bases[q.index] + q.vq.submitted) & 0xFFFF,
                 "ring %d restarted at base %d: base after %d more requests"
                 % (q.index, bases[q.index], q.vq.submitted))

    vmm.remove_device("blk0")
    check_eq(vmm.device_list(), [], "device.list after device.remove")
    vmm.destroy()
    check(vmm.vm_entry() is None, "vm.list has no vm0 after vm.destroy")
    check(qsd.alive, "qemu-storage-daemon keeps serving after its front-end left")
    for q in queues:
        q.vq.close()
    daemon.check_fd_baseline(baseline)
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")


if __name__ == "__main__":
    run(main)

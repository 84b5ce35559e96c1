#!/usr/bin/env python3
"""virtio-fs through vhubd to virtiofsd, per the contract.

device.add (2 queues: hiprio + requests), device.config.get refused
(-32005: no CONFIG protocol feature), device.start, FUSE_INIT, GETATTR of
the root, LOOKUP+OPEN+READ of a real file, device.stop bases, device.remove
(virtiofsd then exits: its front-end left), vm.destroy, fd count back to
baseline, exit 0 on SIGTERM.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import fs, scenarios                             # noqa: E402
from vhubtest.backends import VirtiofsdBackend                 # noqa: E402
from vhubtest.client import NOT_SUPPORTED, RpcError            # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402


def main(t):
    d = t.tmpdir()
    share = os.path.join(d, "share")
    os.mkdir(share)
    content = os.urandom(150000)
    with open(os.path.join(share, "data.bin"), "wb") as f:
        f.write(content)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    log("daemon fd baseline with one control connection: %d" % baseline)

    sock = daemon.backend_socket("fs0.sock")
    vfs = t.enter(VirtiofsdBackend(sock, share, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 16 << 20)

    dev = vmm.add_device("fs0", sock, type="fs")
    log("device.add: features %#x protocol_features %#x queues %r"
        % (dev["features"], dev["protocol_features"], dev["queues"]))
    check(dev["features"] & scenarios.FS_FEATURES, "back-end offers VERSION_1")
    check_eq(dev["queues"], 2, "device.add queues (virtiofsd reports 2)")
    e = expect_error(RpcError, vmm.config_get, "fs0", 0, 4, what="device.config.get on virtiofsd")
    check_eq(e.code, NOT_SUPPORTED, "device.config.get error code (no CONFIG protocol feature)")

    fsdev = fs.FsDevice(mem)
    vmm.start_device("fs0", scenarios.FS_FEATURES, fsdev.vqs)
    check_eq(vmm.device_state("fs0")["state"], "running", "device state after device.start")
    scenarios.fs_checks(fsdev, share, "data.bin", content)

    bases = vmm.stop_device("fs0")
    check_eq(bases.get(0), fsdev.hiprio.submitted, "device.stop base of the hiprio queue")
    check_eq(bases.get(1), fsdev.requests[0].submitted, "device.stop base of the request queue")
    vmm.remove_device("fs0")
    check_eq(vfs.wait_exit(5), 0, "virtiofsd exits 0 once vhubd closed its connection")
    vmm.destroy()
    check(vmm.vm_entry() is None, "vm.list has no vm0 after vm.destroy")
    for vq in fsdev.vqs:
        vq.close()
    daemon.check_fd_baseline(baseline)
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")


if __name__ == "__main__":
    run(main)

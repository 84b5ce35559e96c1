#!/usr/bin/env python3
"""virtio-net through vhubd to dpdk-testpmd (io forwarding), per the contract.

Two queue pairs: frames sent on each TX ring come back intact on its RX ring.
device.add (queues 4), device.config.get refused (-32005: testpmd has no
CONFIG protocol feature), device.start, device.stop bases (TX == frames
sent, RX == buffers filled), device.remove, vm.destroy, fd count back to
baseline, exit 0 on SIGTERM.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import net, scenarios                            # noqa: E402
from vhubtest.backends import TestpmdBackend                   # noqa: E402
from vhubtest.client import NOT_SUPPORTED, RpcError            # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    log("daemon fd baseline with one control connection: %d" % baseline)

    sock = daemon.backend_socket("net0.sock")
    pmd = t.enter(TestpmdBackend(sock, queues=2, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 32 << 20)

    dev = vmm.add_device("net0", sock, type="net", queues=4)
    log("device.add: features %#x protocol_features %#x queues %r"
        % (dev["features"], dev["protocol_features"], dev["queues"]))
    check(dev["features"] & scenarios.NET_FEATURES == scenarios.NET_FEATURES,
          "back-end offers VERSION_1|MQ")
    check(dev["protocol_features"] & (1 << 16), "STATUS protocol feature negotiated")
    check_eq(dev["queues"], 4, "device.add queues (as asked)")
    e = expect_error(RpcError, vmm.config_get, "net0", 0, 8, what="device.config.get on testpmd")
    check_eq(e.code, NOT_SUPPORTED, "device.config.get error code (no CONFIG protocol feature)")

    pairs = [net.NetQueuePair(mem, pair=i, size=256) for i in range(2)]
    vqs = [vq for p in pairs for vq in p.vqs]
    vmm.start_device("net0", scenarios.NET_FEATURES, vqs)
    check_eq(vmm.device_state("net0")["state"], "running", "device state after device.start")
    pmd.wait_forwarding()
    scenarios.net_loopback(pairs)

    bases = vmm.stop_device("net0")
    for p in pairs:
        check_eq(bases.get(p.tx.index), p.sent, "device.stop base of TX ring %d" % p.tx.index)
        check_eq(bases.get(p.rx.index), p.received, "device.stop base of RX ring %d" % p.rx.index)
    vmm.remove_device("net0")
    vmm.destroy()
    check(vmm.vm_entry() is None, "vm.list has no vm0 after vm.destroy")
    for vq in vqs:
        vq.close()
    daemon.check_fd_baseline(baseline)
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")
    check_eq(pmd.stop(), 0, "testpmd exit code after SIGTERM")


if __name__ == "__main__":
    run(main)

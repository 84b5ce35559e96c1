#!/usr/bin/env python3
"""IOTLB (VIRTIO_F_IOMMU_PLATFORM) through vhubd to dpdk-testpmd's vhost PMD
with iommu-support=1.

The guest's memory is registered at guest-physical addresses far from the
addresses the rings and buffers use: those are I/O virtual addresses that
only an IOTLB entry resolves, so nothing can work through the GPAs.

- device.add: the back-end offers VIRTIO_F_IOMMU_PLATFORM; BACKEND_REQ and
  REPLY_ACK negotiated.  device.iotlb.update before the device has acked
  the feature: -32005.
- device.start with the feature acked and the rings at IOVAs: the back-end
  cannot translate them and sends IOTLB misses, forwarded to the VMM as
  device.backend_request (IOTLB_MSG, type miss, an iova inside a ring,
  need_reply 0: DPDK does not wait, so device.backend_reply has nothing to
  answer: -32602).  No frame moves while the translations are missing.
- device.iotlb.update (iova -> the VMM's address of the memory, rw): the
  back-end's rings come alive; 300 frames come back byte for byte.
- device.iotlb.invalidate, then an update again: traffic flows again.
- testpmd killed and restarted: the running device cannot be restored (its
  ring indexes are behind IOVAs): device.failed naming why.
- Bad params (perm "x", size 0, uaddr outside the VM's memory): -32602 /
  -32009; a back-end without IOMMU_PLATFORM (testpmd without
  iommu-support): -32005.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import net                                           # noqa: E402
from vhubtest.backends import TestpmdBackend                       # noqa: E402
from vhubtest.client import (BAD_REGION, INVALID_PARAMS, NOT_SUPPORTED,  # noqa: E402
                             RpcError, u64, u64_json)
from vhubtest.daemon import Daemon                                 # noqa: E402
from vhubtest.events import wait_event                             # noqa: E402
from vhubtest.memory import GuestMemory                            # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402
from vhubtest.vmm import Vmm                                       # noqa: E402

ACCESS_PLATFORM = 1 << 33
PF_REPLY_ACK = 1 << 3
PF_BACKEND_REQ = 1 << 5
IOTLB_MISS = 1
# The GPAs the daemon and the back-end are told; the harness's own
# addresses (descriptors, rings) become IOVAs.
GPA_SHIFT = 0x40000000000


def is_miss(p):
    return (p.get("event") == "device.backend_request" and p.get("device") == "net0"
            and p.get("request") == "IOTLB_MSG")


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    sock = daemon.backend_socket("net0.sock")
    pmd = t.enter_logged("testpmd", TestpmdBackend(sock, queues=1, log_dir=d, extra_vdev="iommu-support=1"))
    mem = t.enter(GuestMemory(16 << 20))
    region = mem.regions[0]
    vmm = Vmm(c, "vm0")
    vmm.create()
    c.call("vm.memory.add", {"vm": "vm0", "gpa": u64_json(region.gpa + GPA_SHIFT), "size": region.size,
                             "fd": 0, "uaddr": u64_json(region.uaddr)}, fds=[region.fd])

    dev = vmm.add_device("net0", sock, type="net", queues=2)
    check(dev["features"] & ACCESS_PLATFORM, "testpmd (iommu-support=1) offers VIRTIO_F_IOMMU_PLATFORM")
    check_eq(dev["protocol_features"] & (PF_REPLY_ACK | PF_BACKEND_REQ), PF_REPLY_ACK | PF_BACKEND_REQ,
             "BACKEND_REQ and REPLY_ACK negotiated")

    def update(iova=region.gpa, size=region.size, uaddr=region.uaddr, perm="rw"):
        return c.call("device.iotlb.update", {"vm": "vm0", "device": "net0", "iova": u64_json(iova),
                                              "size": u64_json(size), "uaddr": u64_json(uaddr), "perm": perm})

    e = expect_error(RpcError, update, what="device.iotlb.update before the feature is acked")
    check_eq(e.code, NOT_SUPPORTED, "IOMMU_PLATFORM not acked yet: not supported")
    e = expect_error(RpcError, update, perm="x", what="perm 'x'")
    check_eq(e.code, INVALID_PARAMS, "bad perm: invalid params")
    e = expect_error(RpcError, update, size=0, what="size 0")
    check_eq(e.code, INVALID_PARAMS, "size 0: invalid params")
    e = expect_error(RpcError, update, uaddr=region.uaddr + region.size - 4096, size=8192,
                     what="uaddr range past the end of the VM's memory")
    check_eq(e.code, BAD_REGION, "uaddr outside the VM's memory: bad region")

    pair = net.NetQueuePair(mem, pair=0, size=128)
    t.defer(lambda: [vq.close() for vq in pair.vqs])
    c.events()  # drop anything earlier
    vmm.start_device("net0", (1 << 32) | ACCESS_PLATFORM, pair.vqs)
    check_eq(vmm.device_state("net0")["state"], "running", "device running (rings at IOVAs)")

    p = c.wait_event(is_miss, 10.0)
    log("first miss: %r" % p)
    rings = [(a, a + 4096) for vq in pair.vqs for a in vq.addresses()]
    check_eq(u64(p["type"]), IOTLB_MISS, "IOTLB_MSG type is a miss")
    check(any(lo <= u64(p["iova"]) < hi for lo, hi in rings), "the miss is for a ring's IOVA")
    check_eq(p.get("need_reply"), 0, "DPDK does not wait for an answer to its miss")
    e = expect_error(RpcError, c.call, "device.backend_reply",
                     {"vm": "vm0", "device": "net0", "token": p["token"], "result": 0},
                     what="device.backend_reply to a miss nobody waits for")
    check_eq(e.code, INVALID_PARAMS, "nothing to answer: invalid params")

    pair.post_rx()
    pair.rx.kick()
    pair.send([net.build_frame(i, 100) for i in range(8)])
    time.sleep(0.5)
    check_eq((pair.rx.used_idx, pair.tx.used_idx), (0, 0), "no frame moves without translations")

    check_eq(update(), {}, "device.iotlb.update of the whole memory (rw)")
    got = pair.recv_until(8, 10.0)
    check_eq(sorted(net.parse_frame(g) for g in got), [(0, i) for i in range(8)],
             "the 8 frames queued before the update came back")
    pmd.wait_forwarding()
    frames = [net.build_frame(i, 60 + (i * 97) % 1440) for i in range(300)]
    got = []
    for i in range(0, len(frames), 64):   # never more in flight than the RX ring holds
        pair.send(frames[i:i + 64])
        got += pair.recv_until(min(64, len(frames) - i), 10.0)
    check(all(g == frames[s] for g, (_, s) in zip(got, (net.parse_frame(g) for g in got))) and
          len(got) == len(frames), "300 frames (60..1499 bytes) came back byte for byte through the IOTLB")
    check_eq(pair.tx_completed(), 8 + 300, "TX chains used")

    check_eq(c.call("device.iotlb.invalidate", {"vm": "vm0", "device": "net0", "iova": u64_json(region.gpa),
                                                "size": region.size}), {}, "device.iotlb.invalidate")
    check_eq(update(), {}, "device.iotlb.update again")
    pair.send([net.build_frame(1000 + i, 200) for i in range(16)])
    got = pair.recv_until(16, 10.0)
    check_eq(sorted(s for _, s in (net.parse_frame(g) for g in got)), list(range(1000, 1016)),
             "traffic flows after invalidate + update")

    # Its rings sit behind IOVAs: a lost back-end cannot be restored exactly.
    pmd.kill()
    pmd.start()
    ev = wait_event(c, "device.failed", "net0", 20.0)
    check("IOMMU_PLATFORM" in ev.get("reason", ""), "a running device behind an IOMMU fails on a loss",
          ev.get("reason"))

    # A back-end without IOMMU_PLATFORM.
    sock2 = daemon.backend_socket("net1.sock")
    t.enter(TestpmdBackend(sock2, queues=1, log_dir=d))
    vmm.add_device("net1", sock2, type="net", queues=2)
    e = expect_error(RpcError, c.call, "device.iotlb.update",
                     {"vm": "vm0", "device": "net1", "iova": 0, "size": 4096,
                      "uaddr": u64_json(region.uaddr), "perm": "ro"},
                     what="device.iotlb.update on testpmd without iommu-support")
    check_eq(e.code, NOT_SUPPORTED, "no IOMMU_PLATFORM: not supported")

    vmm.remove_device("net0")
    vmm.remove_device("net1")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()
    check_eq(pmd.stop(), 0, "testpmd exit code after SIGTERM")


if __name__ == "__main__":
    run(main)

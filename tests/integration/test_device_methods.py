#!/usr/bin/env python3
"""device.net.rarp / device.net.mtu against dpdk-testpmd's vhost PMD, and
device.state.save / load / check against the project's test back-end.

- testpmd negotiates RARP and NET_MTU: both calls succeed; a device without
  those protocol features (qemu-storage-daemon) answers -32005.
- device.state.save hands the VMM's pipe to the back-end (SET_DEVICE_STATE_FD,
  save, stopped phase); the back-end writes its state into it; CHECK answers
  0.  device.state.load feeds that state to a second back-end, which restores
  its ring bases from it.  Running devices are refused (-32004).
"""

import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                               # noqa: E402
from vhubtest.backends import QsdBackend, TestpmdBackend           # noqa: E402
from vhubtest.client import RpcError                               # noqa: E402
from vhubtest.daemon import Daemon                                 # noqa: E402
from vhubtest.testbackend import TestBackend                       # noqa: E402
from vhubtest.testing import check, check_eq, log, run             # noqa: E402
from vhubtest.vmm import vm_with_memory                            # noqa: E402


def expect_error(fn, code, what):
    try:
        fn()
    except RpcError as e:
        check_eq(e.code, code, what)
        return e
    check(False, "%s: expected error %d" % (what, code))


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    mem, vmm = vm_with_memory(t, c, 16 << 20)

    # -- net: RARP and MTU through testpmd
    sock = daemon.backend_socket("net0.sock")
    pmd = t.enter(TestpmdBackend(sock, queues=1, log_dir=d))
    dev = vmm.add_device("net0", sock, type="net", queues=2)
    check(dev["protocol_features"] & (1 << 2) and dev["protocol_features"] & (1 << 4),
          "RARP and NET_MTU negotiated with testpmd")
    c.call("device.net.rarp", {"vm": "vm0", "device": "net0", "mac": "52:54:00:12:34:56"})
    log("ok: device.net.rarp answered")
    c.call("device.net.mtu", {"vm": "vm0", "device": "net0", "mtu": 1500})
    log("ok: device.net.mtu answered")
    expect_error(lambda: c.call("device.net.rarp", {"vm": "vm0", "device": "net0", "mac": "52:54:00:12:34"}),
                 -32602, "bad mac")
    expect_error(lambda: c.call("device.net.mtu", {"vm": "vm0", "device": "net0", "mtu": 20}),
                 -32602, "mtu below 68")
    vmm.remove_device("net0")
    pmd.stop()

    # -- a back-end without RARP/NET_MTU: -32005
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, 4 << 20)
    bsock = daemon.backend_socket("blk0.sock")
    t.enter(QsdBackend(img, bsock, num_queues=1, log_dir=d))
    vmm.add_device("blk0", bsock, type="blk")
    e = expect_error(lambda: c.call("device.net.mtu", {"vm": "vm0", "device": "blk0", "mtu": 1500}),
                     -32005, "NET_SET_MTU on qemu-storage-daemon")
    check("NET_MTU" in e.data.get("detail", ""), "detail names the missing feature")
    expect_error(lambda: c.call("device.state.check", {"vm": "vm0", "device": "blk0"}),
                 -32005, "CHECK_DEVICE_STATE without DEVICE_STATE")
    vmm.remove_device("blk0")

    # -- device state through the test back-end
    s1 = daemon.backend_socket("tb1.sock")
    s2 = daemon.backend_socket("tb2.sock")
    tb = t.enter(TestBackend(sockets=[s1, s2], args=["--disk-size", str(4 << 20)], log_dir=d))
    dev = vmm.add_device("tb1", s1, type="blk")
    check(dev["protocol_features"] & (1 << 19), "DEVICE_STATE negotiated with the test back-end")
    q = blk.BlkQueue(mem, index=0, size=64)
    feats = dev["features"] & ~(1 << 30)
    vmm.start_device("tb1", feats, [q.vq])
    for i in range(5):
        q.write_sectors(i * 8, bytes([i]) * 4096)
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    expect_error(lambda: c.call("device.state.save", {"vm": "vm0", "device": "tb1", "fd": 0}, fds=[wfd]),
                 -32004, "state save of a running device")
    bases = vmm.stop_device("tb1")
    check_eq(bases[0], 5, "ring 0 stopped after 5 requests")
    chunks = []
    reader = threading.Thread(target=lambda: chunks.append(os.read(rfd, 1 << 20)) or
                              [chunks.append(b) for b in iter(lambda: os.read(rfd, 1 << 20), b"")])
    reader.start()
    res = c.call("device.state.save", {"vm": "vm0", "device": "tb1", "fd": 0}, fds=[wfd])
    os.close(wfd)
    check_eq(res, {}, "device.state.save result (the back-end writes into our pipe)")
    reader.join(10)
    os.close(rfd)
    state = b"".join(chunks)
    check(len(state) > 0 and state[:4] == b"VTBS", "the back-end wrote its state blob (%d bytes)" % len(state))
    c.call("device.state.check", {"vm": "vm0", "device": "tb1"})
    log("ok: device.state.check after save")

    dev2 = vmm.add_device("tb2", s2, type="blk")
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    os.write(wfd, state)
    os.close(wfd)
    c.call("device.state.load", {"vm": "vm0", "device": "tb2", "fd": 0}, fds=[rfd])
    os.close(rfd)
    ring0 = [v for v in tb.vrings(1) if v.get("index") == 0]
    check(ring0 and ring0[0]["last_avail"] == 5,
          "the second back-end restored ring 0's base (5) from the loaded state: %r" % ring0)
    c.call("device.state.check", {"vm": "vm0", "device": "tb2"})
    log("ok: device.state.load + check on a second back-end")
    q.vq.close()
    vmm.remove_device("tb1")
    vmm.remove_device("tb2")

    # -- a dirty-log start that one device fails (its back-end drops the
    # connection on SET_LOG_BASE, whose reply value carries no status): the
    # call fails naming it,
    # and the device that did start logging stops again (LOG_ALL cleared)
    s3 = daemon.backend_socket("tb3.sock")
    s4 = daemon.backend_socket("tb4.sock")
    log_features = "0x%x" % (0x140001200 | (1 << 26))   # + VHOST_F_LOG_ALL
    tbl = t.enter(TestBackend(sockets=[s3, s4], args=["--disk-size", str(4 << 20),
                                                      "--features", log_features], log_dir=d))
    dev3 = vmm.add_device("tb3", s3, type="blk")
    vmm.add_device("tb4", s4, type="blk", reconnect_ms=0)
    q3 = blk.BlkQueue(mem, index=0, size=64)
    vmm.start_device("tb3", dev3["features"] & ~(1 << 30) & ~(1 << 26), [q3.vq])
    tbl.misbehave("SET_LOG_BASE", "close", sock=1)
    e = expect_error(lambda: c.call_fds("vm.dirty_log.start", {"vm": "vm0"}), -32006,
                     "vm.dirty_log.start with one device failing SET_LOG_BASE")
    check_eq(e.data.get("device"), "tb4", "the error names the refusing device")
    tbl.wait_until(lambda: not (tbl.conn(0)["features"] & (1 << 26)), 5.0,
                   "tb3 back to features without LOG_ALL")
    check_eq(tbl.requests(0).get("SET_FEATURES"), 3,
             "tb3: SET_FEATURES at start, with LOG_ALL, then without it again")
    check(q3.read_sectors(0, 8) is not None, "tb3 still does I/O")
    q3.vq.close()
    vmm.remove_device("tb3")
    vmm.remove_device("tb4")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()


if __name__ == "__main__":
    run(main)

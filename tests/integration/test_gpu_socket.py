#!/usr/bin/env python3
"""device.gpu.set_socket through vhubd to QEMU's vhost-user-gpu.

The test plays the VMM: it makes a socketpair, hands one end to the daemon
with device.gpu.set_socket (GPU_SET_SOCKET to the back-end), and on its own
end sees the back-end speak the vhost-user-gpu protocol
(docs/interop/vhost-user-gpu.rst): GET_PROTOCOL_FEATURES first, answered
with the EDID bit, then SET_PROTOCOL_FEATURES carrying what both support
(nothing beyond EDID).

- Not a socket (an eventfd) as fd: -32602, nothing reaches the back-end.
- No fd at all: -32602.
- device.remove: the back-end exits (it always does when its front-end
  leaves) and the test's end of the pair sees EOF; the daemon holds no fd
  of it any more (fd count back to baseline).
"""

import os
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.client import INVALID_PARAMS, RpcError                # noqa: E402
from vhubtest.daemon import Daemon                                 # noqa: E402
from vhubtest.realpeers import GpuBackend                          # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402
from vhubtest.vmm import Vmm                                       # noqa: E402

# vhost-user-gpu.rst: header {u32 request, u32 flags, u32 size}
GPU_GET_PROTOCOL_FEATURES = 1
GPU_SET_PROTOCOL_FEATURES = 2
GPU_FLAG_REPLY = 0x4
GPU_PF_EDID = 1 << 0


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("vhost-user-gpu closed its end after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def recv_gpu_msg(s):
    request, flags, size = struct.unpack("<III", recv_exact(s, 12))
    return request, flags, recv_exact(s, size) if size else b""


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    sock = daemon.backend_socket("gpu0.sock")
    gpu = t.enter_logged("vhost-user-gpu", GpuBackend(sock, log_dir=d))
    vmm = Vmm(c, "vm0")
    vmm.create()
    dev = vmm.add_device("gpu0", sock, type="gpu")
    log("device.add: features %#x protocol_features %#x queues %r"
        % (dev["features"], dev["protocol_features"], dev["queues"]))

    efd = os.eventfd(0, os.EFD_CLOEXEC)
    e = expect_error(RpcError, c.call, "device.gpu.set_socket", {"vm": "vm0", "device": "gpu0", "fd": 0},
                     fds=[efd], what="device.gpu.set_socket with an eventfd")
    os.close(efd)
    check_eq(e.code, INVALID_PARAMS, "not a socket: invalid params")
    e = expect_error(RpcError, c.call, "device.gpu.set_socket", {"vm": "vm0", "device": "gpu0"},
                     what="device.gpu.set_socket without fd")
    check_eq(e.code, INVALID_PARAMS, "no fd: invalid params")

    vmm_end, backend_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t.defer(vmm_end.close)
    vmm_end.settimeout(10.0)
    res = c.call("device.gpu.set_socket", {"vm": "vm0", "device": "gpu0", "fd": 0},
                 fds=[backend_end.fileno()])
    backend_end.close()  # the back-end has its own copy now
    check_eq(res, {}, "device.gpu.set_socket result")

    request, flags, payload = recv_gpu_msg(vmm_end)
    check_eq(request, GPU_GET_PROTOCOL_FEATURES, "the back-end's first message on the GPU socket")
    check_eq((flags & GPU_FLAG_REPLY, len(payload)), (0, 0), "a request without payload")
    vmm_end.sendall(struct.pack("<IIIQ", GPU_GET_PROTOCOL_FEATURES, GPU_FLAG_REPLY, 8, GPU_PF_EDID))
    request, flags, payload = recv_gpu_msg(vmm_end)
    check_eq(request, GPU_SET_PROTOCOL_FEATURES, "then it sets the protocol features")
    agreed = struct.unpack("<Q", payload)[0]
    log("vhost-user-gpu set protocol features %#x (QEMU 7.2's has no EDID)" % agreed)
    check_eq(agreed & ~GPU_PF_EDID, 0, "only features the VMM offered are set")
    check_eq(vmm.device_state("gpu0")["state"], "ready", "device state after the GPU socket exchange")

    vmm.remove_device("gpu0")
    check_eq(gpu.wait_exit(10.0), 0, "vhost-user-gpu exits 0 once its front-end left")
    check_eq(vmm_end.recv(1), b"", "the VMM's end of the GPU socket sees EOF")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()


if __name__ == "__main__":
    run(main)

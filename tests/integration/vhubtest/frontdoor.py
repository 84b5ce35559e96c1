"""Where the guest rig's devices lead: straight to the back-ends, or through
vhubd's front door (docs/front-door.md, docs/testing-guests.md).

The same scenario runs both ways; only the socket QEMU is pointed at differs:

    way = Direct(t)                      # the control run
    way = ThroughVhubd(t)                # vhubd with --vmm-dir, a VM "vm0"
    d = way.dir                          # back-end sockets, images, logs go here
    qsd = t.enter(QsdBackend(img, os.path.join(d, "blk.sock"), ...))
    g = Guest(d, [BlkDevice(way.socket(qsd.socket, "blk0", "blk"))], image)
    ...
    way.release("blk0")                  # vhubd: device.remove (the back-end sees its front-end go)

ThroughVhubd also checks, for each socket it hands out, what the contract
says of it (<vmm-dir>/<uid>/<vm>/<device>.sock, 0700 directories, a 0600
socket owned by the VM's uid) and keeps every event of the VM.
"""

import os
import stat
import time

from .client import Timeout, u64
from .daemon import Daemon
from .testing import TestFailure, check, check_eq, log


class Direct:
    """QEMU connects to the back-ends themselves."""
    name = "direct"

    def __init__(self, t):
        self.t = t
        self.dir = t.tmpdir()

    def socket(self, backend_socket, device, dev_type, **params):
        return backend_socket

    def release(self, device):
        pass

    def check_acked(self, device, bit, name):
        """What the driver acked is seen in the guest only (no daemon here)."""


class ThroughVhubd:
    """vhubd between QEMU and the back-ends: a VM `vm` owned by this test's
    control connection, and a front-door device per socket()."""
    name = "vhubd"

    def __init__(self, t, timeout_ms=None, vm="vm0", linger_ms=None, extra_args=()):
        self.t = t
        self.dir = t.tmpdir()
        self.vmm_dir = os.path.join(self.dir, "vmm")
        self.vm = vm
        args = ["--vmm-dir", self.vmm_dir] + list(extra_args)
        if timeout_ms is not None:
            args += ["--backend-timeout-ms", str(timeout_ms)]
        self.daemon = t.enter(Daemon(self.dir, extra_args=args, backend_dirs=[self.dir]).start())
        t.add_log("vhubd", self.daemon.log_path)
        self.client = self.daemon.client()
        params = {"vm": vm}
        if linger_ms is not None:
            params["linger_ms"] = linger_ms
        self.client.call("vm.create", params)
        self.sockets = {}
        self.seen = []

    def socket(self, backend_socket, device, dev_type, **params):
        p = {"vm": self.vm, "device": device, "socket": backend_socket, "type": dev_type,
             "vmm_socket": True}
        p.update(params)
        r = self.client.call("device.add", p)
        path = r["vmm_socket"]
        check_eq(path, os.path.join(self.vmm_dir, str(os.getuid()), self.vm, device + ".sock"),
                 "front-door socket of %s" % device)
        st = os.stat(path)
        check(stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid(),
              "%s is a 0600 socket owned by the VM's uid" % path, oct(st.st_mode))
        for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            check_eq(stat.S_IMODE(os.stat(d).st_mode), 0o700, "mode of %s" % d)
        self.sockets[device] = path
        log("device.add %s (%s) through vhubd: features 0x%x, protocol features 0x%x, %d queues -> %s"
            % (device, dev_type, r["features"], r["protocol_features"], r["queues"], path))
        return path

    def device(self, device):
        for d in self.client.call("device.list", {"vm": self.vm})["devices"]:
            if d["device"] == device:
                return d
        raise KeyError(device)

    def events(self, name=None, device=None):
        """Every event of the VM so far (its owner gets them all), in order."""
        self.seen.extend(self.client.events())
        return [e for e in self.seen
                if (name is None or e.get("event") == name) and (device is None or e.get("device") == device)]

    def wait_events(self, name, count, device=None, timeout=30.0):
        """Until `count` events `name` (of `device`) have come; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.events(name, device)
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestFailure("FAILED: %d %s events within %.0fs; got %d: %s"
                                  % (count, name, timeout, len(got), got))
            try:
                self.seen.append(self.client.wait_event(None, timeout=min(left, 1.0)))
            except Timeout:
                pass

    def check_acked(self, device, bit, name):
        """The driver's features, as vhubd relayed them to the back-end."""
        acked = u64(self.device(device)["acked_features"])
        check(acked & bit, "%s: device.list's acked_features has %s (0x%x)" % (device, name, acked))

    def release(self, device):
        """device.remove: vhubd closes the back-end (virtiofsd then exits)."""
        self.client.call("device.remove", {"vm": self.vm, "device": device})
        check(not os.path.exists(self.sockets[device]), "device.remove removed %s" % self.sockets[device])

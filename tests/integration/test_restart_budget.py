#!/usr/bin/env python3
"""A restart of a daemon filled to its fd budget (docs/restart.md, the fd
budget in docs/control-api.md "Limits").

vhubd under the played service manager with an fd store and an fd limit of
LIMIT (prlimit, both soft and hard), qemu-storage-daemon null-co exports as
devices: VMs of 4 devices, each device started with 2 rings on eventfds,
until the daemon answers -32008.  Then a planned restart (SIGTERM, the
store kept, a new process given every stored fd): the new process must
become ready, hold every VM and device as before, every device running,
and never run out of fds on the way.

At a restart the new process is passed one fd per fd-store name at once --
a stash per group (a device, a VM's memory, its shared objects), a snapshot
per VM -- on top of every fd it takes back out of them.  A budget that did
not keep room for those let a daemon at its limit run out of fds during the
restore (EMFILE on the stashes' fds and the back-ends' sockets): devices
restored as lost, and READY=1 never came.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.backends import QsdNullBackend, require_binary     # noqa: E402
from vhubtest.client import Client, RpcError                     # noqa: E402
from vhubtest.daemon import vhubd_path                           # noqa: E402
from vhubtest.scenarios import idle_blk_start                    # noqa: E402
from vhubtest.servicemanager import ServiceManager               # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run  # noqa: E402

LIMIT = 400
PER_VM = 4
MiB = 1 << 20
LIMIT_REACHED = -32008


def fill(c, socks):
    """VMs of PER_VM started devices until -32008: [(vm, device)]."""
    devices = []
    for v in range(len(socks) // PER_VM):
        vm = "vm%02d" % v
        try:
            c.call("vm.create", {"vm": vm})
            fd = os.memfd_create("restart-budget", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, MiB)
                c.call("vm.memory.add", {"vm": vm, "gpa": MiB, "size": MiB, "fd": 0}, fds=[fd])
            finally:
                os.close(fd)
        except RpcError as e:
            check_eq(e.code, LIMIT_REACHED, "only the fd budget refuses (%s)" % e)
            return devices
        for slot in range(PER_VM):
            dev = "d%d" % slot
            try:
                c.call("device.add", {"vm": vm, "device": dev, "socket": socks[len(devices)], "type": "blk"})
            except RpcError as e:
                check_eq(e.code, LIMIT_REACHED, "only the fd budget refuses (%s)" % e)
                return devices
            fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(4)]
            try:
                c.call("device.start", idle_blk_start(vm, dev, slot, MiB), fds=fds)
            except RpcError as e:
                check_eq(e.code, LIMIT_REACHED, "only the fd budget refuses (%s)" % e)
                c.call("device.remove", {"vm": vm, "device": dev})
                return devices
            finally:
                for fd in fds:
                    os.close(fd)
            devices.append((vm, dev))
    raise TestFailure("%d devices and no -32008: the fd limit of %d did not apply" % (len(devices), LIMIT))


def everything(c):
    """Every VM with its devices' states."""
    out = {}
    for v in c.call("vm.list")["vms"]:
        out[v["vm"]] = sorted((d["device"], d["state"]) for d in
                              c.call("device.list", {"vm": v["vm"]})["devices"])
    return out


def settle(sm):
    """Until the store has not changed for a second (its pushes are in)."""
    last, since, t0 = None, time.monotonic(), time.monotonic()
    while time.monotonic() - since < 1.0:
        if time.monotonic() - t0 > 30:
            raise TestFailure("the fd store never settled")
        n = sm.names()
        if n != last:
            last, since = n, time.monotonic()
        time.sleep(0.05)
    return len(last)


def main(t):
    prlimit = require_binary("/usr/bin/prlimit", "prlimit (util-linux)")
    d = t.tmpdir()
    control = os.path.join(d, "control.sock")
    backends = os.path.join(d, "backends")
    os.makedirs(backends)
    socks = [os.path.join(backends, "e%03d.sock" % i) for i in range(LIMIT // 4)]
    qsd = t.enter(QsdNullBackend(socks, num_queues=2, log_dir=d))
    t.add_log("qsd", qsd.log_path)
    sm = t.enter(ServiceManager(d, fd_store_max=4096))
    t.add_log("vhubd under the service manager", sm.log_path)
    argv = [prlimit, "--nofile=%d:%d" % (LIMIT, LIMIT), "--", vhubd_path(), "--control", control,
            "--backend-dir", backends, "--log-level", "info"]
    sm.start(argv)
    sm.wait_ready()
    c = t.enter(Client(control, timeout=10))
    devices = fill(c, socks)
    before = everything(c)
    check(len(devices) >= PER_VM, "the limit leaves room for a VM at least (%d devices)" % len(devices))
    check(all(s == "running" for devs in before.values() for _, s in devs), "every device runs", before)
    info = c.call("daemon.info")
    names = settle(sm)
    log("filled: %d VMs, %d devices started before -32008 at an fd limit of %d; the store holds %d names"
        % (info["vms"], info["devices"], LIMIT, names))

    with open(sm.log_path, "rb") as f:
        mark = len(f.read())
    sm.send_signal(15)
    check_eq(sm.wait_exit(timeout=30), 0, "the old vhubd exits 0")
    sm.start(argv)
    deadline = time.monotonic() + 20
    while not sm.ready:
        if sm.proc.poll() is not None:
            raise TestFailure("the new vhubd exited (%s) instead of becoming ready" % sm.proc.returncode)
        if time.monotonic() > deadline:
            raise TestFailure("the new vhubd did not become ready within 20 s of its start")
        time.sleep(0.01)
    with open(sm.log_path, "rb") as f:
        after_log = f.read()[mark:].decode(errors="replace")
    short = [x for x in after_log.splitlines() if "Too many open files" in x or "cannot be read back" in x]
    check(not short, "the restore never ran out of fds (nor read a stash short)", short[:3])
    check_eq(everything(c), before, "every VM and device back, every device running")
    log("ok: a daemon filled to its fd budget restarts with everything (%d devices)" % len(devices))
    c.close()
    check_eq(sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


if __name__ == "__main__":
    run(main)

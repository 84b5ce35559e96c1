#!/usr/bin/env python3
"""The vhub Python package drives a real qemu-storage-daemon through vhubd.

    test_python_client.py blocking    vhub.Client
    test_python_client.py asyncio     vhub.aio

The same VMM flow in both forms: daemon.info; vm.create; errors as
exceptions with code, message and data (AlreadyExists, InvalidParams for an
fd index beyond the message's count, NoSuchVM, MethodNotFound,
BackendNotAllowed); guest RAM as memfds (fds in); device.add and
device.config.get (capacity); device.start with kick/call eventfds on two
rings; writes and reads through the rings checked against the image file;
vm.dirty_log.start (an fd out, its size checked); qemu-storage-daemon killed
for real: device.disconnected, then restarted: device.reconnected, and I/O
goes on; device.stop bases; teardown; the daemon's and this process's fd
counts back to their baselines.
"""

import asyncio
import base64
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                           # noqa: E402
from vhubtest import client as _client_path                   # noqa: E402,F401 (python/ on sys.path)
from vhubtest.backends import QsdBackend                       # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402

import vhub                                                    # noqa: E402
import vhub.aio                                                # noqa: E402
from vhub import u64, u64_json                                 # noqa: E402

IMAGE_SIZE = 16 << 20
SRC_PY = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                      "python"))


class Blocking:
    """The blocking client behind the coroutine interface the flow uses."""

    def __init__(self, path):
        self.c = vhub.Client(path, timeout=10)

    async def call(self, method, params=None, fds=(), timeout=None):
        return self.c.call(method, params, fds, timeout=timeout)

    async def call_fds(self, method, params=None, fds=()):
        return self.c.call_fds(method, params, fds)

    async def event(self, name, device, timeout=10.0):
        return self.c.wait_event(lambda e: e.name == name and e.get("device") == device, timeout)

    async def close(self):
        self.c.close()


class Async:
    """vhub.aio; events come through its async iterator."""

    def __init__(self, client):
        self.c = client
        self._it = client.events()

    async def call(self, method, params=None, fds=(), timeout=None):
        return await self.c.call(method, params, fds, timeout=timeout)

    async def call_fds(self, method, params=None, fds=()):
        return await self.c.call_fds(method, params, fds)

    async def event(self, name, device, timeout=10.0):
        async def first():
            async for ev in self._it:
                if ev.name == name and ev.get("device") == device:
                    return ev
                vhub.framing.close_fds(ev.fds)
        return await asyncio.wait_for(first(), timeout)

    async def close(self):
        await self.c.close()


async def expect_rpc(cls, coro, what):
    try:
        await coro
    except cls as e:
        check(isinstance(e, vhub.RpcError) and e.code == cls.code_value and e.message
              and isinstance(e.data, dict) and e.detail,
              "%s: %s with code %d, message and data.detail" % (what, cls.__name__, e.code),
              (e.code, e.message, e.data))
        return e
    check(False, "%s raises %s" % (what, cls.__name__))


async def flow(t, mode):
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    initial = scenarios.make_image(img, IMAGE_SIZE)
    daemon = t.enter(Daemon(d))
    my_fds = sorted(os.listdir("/proc/self/fd"))
    if mode == "blocking":
        c = Blocking(daemon.control)
    else:
        c = Async(await vhub.aio.connect(daemon.control, timeout=10))
    info = await c.call("daemon.info")
    check_eq(info["pid"], daemon.pid, "daemon.info pid")
    baseline = daemon.settled_fd_count()
    vm = "py-" + mode

    await c.call("vm.create", {"vm": vm})
    await expect_rpc(vhub.AlreadyExists, c.call("vm.create", {"vm": vm}), "vm.create twice")
    await expect_rpc(vhub.NoSuchVM, c.call("vm.memory.list", {"vm": "nosuchvm"}),
                     "a VM that does not exist")
    await expect_rpc(vhub.MethodNotFound, c.call("vm.frobnicate", {"vm": vm}), "an unknown method")

    mem = t.enter(GuestMemory(32 << 20))
    r = mem.regions[0]
    region = {"vm": vm, "gpa": u64_json(r.gpa), "size": u64_json(r.size), "fd": 1,
              "offset": 0, "uaddr": u64_json(r.uaddr)}
    await expect_rpc(vhub.InvalidParams, c.call("vm.memory.add", region, fds=[r.fd]),
                     "vm.memory.add naming fd 1 of a message carrying 1")
    region["fd"] = 0
    check_eq(await c.call("vm.memory.add", region, fds=[r.fd]), {}, "vm.memory.add with the memfd")
    regs = (await c.call("vm.memory.list", {"vm": vm}))["regions"]
    check_eq([(u64(x["gpa"]), u64(x["size"])) for x in regs], [(r.gpa, r.size)], "vm.memory.list")

    outside = os.path.join(d, "not-a-backend-dir.sock")
    await expect_rpc(vhub.BackendNotAllowed,
                     c.call("device.add", {"vm": vm, "device": "x", "socket": outside}),
                     "device.add with a socket outside the back-end directories")

    sock = daemon.backend_socket("blk0.sock")
    qsd = t.enter(QsdBackend(img, sock, num_queues=2, log_dir=d))
    dev = await c.call("device.add", {"vm": vm, "device": "blk0", "socket": sock, "type": "blk"})
    check_eq(dev["queues"], 2, "device.add: 2 queues")
    cfg = await c.call("device.config.get", {"vm": vm, "device": "blk0", "offset": 0, "size": 60})
    check_eq(blk.parse_config(base64.b64decode(cfg["data"]))["capacity"], IMAGE_SIZE // 512,
             "device.config.get: capacity in sectors")

    queues = [blk.BlkQueue(mem, index=i, size=64) for i in range(2)]
    features = scenarios.BLK_FEATURES & u64(dev["features"])
    fds, vrings = [], []
    for q in queues:
        fds += [q.vq.kick_fd, q.vq.call_fd]
        vrings.append({"index": q.index, "size": q.vq.size, "desc": u64_json(q.vq.desc),
                       "avail": u64_json(q.vq.avail), "used": u64_json(q.vq.used),
                       "kick": len(fds) - 2, "call": len(fds) - 1})
    await c.call("device.start", {"vm": vm, "device": "blk0", "features": u64_json(features),
                                  "vrings": vrings}, fds=fds)
    log("ok: device.start with 4 eventfds (kick and call of 2 rings)")

    def io(salt):
        for q in queues:
            sector = 64 + 32 * q.index
            data = blk.pattern(sector, 8192, salt)
            q.write_sectors(sector, data)
            check_eq(q.read_sectors(sector, 16), data, "ring %d: read back what it wrote" % q.index)
            with open(img, "rb") as f:
                f.seek(sector * 512)
                check(f.read(8192) == data, "ring %d: the image file holds the data" % q.index)
    io(1)
    check(open(img, "rb").read(64 * 512) == initial[:64 * 512], "sectors nobody wrote unchanged")

    res, log_fds = await c.call_fds("vm.dirty_log.start", {"vm": vm})
    check_eq(len(log_fds), 1, "vm.dirty_log.start: one fd came back with the response")
    check_eq(os.fstat(log_fds[0]).st_size, u64(res["size"]), "the log fd's size is the result's")
    os.close(log_fds[0])
    await c.call("vm.dirty_log.stop", {"vm": vm})

    qsd.kill()
    ev = await c.event("device.disconnected", "blk0")
    check(ev["vm"] == vm and ev.get("reason"), "device.disconnected for blk0 with a reason", ev)
    qsd.restart()
    ev = await c.event("device.reconnected", "blk0", timeout=20)
    check_eq(ev["reconnects"], 1, "device.reconnected: the first reconnect")
    io(2)
    log("ok: I/O goes on after the back-end was killed and restarted")

    res = await c.call("device.stop", {"vm": vm, "device": "blk0"})
    bases = {v["index"]: v["base"] for v in res["vrings"]}
    for q in queues:
        check_eq(bases.get(q.index), q.vq.submitted & 0xFFFF,
                 "device.stop base of ring %d: the requests made available" % q.index)
    await c.call("device.remove", {"vm": vm, "device": "blk0"})
    await c.call("vm.destroy", {"vm": vm})
    for q in queues:
        q.vq.close()
    daemon.check_fd_baseline(baseline)
    await c.close()
    mem.close()
    check_eq(sorted(os.listdir("/proc/self/fd")), my_fds,
             "this process holds no fd more than before the client connected")
    daemon.stop()


def main(t):
    mode = sys.argv[1] if len(sys.argv) > 1 else "blocking"
    if mode not in ("blocking", "asyncio"):
        raise SystemExit("usage: test_python_client.py blocking|asyncio")
    check(os.path.dirname(os.path.abspath(vhub.__file__)) == os.path.join(SRC_PY, "vhub"),
          "the package under test is the source tree's (%s)" % vhub.__file__)
    asyncio.run(flow(t, mode))


if __name__ == "__main__":
    run(main)

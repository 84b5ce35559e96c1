"""The VMM's side of the control API, as the through-vhubd tests use it.

    vmm = Vmm(client, "vm0")
    vmm.create()
    vmm.add_memory(mem)                      # vm.memory.add per region, fd attached
    mem, vmm = vm_with_memory(t, client, 16 << 20)   # the three steps above
    info = vmm.add_device("blk0", sock)      # device.add; u64 fields parsed
    vmm.start_device("blk0", features, vqs)  # device.start, kick/call fds attached
    bases = vmm.stop_device("blk0")          # {index: base}
    vmm.remove_device("blk0"); vmm.destroy()
"""

import base64

from .client import u64, u64_json
from .memory import GuestMemory


class Vmm:
    def __init__(self, client, vm="vm0"):
        self.c = client
        self.vm = vm

    def create(self, **extra):
        return self.c.call("vm.create", dict({"vm": self.vm}, **extra))

    def destroy(self):
        return self.c.call("vm.destroy", {"vm": self.vm})

    def add_region(self, region, uaddr=None):
        """vm.memory.add of one Region; uaddr defaults to the real mapping address."""
        params = {"vm": self.vm, "gpa": u64_json(region.gpa), "size": u64_json(region.size),
                  "fd": 0, "offset": u64_json(region.offset),
                  "uaddr": u64_json(region.uaddr if uaddr is None else uaddr)}
        return self.c.call("vm.memory.add", params, fds=[region.fd])

    def add_memory(self, mem):
        for r in mem.regions:
            self.add_region(r)

    def memory_list(self):
        regs = self.c.call("vm.memory.list", {"vm": self.vm})["regions"]
        return [{k: u64(v) for k, v in r.items()} for r in regs]

    def add_device(self, device, socket, **extra):
        res = self.c.call("device.add", dict({"vm": self.vm, "device": device, "socket": socket},
                                             **extra))
        res = dict(res)
        res["features"] = u64(res["features"])
        res["protocol_features"] = u64(res["protocol_features"])
        return res

    def device_list(self):
        return self.c.call("device.list", {"vm": self.vm})["devices"]

    def device_state(self, device):
        for d in self.device_list():
            if d["device"] == device:
                return d
        return None

    def config_get(self, device, offset, size):
        res = self.c.call("device.config.get", {"vm": self.vm, "device": device,
                                                "offset": offset, "size": size})
        return base64.b64decode(res["data"], validate=True)

    def start_params(self, device, features, vqs):
        """(params, fds) of a device.start: per ring kick then call fd."""
        fds, vrings = [], []
        for vq in vqs:
            fds += [vq.kick_fd, vq.call_fd]
            vrings.append({"index": vq.index, "size": vq.size, "desc": u64_json(vq.desc),
                           "avail": u64_json(vq.avail), "used": u64_json(vq.used),
                           "base": vq.base, "kick": len(fds) - 2, "call": len(fds) - 1})
        return {"vm": self.vm, "device": device, "features": u64_json(features),
                "vrings": vrings}, fds

    def start_device(self, device, features, vqs):
        params, fds = self.start_params(device, features, vqs)
        return self.c.call("device.start", params, fds=fds)

    def stop_device(self, device):
        res = self.c.call("device.stop", {"vm": self.vm, "device": device})
        return {v["index"]: v["base"] for v in res["vrings"]}

    def remove_device(self, device):
        return self.c.call("device.remove", {"vm": self.vm, "device": device})

    def vm_entry(self):
        for v in self.c.call("vm.list")["vms"]:
            if v["vm"] == self.vm:
                return v
        return None


def vm_with_memory(t, client, mem_bytes, vm="vm0"):
    """A VM created with mem_bytes of guest memory (closed by t): (GuestMemory, Vmm)."""
    mem = t.enter(GuestMemory(mem_bytes))
    vmm = Vmm(client, vm)
    vmm.create()
    vmm.add_memory(mem)
    return mem, vmm

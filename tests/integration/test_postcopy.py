#!/usr/bin/env python3
"""Postcopy migration through vhubd to qemu-storage-daemon (libvhost-user,
protocol feature PAGEFAULT): the test plays the migration destination.

The VM's memory is there but its data pages have not arrived yet (holes in
the memfd).  vm.postcopy.advise hands the VMM qemu-storage-daemon's
userfaultfd; vm.postcopy.listen makes the back-end map the memory again
with faults enabled and, asked with `backend_regions: true` (an extension),
tells the VMM where (backend_uaddr per region).
Guest I/O then touches missing pages: the back-end faults, the test reads
the fault from the userfaultfd, turns its address into a guest address with
backend_uaddr, and places the page "from the source" with UFFDIO_COPY.

- advise: one fd per device, a userfaultfd (anon_inode:[userfaultfd]).
- listen with backend_regions: the region, mapped by the back-end somewhere
  else than the VMM; the result matches rpc.discover's schema.
- listen without it (a second postcopy round, the device stopped): exactly
  {}, as the contract says.
- A virtio-blk write whose data sits in two missing pages: both fault, are
  served, and the disk gets exactly the source's bytes.
- A read into a missing page: it faults (the back-end writes it), is
  served, and the guest sees the disk's bytes there.
- While in postcopy: vm.memory.add -32004, listen again -32004, advise
  again -32004; a device without PAGEFAULT (virtiofsd) makes advise -32005.
- vm.postcopy.end: {}; memory changes work again; fds back to baseline.

Needs Debian's python3-jsonschema.
"""

import ctypes
import fcntl
import os
import select
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk                                           # noqa: E402
from vhubtest.backends import QsdBackend, VirtiofsdBackend         # noqa: E402
from vhubtest.client import NOT_SUPPORTED, RpcError, WRONG_STATE, u64  # noqa: E402
from vhubtest.daemon import Daemon                                 # noqa: E402
from vhubtest.memory import PAGE_SIZE, GuestMemory                 # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402
from vhubtest.virtq import Virtqueue                               # noqa: E402
from vhubtest.vmm import Vmm                                       # noqa: E402

try:
    import jsonschema
except ImportError:
    sys.stdout.write("FAILED: this test needs python3-jsonschema (apt-get install python3-jsonschema)\n")
    sys.exit(1)

PF_PAGEFAULT = 1 << 8
BLK_FEATURES = (1 << 32)
UFFD_EVENT_PAGEFAULT = 0x12
# _IOWR(0xAA, _UFFDIO_COPY = 3, struct uffdio_copy {u64 dst, src, len, mode; s64 copy})
UFFDIO_COPY = (3 << 30) | (40 << 16) | (0xAA << 8) | 0x03


class FaultServer:
    """The destination's page server: for each fault on the back-end's
    userfaultfd, UFFDIO_COPY the page's content "from the source"."""

    def __init__(self, ufd, backend_base, gpa_base, source_pages):
        self.ufd = ufd
        self.backend_base = backend_base
        self.gpa_base = gpa_base
        self.source = source_pages        # gpa of a page -> its 4096 bytes
        self.faults = []                  # gpas served, in order
        self.errors = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._buf = ctypes.create_string_buffer(PAGE_SIZE)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join(5)
        return False

    def _serve(self, address):
        page = address & ~(PAGE_SIZE - 1)
        gpa = self.gpa_base + (page - self.backend_base)
        self.faults.append(gpa)
        ctypes.memmove(self._buf, self.source.get(gpa, bytes(PAGE_SIZE)), PAGE_SIZE)
        arg = bytearray(struct.pack("<QQQQq", page, ctypes.addressof(self._buf), PAGE_SIZE, 0, 0))
        fcntl.ioctl(self.ufd, UFFDIO_COPY, arg)
        copied = struct.unpack_from("<q", arg, 32)[0]
        if copied != PAGE_SIZE:
            self.errors.append("UFFDIO_COPY of gpa %#x copied %d" % (gpa, copied))

    def _run(self):
        while not self._stop:
            r, _, _ = select.select([self.ufd], [], [], 0.05)
            if not r:
                continue
            try:
                msg = os.read(self.ufd, 32)
            except BlockingIOError:
                continue
            event = msg[0]
            if event != UFFD_EVENT_PAGEFAULT:
                self.errors.append("unexpected userfaultfd event %#x" % event)
                continue
            try:
                self._serve(struct.unpack_from("<Q", msg, 16)[0])
            except OSError as e:
                self.errors.append("UFFDIO_COPY: %s" % e)


def blk_request(vq, mem, rtype, sector, data_gpa, length):
    """A virtio-blk chain whose header and status live in pages the test wrote."""
    hdr = mem.alloc(16, 16)
    status = mem.alloc(1, 1)
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(status, b"\xff")
    vq.add([(hdr, 16, False), (data_gpa, length, rtype == blk.VIRTIO_BLK_T_IN), (status, 1, True)])
    vq.kick()
    return status


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)

    image = os.path.join(d, "disk.img")
    disk = os.urandom(1 << 20)
    with open(image, "wb") as f:
        f.write(disk)
    sock = daemon.backend_socket("blk0.sock")
    qsd = t.enter_logged("qsd", QsdBackend(image, sock, num_queues=1, log_dir=d))

    mem = t.enter(GuestMemory(8 << 20))
    region = mem.regions[0]
    vq = Virtqueue(mem, size=16, index=0)   # ring pages: written now, present
    t.defer(vq.close)
    # Pages the test never touches: still on the "source".
    write_buf = mem.alloc(2 * PAGE_SIZE, PAGE_SIZE)
    read_buf = mem.alloc(PAGE_SIZE, PAGE_SIZE)
    source = {write_buf: os.urandom(PAGE_SIZE), write_buf + PAGE_SIZE: os.urandom(PAGE_SIZE),
              read_buf: b"\xee" * PAGE_SIZE}

    vmm = Vmm(c, "vm0")
    vmm.create()
    vmm.add_memory(mem)
    dev = vmm.add_device("blk0", sock, type="blk", queues=1)
    check(dev["protocol_features"] & PF_PAGEFAULT, "qemu-storage-daemon negotiates PAGEFAULT")

    e = expect_error(RpcError, c.call, "vm.postcopy.listen", {"vm": "vm0"}, what="listen before advise")
    check_eq(e.code, WRONG_STATE, "listen before advise: wrong state")

    res, fds = c.call_fds("vm.postcopy.advise", {"vm": "vm0"})
    check_eq([x["device"] for x in res["devices"]], ["blk0"], "advise: one entry per device")
    check_eq(len(fds), 1, "advise: one fd")
    ufd = fds[res["devices"][0]["fd"]]
    t.defer(os.close, ufd)
    check_eq(os.readlink("/proc/self/fd/%d" % ufd), "anon_inode:[userfaultfd]", "the fd is a userfaultfd")
    e = expect_error(RpcError, c.call, "vm.postcopy.advise", {"vm": "vm0"}, what="advise twice")
    check_eq(e.code, WRONG_STATE, "advise twice: wrong state")
    e = expect_error(RpcError, vmm.add_region, mem.add_region(64 << 20, 1 << 20),
                     what="vm.memory.add during postcopy")
    check_eq(e.code, WRONG_STATE, "memory changes wait for postcopy to end")

    res = c.call("vm.postcopy.listen", {"vm": "vm0", "backend_regions": True})
    log("listen: %r" % res)
    listen_schema = [m for m in c.call("rpc.discover")["methods"]
                     if m["name"] == "vm.postcopy.listen"][0]["result"]["schema"]
    errors = [e.message for e in jsonschema.Draft7Validator(listen_schema).iter_errors(res)]
    check_eq(errors, [], "listen's result with backend_regions matches rpc.discover's schema")
    regs = res["devices"][0]["regions"]
    check_eq([(u64(r["gpa"]), u64(r["size"])) for r in regs], [(region.gpa, region.size)],
             "listen: the back-end's mapping of the region")
    backend_base = u64(regs[0]["backend_uaddr"])
    check(backend_base not in (0, region.uaddr), "the back-end maps it at its own address (%#x)" % backend_base)
    # qemu-storage-daemon 7.2 echoes the front-end's addresses (a libvhost-user
    # bug); the daemon then finds the mapping itself: it must be the real one.
    with open("/proc/%d/maps" % qsd.pid) as f:
        starts = [int(line.split("-")[0], 16) for line in f if "vhubtest-ram" in line]
    check(backend_base in starts, "backend_uaddr is where qemu-storage-daemon really mapped the memfd")
    e = expect_error(RpcError, c.call, "vm.postcopy.listen", {"vm": "vm0"}, what="listen twice")
    check_eq(e.code, WRONG_STATE, "listen twice: wrong state")

    with FaultServer(ufd, backend_base, region.gpa, source) as server:
        vmm.start_device("blk0", BLK_FEATURES, [vq])
        status = blk_request(vq, mem, blk.VIRTIO_BLK_T_OUT, 8, write_buf, 2 * PAGE_SIZE)
        vq.wait_used(1, 10.0)
        check_eq(mem.read(status, 1), b"\x00", "write completed OK")
        check_eq(sorted(server.faults), [write_buf, write_buf + PAGE_SIZE],
                 "the back-end faulted on both missing data pages, and only there")
        with open(image, "rb") as f:
            f.seek(8 * 512)
            check(f.read(2 * PAGE_SIZE) == source[write_buf] + source[write_buf + PAGE_SIZE],
                  "the disk holds exactly the pages served from the source")

        status = blk_request(vq, mem, blk.VIRTIO_BLK_T_IN, 100, read_buf, PAGE_SIZE)
        vq.wait_used(1, 10.0)
        check_eq(mem.read(status, 1), b"\x00", "read completed OK")
        check_eq(server.faults[2:], [read_buf], "the read faulted on its missing buffer page")
        check(mem.read(read_buf, PAGE_SIZE) == disk[100 * 512:100 * 512 + PAGE_SIZE],
              "the guest sees the disk's bytes in the page served")
        check_eq(server.errors, [], "no fault-serving errors")

    check_eq(c.call("vm.postcopy.end", {"vm": "vm0"}), {}, "vm.postcopy.end")
    e = expect_error(RpcError, c.call, "vm.postcopy.end", {"vm": "vm0"}, what="end twice")
    check_eq(e.code, WRONG_STATE, "end twice: wrong state")
    vmm.add_region(mem.regions[1])
    check_eq(len(vmm.memory_list()), 2, "memory changes work again after postcopy")
    status = blk_request(vq, mem, blk.VIRTIO_BLK_T_IN, 0, read_buf, 512)
    vq.wait_used(1, 10.0)
    check(mem.read(read_buf, 512) == disk[:512], "I/O after postcopy works")

    # A second round, asking for no regions: the contract's {}.
    vmm.stop_device("blk0")
    res, fds = c.call_fds("vm.postcopy.advise", {"vm": "vm0"})
    for fd in fds:
        os.close(fd)
    check_eq(len(res["devices"]), 1, "second round: advise")
    check_eq(c.call("vm.postcopy.listen", {"vm": "vm0"}), {}, "listen without backend_regions: exactly {}")
    check_eq(c.call("vm.postcopy.end", {"vm": "vm0"}), {}, "second round: end")

    # A back-end without PAGEFAULT.
    fs_sock = daemon.backend_socket("fs0.sock")
    shared = os.path.join(d, "shared")
    os.mkdir(shared)
    t.enter(VirtiofsdBackend(fs_sock, shared, log_dir=d))
    fs = vmm.add_device("fs0", fs_sock, type="fs")
    check_eq(fs["protocol_features"] & PF_PAGEFAULT, 0, "virtiofsd 7.2 has no PAGEFAULT")
    e = expect_error(RpcError, c.call, "vm.postcopy.advise", {"vm": "vm0"}, what="advise with virtiofsd")
    check_eq(e.code, NOT_SUPPORTED, "a device without PAGEFAULT: not supported")
    check_eq(e.data.get("detail", "").startswith("device fs0"), True, "the error names the device")

    vmm.remove_device("fs0")
    vmm.remove_device("blk0")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)
    daemon.stop()


if __name__ == "__main__":
    run(main)

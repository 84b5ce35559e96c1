"""Shared pieces of the memory fan-out tests (test_memory_*.py); not a test.

The memory tests prove that a back-end really mapped (or really dropped) a
region by doing I/O with buffers in that region: a blk write whose data
lands in the image file, a read whose data lands in the region, a frame
looped back by testpmd through RX/TX buffers there.  The test back-end's
own report (`regions`) is the second witness where a real back-end cannot
say what it has mapped.

    mem = GuestMemory(32 << 20)              # region 0 at gpa 0
    r1 = hot_region(mem, 1 << 30, 16 << 20)  # a second memfd at a higher gpa
    vmm.add_region(r1)
    q1 = BlkQueue(RegionAlloc(mem, r1), vq=q0.vq, max_io=8192)  # buffers in r1
    blk_roundtrip(q1, sector=64, nsect=4, salt=1, image=img)
"""

import struct
import time

from vhubtest import blk, net
from vhubtest.backends import QSD, Backend, require_binary
from vhubtest.client import RpcError, u64
from vhubtest.testing import TestFailure, check_eq
from vhubtest.virtq import Virtqueue

NET_BUF = 2048


class QsdFileExports(Backend):
    """One qemu-storage-daemon process serving a file-backed (raw) export
    per (image, socket): real data, so reads and writes can be checked."""
    name = "qsd-files"

    def __init__(self, images, sockets, num_queues=1, log_dir=None):
        require_binary(QSD, "qemu-storage-daemon")
        super().__init__(sockets, log_dir)
        self.images = list(images)
        self.num_queues = num_queues

    def argv(self):
        argv = [QSD]
        for i, (img, s) in enumerate(zip(self.images, self.sockets)):
            argv += ["--blockdev", "driver=file,node-name=f%d,filename=%s" % (i, img),
                     "--blockdev", "driver=raw,node-name=d%d,file=f%d" % (i, i),
                     "--export", "type=vhost-user-blk,id=e%d,node-name=d%d,addr.type=unix,"
                                 "addr.path=%s,writable=on,num-queues=%d"
                                 % (i, i, s, self.num_queues)]
        return argv


class RegionAlloc:
    """A GuestMemory view whose alloc() hands out ranges of one region only
    (everything else goes to the real GuestMemory)."""

    def __init__(self, mem, region):
        self._mem = mem
        self._region = region

    def alloc(self, size, align=16):
        return alloc_in(self._mem, self._region, size, align)

    def __getattr__(self, name):
        return getattr(self._mem, name)


def alloc_in(mem, region, size, align=16):
    """The gpa of `size` fresh bytes inside `region` (GuestMemory's bump
    allocator, pinned to one region)."""
    i = mem.regions.index(region)
    start = (region.gpa + mem._cursor[i] + align - 1) & ~(align - 1)
    if start + size > region.gpa + region.size:
        raise MemoryError("region %r exhausted allocating %d bytes" % (region, size))
    mem._cursor[i] = start + size - region.gpa
    return start


def hot_region(mem, gpa, size, name="vhubtest-hot"):
    """A new memfd region in the harness's guest memory (not yet in the VM)."""
    r = mem.add_region(gpa, size)
    return r


def drop_region(mem, region):
    """Forget a region the VM no longer has, and unmap it here."""
    i = mem.regions.index(region)
    del mem.regions[i]
    del mem._cursor[i]
    region.close()


def region_key(r):
    """(gpa, size, uaddr, offset) of a Region, a vm.memory.list entry or a
    test back-end region report."""
    if isinstance(r, dict):
        off = r.get("offset", r.get("mmap_offset"))
        return (u64(r["gpa"]), u64(r["size"]), u64(r["uaddr"]), u64(off))
    return (r.gpa, r.size, r.uaddr, r.offset)


def table(regions):
    return sorted(region_key(r) for r in regions)


def vm_table(vmm):
    return table(vmm.memory_list())


def check_vm_table(vmm, regions, what):
    check_eq(vm_table(vmm), table(regions), "vm.memory.list %s" % what)


def check_tb_tables(vmm, tb, socks, what):
    """Every listed test back-end socket holds exactly vm.memory.list."""
    want = vm_table(vmm)
    for s in socks:
        check_eq(table(tb.regions(s)), want,
                 "test back-end socket %d's mapped regions == vm.memory.list %s" % (s, what))


# ---- blk I/O with buffers where we want them ----

def read_image(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def blk_roundtrip(q, sector, nsect, salt, image=None, timeout=5.0):
    """Write a pattern (from q's buffers), read it back (into q's buffers):
    both directions must move the data; the image file must hold it."""
    data = blk.pattern(sector, nsect * blk.SECTOR_SIZE, salt=salt)
    q.write_sectors(sector, data, timeout=timeout)
    got = q.read_sectors(sector, nsect, timeout=timeout)
    if got != data:
        raise TestFailure("FAILED: blk queue %d: read back differs at sector %d" % (q.index, sector))
    if image is not None and read_image(image, sector * blk.SECTOR_SIZE, len(data)) != data:
        raise TestFailure("FAILED: image %s does not hold the data written at sector %d"
                          % (image, sector))
    return data


def blk_buffers_in(q, region):
    """Every data/header/status slot of BlkQueue q lies inside region."""
    return all(region.contains(h, 16) and region.contains(d, q.max_io) and region.contains(s, 1)
               for h, d, s in q._slots)


def blk_probe_unmapped(q, sector, wait=1.0):
    """Submit one read whose data buffer lies in a range the back-end must
    not have mapped; returns the request (done or not after `wait`)."""
    req = q.submit(blk.VIRTIO_BLK_T_IN, sector, length=4096)
    q.kick()
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not req.done:
        q.reap()
        time.sleep(0.01)
    return req


# ---- net I/O with buffers where we want them ----

def net_exchange(mem, rx, tx, rx_gpas, tx_gpas, tag, timeout=5.0, size_of=None):
    """Loop len(tx_gpas) frames through the back-end: exactly that many RX
    buffers (at rx_gpas) are posted and all are used, so no descriptor
    into these buffers is left available afterwards.  Every frame must come
    back byte for byte; returns the number of frames."""
    n = len(tx_gpas)
    if len(rx_gpas) != n:
        raise ValueError("as many RX buffers as frames")
    size_of = size_of or (lambda i: 60 + (i * 211) % 1400)
    for g in rx_gpas:
        mem.fill(g, NET_BUF, 0x5A)
        rx.add([(g, NET_BUF, True)], token=g, publish=False)
    rx.publish()
    rx.kick()
    frames = [net.build_frame(i, size_of(i), tag=tag) for i in range(n)]
    for g, f in zip(tx_gpas, frames):
        mem.write(g, bytes(net.VIRTIO_NET_HDR_SIZE) + f)
        tx.add([(g, net.VIRTIO_NET_HDR_SIZE + len(f), False)], token=g, publish=False)
    tx.publish()
    tx.kick()
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        for _, g, length in rx.reap():
            got.append(mem.read(g, length)[net.VIRTIO_NET_HDR_SIZE:])
        if len(got) >= n:
            break
        if time.monotonic() > deadline:
            raise TestFailure("FAILED: net: %d of %d frames came back in %.1fs (rx %r, tx %r)"
                              % (len(got), n, timeout, rx, tx))
        rx.wait_for_used(0.02)
    tdead = time.monotonic() + timeout
    while tx.outstanding and time.monotonic() < tdead:
        tx.reap()
        time.sleep(0.001)
    if tx.outstanding:
        raise TestFailure("FAILED: net: %d TX chains never used" % tx.outstanding)
    ids = sorted(net.parse_frame(g) or (None, None) for g in got)
    if ids != [(tag, i) for i in range(n)]:
        raise TestFailure("FAILED: net: frames back %r" % ids[:8])
    for g in got:
        _, seq = net.parse_frame(g)
        if g != frames[seq]:
            raise TestFailure("FAILED: net: frame %d differs" % seq)
    return n


def net_queues(mem, size=256):
    """receiveq 0 and transmitq 1 (rings wherever mem allocates)."""
    return Virtqueue(mem, size=size, index=0), Virtqueue(mem, size=size, index=1)


def net_bufs(mem_or_view, n):
    return [mem_or_view.alloc(NET_BUF, 64) for _ in range(n)]


# ---- errors ----

def expect_rpc_error(fn, code, what, *args, **kw):
    """fn(*args) must fail with `code`; returns the RpcError."""
    try:
        fn(*args, **kw)
    except RpcError as e:
        check_eq(e.code, code, "%s: error code (%s)" % (what, (e.data or {}).get("detail")))
        return e
    raise TestFailure("FAILED: %s succeeded; expected error %d" % (what, code))


def detail(e):
    return (e.data or {}).get("detail", "")


def daemon_log_count(daemon, needle):
    try:
        with open(daemon.log_path, "r", errors="replace") as f:
            return f.read().count(needle)
    except FileNotFoundError:
        return 0


def sent_count(daemon, device, request):
    """How often vhubd logged sending `request` to `device` (debug log)."""
    n = 0
    with open(daemon.log_path, "r", errors="replace") as f:
        for line in f:
            if "sent %s" % request in line and "device=%s" % device in line.split():
                n += 1
    return n


def u32(b, off=0):
    return struct.unpack_from("<I", b, off)[0]


def elapsed_ms(t0):
    return (time.monotonic() - t0) * 1000.0


"""Guest memory for the harness: memfd-backed regions shared with back-ends.

A region is one memfd (MFD_CLOEXEC), ftruncate'd and mmap'd MAP_SHARED here;
the same fd is what a VMM hands to vhubd (vm.memory.add) or what direct.py
sends to a back-end (ADD_MEM_REG / SET_MEM_TABLE).  `uaddr` is the address
this process really maps the region at, as a VMM's would be.

Ring indices are read and written with single aligned 16/32-bit accesses
(ctypes at the mapping's address) so a back-end never sees a torn index;
bulk data goes through the mmap object.  On x86 (TSO) program order of
stores is the order other CPUs see them, which is what the split ring's
"write the entry, then the index" rule needs.
"""

import ctypes
import mmap
import os
import struct

PAGE_SIZE = mmap.PAGESIZE


def memfd(size, name="vhubtest"):
    """A memfd (MFD_CLOEXEC) of size zero bytes; the caller owns it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def align_up(value, align):
    if align <= 0 or align & (align - 1):
        raise ValueError("alignment must be a power of two: %r" % align)
    return (value + align - 1) & ~(align - 1)


def pack_u16(v):
    return struct.pack("<H", v)


def pack_u32(v):
    return struct.pack("<I", v)


def pack_u64(v):
    return struct.pack("<Q", v)


def unpack_u16(b, off=0):
    return struct.unpack_from("<H", b, off)[0]


def unpack_u32(b, off=0):
    return struct.unpack_from("<I", b, off)[0]


def unpack_u64(b, off=0):
    return struct.unpack_from("<Q", b, off)[0]


class GuestMemoryError(Exception):
    """An access outside guest memory (a harness bug, never a back-end's)."""


class Region:
    """One guest RAM region: [gpa, gpa+size) backed by fd at `offset`."""

    def __init__(self, gpa, size, name="vhubtest-ram", offset=0):
        if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE or offset % PAGE_SIZE:
            raise ValueError("region gpa/size/offset must be page aligned")
        self.gpa = gpa
        self.size = size
        self.offset = offset
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, offset + size)
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=offset)
        except BaseException:
            os.close(self.fd)
            raise
        # The real address of the mapping: a VMM's "user address".
        anchor = ctypes.c_char.from_buffer(self.mm)
        self.uaddr = ctypes.addressof(anchor)
        del anchor  # drop the buffer export so mm.close() works later
        self.closed = False

    def contains(self, gpa, length=1):
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.mm.close()
        os.close(self.fd)

    def __repr__(self):
        return "Region(gpa=%#x, size=%#x, offset=%#x, uaddr=%#x, fd=%d)" % (
            self.gpa, self.size, self.offset, self.uaddr, self.fd)


class GuestMemory:
    """A set of regions plus a bump allocator of guest-physical ranges.

    GuestMemory(size) makes one region at gpa 0 (or `base`); add_region()
    adds more.  alloc(size, align) hands out ranges from the regions in
    order; free is all-at-once (the harness's rings live as long as a test).
    """

    def __init__(self, size=None, base=0, name="vhubtest-ram"):
        self.regions = []
        self._cursor = []  # next free offset per region
        self._name = name
        if size is not None:
            self.add_region(base, size)

    def add_region(self, gpa, size, offset=0):
        size = align_up(size, PAGE_SIZE)
        for r in self.regions:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise ValueError("region %#x+%#x overlaps %r" % (gpa, size, r))
        r = Region(gpa, size, self._name, offset)
        self.regions.append(r)
        self._cursor.append(0)
        return r

    def region_of(self, gpa, length=1):
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise GuestMemoryError("gpa range %#x+%#x is not in guest memory" % (gpa, length))

    def alloc(self, size, align=16):
        """Return the gpa of `size` fresh bytes aligned to `align`."""
        for i, r in enumerate(self.regions):
            start = align_up(r.gpa + self._cursor[i], align)
            if start + size <= r.gpa + r.size:
                self._cursor[i] = start + size - r.gpa
                return start
        raise GuestMemoryError("guest memory exhausted allocating %d bytes" % size)

    def gpa_to_uaddr(self, gpa):
        r = self.region_of(gpa)
        return r.uaddr + (gpa - r.gpa)

    # ---- bulk access ----
    def read(self, gpa, length):
        r = self.region_of(gpa, length)
        off = gpa - r.gpa
        return bytes(r.mm[off:off + length])

    def write(self, gpa, data):
        data = bytes(data)
        r = self.region_of(gpa, len(data))
        off = gpa - r.gpa
        r.mm[off:off + len(data)] = data

    def fill(self, gpa, length, byte=0):
        self.write(gpa, bytes([byte]) * length)

    # ---- single aligned accesses (ring indices, used elements) ----
    def _ptr(self, gpa, ctype):
        size = ctypes.sizeof(ctype)
        if gpa % size:
            raise GuestMemoryError("unaligned %d-byte access at %#x" % (size, gpa))
        r = self.region_of(gpa, size)
        if r.closed:
            raise GuestMemoryError("access to a closed region")
        return ctype.from_address(r.uaddr + (gpa - r.gpa))

    def read_u16(self, gpa):
        return self._ptr(gpa, ctypes.c_uint16).value

    def write_u16(self, gpa, v):
        self._ptr(gpa, ctypes.c_uint16).value = v & 0xFFFF

    def read_u32(self, gpa):
        return self._ptr(gpa, ctypes.c_uint32).value

    def write_u32(self, gpa, v):
        self._ptr(gpa, ctypes.c_uint32).value = v & 0xFFFFFFFF

    def read_u64(self, gpa):
        return self._ptr(gpa, ctypes.c_uint64).value

    def write_u64(self, gpa, v):
        self._ptr(gpa, ctypes.c_uint64).value = v & 0xFFFFFFFFFFFFFFFF

    def close(self):
        for r in self.regions:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

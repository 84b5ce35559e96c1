"""virtio-fs driver: FUSE requests over virtqueues (virtio 1.x "File System Device").

Queue 0 is hiprio (FORGET only), queue 1 the first request queue.  A request
is a chain: the in-part {fuse_in_header (40 bytes), op args} device-readable,
then the out-part {fuse_out_header (16 bytes), reply} device-writable.
Structures are FUSE kernel protocol 7.36 (include/uapi/linux/fuse.h).
"""

import os
import stat
import struct

from .virtq import Virtqueue

FUSE_LOOKUP = 1
FUSE_FORGET = 2
FUSE_GETATTR = 3
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_RELEASE = 18
FUSE_INIT = 26
FUSE_OPENDIR = 27
FUSE_DESTROY = 38

FUSE_ROOT_ID = 1
FUSE_KERNEL_VERSION = 7
FUSE_KERNEL_MINOR_VERSION = 36

IN_HEADER = struct.Struct("<IIQQIIIHH")      # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")    # fuse_attr, 88 bytes
ATTR_FIELDS = ("ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec",
               "ctimensec", "mode", "nlink", "uid", "gid", "rdev", "blksize", "flags")

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88


class FuseError(Exception):
    def __init__(self, opcode, err):
        self.opcode = opcode
        self.errno = -err
        super().__init__("FUSE opcode %d failed: %s" % (opcode, os.strerror(-err)))


def parse_attr(data, off=0):
    return dict(zip(ATTR_FIELDS, ATTR.unpack_from(data, off)))


class FuseReply:
    def __init__(self, opcode, unique, error, body, used_len):
        self.opcode = opcode
        self.unique = unique
        self.error = error
        self.body = body
        self.used_len = used_len


class FsDevice:
    """The hiprio queue and one request queue of a virtio-fs device."""

    def __init__(self, mem, size=64, max_reply=1 << 17, request_queues=1):
        self.mem = mem
        self.hiprio = Virtqueue(mem, size=size, index=0)
        self.requests = [Virtqueue(mem, size=size, index=1 + i) for i in range(request_queues)]
        self.max_reply = max_reply
        self._in = mem.alloc(4096 + 256, 64)
        self._out = mem.alloc(max_reply, 64)
        self._unique = 0
        self.init_reply = None

    @property
    def vqs(self):
        return [self.hiprio] + self.requests

    def call(self, opcode, nodeid=0, args=b"", reply_size=4096, queue=0, timeout=5.0):
        """Send one request on request queue `queue` and wait for its reply."""
        vq = self.requests[queue]
        self._unique += 2   # the low bit of unique marks interrupts: keep it 0
        unique = self._unique
        reply_size = min(reply_size + OUT_HEADER.size, self.max_reply)
        hdr = IN_HEADER.pack(IN_HEADER.size + len(args), opcode, unique, nodeid,
                             0, 0, os.getpid(), 0, 0)
        self.mem.write(self._in, hdr + args)
        self.mem.fill(self._out, OUT_HEADER.size, 0xEE)  # the device must overwrite this
        vq.add([(self._in, len(hdr) + len(args), False), (self._out, reply_size, True)],
               token=unique)
        vq.kick()
        (head, token, used_len), = vq.wait_used(1, timeout)
        if token != unique:
            raise RuntimeError("reply for unique %r, want %d" % (token, unique))
        out = self.mem.read(self._out, max(used_len, OUT_HEADER.size))
        olen, err, ounique = OUT_HEADER.unpack_from(out)
        if ounique != unique:
            raise RuntimeError("FUSE reply unique %d, want %d" % (ounique, unique))
        if olen != used_len:
            raise RuntimeError("FUSE reply len %d but used len %d" % (olen, used_len))
        return FuseReply(opcode, unique, err, out[OUT_HEADER.size:olen], used_len)

    def _ok(self, reply):
        if reply.error:
            raise FuseError(reply.opcode, reply.error)
        return reply.body

    def init(self, max_readahead=1 << 17, flags=0, flags2=0):
        """FUSE_INIT 7.36: returns (major, minor, max_write)."""
        args = struct.pack("<IIIII", FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION,
                           max_readahead, flags, flags2) + bytes(44)   # unused[11]
        assert len(args) == 64
        body = self._ok(self.call(FUSE_INIT, 0, args, reply_size=64))
        if len(body) < 24:
            raise RuntimeError("FUSE_INIT reply of %d bytes" % len(body))
        major, minor, readahead, rflags, max_bg, congestion, max_write = \
            struct.unpack_from("<IIIIHHI", body)
        self.init_reply = {"major": major, "minor": minor, "max_readahead": readahead,
                           "flags": rflags, "max_write": max_write, "len": len(body)}
        return self.init_reply

    def getattr(self, nodeid=FUSE_ROOT_ID):
        body = self._ok(self.call(FUSE_GETATTR, nodeid, struct.pack("<IIQ", 0, 0, 0),
                                  reply_size=104))
        if len(body) < 104:
            raise RuntimeError("GETATTR reply of %d bytes" % len(body))
        attr_valid, attr_valid_nsec, _ = struct.unpack_from("<QII", body)
        return parse_attr(body, 16)

    def lookup(self, name, parent=FUSE_ROOT_ID):
        """(nodeid, attr) of `name` in directory `parent`."""
        body = self._ok(self.call(FUSE_LOOKUP, parent, name.encode() + b"\0", reply_size=128))
        if len(body) < 128:
            raise RuntimeError("LOOKUP reply of %d bytes" % len(body))
        nodeid, generation = struct.unpack_from("<QQ", body)
        return nodeid, parse_attr(body, 40)

    def open(self, nodeid, flags=os.O_RDONLY):
        body = self._ok(self.call(FUSE_OPEN, nodeid, struct.pack("<II", flags, 0), reply_size=16))
        fh, open_flags = struct.unpack_from("<QI", body)
        return fh

    def read(self, nodeid, fh, offset, size):
        args = struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)
        assert len(args) == 40
        return self._ok(self.call(FUSE_READ, nodeid, args, reply_size=size))

    def release(self, nodeid, fh):
        self._ok(self.call(FUSE_RELEASE, nodeid, struct.pack("<QIIQ", fh, 0, 0, 0), reply_size=0))

    def forget(self, nodeid, nlookup=1, timeout=5.0):
        """FORGET on the hiprio queue: no reply, but the chain is used."""
        self.mem.write(self._in + 4096, IN_HEADER.pack(IN_HEADER.size + 8, FUSE_FORGET, 0,
                                                       nodeid, 0, 0, 0, 0, 0)
                       + struct.pack("<Q", nlookup))
        self.hiprio.add([(self._in + 4096, IN_HEADER.size + 8, False)])
        self.hiprio.kick()
        return self.hiprio.wait_used(1, timeout)

    def read_file(self, name, size):
        """LOOKUP + OPEN + READ + RELEASE of a file in the root directory."""
        nodeid, attr = self.lookup(name)
        fh = self.open(nodeid)
        try:
            data = b""
            while len(data) < attr["size"] and len(data) < size:
                chunk = self.read(nodeid, fh, len(data), min(65536, size - len(data)))
                if not chunk:
                    break
                data += chunk
        finally:
            self.release(nodeid, fh)
        return nodeid, attr, data


def make_share(d, size=100000):
    """A directory d/share holding data.bin of size random bytes: (its
    path, the bytes)."""
    share = os.path.join(d, "share")
    os.mkdir(share)
    content = os.urandom(size)
    with open(os.path.join(share, "data.bin"), "wb") as f:
        f.write(content)
    return share, content


def is_dir(attr):
    return stat.S_ISDIR(attr["mode"])


def is_reg(attr):
    return stat.S_ISREG(attr["mode"])


__all__ = ["FsDevice", "FuseError", "is_dir", "is_reg", "errno"]

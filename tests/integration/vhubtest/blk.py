"""virtio-blk driver over Virtqueues (virtio 1.x "Block Device").

A request is a chain: header {u32 type, u32 reserved, u64 sector}
(device-readable), data buffers (readable for OUT, writable for IN/GET_ID),
one status byte (device-writable; 0 = OK, 1 = IOERR, 2 = UNSUPP).
"""

import struct

from .virtq import Virtqueue, VirtqError

SECTOR_SIZE = 512

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_ID_BYTES = 20


class BlkError(Exception):
    pass


def parse_config(data):
    """The fields of struct virtio_blk_config the harness uses."""
    cfg = {"capacity": struct.unpack_from("<Q", data, 0)[0]}
    if len(data) >= 16:
        cfg["size_max"], cfg["seg_max"] = struct.unpack_from("<II", data, 8)
    if len(data) >= 24:
        cfg["blk_size"] = struct.unpack_from("<I", data, 20)[0]
    if len(data) >= 36:
        cfg["num_queues"] = struct.unpack_from("<H", data, 34)[0]
    return cfg


class BlkRequest:
    """One in-flight request; `data` is filled in for reads when it completes."""

    def __init__(self, vq, rtype, sector, length):
        self.vq = vq
        self.type = rtype
        self.sector = sector
        self.length = length
        self.hdr_gpa = None
        self.data_gpa = None
        self.status_gpa = None
        self.head = None
        self.done = False
        self.status = None
        self.used_len = None
        self.data = None

    def __repr__(self):
        return "BlkRequest(q=%d, type=%d, sector=%d, len=%d, status=%r)" % (
            self.vq.index, self.type, self.sector, self.length, self.status)


class BlkQueue:
    """A virtio-blk request queue: a Virtqueue plus preallocated buffer slots.

    Each descriptor-chain slot owns a header, a data area of max_io bytes and
    a status byte in guest memory, so up to size/3 requests can be in flight.
    """

    def __init__(self, mem, index=0, size=128, max_io=65536, base=0, vq=None):
        self.mem = mem
        self.vq = vq or Virtqueue(mem, size=size, index=index, base=base)
        self.index = self.vq.index
        self.max_io = max_io
        nslots = self.vq.size // 3
        self._slots = []
        for _ in range(nslots):
            hdr = mem.alloc(16, 16)
            status = mem.alloc(1, 1)
            data = mem.alloc(max_io, 512)
            self._slots.append((hdr, data, status))
        self._free_slots = list(range(nslots))
        self._slot_of = {}   # head -> slot number

    @property
    def capacity(self):
        return len(self._free_slots)

    def submit(self, rtype, sector, data=None, length=None, publish=True):
        """Queue one request; data for OUT, length for IN/GET_ID."""
        if not self._free_slots:
            raise BlkError("queue %d: no free request slot" % self.index)
        if rtype == VIRTIO_BLK_T_OUT:
            length = len(data)
        elif rtype == VIRTIO_BLK_T_GET_ID:
            length = VIRTIO_BLK_ID_BYTES if length is None else length
        elif rtype == VIRTIO_BLK_T_FLUSH:
            length = 0
        if length > self.max_io:
            raise BlkError("request of %d bytes > max_io %d" % (length, self.max_io))
        slot = self._free_slots.pop(0)
        hdr, dgpa, sgpa = self._slots[slot]
        req = BlkRequest(self.vq, rtype, sector, length)
        req.hdr_gpa, req.data_gpa, req.status_gpa = hdr, dgpa, sgpa
        self.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.mem.write(sgpa, b"\xff")   # a status the device must overwrite
        chain = [(hdr, 16, False)]
        if rtype == VIRTIO_BLK_T_OUT:
            self.mem.write(dgpa, data)
            chain.append((dgpa, length, False))
        elif length:
            self.mem.fill(dgpa, length, 0xA5)  # poison: a read must overwrite it
            chain.append((dgpa, length, True))
        chain.append((sgpa, 1, True))
        try:
            req.head = self.vq.add(chain, token=req, publish=publish)
        except BaseException:
            self._free_slots.insert(0, slot)
            raise
        self._slot_of[req.head] = slot
        return req

    def _complete(self, entries):
        out = []
        for head, req, used_len in entries:
            slot = self._slot_of.pop(head)
            req.status = self.mem.read(req.status_gpa, 1)[0]
            req.used_len = used_len
            if req.type in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_GET_ID) and req.length:
                req.data = self.mem.read(req.data_gpa, req.length)
            req.done = True
            self._free_slots.append(slot)
            out.append(req)
        return out

    def reap(self):
        return self._complete(self.vq.reap())

    def wait(self, count=1, timeout=5.0):
        return self._complete(self.vq.wait_used(count, timeout))

    def kick(self):
        self.vq.kick()

    # ---- synchronous helpers ----
    def _one(self, rtype, sector, data=None, length=None, timeout=5.0):
        req = self.submit(rtype, sector, data=data, length=length)
        self.kick()
        done = self.wait(1, timeout)
        if done[0] is not req:
            raise BlkError("unexpected completion %r" % done[0])
        if req.status != VIRTIO_BLK_S_OK:
            raise BlkError("%r failed with status %d" % (req, req.status))
        return req

    def read_sectors(self, sector, count, timeout=5.0):
        return self._one(VIRTIO_BLK_T_IN, sector, length=count * SECTOR_SIZE,
                         timeout=timeout).data

    def write_sectors(self, sector, data, timeout=5.0):
        if len(data) % SECTOR_SIZE:
            raise ValueError("write of %d bytes is not whole sectors" % len(data))
        self._one(VIRTIO_BLK_T_OUT, sector, data=data, timeout=timeout)

    def flush(self, timeout=5.0):
        self._one(VIRTIO_BLK_T_FLUSH, 0, timeout=timeout)

    def get_id(self, timeout=5.0):
        return self._one(VIRTIO_BLK_T_GET_ID, 0, timeout=timeout).data.split(b"\0", 1)[0]


def pattern(sector, length, salt=0):
    """Recognizable data: every 8 bytes carry (salt, sector, byte offset)."""
    out = bytearray()
    off = 0
    while len(out) < length:
        out += struct.pack("<HHI", salt & 0xFFFF, (sector + off // SECTOR_SIZE) & 0xFFFF, off)
        off += 8
    return bytes(out[:length])


def run_random_io(queues, image_size, image_reader, nreq=200, seed=1, max_sectors=16,
                  timeout=10.0, log=print):
    """Concurrent writes then reads on every queue, checked against the image.

    Phase 1 keeps every queue full of OUT requests to distinct, non-overlapping
    extents (so ordering between queues cannot matter), then flushes; phase 2
    reads every extent back through the rings, and both the ring data and the
    image file (image_reader(offset, length)) must match what was written.
    Returns {queue index: number of requests submitted on it}.
    """
    import random
    rnd = random.Random(seed)
    total_sectors = image_size // SECTOR_SIZE
    # Distinct extents: split the disk into nreq stripes, one write in each.
    stripe = total_sectors // nreq
    if stripe < 1:
        raise ValueError("image too small for %d requests" % nreq)
    extents = []
    for i in range(nreq):
        n = rnd.randint(1, min(max_sectors, stripe))
        start = i * stripe + rnd.randint(0, stripe - n)
        extents.append((start, n))
    rnd.shuffle(extents)
    submitted = {q.index: 0 for q in queues}
    written = {}

    def pump(work, make):
        """Keep all queues busy until `work` is done; returns completed requests."""
        pending = list(work)
        inflight = {q.index: 0 for q in queues}
        done = []
        qi = 0
        while pending or any(inflight.values()):
            progressed = False
            for q in queues:
                n = 0
                while pending and q.capacity:
                    make(q, pending.pop())
                    inflight[q.index] += 1
                    submitted[q.index] += 1
                    n += 1
                if n:
                    q.kick()
                    progressed = True
            for q in queues:
                got = q.reap()
                inflight[q.index] -= len(got)
                done.extend(got)
                progressed = progressed or bool(got)
            if not progressed:
                # Nothing new: wait a little on any queue with work in flight.
                busy = [q for q in queues if inflight[q.index]]
                q = busy[qi % len(busy)]
                qi += 1
                try:
                    got = q.wait(1, timeout)
                except VirtqError as e:
                    raise BlkError("I/O stalled: %s; inflight %r" % (e, inflight)) from e
                inflight[q.index] -= len(got)
                done.extend(got)
        return done

    def make_write(q, ext):
        start, n = ext
        data = pattern(start, n * SECTOR_SIZE, salt=seed)
        written[start] = data
        q.submit(VIRTIO_BLK_T_OUT, start, data=data, publish=True)

    done = pump(extents, make_write)
    bad = [r for r in done if r.status != VIRTIO_BLK_S_OK]
    if bad:
        raise BlkError("%d writes failed, first %r" % (len(bad), bad[0]))
    log("ok: %d concurrent writes completed on queues %s" % (len(done), sorted(submitted)))

    for q in queues:
        q._one(VIRTIO_BLK_T_FLUSH, 0, timeout=timeout)
        submitted[q.index] += 1

    def make_read(q, ext):
        start, n = ext
        q.submit(VIRTIO_BLK_T_IN, start, length=n * SECTOR_SIZE)

    done = pump(extents, make_read)
    mismatches = 0
    for r in done:
        if r.status != VIRTIO_BLK_S_OK:
            raise BlkError("read failed: %r" % r)
        want = written[r.sector]
        if r.data != want:
            mismatches += 1
        elif image_reader is not None and image_reader(r.sector * SECTOR_SIZE, len(want)) != want:
            raise BlkError("image file differs from written data at sector %d" % r.sector)
    if mismatches:
        raise BlkError("%d of %d reads returned wrong data" % (mismatches, len(done)))
    log("ok: %d concurrent reads match the written data and the image file byte for byte"
        % len(done))
    return submitted

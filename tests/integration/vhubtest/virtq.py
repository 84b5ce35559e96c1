"""A split-virtqueue driver (virtio 1.x "Split Virtqueues") in guest memory.

Layout (each part allocated with the spec's alignment):
  descriptor table  16 * N bytes, align 16: {u64 addr, u32 len, u16 flags, u16 next}
  available ring    6 + 2 * N,   align 2:  {u16 flags, u16 idx, u16 ring[N], u16 used_event}
  used ring         6 + 8 * N,   align 4:  {u16 flags, u16 idx, {u32 id, u32 len}[N], u16 avail_event}

Completion is judged only by the used index in guest memory.  The call
eventfd is a hint for waiting (qemu-storage-daemon signals it once when the
call fd is set, which completes nothing).  EVENT_IDX and INDIRECT_DESC are not
negotiated by the harness, so used_event/avail_event are left alone.
"""

import errno
import os
import select
import time

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2

DESC_SIZE = 16


class VirtqError(Exception):
    pass


class VirtqTimeout(VirtqError):
    pass


def _u16(v):
    return v & 0xFFFF


class Virtqueue:
    """One split virtqueue.

    mem: GuestMemory; size: power of two; index: the queue's number;
    base: the next avail index the ring starts at (the device's last_avail_idx
    after SET_VRING_BASE); the used index is initialized to the same value.
    The kick and call eventfds are created here (EFD_CLOEXEC|EFD_NONBLOCK).
    """

    def __init__(self, mem, size=128, index=0, base=0, make_eventfds=True):
        if size <= 0 or size & (size - 1) or size > 32768:
            raise ValueError("queue size must be a power of two <= 32768")
        self.mem = mem
        self.size = size
        self.index = index
        self.desc = mem.alloc(DESC_SIZE * size, 16)
        self.avail = mem.alloc(6 + 2 * size, 2)
        self.used = mem.alloc(6 + 8 * size, 4)
        self.kick_fd = self.call_fd = None
        if make_eventfds:
            flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
            self.kick_fd = os.eventfd(0, flags)
            self.call_fd = os.eventfd(0, flags)
        self.kicks = 0
        self.reset(base)

    # ---- ring state ----
    def reset(self, base=0):
        """Zero the ring and start it at avail/used index `base`."""
        mem = self.mem
        mem.fill(self.desc, DESC_SIZE * self.size)
        mem.fill(self.avail, 6 + 2 * self.size)
        mem.fill(self.used, 6 + 8 * self.size)
        self.base = _u16(base)
        self._avail_idx = self.base       # our shadow of avail->idx
        self._last_used = self.base       # next used entry we will read
        mem.write_u16(self.avail + 2, self.base)
        mem.write_u16(self.used + 2, self.base)
        self._free = list(range(self.size))  # free descriptor indices
        self._chains = {}                 # head -> (descriptor list, token)
        self.submitted = 0                # chains made available since reset
        self.completed = 0

    @property
    def avail_idx(self):
        return self._avail_idx

    @property
    def used_idx(self):
        """The device's used->idx as it is in guest memory now."""
        return self.mem.read_u16(self.used + 2)

    @property
    def last_used(self):
        return self._last_used

    @property
    def outstanding(self):
        """Chains made available and not yet reaped."""
        return len(self._chains)

    @property
    def num_free(self):
        return len(self._free)

    def addresses(self):
        """(desc, avail, used) guest-physical addresses."""
        return self.desc, self.avail, self.used

    # ---- submission ----
    def add(self, bufs, token=None, publish=True):
        """Add one chain of (gpa, len, writable) buffers; return its head.

        Device-readable buffers must come before device-writable ones
        (virtio: "all device-writable descriptors after device-readable").
        """
        if not bufs:
            raise ValueError("empty chain")
        if len(bufs) > len(self._free):
            raise VirtqError("queue %d: %d descriptors needed, %d free"
                             % (self.index, len(bufs), len(self._free)))
        seen_writable = False
        for _, _, w in bufs:
            if seen_writable and not w:
                raise ValueError("readable buffer after a writable one")
            seen_writable = seen_writable or w
        ids = [self._free.pop(0) for _ in bufs]
        mem = self.mem
        for i, (gpa, length, writable) in enumerate(bufs):
            mem.region_of(gpa, max(length, 1))  # a buffer must lie in guest RAM
            flags = VIRTQ_DESC_F_WRITE if writable else 0
            nxt = 0
            if i + 1 < len(ids):
                flags |= VIRTQ_DESC_F_NEXT
                nxt = ids[i + 1]
            d = self.desc + DESC_SIZE * ids[i]
            mem.write_u64(d, gpa)
            mem.write_u32(d + 8, length)
            mem.write_u16(d + 12, flags)
            mem.write_u16(d + 14, nxt)
        head = ids[0]
        self._chains[head] = (ids, token)
        # The ring entry first, then (on publish) the index.
        slot = self._avail_idx % self.size
        mem.write_u16(self.avail + 4 + 2 * slot, head)
        self._avail_idx = _u16(self._avail_idx + 1)
        self.submitted += 1
        if publish:
            self.publish()
        return head

    def publish(self):
        """Make every added chain visible: store avail->idx."""
        self.mem.write_u16(self.avail + 2, self._avail_idx)

    def kick(self):
        os.eventfd_write(self.kick_fd, 1)
        self.kicks += 1

    # ---- completion ----
    def drain_call(self):
        """Consume a pending call signal; True if there was one."""
        if self.call_fd is None:
            return False
        try:
            os.eventfd_read(self.call_fd)
            return True
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return False
            raise

    def pending_used(self):
        return _u16(self.used_idx - self._last_used)

    def reap(self):
        """Collect every used entry now visible: [(head, token, len)]."""
        out = []
        used_idx = self.used_idx
        n = _u16(used_idx - self._last_used)
        if n > self.size:
            raise VirtqError("queue %d: device moved used idx by %d (size %d)"
                             % (self.index, n, self.size))
        for _ in range(n):
            slot = self._last_used % self.size
            elem = self.used + 4 + 8 * slot
            head = self.mem.read_u32(elem)
            length = self.mem.read_u32(elem + 4)
            chain = self._chains.pop(head, None)
            if chain is None:
                raise VirtqError("queue %d: device used id %d which is not outstanding"
                                 % (self.index, head))
            ids, token = chain
            self._free.extend(ids)
            self._last_used = _u16(self._last_used + 1)
            self.completed += 1
            out.append((head, token, length))
        return out

    def _nap(self, left):
        """Wait a few ms at most (never past `left` seconds): on the call
        eventfd, a hint, or asleep without one."""
        if self.call_fd is not None:
            r, _, _ = select.select([self.call_fd], [], [], min(left, 0.005))
            if r:
                self.drain_call()
        else:
            time.sleep(min(left, 0.001))

    def wait_for_used(self, timeout):
        """Wait (without reaping) until an unreaped used entry exists; bool."""
        deadline = time.monotonic() + timeout
        while True:
            if self.used_idx != self._last_used:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._nap(left)

    def wait_used(self, count=1, timeout=5.0):
        """Reap until `count` entries were collected; return them.

        Polls the used index; sleeps on the call eventfd (a hint) between
        polls, never longer than a few ms so a missed call cannot stall us.
        """
        got = []
        deadline = time.monotonic() + timeout
        while True:
            got.extend(self.reap())
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise VirtqTimeout(
                    "queue %d: %d of %d completions after %.1fs (avail %d, used %d, last_used %d)"
                    % (self.index, len(got), count, timeout, self._avail_idx,
                       self.used_idx, self._last_used))
            self._nap(left)

    def close(self):
        for fd in (self.kick_fd, self.call_fd):
            if fd is not None:
                os.close(fd)
        self.kick_fd = self.call_fd = None

    def vring_params(self, kick_index, call_index):
        """A device.start vring entry (fd indexes into the request's fds)."""
        return {"index": self.index, "size": self.size, "desc": self.desc,
                "avail": self.avail, "used": self.used, "base": self.base,
                "kick": kick_index, "call": call_index}

    def __repr__(self):
        return ("Virtqueue(index=%d, size=%d, desc=%#x, avail=%#x, used=%#x, "
                "avail_idx=%d, used_idx=%d, outstanding=%d)"
                % (self.index, self.size, self.desc, self.avail, self.used,
                   self._avail_idx, self.used_idx, self.outstanding))

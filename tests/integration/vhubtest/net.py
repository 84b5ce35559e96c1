"""virtio-net driver over Virtqueues (virtio 1.x "Network Device").

Queue 2k is receiveq k, 2k+1 transmitq k.  With VERSION_1 acked every
buffer starts with the 12-byte virtio_net_hdr {u8 flags, u8 gso_type,
u16 hdr_len, u16 gso_size, u16 csum_start, u16 csum_offset,
u16 num_buffers}; the harness sends an all-zero header (no offloads) and
strips the device's header from received frames.  Without MRG_RXBUF each
RX buffer must hold a whole frame plus header.
"""

import struct
import zlib

from .virtq import Virtqueue

VIRTIO_NET_HDR_SIZE = 12

VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

ETH_P_TEST = 0x88B5  # IEEE local experimental ethertype: nobody else's frames
MAGIC = b"VHUBTEST"


class NetError(Exception):
    pass


def mac_bytes(mac):
    if isinstance(mac, (bytes, bytearray)):
        return bytes(mac)
    return bytes(int(x, 16) for x in mac.split(":"))


def build_frame(seq, size=128, dst="02:00:00:00:00:02", src="02:00:00:00:00:01", tag=0):
    """An Ethernet frame whose payload names itself: magic, tag, seq, length, crc.

    Payload: b"VHUBTEST" u32 tag u32 seq u32 size, filler bytes, u32 crc32 of
    all preceding frame bytes.
    """
    if size < 14 + 8 + 12 + 4:
        raise ValueError("frame too small")
    head = mac_bytes(dst) + mac_bytes(src) + struct.pack(">H", ETH_P_TEST)
    head += MAGIC + struct.pack("<III", tag, seq, size)
    fill = bytes((seq + i) & 0xFF for i in range(size - len(head) - 4))
    body = head + fill
    return body + struct.pack("<I", zlib.crc32(body))


def parse_frame(frame):
    """(tag, seq) of a harness frame, or None if it is not one or is damaged."""
    if len(frame) < 42 or frame[12:14] != struct.pack(">H", ETH_P_TEST) or frame[14:22] != MAGIC:
        return None
    tag, seq, size = struct.unpack_from("<III", frame, 22)
    if size != len(frame):
        return None
    if struct.unpack_from("<I", frame, len(frame) - 4)[0] != zlib.crc32(frame[:-4]):
        return None
    return tag, seq


class NetQueuePair:
    """receiveq `2*pair` and transmitq `2*pair+1` with preallocated buffers."""

    def __init__(self, mem, pair=0, size=256, buf_size=2048, rx_base=0, tx_base=0):
        self.mem = mem
        self.pair = pair
        self.buf_size = buf_size
        self.rx = Virtqueue(mem, size=size, index=2 * pair, base=rx_base)
        self.tx = Virtqueue(mem, size=size, index=2 * pair + 1, base=tx_base)
        self._rx_bufs = [mem.alloc(buf_size, 64) for _ in range(size)]
        self._tx_bufs = [mem.alloc(buf_size, 64) for _ in range(size)]
        self._tx_free = list(range(size))
        self._rx_free = list(range(size))
        self.rx_posted = 0
        self.sent = 0
        self.received = 0

    @property
    def vqs(self):
        return [self.rx, self.tx]

    def post_rx(self, count=None):
        """Make (up to) `count` more device-writable RX buffers available."""
        n = 0
        while self._rx_free and (count is None or n < count):
            gpa = self._rx_bufs[self._rx_free.pop(0)]
            self.rx.add([(gpa, self.buf_size, True)], token=gpa, publish=False)
            n += 1
        if n:
            self.rx.publish()
            self.rx_posted += n
        return n

    def send(self, frames, kick=True):
        """Put frames on the TX ring (header + frame in one readable buffer)."""
        self._reap_tx()
        for frame in frames:
            if len(frame) + VIRTIO_NET_HDR_SIZE > self.buf_size:
                raise NetError("frame of %d bytes too big" % len(frame))
            if not self._tx_free:
                raise NetError("TX ring full")
            slot = self._tx_free.pop(0)
            gpa = self._tx_bufs[slot]
            self.mem.write(gpa, bytes(VIRTIO_NET_HDR_SIZE) + frame)
            self.tx.add([(gpa, VIRTIO_NET_HDR_SIZE + len(frame), False)], token=slot,
                        publish=False)
            self.sent += 1
        self.tx.publish()
        if kick:
            self.tx.kick()

    def _reap_tx(self):
        for _, slot, _ in self.tx.reap():
            self._tx_free.append(slot)

    def tx_completed(self):
        self._reap_tx()
        return self.tx.completed

    def recv(self):
        """Frames now in used RX entries (header stripped); reposts buffers."""
        frames = []
        for _, gpa, length in self.rx.reap():
            if length < VIRTIO_NET_HDR_SIZE or length > self.buf_size:
                raise NetError("RX used length %d out of range" % length)
            data = self.mem.read(gpa, length)
            self._rx_free.append(self._rx_bufs.index(gpa))
            frames.append(data[VIRTIO_NET_HDR_SIZE:])
            self.received += 1
        if frames:
            self.post_rx()
            self.rx.kick()
        return frames

    def recv_until(self, count, timeout=5.0):
        """Frames until `count` arrived; raises NetError on timeout."""
        import time
        deadline = time.monotonic() + timeout
        got = []
        while True:
            got.extend(self.recv())
            if len(got) >= count:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise NetError("pair %d: %d of %d frames received in %.1fs "
                               "(rx used %d avail %d, tx used %d avail %d)"
                               % (self.pair, len(got), count, timeout, self.rx.used_idx,
                                  self.rx.avail_idx, self.tx.used_idx, self.tx.avail_idx))
            self.rx.wait_for_used(min(left, 0.05))

"""A minimal synchronous vhost-user front-end in pure Python.

Written from QEMU's docs/interop/vhost-user.rst ("Message Specification",
"Front-end message types").  It lets the harness drive real back-ends
without vhubd (to validate the virtqueue/blk/net/fs drivers) and is the
"raw socket" baseline for benchmarks.

Message: header {u32 request, u32 flags, u32 size} + payload, native (LE)
byte order; flags: version 1 in the low 2 bits, REPLY 0x4, NEED_REPLY 0x8.
Fds travel as SCM_RIGHTS with the message.  Every send uses MSG_NOSIGNAL
(a killed back-end gives EPIPE, not SIGPIPE).
"""

import errno
import socket
import struct
import time

from .procs import unlink_if_exists

# ---- request numbers (spec: "Front-end message types") ----
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SEND_RARP = 19
NET_SET_MTU = 20
SET_BACKEND_REQ_FD = 21
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38
SET_STATUS = 39
GET_STATUS = 40

REQUEST_NAMES = {v: k for k, v in globals().items()
                 if k.isupper() and isinstance(v, int) and not k.startswith("_")}

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

HDR = struct.Struct("<III")

# ---- feature bits ----
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VHOST_F_LOG_ALL = 26
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

PF_MQ = 0
PF_LOG_SHMFD = 1
PF_RARP = 2
PF_REPLY_ACK = 3
PF_NET_MTU = 4
PF_BACKEND_REQ = 5
PF_CONFIG = 9
PF_BACKEND_SEND_FD = 10
PF_HOST_NOTIFIER = 11
PF_INFLIGHT_SHMFD = 12
PF_RESET_DEVICE = 13
PF_CONFIGURE_MEM_SLOTS = 15
PF_STATUS = 16

# What this front-end can honour: no back-end channel, no logging, no inflight.
SUPPORTED_PROTOCOL_FEATURES = ((1 << PF_MQ) | (1 << PF_REPLY_ACK) | (1 << PF_CONFIG) |
                               (1 << PF_CONFIGURE_MEM_SLOTS) | (1 << PF_STATUS))

# virtio device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_ALL_OK = 0x0F

VRING_INVALID_FD = 1 << 8


def bit(n):
    return 1 << n


class VhostUserError(Exception):
    pass


class BackendClosed(VhostUserError):
    pass


class DirectFrontend:
    """One vhost-user connection, driven synchronously.

    Typical use (see setup()):
        fe = DirectFrontend.connect(path)
        fe.setup(mem, device_features=..., rings=[vq0, vq1])
        ... I/O through the rings ...
        bases = fe.stop_rings()
    """

    def __init__(self, sock, timeout=5.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.features = None           # the back-end's offer
        self.protocol_features = 0     # negotiated
        self.acked_features = None
        self.queue_num = None
        self.max_mem_slots = None
        self.log = []                  # (request name, detail) of what we sent
        self.rings = {}

    # ---- connection ----
    @classmethod
    def connect(cls, path, timeout=5.0, retry_for=5.0):
        """Connect to a listening back-end, retrying ECONNREFUSED/ENOENT."""
        deadline = time.monotonic() + retry_for
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path)
                return cls(s, timeout)
            except OSError as e:
                s.close()
                if e.errno not in (errno.ECONNREFUSED, errno.ENOENT) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @classmethod
    def listen(cls, path, accept_timeout=10.0, timeout=5.0):
        """Listen on `path` (server mode; e.g. testpmd client=1) and accept one."""
        unlink_if_exists(path)
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            ls.bind(path)
            ls.listen(1)
            ls.settimeout(accept_timeout)
            s, _ = ls.accept()
        finally:
            ls.close()
        s.setblocking(True)
        return cls(s, timeout)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- raw messages ----
    def send(self, request, payload=b"", fds=(), need_reply=False):
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        msg = HDR.pack(request, flags, len(payload)) + payload
        anc = []
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))]
        try:
            n = self.sock.sendmsg([msg], anc, socket.MSG_NOSIGNAL)
            if n < len(msg):
                self.sock.sendall(msg[n:], socket.MSG_NOSIGNAL)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise BackendClosed("%s: back-end closed the connection (%s)"
                                % (REQUEST_NAMES.get(request, request), e)) from e

    def _recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout as e:
                raise VhostUserError("timed out after %.1fs waiting for a reply" % self.timeout) from e
            except ConnectionResetError as e:
                raise BackendClosed("back-end reset the connection") from e
            if not chunk:
                raise BackendClosed("back-end closed the connection")
            buf += chunk
        return buf

    def recv_reply(self, request):
        hdr = self._recv_exact(HDR.size)
        req, flags, size = HDR.unpack(hdr)
        payload = self._recv_exact(size) if size else b""
        name = REQUEST_NAMES.get(request, request)
        if req != request:
            raise VhostUserError("%s: reply is for request %d" % (name, req))
        if not flags & FLAG_REPLY or flags & 0x3 != FLAG_VERSION:
            raise VhostUserError("%s: bad reply flags %#x" % (name, flags))
        return payload

    def request(self, request, payload=b"", fds=()):
        """A request whose reply the spec defines (GET_*)."""
        self.send(request, payload, fds)
        return self.recv_reply(request)

    def command(self, request, payload=b"", fds=(), ack=True):
        """A request without a defined reply; waits for REPLY_ACK if negotiated."""
        want = ack and bool(self.protocol_features & bit(PF_REPLY_ACK))
        self.send(request, payload, fds, need_reply=want)
        self.log.append(REQUEST_NAMES.get(request, request))
        if want:
            reply = self.recv_reply(request)
            if len(reply) != 8:
                raise VhostUserError("%s: REPLY_ACK payload of %d bytes"
                                     % (REQUEST_NAMES.get(request, request), len(reply)))
            (rc,) = struct.unpack("<Q", reply)
            if rc != 0:
                raise VhostUserError("%s: back-end answered failure %d"
                                     % (REQUEST_NAMES.get(request, request), rc))

    def _u64_reply(self, request, payload=b""):
        r = self.request(request, payload)
        if len(r) != 8:
            raise VhostUserError("%s: reply of %d bytes, want 8"
                                 % (REQUEST_NAMES.get(request, request), len(r)))
        return struct.unpack("<Q", r)[0]

    # ---- individual requests ----
    def get_features(self):
        self.features = self._u64_reply(GET_FEATURES)
        return self.features

    def set_features(self, features):
        self.acked_features = features
        self.command(SET_FEATURES, struct.pack("<Q", features))

    def get_protocol_features(self):
        return self._u64_reply(GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, pf):
        # Not acked with REPLY_ACK: it is the message that negotiates it.
        self.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
        self.protocol_features = pf

    def get_queue_num(self):
        self.queue_num = self._u64_reply(GET_QUEUE_NUM)
        return self.queue_num

    def get_max_mem_slots(self):
        self.max_mem_slots = self._u64_reply(GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_owner(self):
        self.command(SET_OWNER)

    def add_mem_reg(self, region, uaddr=None):
        # The fd is mapped from the region's offset: pass it as mmap offset.
        payload = struct.pack("<QQQQQ", 0, region.gpa, region.size,
                              region.uaddr if uaddr is None else uaddr, region.offset)
        self.command(ADD_MEM_REG, payload, [region.fd])

    def rem_mem_reg(self, region, uaddr=None):
        payload = struct.pack("<QQQQQ", 0, region.gpa, region.size,
                              region.uaddr if uaddr is None else uaddr, region.offset)
        self.command(REM_MEM_REG, payload, [region.fd])

    def set_mem_table(self, regions):
        if len(regions) > 8:
            raise ValueError("SET_MEM_TABLE carries at most 8 regions")
        payload = struct.pack("<II", len(regions), 0)
        for r in regions:
            payload += struct.pack("<QQQQ", r.gpa, r.size, r.uaddr, r.offset)
        self.command(SET_MEM_TABLE, payload, [r.fd for r in regions])

    def set_memory(self, mem, use_add_mem_reg=None):
        """Hand every region of `mem` over, by ADD_MEM_REG when negotiated."""
        if use_add_mem_reg is None:
            use_add_mem_reg = bool(self.protocol_features & bit(PF_CONFIGURE_MEM_SLOTS))
        if use_add_mem_reg:
            for r in mem.regions:
                self.add_mem_reg(r)
        else:
            self.set_mem_table(mem.regions)

    def get_config(self, offset, size, flags=0):
        payload = struct.pack("<III", offset, size, flags) + bytes(size)
        r = self.request(GET_CONFIG, payload)
        if len(r) != 12 + size:
            raise VhostUserError("GET_CONFIG: reply of %d bytes, want %d (0 = back-end error)"
                                 % (len(r), 12 + size))
        return r[12:]

    def set_vring_num(self, index, num):
        self.command(SET_VRING_NUM, struct.pack("<II", index, num))

    def set_vring_base(self, index, base):
        self.command(SET_VRING_BASE, struct.pack("<II", index, base))

    def set_vring_addr(self, index, desc_uaddr, used_uaddr, avail_uaddr, flags=0, log=0):
        self.command(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, flags, desc_uaddr,
                                                 used_uaddr, avail_uaddr, log))

    def set_vring_call(self, index, fd):
        if fd is None:
            self.command(SET_VRING_CALL, struct.pack("<Q", index | VRING_INVALID_FD))
        else:
            self.command(SET_VRING_CALL, struct.pack("<Q", index), [fd])

    def set_vring_kick(self, index, fd):
        if fd is None:
            self.command(SET_VRING_KICK, struct.pack("<Q", index | VRING_INVALID_FD))
        else:
            self.command(SET_VRING_KICK, struct.pack("<Q", index), [fd])

    def set_vring_enable(self, index, enable=True):
        self.command(SET_VRING_ENABLE, struct.pack("<II", index, 1 if enable else 0))

    def get_vring_base(self, index):
        r = self.request(GET_VRING_BASE, struct.pack("<II", index, 0))
        if len(r) != 8:
            raise VhostUserError("GET_VRING_BASE: reply of %d bytes" % len(r))
        idx, num = struct.unpack("<II", r)
        if idx != index:
            raise VhostUserError("GET_VRING_BASE: reply for ring %d, asked %d" % (idx, index))
        return num

    def set_status(self, status):
        self.command(SET_STATUS, struct.pack("<Q", status))

    def get_status(self):
        return self._u64_reply(GET_STATUS)

    # ---- sequences ----
    def handshake(self, want_protocol=SUPPORTED_PROTOCOL_FEATURES):
        """GET_FEATURES, protocol features, queue num, SET_OWNER, mem slots."""
        self.get_features()
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            offered = self.get_protocol_features()
            self.protocol_offered = offered
            self.set_protocol_features(offered & want_protocol)
        else:
            self.protocol_offered = 0
        if self.protocol_features & bit(PF_MQ):
            self.get_queue_num()
        self.set_owner()
        if self.protocol_features & bit(PF_CONFIGURE_MEM_SLOTS):
            self.get_max_mem_slots()
        return self.features

    def start_ring(self, vq, enable=True):
        """NUM, BASE, ADDR (user addresses), CALL, then KICK (call before kick:
        qemu-storage-daemon completes on a pending kick and needs the call fd)."""
        mem = vq.mem
        self.set_vring_num(vq.index, vq.size)
        self.set_vring_base(vq.index, vq.base)
        self.set_vring_addr(vq.index, mem.gpa_to_uaddr(vq.desc), mem.gpa_to_uaddr(vq.used),
                            mem.gpa_to_uaddr(vq.avail))
        self.set_vring_call(vq.index, vq.call_fd)
        self.set_vring_kick(vq.index, vq.kick_fd)
        if enable and self.acked_features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            self.set_vring_enable(vq.index, True)
        self.rings[vq.index] = vq

    def setup(self, mem, device_features, rings, use_add_mem_reg=None):
        """The whole start sequence a VMM does; returns the features acked.

        device_features: the virtio bits the driver wants (VERSION_1 etc.);
        only bits the back-end offers are acked; PROTOCOL_FEATURES (bit 30) is
        added when offered.  Every ring gets one kick at the end so that no
        early kick can be lost."""
        if self.features is None:
            self.handshake()
        acked = device_features & self.features
        if acked != device_features:
            raise VhostUserError("back-end lacks features %#x (offers %#x)"
                                 % (device_features & ~self.features, self.features))
        if self.features & bit(VHOST_USER_F_PROTOCOL_FEATURES):
            acked |= bit(VHOST_USER_F_PROTOCOL_FEATURES)
        self.set_features(acked)
        self.set_memory(mem, use_add_mem_reg)
        for vq in rings:
            self.start_ring(vq)
        if self.protocol_features & bit(PF_STATUS):
            self.set_status(STATUS_ALL_OK)
        for vq in rings:
            vq.kick()
        return acked

    def stop_rings(self):
        """GET_VRING_BASE on every started ring: {index: base}."""
        out = {}
        for idx in sorted(self.rings):
            out[idx] = self.get_vring_base(idx)
        self.rings = {}
        return out

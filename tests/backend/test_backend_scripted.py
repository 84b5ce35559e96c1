#!/usr/bin/env python3
"""vhub-test-backend driven through vhubtest.testbackend.TestBackend and the
harness's own front-end (vhubtest.direct) and blk driver: an independent
cross-check of the back-end, and of every scripted behaviour.

    test_backend_scripted.py [blk] [options] [hostile] [fuzz] [misbehave] [handshake] [channel] [state] [endian]
"""

import os
import select
import socket
import struct
import sys
import threading
import time

from vhubtest import blk, direct, scenarios, virtq
from vhubtest.direct import DirectFrontend, VhostUserError, BackendClosed, bit
from vhubtest.memory import GuestMemory
from vhubtest.testbackend import TestBackend, TestBackendError
from vhubtest.testing import check, check_eq, expect_error, log, run

IMAGE_SIZE = 16 << 20
PF_SHARED_OBJECT = 18
PF_DEVICE_STATE = 19
SET_DEVICE_STATE_FD = 42
CHECK_DEVICE_STATE = 43
GET_SHARED_OBJECT = 41
SET_VRING_ENDIAN = 23
PF_CROSS_ENDIAN = 6


def backend(t, d, socks, args=(), connect=()):
    tb = TestBackend([os.path.join(d, s) for s in socks], args=list(args),
                     connect=[os.path.join(d, s) for s in connect], log_dir=d)
    t.add_log("vhub-test-backend", tb.log_path)
    t.enter(tb)

    def clean_exit():
        # ASan/UBSan/leak reports make the exit status nonzero
        if tb.proc is not None and tb.alive:
            check_eq(tb.stop(), 0, "%s exit status on SIGTERM" % os.path.basename(tb.log_path))
    t.defer(clean_exit)
    return tb


def recv_msg(sock, timeout=5.0):
    """One message with its fds: (request, flags, payload, [fds])."""
    sock.settimeout(timeout)
    data, anc, _, _ = sock.recvmsg(12, socket.CMSG_SPACE(8 * 4))
    fds = []
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack("%di" % (len(cdata) // 4), cdata[:len(cdata) // 4 * 4]))
    if len(data) < 12:
        data += recv_exact(sock, 12 - len(data))
    req, flags, size = struct.unpack("<III", data)
    payload = recv_exact(sock, size) if size else b""
    return req, flags, payload, fds


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise BackendClosed("EOF")
        buf += chunk
    return buf


def readable(sock, timeout):
    return bool(select.select([sock], [], [], timeout)[0])


def scenario_blk(t):
    """The harness's blk driver against the test back-end, out of order."""
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    initial = scenarios.make_image(img, IMAGE_SIZE)
    tb = backend(t, d, ["blk.sock"], ["--disk", img, "--complete", "random", "--delay-ms", "3",
                                      "--seed", "5"])
    mem = t.enter(GuestMemory(32 << 20))
    fe = t.enter(DirectFrontend.connect(tb.sockets[0]))
    fe.handshake()
    check_eq(fe.queue_num, 2, "GET_QUEUE_NUM")
    check_eq(fe.max_mem_slots, 32, "GET_MAX_MEM_SLOTS")
    cfg = blk.parse_config(fe.get_config(0, 60))
    check_eq(cfg["capacity"], IMAGE_SIZE // 512, "config capacity")
    queues = [blk.BlkQueue(mem, index=i, size=128) for i in range(2)]
    fe.setup(mem, scenarios.BLK_FEATURES, [q.vq for q in queues])
    regions = tb.regions()
    check_eq([(r["gpa"], r["size"], r["uaddr"]) for r in regions],
             [(r.gpa, r.size, r.uaddr) for r in mem.regions], "regions reported by the back-end")
    scenarios.blk_first_sectors(queues[0], initial)
    check_eq(queues[1].get_id()[:8], b"vhub-tb-", "GET_ID")
    queues[0].flush()
    scenarios.blk_io(queues, img, initial)
    vr = tb.vrings()
    check(all(v["started"] and v["enabled"] and v["broken"] is None for v in vr),
          "both rings started, enabled, healthy", vr)
    bases = fe.stop_rings()
    for q in queues:
        check_eq(bases[q.index], q.vq.submitted, "GET_VRING_BASE of ring %d" % q.index)
    scenarios.blk_index_wrap(fe, queues[0])
    st = tb.socket_status()
    check(st["completed"] >= 2 * 256 and st["requests"]["SET_VRING_KICK"] == 3,
          "status counts requests and completions", st["requests"])


def scenario_misbehave(t):
    d = t.tmpdir()
    tb = backend(t, d, ["a.sock"])
    fe = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe.handshake()
    fe.set_features(fe.features)

    tb.misbehave("SET_STATUS", "refuse", count=1)
    expect_error(VhostUserError, fe.set_status, 0xF, what="refused SET_STATUS")
    fe.set_status(0xF)
    check_eq(fe.get_status(), 0xF, "SET_STATUS works once the rule ran out")

    tb.misbehave("GET_STATUS", "bad-flags", count=1)
    expect_error(VhostUserError, fe.get_status, what="reply without the REPLY flag")
    tb.misbehave("GET_QUEUE_NUM", "wrong-request", count=1)
    expect_error(VhostUserError, fe.get_queue_num, what="reply to another request")
    check_eq(fe.get_queue_num(), 2, "GET_QUEUE_NUM afterwards")

    tb.misbehave("GET_STATUS", "extra-fds", count=1)
    fe.send(direct.GET_STATUS)
    req, flags, payload, fds = recv_msg(fe.sock)
    for fd in fds:
        os.close(fd)
    check_eq((req, flags, len(fds)), (direct.GET_STATUS, 5, 3), "reply with 3 unwanted fds")

    fe.sock.settimeout(0.3)
    tb.misbehave("GET_STATUS", "silence", count=1)
    expect_error(VhostUserError, fe.get_status, what="silence")
    fe.sock.settimeout(3.0)
    check_eq(fe.get_status(), 0xF, "answers again after the silence")

    tb.misbehave("GET_MAX_MEM_SLOTS", "delay", delay_ms=300, count=1)
    t0 = time.monotonic()
    fe.get_max_mem_slots()
    check(time.monotonic() - t0 >= 0.28, "reply delayed by 300 ms", time.monotonic() - t0)

    tb.misbehave("SET_STATUS", "hang", count=1)
    fe.send(direct.SET_STATUS, struct.pack("<Q", 7), need_reply=True)
    tb.wait_until(lambda: tb.conn()["hung"], what="socket hung")
    check(not readable(fe.sock, 0.2), "no answer while hung")
    tb.resume()
    check_eq(struct.unpack("<Q", fe.recv_reply(direct.SET_STATUS))[0], 0, "answer after resume")
    check_eq(fe.get_status(), 7, "the held request was processed on resume")

    tb.sigstop()
    fe.send(direct.GET_QUEUE_NUM)
    check(not readable(fe.sock, 0.2), "no answer while SIGSTOPped")
    tb.sigcont()
    check_eq(struct.unpack("<Q", fe.recv_reply(direct.GET_QUEUE_NUM))[0], 2, "answer after SIGCONT")

    # ignore-fd: the kick eventfd is held but never drained; the ring is polled
    mem = t.enter(GuestMemory(4 << 20))
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    t.defer(q.vq.close)
    fe.set_memory(mem)
    tb.misbehave("SET_VRING_KICK", "ignore-fd", count=1)
    fe.start_ring(q.vq)
    v = tb.vrings()[0]
    check(v["ignored_fd"] and not v["kick_fd"] and v["polling"],
          "ignore-fd: the kick fd is held, the ring polled", v)
    os.eventfd_write(q.vq.kick_fd, 5)
    check_eq(len(q.read_sectors(0, 8)), 4096, "ignore-fd: the polled ring does I/O")
    check(os.eventfd_read(q.vq.kick_fd) >= 5, "ignore-fd: nobody drained the kick eventfd")
    fe.stop_rings()

    tb.misbehave("GET_FEATURES", "oversized", count=1)
    fe.send(direct.GET_FEATURES)
    req, flags, size = struct.unpack("<III", recv_exact(fe.sock, 12))
    check(req == direct.GET_FEATURES and size > 4096, "oversized size field", size)
    fe.close()

    tb.misbehave("GET_PROTOCOL_FEATURES", "close", count=1)
    fe2 = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe2.get_features()
    expect_error(BackendClosed, fe2.get_protocol_features, what="close on GET_PROTOCOL_FEATURES")
    fe3 = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe3.handshake()
    check_eq(tb.connections(), 3, "the back-end kept listening: 3 connections")
    # a protocol violation (GET_QUEUE_NUM without MQ negotiated) closes
    fe4 = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe3.close()
    fe4.get_features()
    fe4.set_protocol_features(0)
    expect_error(BackendClosed, fe4.get_queue_num, what="GET_QUEUE_NUM without MQ")
    st = tb.socket_status()
    check(st["protocol_errors"] == 1 and "GET_QUEUE_NUM" in st["last_error"],
          "protocol error counted and reported", st["last_error"])
    with expect_raises(TestBackendError):
        tb.misbehave("NO_SUCH_REQUEST", "refuse")


class expect_raises:
    def __init__(self, exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        check(exc_type is not None and issubclass(exc_type, self.exc),
              "raised %s" % self.exc.__name__, exc_type)
        return True


def scenario_handshake(t):
    """--fail-handshake and --connect (the daemon's server mode)."""
    d = t.tmpdir()
    tb = backend(t, d, ["hs.sock"], ["--fail-handshake", "2"])
    for i in range(2):
        fe = DirectFrontend.connect(tb.sockets[0], timeout=3.0)
        fe.get_features()
        expect_error(BackendClosed, fe.get_protocol_features, what="handshake %d closed" % i)
        fe.close()
    fe = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe.handshake()
    check_eq(tb.connections(), 3, "third connection served")

    path = os.path.join(d, "fe.sock")
    tb2 = backend(t, d, [], ["--reconnect-ms", "20"], connect=["fe.sock"])
    for i in range(3):
        fe = DirectFrontend.listen(path, accept_timeout=5.0, timeout=3.0)
        fe.handshake()
        check_eq(fe.queue_num, 2, "client mode: connection %d served" % (i + 1))
        fe.close()
    tb2.wait_until(lambda: tb2.connections() >= 3, what="3 connections")
    check_eq(tb2.socket_status()["mode"], "connect", "socket mode reported")


def scenario_channel(t):
    d = t.tmpdir()
    tb = backend(t, d, ["ch.sock"])
    fe = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    want = (direct.SUPPORTED_PROTOCOL_FEATURES | bit(direct.PF_BACKEND_REQ) |
            bit(direct.PF_BACKEND_SEND_FD) | bit(direct.PF_HOST_NOTIFIER) | bit(PF_SHARED_OBJECT))
    fe.handshake(want_protocol=want)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    t.defer(a.close)
    fe.command(direct.SET_BACKEND_REQ_FD, fds=[b.fileno()])
    b.close()
    tb.wait_until(lambda: tb.conn()["backend_channel"], what="back-end channel")

    answers = []
    th = threading.Thread(target=lambda: answers.append(tb.config_change()))
    th.start()
    req, flags, payload, fds = recv_msg(a)
    check_eq((req, flags & 0xB), (2, 0x9), "CONFIG_CHANGE_MSG with NEED_REPLY")
    a.sendall(struct.pack("<IIIQ", 2, 0x5, 8, 42))
    th.join(5)
    check_eq(answers[0]["reply"], 42, "the front-end's reply value reported")

    r = tb.host_notifier(queue=1, need_reply=False)
    check(r["sent"], "host notifier sent without NEED_REPLY")
    req, flags, payload, fds = recv_msg(a)
    u64, size, offset = struct.unpack("<QQQ", payload)
    check_eq((req, u64, size, offset, len(fds)), (3, 1, 4096, 0, 1), "VRING_HOST_NOTIFIER_MSG")
    check_eq(os.fstat(fds[0]).st_size, 4096, "its memfd is 4096 bytes")
    os.close(fds[0])
    tb.host_notifier(queue=0, fd=False, need_reply=False)
    req, flags, payload, fds = recv_msg(a)
    check_eq((struct.unpack("<Q", payload[:8])[0], len(fds)), (1 << 8, 0), "de-register: no fd")

    uuid = tb.export(size=8192, fill="ab", need_reply=False)
    req, flags, payload, fds = recv_msg(a)
    check_eq((req, len(payload)), (6, 16), "SHARED_OBJECT_ADD with the 16-byte UUID")
    check_eq(tb.shared_objects()[0]["uuid"], uuid, "object listed")
    fe.send(GET_SHARED_OBJECT, payload)
    req, flags, reply, fds = recv_msg(fe.sock)
    check_eq((req, flags, reply, len(fds)), (GET_SHARED_OBJECT, 5, payload, 1),
             "GET_SHARED_OBJECT: UUID echoed, fd attached")
    check_eq(os.pread(fds[0], 2, 8190), b"\xab\xab", "the object's content")
    os.close(fds[0])
    tb.remove(uuid, need_reply=False)
    check_eq(recv_msg(a)[0], 7, "SHARED_OBJECT_REMOVE")

    try:
        tb.lookup(uuid, timeout_ms=200)
        check(False, "lookup without an answer must time out")
    except TestBackendError as e:
        check("timeout" in e.answer["error"], "lookup unanswered: timeout reported", e.answer)
    req, flags, payload, fds = recv_msg(a)
    check_eq(req, 8, "SHARED_OBJECT_LOOKUP sent")
    a.sendall(struct.pack("<IIIQ", 8, 0x5, 8, 1))   # the late reply is absorbed
    check_eq(tb.status()["ok"], True, "still fine")

    r = tb.flood(kind="messages", count=50)
    check_eq(r["sent"], 50, "flood queued")
    got = [recv_msg(a)[0] for _ in range(50)]
    check_eq(set(got), {2}, "50 CONFIG_CHANGE_MSG received")
    r = tb.flood(kind="garbage", count=2)
    check_eq(len(recv_exact(a, r["bytes"])), 8192, "8 KiB of garbage")


def scenario_state(t):
    d = t.tmpdir()
    tb = backend(t, d, ["st.sock"])
    fe = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe.handshake(want_protocol=direct.SUPPORTED_PROTOCOL_FEATURES | bit(PF_DEVICE_STATE))
    fe.set_vring_num(1, 64)
    fe.set_vring_base(1, 1234)

    r, w = os.pipe()
    reply = fe.request(SET_DEVICE_STATE_FD, struct.pack("<II", 0, 0), fds=[w])
    os.close(w)
    check_eq(struct.unpack("<Q", reply)[0], 1 << 8, "SAVE accepted, our fd used")
    blob = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        blob += chunk
    os.close(r)
    check(len(blob) > 16 and blob[:4] == b"VTBS", "state blob", blob[:16])
    check_eq(fe._u64_reply(CHECK_DEVICE_STATE), 0, "CHECK_DEVICE_STATE after SAVE")

    fe.set_vring_base(1, 7)
    r, w = os.pipe()
    fe.request(SET_DEVICE_STATE_FD, struct.pack("<II", 1, 0), fds=[r])
    os.close(r)
    os.write(w, blob)
    os.close(w)
    check_eq(fe._u64_reply(CHECK_DEVICE_STATE), 0, "CHECK_DEVICE_STATE after LOAD")
    check_eq(tb.vrings()[1]["last_avail"], 1234, "LOAD restored the ring base")

    r, w = os.pipe()
    fe.request(SET_DEVICE_STATE_FD, struct.pack("<II", 1, 0), fds=[r])
    os.close(r)
    os.write(w, b"garbage")
    os.close(w)
    check(fe._u64_reply(CHECK_DEVICE_STATE) != 0, "a garbage blob fails CHECK_DEVICE_STATE")


def scenario_hostile(t):
    """A hostile front-end: descriptor loops, avail index jumps, memory
    truncated under the back-end.  It must survive and say what happened."""
    d = t.tmpdir()
    tb = backend(t, d, ["h.sock"], ["--queues", "3", "--delay-ms", "300"])
    mem = t.enter(GuestMemory(1 << 20))
    data = mem.add_region(16 << 20, 1 << 20)
    fe = t.enter(DirectFrontend.connect(tb.sockets[0], timeout=3.0))
    fe.handshake()
    vqs = [virtq.Virtqueue(mem, size=16, index=i) for i in range(3)]
    fe.setup(mem, scenarios.BLK_FEATURES, vqs)
    hdr, status = mem.alloc(16), mem.alloc(1)
    mem.write(hdr, struct.pack("<IIQ", 1, 0, 0))      # OUT, sector 0

    # ring 0: a descriptor chained to itself
    mem.write(vqs[0].desc, struct.pack("<QIHH", hdr, 16, 1, 0))
    mem.write_u16(vqs[0].avail + 4, 0)
    mem.write_u16(vqs[0].avail + 2, 1)
    vqs[0].kick()
    tb.wait_until(lambda: tb.vrings()[0]["broken"], what="ring 0 broken")
    check("loops" in tb.vrings()[0]["broken"], "descriptor loop detected", tb.vrings()[0]["broken"])

    # ring 1: the avail index runs ahead by more than the ring size
    mem.write_u16(vqs[1].avail + 2, 1000)
    vqs[1].kick()
    tb.wait_until(lambda: tb.vrings()[1]["broken"], what="ring 1 broken")
    check("more than the ring size" in tb.vrings()[1]["broken"], "avail index jump detected")

    # ring 2: a write whose data region is truncated while it is held
    vqs[2].add([(hdr, 16, False), (data.gpa, 4096, False), (status, 1, True)])
    vqs[2].kick()
    tb.wait_until(lambda: tb.vrings()[2]["in_flight"] == 1, what="request fetched")
    os.ftruncate(data.fd, 0)
    tb.wait_until(lambda: tb.vrings()[2]["completed"] == 1, what="request completed")
    check(tb.status()["sigbus"] >= 1, "SIGBUS survived and reported", tb.status()["sigbus"])
    check(tb.alive, "back-end alive")
    check_eq(len(tb.regions()), 2, "regions still listed")


def scenario_fuzz(t):
    """Random hostile traffic through the real socket: mostly-valid descriptor
    chains with mutations, garbage rings, index jumps, random addresses,
    sizes, regions, inflight buffers and raw requests, rings stopped and
    restarted under it.  The back-end may close connections and break rings;
    it must never crash (in ASan/UBSan builds: nor leak or trip a check).
    VHUB_FUZZ_ITERATIONS / VHUB_FUZZ_SEED vary it."""
    import random
    d = t.tmpdir()
    rnd = random.Random(int(os.environ.get("VHUB_FUZZ_SEED", "1")))
    iterations = int(os.environ.get("VHUB_FUZZ_ITERATIONS", "3000"))
    tb = backend(t, d, ["f.sock"], ["--queues", "2", "--delay-ms", "2", "--complete", "random",
                                     "--disk-size", "1M", "-q"])
    mem = t.enter(GuestMemory(1 << 20))
    QS = 16
    vqs = [virtq.Virtqueue(mem, size=QS, index=i) for i in range(2)]
    scratch = mem.alloc(128 << 10, 4096)
    capacity = (1 << 20) // 512
    state = {"fe": None, "conns": 0}
    avail = {0: 0, 1: 0}

    def u64():
        return rnd.choice([0, 1, rnd.getrandbits(64), rnd.getrandbits(20), 1 << 63, (1 << 64) - 1])

    def maybe(v, mutate):
        return mutate() if rnd.random() < 0.03 else v

    def memfd(size):
        fd = os.memfd_create("fuzz")
        os.ftruncate(fd, size)
        return fd

    def start_ring(fe, vq, base):
        fe.send(direct.SET_VRING_NUM, struct.pack("<II", vq.index, QS))
        fe.send(direct.SET_VRING_BASE, struct.pack("<II", vq.index, base))
        fe.send(direct.SET_VRING_ADDR, struct.pack("<IIQQQQ", vq.index, 0, mem.gpa_to_uaddr(vq.desc),
                mem.gpa_to_uaddr(vq.used), mem.gpa_to_uaddr(vq.avail), 0))
        fe.send(direct.SET_VRING_CALL, struct.pack("<Q", vq.index), [vq.call_fd])
        fe.send(direct.SET_VRING_KICK, struct.pack("<Q", vq.index), [vq.kick_fd])
        fe.send(direct.SET_VRING_ENABLE, struct.pack("<II", vq.index, 1))
        avail[vq.index] = base
        mem.write_u16(vq.avail + 2, base)

    def connect():
        fe = DirectFrontend.connect(tb.sockets[0], timeout=2.0)
        fe.handshake(want_protocol=0xdbe2b & ~bit(direct.PF_REPLY_ACK))
        fe.set_features(fe.features)
        fe.set_memory(mem)
        if rnd.random() < 0.5:      # inflight tracking on for this connection
            r = fe.request(direct.GET_INFLIGHT_FD, struct.pack("<QQHHI", 0, 0, 2, QS, 0))
            size = struct.unpack("<Q", r[:8])[0]
            fd = memfd(size)        # the front-end's own copy, like after a reconnect
            fe.send(direct.SET_INFLIGHT_FD, struct.pack("<QQHHI", size, 0, 2, QS, 0), [fd])
            os.close(fd)
        for vq in vqs:
            start_ring(fe, vq, mem.read_u16(vq.used + 2))
        fe.sock.setblocking(False)
        state["conns"] += 1
        return fe

    def add_chain(vq):
        # five 3-descriptor slots; at most 4 outstanding, so no head is
        # offered while in flight unless a mutation says so
        a = avail[vq.index]
        head = 3 * (a % 5)
        idx = [head + j for j in range(3)]
        slot = rnd.randrange(16)
        hdr, data, st = scratch + slot * 32, scratch + 4096 + slot * 4096 * 2, scratch + slot * 32 + 16
        rtype = maybe(rnd.choice([0, 1, 1, 4, 8]), lambda: rnd.getrandbits(32))
        sector = maybe(rnd.randrange(capacity), lambda: rnd.choice([capacity, capacity - 1, u64()]))
        dlen = maybe(rnd.choice([512, 1024, 4096]), lambda: rnd.choice([0, 1, 511, 8192, u64() & 0xFFFFFFFF]))
        mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector & ((1 << 64) - 1)))
        descs = [(hdr, 16, 1), (data, dlen, 1 | (2 if rtype in (0, 8) else 0)), (st, 1, 2)]
        if rnd.random() < 0.3:
            descs = [descs[0], descs[2]]
        for j, (addr, ln, fl) in enumerate(descs):
            nxt = idx[j + 1] if j + 1 < len(descs) else 0
            addr = maybe(addr, lambda: rnd.choice([u64(), 1 << 20, (1 << 20) - 8]))
            fl = maybe(fl if j + 1 < len(descs) else fl & ~1, lambda: rnd.randrange(8))
            nxt = maybe(nxt, lambda: rnd.randrange(40))
            mem.write(vq.desc + 16 * idx[j], struct.pack("<QIHH", addr & ((1 << 64) - 1),
                                                          ln & 0xFFFFFFFF, fl, nxt))
        mem.write_u16(vq.avail + 4 + 2 * (a % QS), maybe(head, lambda: rnd.randrange(1 << 16)))
        avail[vq.index] = (a + 1) & 0xFFFF

    for i in range(iterations):
        fe = state["fe"]
        if fe is None:
            try:
                fe = state["fe"] = connect()
            except (VhostUserError, OSError):
                fe = state["fe"] = None
                continue
        vq = rnd.choice(vqs)
        k = rnd.random()
        fds = []
        try:
            if k < 0.45:
                outstanding = (avail[vq.index] - mem.read_u16(vq.used + 2)) & 0xFFFF
                if outstanding >= 4:
                    time.sleep(0.003)
                    continue
                for _ in range(rnd.randrange(1, 5 - outstanding)):
                    add_chain(vq)
                mem.write_u16(vq.avail + 2, avail[vq.index])
                os.eventfd_write(vq.kick_fd, 1)
            elif k < 0.50:
                mem.write(vq.desc, rnd.randbytes(16 * QS))
                os.eventfd_write(vq.kick_fd, 1)
            elif k < 0.53:
                avail[vq.index] = rnd.getrandbits(16)
                mem.write_u16(vq.avail + 2, avail[vq.index])
                os.eventfd_write(vq.kick_fd, 1)
            elif k < 0.63:      # stop and restart where the device says
                fe.send(direct.GET_VRING_BASE, struct.pack("<II", vq.index, 0))
                start_ring(fe, vq, mem.read_u16(vq.used + 2))
            elif k < 0.66:
                fe.send(direct.SET_VRING_ADDR, struct.pack("<IIQQQQ", rnd.randrange(3), rnd.randrange(2),
                        u64() & ~15, u64() & ~3, u64() & ~1, u64()))
            elif k < 0.69:
                fe.send(direct.SET_VRING_NUM, struct.pack("<II", rnd.randrange(3),
                        rnd.choice([0, 1, 3, 16, 256, 32768, 65536, rnd.getrandbits(32)])))
            elif k < 0.72:
                fe.send(direct.SET_VRING_BASE, struct.pack("<II", rnd.randrange(3), rnd.getrandbits(17)))
            elif k < 0.77:
                size = rnd.choice([4096, 1 << 20, 1 << 16])
                fds = [memfd(rnd.choice([0, 4096, size, size * 2]))]
                fe.send(rnd.choice([direct.ADD_MEM_REG, direct.REM_MEM_REG]), struct.pack(
                    "<QQQQQ", 0, rnd.choice([0, 1 << 30, u64()]), rnd.choice([size, 0, u64()]),
                    rnd.choice([mem.regions[0].uaddr, u64()]), rnd.choice([0, 4096, u64()])), fds)
            elif k < 0.81:
                nq, qs = rnd.choice([1, 2, 65535]), rnd.choice([QS, 1, 1024, 65535])
                size = nq * (16 + 16 * qs)
                fds = [memfd(rnd.choice([size, size // 2, 4096]))]
                os.pwrite(fds[0], rnd.randbytes(min(size, 4096, os.fstat(fds[0]).st_size)), 0)
                fe.send(direct.SET_INFLIGHT_FD, struct.pack("<QQHHI", rnd.choice([size, u64()]),
                        rnd.choice([0, 8, 3, u64()]), nq, qs, 0), fds)
            elif k < 0.85:
                fe.send(direct.SET_VRING_ENABLE, struct.pack("<II", rnd.randrange(3), rnd.randrange(2)))
            elif k < 0.87:
                fe.send(rnd.randrange(1, 46), rnd.randbytes(rnd.choice([0, 8, 12, 24, 40, rnd.randrange(300)])))
            elif k < 0.89:
                fe.close()
                state["fe"] = None
                continue
            else:
                time.sleep(0.002)   # let held requests complete
        except (BackendClosed, VhostUserError, OSError):
            fe.close()
            state["fe"] = fe = None
        finally:
            for fd in fds:
                os.close(fd)
        if fe is not None:
            try:
                while fe.sock.recv(65536):
                    pass
                fe.close()      # EOF
                state["fe"] = None
            except BlockingIOError:
                pass
            except OSError:
                fe.close()
                state["fe"] = None
    if state["fe"] is not None:
        state["fe"].close()
    st = tb.status()
    s0 = st["sockets"][0]
    check(tb.alive, "back-end alive after %d random steps (%d connections)" % (iterations, state["conns"]))
    log("protocol errors %d, sigbus %d, requests fetched %d, completed %d"
        % (s0["protocol_errors"], st["sigbus"], s0["fetched"], s0["completed"]))
    check(s0["fetched"] > 100 and s0["completed"] > 100, "the fuzzer reached request processing")

def scenario_endian(t):
    """CROSS_ENDIAN: a legacy (no VERSION_1) ring set big-endian with
    SET_VRING_ENDIAN is read and written big-endian, request headers too;
    the request is refused once the ring started or with VERSION_1."""
    d = t.tmpdir()
    img = os.path.join(d, "disk.img")
    initial = scenarios.make_image(img, IMAGE_SIZE)
    tb = backend(t, d, ["be.sock", "v1.sock"], ["--disk", img, "--protocol-features",
                                                 "%x" % (0xdbe2b | bit(PF_CROSS_ENDIAN))])
    mem = t.enter(GuestMemory(4 << 20))
    want = direct.SUPPORTED_PROTOCOL_FEATURES | bit(PF_CROSS_ENDIAN)
    fe = t.enter(DirectFrontend.connect(tb.sockets[0]))
    fe.handshake(want_protocol=want)
    check(fe.protocol_features & bit(PF_CROSS_ENDIAN), "CROSS_ENDIAN negotiated")
    legacy = (scenarios.BLK_FEATURES & ~bit(direct.VIRTIO_F_VERSION_1)) | \
        bit(direct.VHOST_USER_F_PROTOCOL_FEATURES)
    fe.set_features(legacy)
    fe.set_memory(mem)
    size = 16
    desc, avail, used = mem.alloc(16 * size, 16), mem.alloc(6 + 2 * size, 2), mem.alloc(6 + 8 * size, 4)
    for a, n in ((desc, 16 * size), (avail, 6 + 2 * size), (used, 6 + 8 * size)):
        mem.fill(a, n)
    kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    t.defer(os.close, kick)
    t.defer(os.close, call)
    fe.command(SET_VRING_ENDIAN, struct.pack("<II", 0, 1))
    fe.set_vring_num(0, size)
    fe.set_vring_base(0, 0)
    fe.set_vring_addr(0, mem.gpa_to_uaddr(desc), mem.gpa_to_uaddr(used), mem.gpa_to_uaddr(avail))
    fe.set_vring_call(0, call)
    fe.set_vring_kick(0, kick)
    fe.set_vring_enable(0, True)
    check_eq(tb.vrings(0)[0]["endian"], "big", "the back-end took ring 0 as big-endian")
    expect_error(VhostUserError, fe.command, SET_VRING_ENDIAN, struct.pack("<II", 0, 0),
                 what="SET_VRING_ENDIAN on a started ring")

    hdr, data, status = mem.alloc(16, 16), mem.alloc(4096, 512), mem.alloc(1, 1)
    payload = os.urandom(4096)
    sector = 64

    def submit(n, rtype, writable):
        """Request n (0-based) as one 3-descriptor chain at heads 0..2, all big-endian."""
        mem.write(hdr, struct.pack(">IIQ", rtype, 0, sector))
        mem.write(status, b"\xff")
        for i, (gpa, length, flags) in enumerate(((hdr, 16, 1), (data, 4096, 1 | (2 if writable else 0)),
                                                  (status, 1, 2))):
            mem.write(desc + 16 * i, struct.pack(">QIHH", gpa, length, flags, i + 1 if flags & 1 else 0))
        mem.write(avail + 4 + 2 * (n % size), struct.pack(">H", 0))
        mem.write(avail + 2, struct.pack(">H", n + 1))
        os.eventfd_write(kick, 1)
        deadline = time.monotonic() + 5
        while struct.unpack(">H", mem.read(used + 2, 2))[0] != n + 1:
            if time.monotonic() > deadline:
                raise AssertionError("request %d not completed (used idx bytes %s)"
                                     % (n, mem.read(used + 2, 2).hex()))
            time.sleep(0.002)
        return struct.unpack(">II", mem.read(used + 4 + 8 * (n % size), 8))

    mem.write(data, payload)
    check_eq(submit(0, blk.VIRTIO_BLK_T_OUT, False), (0, 1), "big-endian write: used elem (id, len)")
    check_eq(mem.read(status, 1), b"\x00", "write status OK")
    with open(img, "rb") as f:
        f.seek(sector * 512)
        check(f.read(4096) == payload, "the disk holds the write at the big-endian sector")
    mem.fill(data, 4096, 0xA5)
    check_eq(submit(1, blk.VIRTIO_BLK_T_IN, True), (0, 4097), "big-endian read: used elem (id, len)")
    check(mem.read(data, 4096) == payload, "the read returns the written data")
    with open(img, "rb") as f:
        check(f.read(sector * 512) == initial[:sector * 512], "nothing written before that sector")
    check_eq(fe.get_vring_base(0), 2, "GET_VRING_BASE after two requests")

    fe2 = t.enter(DirectFrontend.connect(tb.sockets[1]))
    fe2.handshake(want_protocol=want)
    fe2.set_features(scenarios.BLK_FEATURES | bit(direct.VHOST_USER_F_PROTOCOL_FEATURES))
    expect_error(VhostUserError, fe2.command, SET_VRING_ENDIAN, struct.pack("<II", 0, 1),
                 what="SET_VRING_ENDIAN with VERSION_1 acked")
    check_eq(tb.vrings(1)[0]["endian"], None, "a VERSION_1 ring has no endianness set")


def scenario_options(t):
    """A bad option value is named from the option table, whichever way it was
    written: argv[optind - 1] is the value itself in "--queues 0" (the message
    once read past it into the environment)."""
    import subprocess
    exe = os.environ["VHUB_TEST_BACKEND"]
    for args, name, value in ((["--queues", "0"], "queues", "0"), (["--queues=0"], "queues", "0"),
                              (["--delay-ms", "x"], "delay-ms", "x"),
                              (["--complete", "sideways"], "complete", "sideways")):
        p = subprocess.run([exe, "--socket", "/nonexistent/s"] + args, capture_output=True,
                           text=True, timeout=10, env={"PATH": "/usr/bin:/bin", "MARK": "=leak"})
        check(p.returncode != 0, "%s: refused" % " ".join(args))
        check_eq(p.stderr.strip().splitlines()[0],
                 "vhub-test-backend: bad value for --%s: %s" % (name, value),
                 "%s: the message names the option and its value" % " ".join(args))


SCENARIOS = {"blk": scenario_blk, "options": scenario_options, "hostile": scenario_hostile, "fuzz": scenario_fuzz, "misbehave": scenario_misbehave,
             "handshake": scenario_handshake, "channel": scenario_channel, "state": scenario_state,
             "endian": scenario_endian}


def main(t):
    names = sys.argv[1:] or list(SCENARIOS)
    for n in names:
        log("== %s" % n)
        SCENARIOS[n](t)


if __name__ == "__main__":
    run(main)

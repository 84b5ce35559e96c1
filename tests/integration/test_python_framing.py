#!/usr/bin/env python3
"""The vhub Python package's framing, against a scripted peer on a socketpair.

The contract's rules, from the receiving side: fds are queued in arrival
order and each message takes its "fds": N from the front, whether the fds of
several messages come in one sendmsg or a message's bytes come in several;
a message that declares more fds than arrived, fds that no message claims,
a bad "fds" value, invalid JSON or an oversized line break the connection
(ProtocolError) and every queued fd is closed.  Then the same for the
blocking client (vhub.Client) and the asyncio client (vhub.aio): per-call
timeouts (a late response's fds are closed), errors with code, message and
data, events with their fds, and no fd left open in this process.
"""

import asyncio
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import client as _client_path  # noqa: E402,F401 (puts python/ on sys.path)
from vhubtest.testing import check, check_eq, expect_error, log, run  # noqa: E402

import vhub                                  # noqa: E402
import vhub.aio                              # noqa: E402
from vhub import framing                     # noqa: E402


# ---- helpers ----

def line(obj):
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def tagged(tag):
    """A pipe's read end holding tag: an fd that says which one it is."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.write(w, tag.encode())
    os.close(w)
    return r


def tag_of(fd):
    return os.read(fd, 64).decode()


def is_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def open_fds():
    return sorted(int(x) for x in os.listdir("/proc/self/fd"))


def check_no_new_fds(before, what):
    # listdir's own fd is gone by the time it returns
    check_eq(open_fds(), before, "no fd left open: %s" % what)


class Peer:
    """The daemon's side of a socketpair, scripted."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.fdq = []

    def read_msg(self, timeout=5.0):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, 253)
            self.fdq += fds
            if not data:
                raise EOFError
            self.buf += data
        ln, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(ln)
        n = msg.get("fds", 0)
        mine, self.fdq = self.fdq[:n], self.fdq[n:]
        return msg, mine

    def send(self, data, fds=()):
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def close(self):
        framing.close_fds(self.fdq)
        self.sock.close()


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    return a, Peer(b)


def result(req_id, res, n_fds=0):
    m = {"jsonrpc": "2.0", "id": req_id, "result": res}
    if n_fds:
        m["fds"] = n_fds
    return line(m)


def event(name, n_fds=0, **kw):
    m = {"jsonrpc": "2.0", "method": "event", "params": dict({"event": name, "vm": "vm0"}, **kw)}
    if n_fds:
        m["fds"] = n_fds
    return line(m)


# ---- the decoder alone ----

def test_decoder():
    d = framing.Decoder()
    a, b, c = tagged("a"), tagged("b"), tagged("c")
    out = d.feed(result(1, {}, 1) + event("x", 2), [a, b, c])
    check_eq([(m.get("id"), [tag_of(fd) for fd in fds]) for m, fds in out],
             [(1, ["a"]), (None, ["b", "c"])],
             "one recvmsg with two messages' fds: each takes its own, in order")
    framing.close_fds([a, b, c])

    a = tagged("a")
    whole = result(2, {"fd": 0}, 1)
    check_eq(d.feed(whole[:7], [a]), [], "half a line with its fd: nothing yet")
    check_eq(d.queued_fds, [a], "the fd waits in the queue for its line")
    out = d.feed(whole[7:], [])
    check_eq([(m["id"], [tag_of(fd) for fd in fds]) for m, fds in out], [(2, ["a"])],
             "the line completed by the next read takes the fd that came with its first byte")
    os.close(a)

    b = tagged("b")
    first, second = result(3, {}), result(4, {}, 1)
    out = d.feed(first + second[:5], [b])
    check_eq([(m["id"], fds) for m, fds in out], [(3, [])],
             "a line without fds does not take the next line's fd")
    out = d.feed(second[5:], [])
    check_eq([(m["id"], [tag_of(fd) for fd in fds]) for m, fds in out], [(4, ["b"])],
             "the next line does")
    os.close(b)

    check_eq(d.feed(b"\n \n" + result(5, {}), []), [(json.loads(result(5, {})), [])],
             "blank lines carry nothing")
    out = d.feed(line([{"jsonrpc": "2.0", "id": 6, "result": {}},
                       {"jsonrpc": "2.0", "id": 7, "result": {}}]), [])
    check_eq(len(out[0][0]), 2, "a batch answer is one message (an array)")

    def violation(data, fds, what, **kw):
        dd = framing.Decoder(**kw)
        e = expect_error(vhub.ProtocolError, dd.feed, data, fds, what=what)
        check(not any(is_open(fd) for fd in fds), "%s: every fd queued is closed" % what)
        expect_error(vhub.ProtocolError, dd.feed, result(1, {}), [], what="%s: then the "
                     "decoder refuses anything more" % what)
        return e

    violation(result(1, {}, 2), [tagged("x")], "a message declaring 2 fds with 1 received")
    violation(event("y"), [tagged("x")], "an fd that no message declares")
    violation(result(1, {}, 2), [tagged("x"), tagged("z")],
              "more fds queued at once than the decoder's limit", max_queued_fds=1)
    for bad in (-1, "1", True, 254, 1.0):
        violation(b'{"jsonrpc":"2.0","id":1,"result":{},"fds":%s}\n' % json.dumps(bad).encode(),
                  [], "\"fds\": %s" % json.dumps(bad))
    violation(b'{"jsonrpc":"2.0",\n', [], "invalid JSON")
    violation(b'"just a string"\n', [], "a line that is no object or array")
    violation(b"{" + b" " * 2000, [tagged("x")], "a line over the limit", max_line=1024)

    # A violation after good messages: the good ones' fds are closed too,
    # nothing is handed out from a broken stream.
    dd = framing.Decoder()
    good = tagged("good")
    expect_error(vhub.ProtocolError, dd.feed, result(1, {}, 1) + b"nonsense\n", [good],
                 what="a good message then garbage in one read")
    check(not is_open(good), "the good message's fd is closed with the broken stream")


# ---- the blocking client ----

def test_blocking():
    before = open_fds()
    a, peer = pair()
    c = vhub.Client(sock=a, timeout=5)

    # fds in: the request's fds ride with its line, in order
    x, y = tagged("x"), tagged("y")
    p = c.request("vm.memory.add", {"vm": "vm0", "fd": 0}, fds=[x, y])
    framing.close_fds([x, y])
    m, fds = peer.read_msg()
    check_eq((m["fds"], [tag_of(fd) for fd in fds]), (2, ["x", "y"]),
             "the request declared \"fds\": 2 and both fds arrived with it, in order")
    framing.close_fds(fds)

    # fds out, split over messages: one sendmsg carries the event's fd and
    # the response's fd; each message takes its own
    e1, r1 = tagged("event"), tagged("response")
    peer.send(event("device.backend_request", 1, device="d0") + result(m["id"], {"fd": 0}, 1),
              [e1, r1])
    framing.close_fds([e1, r1])
    res, rfds = p.result_fds()
    check_eq((res, [tag_of(fd) for fd in rfds]), ({"fd": 0}, ["response"]),
             "the response got the fd that came for it")
    ev = c.wait_event(lambda e: e.name == "device.backend_request", 5)
    check_eq([tag_of(fd) for fd in ev.fds], ["event"], "the event got its own fd (Event.fds)")
    framing.close_fds(rfds + ev.fds)

    # errors carry code, message and data, as their own class
    p = c.request("vm.create", {"vm": "vm0"})
    m, _ = peer.read_msg()
    peer.send(line({"jsonrpc": "2.0", "id": m["id"], "error": {
        "code": -32003, "message": "already exists", "data": {"detail": "VM vm0 exists"}}}))
    e = expect_error(vhub.AlreadyExists, p.result, 5, what="an error response")
    check_eq((e.code, e.message, e.data, e.detail), (vhub.ALREADY_EXISTS, "already exists",
                                                      {"detail": "VM vm0 exists"}, "VM vm0 exists"),
             "RpcError code, message, data")
    check(isinstance(e, vhub.RpcError), "AlreadyExists is an RpcError")

    # a per-call timeout; the late response's fd is closed, not leaked
    t0 = time.monotonic()
    expect_error(vhub.Timeout, c.call, "device.stop", {"vm": "vm0", "device": "d0"}, timeout=0.2,
                 what="a call the peer does not answer in time")
    check(0.15 < time.monotonic() - t0 < 3, "the timeout is the call's (0.2 s)")
    m, _ = peer.read_msg()
    mid = open_fds()
    late = tagged("late")
    peer.send(result(m["id"], {}, 1), [late])
    os.close(late)
    _answer_next(peer, {"ok": 1})
    check_eq(c.call("daemon.info", timeout=5), {"ok": 1},
             "the connection goes on after a timed-out call")
    check_eq(open_fds(), mid, "the late response's fd was closed on arrival")
    check_eq(c.unclaimed_fds(), [], "nothing unclaimed")

    # a message that declares more fds than arrived breaks the connection
    p = c.request("daemon.info")
    m, _ = peer.read_msg()
    lone = tagged("lone")
    peer.send(result(m["id"], {}, 2), [lone])
    os.close(lone)
    expect_error(vhub.ProtocolError, p.result, 5, what="a response declaring 2 fds with 1 sent")
    check(c.closed and c.protocol_errors, "the client recorded the violation and closed",
          c.protocol_errors)
    expect_error(vhub.ConnectionClosed, c.call, "daemon.info", what="a call after that")
    c.close()
    peer.close()
    check_no_new_fds(before, "blocking client, after close")

    # fds with no message at all
    a, peer = pair()
    c = vhub.Client(sock=a, timeout=5)
    stray = tagged("stray")
    peer.send(event("device.config_changed"), [stray])
    os.close(stray)
    check(c.wait_closed(5), "fds no message declares: the connection is closed")
    check_eq(c.unclaimed_fds(), [], "and the stray fd with it")
    c.close()
    peer.close()
    check_no_new_fds(before, "after a stray fd")


def _answer_next(peer, res):
    """Answer the next request once it arrives (in a thread: the call blocks)."""
    def go():
        m, fds = peer.read_msg()
        framing.close_fds(fds)
        peer.send(result(m["id"], res))
    threading.Thread(target=go, daemon=True).start()


# ---- the asyncio client ----

async def atest_asyncio():
    before = open_fds()
    a, peer = pair()
    c = vhub.aio.Client(a, timeout=5)

    x, y = tagged("x"), tagged("y")
    task = asyncio.ensure_future(c.call_fds("vm.memory.add", {"vm": "vm0", "fd": 0}, [x, y]))
    await asyncio.sleep(0)
    framing.close_fds([x, y])    # the client sent (or holds) its own copies
    m, fds = peer.read_msg()
    check_eq((m["fds"], [tag_of(fd) for fd in fds]), (2, ["x", "y"]),
             "asyncio: the request carried its 2 fds, in order")
    framing.close_fds(fds)
    e1, r1 = tagged("event"), tagged("response")
    peer.send(event("device.backend_request", 1, device="d0") + result(m["id"], {"fd": 0}, 1),
              [e1, r1])
    framing.close_fds([e1, r1])
    res, rfds = await task
    check_eq((res, [tag_of(fd) for fd in rfds]), ({"fd": 0}, ["response"]),
             "asyncio: the response's fd, not the event's")
    os.close(rfds[0])
    ev = await c.next_event(timeout=5)
    check_eq((ev.name, [tag_of(fd) for fd in ev.fds]), ("device.backend_request", ["event"]),
             "asyncio: the event with its fd")
    framing.close_fds(ev.fds)

    # responses in any order
    t1 = asyncio.ensure_future(c.call("device.list", {"vm": "vm0"}))
    t2 = asyncio.ensure_future(c.call("vm.list"))
    await asyncio.sleep(0)
    m1, _ = peer.read_msg()
    m2, _ = peer.read_msg()
    peer.send(result(m2["id"], {"n": 2}) + result(m1["id"], {"n": 1}))
    check_eq([await t1, await t2], [{"n": 1}, {"n": 2}], "asyncio: out-of-order answers by id")

    # errors
    t = asyncio.ensure_future(c.call("device.remove", {"vm": "vm0", "device": "nope"}))
    await asyncio.sleep(0)
    m, _ = peer.read_msg()
    peer.send(line({"jsonrpc": "2.0", "id": m["id"], "error": {
        "code": -32002, "message": "no such device", "data": {"detail": "no device nope"}}}))
    try:
        await t
        check(False, "asyncio: an error response raises")
    except vhub.NoSuchDevice as e:
        check_eq((e.code, e.message, e.detail), (-32002, "no such device", "no device nope"),
                 "asyncio: NoSuchDevice with code, message, data")

    # per-call timeout; the late answer's fd is closed
    try:
        await c.call("device.stop", {"vm": "vm0", "device": "d0"}, timeout=0.2)
        check(False, "asyncio: the call times out")
    except vhub.Timeout as e:
        log("ok: asyncio: per-call timeout raised Timeout: %s" % e)
    m, _ = peer.read_msg()
    mid = open_fds()
    late = tagged("late")
    peer.send(result(m["id"], {}, 1), [late])
    os.close(late)
    # cancelled while waiting: also forgotten
    t = asyncio.ensure_future(c.call("device.reset", {"vm": "vm0", "device": "d0"}))
    await asyncio.sleep(0)
    t.cancel()
    try:
        await t
    except asyncio.CancelledError:
        log("ok: asyncio: a cancelled call raises CancelledError")
    m, _ = peer.read_msg()
    late = tagged("late2")
    peer.send(result(m["id"], {}, 1), [late])
    os.close(late)
    t = asyncio.ensure_future(c.call("daemon.info"))
    await asyncio.sleep(0)
    m, _ = peer.read_msg()
    peer.send(result(m["id"], {"ok": 1}))
    check_eq(await t, {"ok": 1}, "asyncio: the connection goes on")
    check_eq(open_fds(), mid, "asyncio: the late answers' fds (timed out, cancelled) were closed")

    # events through the async iterator, filtered
    peer.send(event("device.disconnected", device="d0", reason="EOF")
              + event("device.config_changed", device="d0")
              + event("device.reconnected", device="d0", reconnects=1))
    got = []
    async for ev in c.events(lambda e: e.name != "device.config_changed"):
        got.append(ev.name)
        if len(got) == 2:
            break
    check_eq(got, ["device.disconnected", "device.reconnected"], "asyncio: events() in order")

    # a message declaring more fds than sent: ProtocolError for the waiting
    # call and for the event iterator; everything closed
    waiter = asyncio.ensure_future(c.call("daemon.info"))
    evs = asyncio.ensure_future(c.next_event())
    await asyncio.sleep(0)
    m, _ = peer.read_msg()
    lone = tagged("lone")
    peer.send(result(m["id"], {}, 3), [lone])
    os.close(lone)
    for what, fut in (("the waiting call", waiter), ("next_event", evs)):
        try:
            await asyncio.wait_for(fut, 5)
            check(False, "asyncio: %s fails on the violation" % what)
        except vhub.ProtocolError as e:
            log("ok: asyncio: %s raised ProtocolError: %s" % (what, e))
    check(c.closed, "asyncio: the connection is closed after the violation")
    await c.close()
    peer.close()
    check_no_new_fds(before, "asyncio client, after close")

    # the daemon closing: pending calls and the iterator see ConnectionClosed
    a, peer = pair()
    c = vhub.aio.Client(a, timeout=5)
    waiter = asyncio.ensure_future(c.call("daemon.info"))
    await asyncio.sleep(0)
    peer.read_msg()
    peer.close()
    try:
        await waiter
        check(False, "asyncio: a call pending at EOF fails")
    except vhub.ConnectionClosed as e:
        check(not isinstance(e, vhub.ProtocolError), "asyncio: EOF is ConnectionClosed: %s" % e)
    try:
        async for _ in c.events():
            pass
        check(False, "asyncio: events() raises when the daemon closed")
    except vhub.ConnectionClosed:
        log("ok: asyncio: events() raises ConnectionClosed once the daemon closed")
    await c.close()
    # ... and our own close ends the iterator quietly
    a, peer = pair()
    c = vhub.aio.Client(a, timeout=5)
    it = asyncio.ensure_future(_drain(c))
    await asyncio.sleep(0.01)
    await c.close()
    check_eq(await asyncio.wait_for(it, 5), [], "asyncio: close() ends events() quietly")
    peer.close()
    check_no_new_fds(before, "asyncio client, at the end")

    # a big request goes out whole through a full socket buffer (add_writer)
    a, peer = pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c = vhub.aio.Client(a, timeout=5)
    big = "v" * (1 << 20)
    fd = tagged("big")
    task = asyncio.ensure_future(c.call("vm.create", {"vm": "vm0", "pad": big}, [fd]))
    await asyncio.sleep(0)
    os.close(fd)
    loop = asyncio.get_running_loop()
    m, fds = await loop.run_in_executor(None, peer.read_msg)
    check_eq((len(m["params"]["pad"]), [tag_of(f) for f in fds]), (len(big), ["big"]),
             "asyncio: a 1 MiB request through a 4 KiB buffer arrives whole with its fd")
    framing.close_fds(fds)
    peer.send(result(m["id"], {}))
    check_eq(await task, {}, "asyncio: and is answered")
    await c.close()
    peer.close()
    check_no_new_fds(before, "asyncio client, big request")


async def _drain(c):
    return [ev async for ev in c.events()]


def main(t):
    test_decoder()
    test_blocking()
    asyncio.run(atest_asyncio())


if __name__ == "__main__":
    run(main)

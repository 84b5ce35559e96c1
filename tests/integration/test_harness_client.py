#!/usr/bin/env python3
"""Self-test of vhubtest.client against a scripted peer (no vhubd).

Checks the framing the contract asks for: "fds": N with SCM_RIGHTS on the
same sendmsg, received fds assigned in arrival order to the messages that
declare them, responses matched by id out of order, notifications queued
for wait_event, id-null errors, batches, u64 parsing, and EOF detection.
"""

import json
import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.client import (Client, ConnectionClosed, RpcError, u64, u64_json)  # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, run              # noqa: E402


def line(obj):
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def read_msg(conn, state):
    """One line + the fds that came with it (scripted peer side)."""
    while b"\n" not in state["buf"]:
        data, fds, _, _ = socket.recv_fds(conn, 65536, 16)
        state["fds"] += fds
        if not data:
            raise EOFError
        state["buf"] += data
    ln, state["buf"] = state["buf"].split(b"\n", 1)
    msg = json.loads(ln)
    n = msg.get("fds", 0) if isinstance(msg, dict) else 0
    mine, state["fds"] = state["fds"][:n], state["fds"][n:]
    return msg, mine


def peer(ls, seen):
    conn, _ = ls.accept()
    st = {"buf": b"", "fds": []}
    # 1: a request with two fds, answered after request 2 (out of order).
    m1, f1 = read_msg(conn, st)
    m2, f2 = read_msg(conn, st)
    seen["m1"] = m1
    seen["f1"] = [os.read(fd, 16) for fd in f1]
    for fd in f1 + f2:
        os.close(fd)
    conn.sendall(line({"jsonrpc": "2.0", "method": "event",
                       "params": {"event": "device.config_changed", "vm": "vm0", "device": "d0"}}))
    conn.sendall(line({"jsonrpc": "2.0", "id": m2["id"], "error":
                       {"code": -32002, "message": "no such device", "data": {"detail": "d9"}}}))
    conn.sendall(line({"jsonrpc": "2.0", "id": m1["id"], "result": {"got": len(f1)}}))
    # 3: answered with two messages carrying fds, sent back to back, then
    # the response (declaring 2 fds) whose fds are pipes we write into.
    m3, _ = read_msg(conn, st)
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, b"first")
    os.write(w2, b"second")
    socket.send_fds(conn, [line({"jsonrpc": "2.0", "method": "event",
                                 "params": {"event": "device.backend_request", "vm": "vm0"},
                                 "fds": 1})], [r1])
    socket.send_fds(conn, [line({"jsonrpc": "2.0", "id": m3["id"], "result": {"fd": 0},
                                 "fds": 1})], [r2])
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    # 4: a batch, answered in reverse order; then an id-null parse error.
    m4, _ = read_msg(conn, st)
    conn.sendall(line([{"jsonrpc": "2.0", "id": r["id"], "result": {"i": r["params"]["i"]}}
                       for r in reversed(m4)]))
    while b"\n" not in st["buf"]:
        st["buf"] += conn.recv(4096)
    seen["raw"] = st["buf"].split(b"\n", 1)[0]
    conn.sendall(line({"jsonrpc": "2.0", "id": None, "error": {"code": -32700,
                                                               "message": "parse error"}}))
    conn.close()


def main(t):
    d = t.tmpdir()
    path = os.path.join(d, "control.sock")
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(path)
    ls.listen(1)
    seen = {}
    th = threading.Thread(target=peer, args=(ls, seen), daemon=True)
    th.start()
    c = Client(path, timeout=5)
    t.defer(c.close)

    ra, wa = os.pipe()
    rb, wb = os.pipe()
    os.write(wa, b"A")
    os.write(wb, b"B")
    p1 = c.request("vm.memory.add", {"vm": "vm0", "fd": 0}, fds=[ra, rb])
    p2 = c.request("device.remove", {"vm": "vm0", "device": "d9"})
    for fd in (ra, wa, rb, wb):
        os.close(fd)
    e = expect_error(RpcError, p2.result, 5, what="the second request (answered first)")
    check_eq((e.code, e.data), (-32002, {"detail": "d9"}), "error code and data")
    check_eq(p1.result(5), {"got": 2}, "first request's result, answered after the second")
    check_eq(seen["m1"].get("fds"), 2, "request declared \"fds\": 2")
    check_eq(seen["f1"], [b"A", b"B"], "the peer got both fds, in order, with that line")
    ev = c.wait_event(lambda e: e["event"] == "device.config_changed", 5)
    check_eq(ev["device"], "d0", "notification queued for wait_event")

    res, fds = c.call_fds("vm.dirty_log.start", {"vm": "vm0"})
    check_eq(len(fds), 1, "response carried one fd")
    check_eq(os.read(fds[0], 16), b"second", "the response got its own fd (not the event's)")
    os.close(fds[0])
    ev = c.wait_event(lambda e: e["event"] == "device.backend_request", 5)
    check_eq(os.read(ev["_fds"][0], 16), b"first", "the event got the fd sent with it")
    os.close(ev["_fds"][0])

    out = c.batch([("daemon.info", {"i": 1}), ("vm.list", {"i": 2})], timeout=5)
    check_eq(sorted(r["result"]["i"] for r in out), [1, 2], "batch answered as an array")
    c.send_raw(b'{"not json\n')
    r = c.wait_null_response(5)
    check_eq(r.error["code"], -32700, "id-null error queued")
    check_eq(seen["raw"], b'{"not json', "send_raw sent the bytes as given")
    check(c.wait_closed(5), "EOF from the peer is seen")
    expect_error(ConnectionClosed, c.call, "daemon.info", timeout=2,
                 what="a call on a connection the peer closed")
    check_eq(c.unclaimed_fds(), [], "no fd left unclaimed")
    check_eq(c.protocol_errors, [], "no framing trouble recorded")

    check_eq(u64(5), 5, "u64(int)")
    check_eq(u64("0xffffffffffffffff"), (1 << 64) - 1, "u64(hex string)")
    check_eq(u64_json(1 << 60), "0x1000000000000000", "u64 above 53 bits encodes as hex")
    check_eq(u64_json(1 << 52), 1 << 52, "u64 below 53 bits stays an integer")
    expect_error(ValueError, u64, "12", what="u64 of a decimal string")
    th.join(2)


if __name__ == "__main__":
    run(main)

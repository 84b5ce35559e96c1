#!/usr/bin/env python3
"""Every error code and bad-input case of the control contract
(docs/control-api.md), against the real vhubd and real back-ends.

Each case asserts the error code, that error.data.detail is a sentence and,
where a field is at fault, that the detail names it; for -32006/-32007 that
error.data carries the device and the vhost-user request.  After EVERY case
the daemon's fd count (/proc/PID/fd) is back to its baseline: an fd a bad
request carried was closed, nothing leaked.

Sections: framing (-32700, -32600, fds), request objects, params (-32602:
unknown members, types, names, u64s, fd indexes), -32001/-32002/-32003,
real qemu-storage-daemon devices (-32004, device.start params), -32005
(virtiofsd has no CONFIG; qsd has no RARP/NET_MTU), -32006 (a listener that
accepts and closes; a refusing vhub-test-backend), -32007 (a listener that
never answers, --backend-timeout-ms 300), -32008 (every configurable limit),
-32009 (bad regions), -32010 (paths and owners; nothing connected), batches
and notifications.
"""

import json
import os
import select
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                                   # noqa: E402
from vhubtest.backends import QsdNullBackend, VirtiofsdBackend         # noqa: E402
from vhubtest.client import (ALREADY_EXISTS, BACKEND_ERROR,              # noqa: E402
                             BACKEND_NOT_ALLOWED, BACKEND_TIMEOUT, BAD_REGION,
                             INVALID_PARAMS, INVALID_REQUEST, LIMIT_REACHED,
                             METHOD_NOT_FOUND, NO_SUCH_DEVICE, NO_SUCH_VM,
                             NOT_SUPPORTED, PARSE_ERROR, WRONG_STATE, Client,
                             ConnectionClosed, RpcError, encode, u64)
from vhubtest.contract import (ALL_METHODS_NAMING_A_VM, FakeListener,  # noqa: E402
                               FdBaseline, check_error, closing, expect_rpc,
                               half_closed_session, names_field)
from vhubtest.daemon import Daemon                                     # noqa: E402
from vhubtest.memory import GuestMemory, memfd                         # noqa: E402
from vhubtest.procs import wait_until                                  # noqa: E402
from vhubtest.testing import (TestFailure, check, check_eq, log,       # noqa: E402
                              run)
from vhubtest.vmm import Vmm                                           # noqa: E402

MiB = 1 << 20
PAGE = 4096


# ---------------------------------------------------------------- helpers

def wait_eof(fd, timeout=5.0):
    """The read end of a pipe sees EOF: every copy of the write end is closed."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                if os.read(fd, 4096) == b"":
                    return True
            except BlockingIOError:
                pass


def wait_batch(c, timeout=5.0):
    def pick():
        return c._batches.pop(0) if c._batches else None
    return c._wait(pick, timeout, "a batch response")


def wait_id_or_null(c, req_id, timeout=5.0):
    """The response to req_id, or (if the daemon could not tell) one with id null."""
    def pick():
        if req_id in c._responses:
            return c._responses.pop(req_id)
        return c._null.pop(0) if c._null else None
    return c._wait(pick, timeout, "response to id %r (or id null)" % (req_id,))


def quiet_for(c, seconds):
    """Nothing at all arrives on c for `seconds` (responses, batches, nulls)."""
    time.sleep(seconds)
    with c._lock:
        return not c._responses and not c._null and not c._batches and not c._other


def raw_request(method, params=None, req_id=1, **top):
    msg = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    msg.update(top)
    return encode(msg)


# ------------------------------------------------------------- framing

def framing_lines(daemon, c, fb):
    """Lines: invalid JSON, a value that is no request, blank lines, the 1 MiB limit."""
    # -32700: invalid JSON, id null; the connection stays usable.
    for bad in (b'{"jsonrpc":"2.0","id":1,"method":\n',
                b'{"jsonrpc":"2.0","id":2,"method":"daemon.info"} trailing\n',
                b'\xff\xfe{}\n',
                b'{"jsonrpc":"2.0","id":3,"method":"daemon.info",}\n'):
        c.send_raw(bad)
        r = c.wait_null_response(5)
        check("id" in r.msg and r.msg["id"] is None, "invalid JSON %r: answered with id null" % bad[:30])
        check_error(r.error, PARSE_ERROR, "invalid JSON %r" % bad[:30])
        info = c.call("daemon.info", timeout=5)
        check_eq(info["pid"], daemon.pid, "the same connection still answers after -32700")
        fb.after("invalid JSON")

    # A value that is JSON but not a request: -32600, connection stays.
    c.send_raw(b'5\n')
    r = c.wait_null_response(5)
    check_error(r.error, INVALID_REQUEST, "a bare number as a message")
    c.call("daemon.info", timeout=5)
    fb.after("a bare number")

    # Blank lines are not messages.
    c.send_raw(b'\n  \n')
    check(quiet_for(c, 0.2), "blank lines get no answer")
    c.call("daemon.info", timeout=5)

    # A line of exactly 1 MiB is accepted (padding inside the JSON value).
    head = b'{"jsonrpc":"2.0","id":4242,"method":"daemon.info"'
    line = head + b" " * (MiB - len(head) - 1) + b"}"
    check_eq(len(line), MiB, "boundary line length")
    big = daemon.client()
    big.send_raw(line + b"\n")
    check_eq(big.wait_response(4242, 10).result["pid"], daemon.pid,
             "a line of exactly 1 MiB is answered")
    big.close()
    fb.after("a 1 MiB line")

    # Longer than 1 MiB: -32600 id null, then the connection is closed.
    over = daemon.client()
    line = head + b" " * (MiB - len(head)) + b"}\n"       # 1 MiB + 1, then '\n'
    sender = threading.Thread(target=lambda: _send_ignoring_close(over, line), daemon=True)
    sender.start()
    r = over.wait_null_response(10)
    check_error(r.error, INVALID_REQUEST, "a line longer than 1 MiB")
    check(r.msg["id"] is None, "oversized line: id null")
    check(over.wait_closed(5), "oversized line: the daemon closed the connection")
    sender.join(5)
    over.close()
    fb.after("an oversized line")

    # Even without a newline: the daemon does not buffer past the limit.
    over = daemon.client()
    sender = threading.Thread(target=lambda: _send_ignoring_close(over, b"[" + b" " * (MiB + 16)),
                              daemon=True)
    sender.start()
    r = over.wait_null_response(10)
    check_error(r.error, INVALID_REQUEST, "an unterminated line beyond 1 MiB")
    check(over.wait_closed(5), "unterminated oversized line: connection closed")
    sender.join(5)
    over.close()
    fb.after("an unterminated oversized line")


def framing_fds(daemon, c, fb):
    """The fds that ride with the lines: counted, claimed, limited, split across sends."""
    # fds: more declared than sent -> -32600 id null, closed, queued fds closed.
    for declared, sent in ((3, 1), (1, 0), (2, 1), (254, 1)):
        x = daemon.client()
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(sent)]
        x.send_raw(raw_request("daemon.info", fds=declared), [w for _, w in pipes])
        closing([w for _, w in pipes])
        r = x.wait_null_response(5)
        check_error(r.error, INVALID_REQUEST, "\"fds\": %d with %d sent" % (declared, sent))
        check(x.wait_closed(5), "fds mismatch %d/%d: connection closed" % (declared, sent))
        for rd, _ in pipes:
            check(wait_eof(rd), "fds mismatch %d/%d: the daemon closed the queued fd" % (declared, sent))
        closing([rd for rd, _ in pipes])
        x.close()
        fb.after("\"fds\": %d with %d fds sent" % (declared, sent))

    # 253 fds in one message (the kernel's limit) are taken and, unused, closed.
    pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(253)]
    c.send_raw(raw_request("daemon.info", req_id=253, fds=253), [w for _, w in pipes])
    closing([w for _, w in pipes])
    check_eq(c.wait_response(253, 5).result["pid"], daemon.pid, "a request with 253 fds is answered")
    check(all(wait_eof(rd) for rd, _ in pipes), "all 253 unused fds were closed")
    closing([rd for rd, _ in pipes])
    fb.after("a request with 253 fds")

    # Malformed "fds" members are framing violations too.
    for bad in ('"x"', '-1', '1.5', 'null'):
        x = daemon.client()
        x.send_raw(b'{"jsonrpc":"2.0","id":1,"method":"daemon.info","fds":%s}\n' % bad.encode())
        r = x.wait_null_response(5)
        check_error(r.error, INVALID_REQUEST, "\"fds\": %s" % bad)
        check(x.wait_closed(5), "\"fds\": %s: connection closed" % bad)
        x.close()
        fb.after("\"fds\": %s" % bad)

    # fds with no line to claim them.
    for what, data in (("a blank line", b"\n"),
                       ("a complete line that declares no fds",
                        raw_request("daemon.info", req_id=77))):
        x = daemon.client()
        rd, w = os.pipe2(os.O_CLOEXEC)
        x.send_raw(data, [w])
        os.close(w)
        r = x.wait_null_response(5)
        check_error(r.error, INVALID_REQUEST, "an fd sent with %s" % what)
        check(x.wait_closed(5), "an fd sent with %s: connection closed" % what)
        check(wait_eof(rd), "an fd sent with %s: the daemon closed it" % what)
        os.close(rd)
        x.close()
        fb.after("an fd sent with %s" % what)

    # fds ride with the first byte of their line; the rest may follow later.
    c.call("vm.create", {"vm": "fr"})
    m = memfd(64 * 1024)
    line = raw_request("vm.memory.add", {"vm": "fr", "gpa": 0, "size": 65536, "fd": 0},
                       req_id=901, fds=1)
    c.send_raw(line[:10], [m])
    time.sleep(0.05)
    c.send_raw(line[10:])
    c.wait_response(901, 5).raise_for_error()
    os.close(m)
    # Two lines and their fds in one sendmsg: each takes its own from the front.
    a, b = memfd(64 * 1024), memfd(128 * 1024)
    both = (raw_request("vm.memory.add", {"vm": "fr", "gpa": 0x100000, "size": 65536, "fd": 0},
                        req_id=902, fds=1) +
            raw_request("vm.memory.add", {"vm": "fr", "gpa": 0x200000, "size": 131072, "fd": 0},
                        req_id=903, fds=1))
    c.send_raw(both, [a, b])
    closing([a, b])
    c.wait_response(902, 5).raise_for_error()
    c.wait_response(903, 5).raise_for_error()
    regs = sorted((u64(r["gpa"]), u64(r["size"])) for r in
                  c.call("vm.memory.list", {"vm": "fr"})["regions"])
    check_eq(regs, [(0, 65536), (0x100000, 65536), (0x200000, 131072)],
             "fds split from their line, and two lines' fds in one sendmsg, went to the right requests")
    c.call("vm.destroy", {"vm": "fr"})
    fb.after("fds split across sends")


def framing(t, daemon, c, fb):
    framing_lines(daemon, c, fb)
    framing_fds(daemon, c, fb)


def half_close(t, daemon, c, fb):
    """A client that sends its requests and shuts down its writing side still
    gets the answers, then EOF."""
    msgs, _ = half_closed_session(daemon.control, [raw_request("daemon.info", req_id=1),
                                                   raw_request("vm.list", req_id=2)], timeout=5)
    check_eq(sorted(m.get("id") for m in msgs), [1, 2],
             "both requests answered after the client's SHUT_WR, then EOF")
    check(all("result" in m for m in msgs), "... with results")
    fb.after("a half-closed client")


def _send_ignoring_close(client, data):
    try:
        client.send_raw(data)
    except (ConnectionClosed, OSError):
        pass


# ----------------------------------------------------- request objects

def request_objects(t, daemon, c, fb):
    expect_rpc(c, "vm.nosuch", {}, METHOD_NOT_FOUND)
    expect_rpc(c, "", {}, METHOD_NOT_FOUND, what="empty method name")
    expect_rpc(c, "daemon.info.", None, METHOD_NOT_FOUND, what="daemon.info. (trailing dot)")
    expect_rpc(c, "DAEMON.INFO", None, METHOD_NOT_FOUND, what="method names are case-sensitive")
    fb.after("unknown methods")

    cases = [
        ("no jsonrpc member", {"id": 11, "method": "daemon.info"}),
        ("jsonrpc 1.0", {"jsonrpc": "1.0", "id": 12, "method": "daemon.info"}),
        ("method not a string", {"jsonrpc": "2.0", "id": 13, "method": 5}),
        ("no method", {"jsonrpc": "2.0", "id": 14}),
        ("unknown top-level member", {"jsonrpc": "2.0", "id": 15, "method": "daemon.info",
                                      "extra": 1}),
    ]
    for what, obj in cases:
        c.send_raw(encode(obj))
        r = wait_id_or_null(c, obj["id"])
        check(r.id in (obj["id"], None), "%s: id echoed or null" % what)
        check_error(r.error, INVALID_REQUEST, what)
        fb.after(what)
    for what, idv in (("id an object", {"a": 1}), ("id an array", [1]), ("id a boolean", True),
                      ("id a string of 257 bytes (a call keeps its id: at most 256)", "i" * 257)):
        c.send_raw(encode({"jsonrpc": "2.0", "id": idv, "method": "daemon.info"}))
        r = c.wait_null_response(5)
        check_error(r.error, INVALID_REQUEST, what)
        fb.after(what)
    # string ids are echoed exactly
    c.send_raw(encode({"jsonrpc": "2.0", "id": "abc-1", "method": "daemon.info"}))
    check_eq(c.wait_response("abc-1", 5).result["pid"], daemon.pid, "a string id is echoed")
    c.send_raw(encode({"jsonrpc": "2.0", "id": "i" * 256, "method": "daemon.info"}))
    check_eq(c.wait_response("i" * 256, 5).result["pid"], daemon.pid, "a 256-byte string id is echoed")

    for what, params in (("params an array", ["vm0"]), ("params a string", "vm0"),
                         ("params a number", 5), ("params null", None)):
        c.send_raw(encode({"jsonrpc": "2.0", "id": 21, "method": "vm.create", "params": params}))
        r = c.wait_response(21, 5)
        check_error(r.error, INVALID_PARAMS, what)
        fb.after(what)
    # params may be omitted or {} for methods without params
    check_eq(c.call("daemon.info", {})["pid"], daemon.pid, "daemon.info with params {}")
    check(c.call("vm.list")["vms"] is not None, "vm.list without params")


# -------------------------------------------------------------- params

DEVICE_METHODS = [(m, p, n) for m, p, n in ALL_METHODS_NAMING_A_VM
                  if "device" in p and m != "device.add"]


def fresh_fds(n):
    """n fds for a request: eventfds (any fd type does for index checks)."""
    return [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(n)]


def params_unknown_members(c, fb):
    """Unknown members, top level and nested; the call had no effect."""
    expect_rpc(c, "vm.create", {"vm": "u1", "bogus": 1}, INVALID_PARAMS, field="bogus")
    check(all(v["vm"] != "u1" for v in c.call("vm.list")["vms"]),
          "a refused vm.create created nothing")
    expect_rpc(c, "daemon.info", {"verbose": True}, INVALID_PARAMS, field="verbose")
    expect_rpc(c, "vm.list", {"all": 1}, INVALID_PARAMS, field="all")
    expect_rpc(c, "vm.memory.list", {"vm": "vm0", "Gpa": 0}, INVALID_PARAMS, field="Gpa")
    m = memfd(65536)
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": 0,
                                    "flags": 1}, INVALID_PARAMS, field="flags", fds=[m])
    os.close(m)
    fb.after("unknown members")


def params_missing_members(c, fb):
    """Missing required members."""
    expect_rpc(c, "vm.create", {}, INVALID_PARAMS, field="vm")
    expect_rpc(c, "vm.memory.list", {}, INVALID_PARAMS, field="vm")
    m = memfd(65536)
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "fd": 0}, INVALID_PARAMS,
               field="size", fds=[m])
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536}, INVALID_PARAMS,
               field="fd", fds=[m])
    os.close(m)
    expect_rpc(c, "device.add", {"vm": "vm0", "device": "d0"}, INVALID_PARAMS, field="socket")
    expect_rpc(c, "device.add", {"vm": "vm0", "socket": "/x.sock"}, INVALID_PARAMS, field="device")
    fb.after("missing members")


def params_wrong_types(c, fb, sock):
    """Wrong types."""
    for params, field in (
            ({"vm": 5}, "vm"), ({"vm": None}, "vm"), ({"vm": ["vm1"]}, "vm"),
            ({"vm": "t1", "linger_ms": "100"}, "linger_ms"),
            ({"vm": "t1", "linger_ms": True}, "linger_ms"),
            ({"vm": "t1", "linger_ms": 1.5}, "linger_ms"),
            ({"vm": "t1", "linger_ms": -1}, "linger_ms"),
            ({"vm": "t1", "uid": "0"}, "uid"),
            ({"vm": "t1", "uid": -1}, "uid")):
        expect_rpc(c, "vm.create", params, INVALID_PARAMS, field=field)
    for params, field in (
            ({"device": "d0", "socket": 5}, "socket"),
            ({"device": "d0", "socket": sock, "queues": "2"}, "queues"),
            ({"device": "d0", "socket": sock, "queues": 0}, "queues"),
            ({"device": "d0", "socket": sock, "queues": -1}, "queues"),
            ({"device": "d0", "socket": sock, "mode": "peer"}, "mode"),
            ({"device": "d0", "socket": sock, "mode": 1}, "mode"),
            ({"device": "d0", "socket": sock, "type": 7}, "type"),
            ({"device": "d0", "socket": sock, "reconnect_ms": "10"}, "reconnect_ms"),
            ({"device": "d0", "socket": sock, "reconnect_ms": -5}, "reconnect_ms"),
            ({"device": 1, "socket": sock}, "device")):
        expect_rpc(c, "device.add", dict(params, vm="vm0"), INVALID_PARAMS, field=field)
    check_eq(c.call("device.list", {"vm": "vm0"})["devices"], [],
             "refused device.adds added nothing")
    fb.after("wrong types")


def params_bad_names(c, fb, sock):
    """Names: 1-64 of [A-Za-z0-9._-]."""
    for bad in ("", "a" * 65, "a/b", "/", "a b", "vm\u00e9", "a\nb", "a:b", "*"):
        expect_rpc(c, "vm.create", {"vm": bad}, INVALID_PARAMS, field="vm",
                   what="vm.create with name %r" % bad[:70])
        expect_rpc(c, "device.add", {"vm": "vm0", "device": bad, "socket": sock}, INVALID_PARAMS,
                   field="device", what="device.add with device name %r" % bad[:70])
        expect_rpc(c, "vm.memory.list", {"vm": bad}, INVALID_PARAMS, field="vm",
                   what="vm.memory.list naming %r" % bad[:70])
    check_eq(sorted(v["vm"] for v in c.call("vm.list")["vms"]), ["vm0"],
             "no VM was created by a bad name")
    for good in ("a" * 64, "A.b_c-9", "-", "...", "0"):
        c.call("vm.create", {"vm": good})
        c.call("vm.destroy", {"vm": good})
    log("ok: names of 1 and 64 characters of [A-Za-z0-9._-] are accepted")
    fb.after("bad names")


def params_u64(c, fb):
    """U64: an integer or a "0x..." string; nothing else."""
    for bad in ("0xZZ", "0x", "0x-1", "0x 1", " 0x1000", "4096", "1e3", "0x" + "1" * 17,
                -4096, 4096.0, 4096.5, True, None, [4096], {"v": 1}):
        m = memfd(65536)
        expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": bad, "size": 65536, "fd": 0},
                   INVALID_PARAMS, field="gpa", fds=[m], what="gpa %r" % (bad,))
        os.close(m)
        expect_rpc(c, "vm.memory.remove", {"vm": "vm0", "gpa": bad}, INVALID_PARAMS,
                   field="gpa", what="vm.memory.remove gpa %r" % (bad,))
    m = memfd(65536)
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": "0xZZ", "fd": 0},
               INVALID_PARAMS, field="size", fds=[m])
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "offset": -1, "fd": 0},
               INVALID_PARAMS, field="offset", fds=[m])
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "uaddr": "0xg", "fd": 0},
               INVALID_PARAMS, field="uaddr", fds=[m])
    os.close(m)
    # both accepted forms work, upper-case hex too
    m = memfd(65536)
    c.call("vm.memory.add", {"vm": "vm0", "gpa": "0x100000", "size": "0X10000", "fd": 0,
                             "uaddr": "0xFFFF00000000", "offset": "0x0"}, fds=[m])
    os.close(m)
    regs = c.call("vm.memory.list", {"vm": "vm0"})["regions"]
    check_eq([(u64(r["gpa"]), u64(r["size"]), u64(r["uaddr"])) for r in regs],
             [(0x100000, 0x10000, 0xFFFF00000000)], "hex-string u64s are read as hex")
    c.call("vm.memory.remove", {"vm": "vm0", "gpa": 1048576})
    # integers above 2^53 are accepted too; the daemon answers those as "0x..."
    # strings and everything up to 2^53 - 1 as integers
    m = memfd(65536)
    c.call("vm.memory.add", {"vm": "vm0", "gpa": (1 << 53) - 65536, "size": 65536, "fd": 0,
                             "uaddr": 1 << 56}, fds=[m])
    os.close(m)
    r0 = c.call("vm.memory.list", {"vm": "vm0"})["regions"][0]
    check_eq(r0["gpa"], (1 << 53) - 65536, "a gpa below 2^53 is answered as an integer")
    check(type(r0["gpa"]) is int, "... of JSON integer type")
    check_eq(r0["uaddr"], "0x100000000000000", "a uaddr of 2^56 is answered as a \"0x...\" string")
    c.call("vm.memory.remove", {"vm": "vm0", "gpa": (1 << 53) - 65536})
    m = memfd(65536)
    c.call("vm.memory.add", {"vm": "vm0", "gpa": 1 << 53, "size": 65536, "fd": 0,
                             "uaddr": (1 << 53) - 65536}, fds=[m])
    os.close(m)
    r0 = c.call("vm.memory.list", {"vm": "vm0"})["regions"][0]
    check_eq(r0["gpa"], "0x20000000000000", "a gpa of exactly 2^53 is answered as a string")
    check_eq(r0["uaddr"], (1 << 53) - 65536, "a uaddr of 2^53 - 64 KiB as an integer")
    c.call("vm.memory.remove", {"vm": "vm0", "gpa": "0x20000000000000"})
    fb.after("malformed u64s")


def params_fd_indexes(c, fb):
    """Fd indexes."""
    m = memfd(65536)
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": 1},
               INVALID_PARAMS, field="fd", fds=[m], what="fd index 1 with 1 fd")
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": 0},
               INVALID_PARAMS, field="fd", what="fd index 0 with no fds")
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": -1},
               INVALID_PARAMS, field="fd", fds=[m], what="fd index -1")
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": "0"},
               INVALID_PARAMS, field="fd", fds=[m], what="fd index as a string")
    expect_rpc(c, "vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": 253},
               INVALID_PARAMS, field="fd", fds=[m], what="fd index 253")
    os.close(m)
    fb.after("fd index out of range")


def params_unused_fds_closed(c, fb):
    """Fds a request carried but did not use are closed when it completes, whether it succeeded or
    failed."""
    m = memfd(65536)
    rd, w = os.pipe2(os.O_CLOEXEC)
    c.call("vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 65536, "fd": 0}, fds=[m, w])
    closing([m, w])
    check(wait_eof(rd), "an fd a successful request did not use was closed")
    os.close(rd)
    rd, w = os.pipe2(os.O_CLOEXEC)
    expect_rpc(c, "vm.memory.list", {"vm": "nosuchvm"}, NO_SUCH_VM, fds=[w])
    os.close(w)
    check(wait_eof(rd), "an fd a failed request carried was closed")
    os.close(rd)
    rd, w = os.pipe2(os.O_CLOEXEC)
    c.call("daemon.info", {}, fds=[w])
    os.close(w)
    check(wait_eof(rd), "an fd sent with daemon.info was closed")
    os.close(rd)
    c.call("vm.memory.remove", {"vm": "vm0", "gpa": 0})
    fb.after("unused fds")


def params_cases(t, daemon, c, fb):
    c.call("vm.create", {"vm": "vm0"})
    fb.reset(c)
    sock = daemon.backend_socket("none.sock")
    params_unknown_members(c, fb)
    params_missing_members(c, fb)
    params_wrong_types(c, fb, sock)
    params_bad_names(c, fb, sock)
    params_u64(c, fb)
    params_fd_indexes(c, fb)
    params_unused_fds_closed(c, fb)


def missing_things(t, daemon, c, fb):
    # -32001 for every method naming a VM that does not exist
    for method, params, nfds in ALL_METHODS_NAMING_A_VM:
        fds = fresh_fds(nfds)
        expect_rpc(c, method, dict(params, vm="nosuchvm"), NO_SUCH_VM, fds=fds,
                   what="%s on a VM that does not exist" % method)
        closing(fds)
    expect_rpc(c, "vm.memory.list", {"vm": "vm0", "uid": 4242}, NO_SUCH_VM,
               what="root naming vm0 of a uid that has none")
    fb.after("-32001 for every method")

    # -32002 for every device method naming a device that does not exist
    for method, params, nfds in DEVICE_METHODS:
        fds = fresh_fds(nfds)
        expect_rpc(c, method, dict(params, vm="vm0", device="nodev"), NO_SUCH_DEVICE, fds=fds,
                   what="%s on a device that does not exist" % method)
        closing(fds)
    fb.after("-32002 for every device method")

    # -32003
    expect_rpc(c, "vm.create", {"vm": "vm0"}, ALREADY_EXISTS, what="vm.create of an existing VM")
    expect_rpc(c, "vm.create", {"vm": "vm0", "linger_ms": 100}, ALREADY_EXISTS,
               what="vm.create of an existing VM (other params)")
    fb.after("-32003 VM")


# --------------------------------------------- real back-ends: qsd, virtiofsd

def with_qsd(t, daemon, c, fb, d):
    socks = [daemon.backend_socket("null%d.sock" % i) for i in range(3)]
    qsd = t.enter(QsdNullBackend(socks, size=8 * MiB, num_queues=1, log_dir=d))
    mem = t.enter(GuestMemory(4 * MiB, base=0x40000000))
    vmm = Vmm(c, "vm0")
    vmm.add_memory(mem)
    dev = vmm.add_device("blk0", socks[0], type="blk")
    check_eq(vmm.device_state("blk0")["state"], "ready", "qsd device ready")
    fb.reset(c)

    # -32003: the same device name again (another export); nothing connects
    expect_rpc(c, "device.add", {"vm": "vm0", "device": "blk0", "socket": socks[1]},
               ALREADY_EXISTS, what="device.add of an existing device name")
    # the other export is still free: a new device on it handshakes at once
    vmm.add_device("blk1", socks[1])
    vmm.remove_device("blk1")
    fb.after("-32003 device")

    # config param errors
    for params, field in (({"offset": "x", "size": 4}, "offset"),
                          ({"offset": 0, "size": -1}, "size"),
                          ({"offset": 0}, "size"),
                          ({"offset": 0, "size": 4, "extra": 0}, "extra")):
        expect_rpc(c, "device.config.get", dict(params, vm="vm0", device="blk0"),
                   INVALID_PARAMS, field=field)
    expect_rpc(c, "device.config.get", {"vm": "vm0", "device": "blk0", "offset": 0, "size": 0},
               INVALID_PARAMS, field="size", what="config.get of 0 bytes")
    for data in ("!!!!", "AAA", 5, ""):
        expect_rpc(c, "device.config.set", {"vm": "vm0", "device": "blk0", "offset": 0,
                                            "data": data}, INVALID_PARAMS, field="data",
                   what="config.set data %r" % (data,))
    cap = blk.parse_config(vmm.config_get("blk0", 0, 60))["capacity"]
    check_eq(cap, 8 * MiB // 512, "GET_CONFIG still works after refused calls")
    fb.after("config params")

    # -32004: device.stop on a ready device
    expect_rpc(c, "device.stop", {"vm": "vm0", "device": "blk0"}, WRONG_STATE,
               what="device.stop on a ready device")
    fb.after("device.stop on ready")

    # device.start params: each refusal closes the eventfds it carried
    q = blk.BlkQueue(mem, index=0, size=64)
    good, _ = vmm.start_params("blk0", scenarios.BLK_FEATURES & dev["features"], [q.vq])

    def start_with(vr_change=None, top_change=None, nfds=2):
        p = json.loads(json.dumps(good))
        if vr_change:
            p["vrings"][0].update(vr_change)
        if top_change:
            p.update(top_change)
        return p, fresh_fds(nfds)

    for what, vr, top, nfds, field in (
            ("vrings missing", None, {"vrings": None}, 2, "vrings"),
            ("vrings empty", None, {"vrings": []}, 2, "vrings"),
            ("vrings an object", None, {"vrings": {"index": 0}}, 2, "vrings"),
            ("unknown vring member", {"foo": 1}, None, 2, "foo"),
            ("kick index out of range", {"kick": 2}, None, 2, "kick"),
            ("call index out of range", {"call": 7}, None, 2, "call"),
            ("kick as a string", {"kick": "0"}, None, 2, "kick"),
            ("err index out of range", {"err": 2}, None, 2, "err"),
            ("desc malformed", {"desc": "0xZZ"}, None, 2, "desc"),
            ("base negative", {"base": -1}, None, 2, "base"),
            ("features malformed", None, {"features": "0xnope"}, 2, "features"),
            ("features negative", None, {"features": -1}, 2, "features")):
        p, fds = start_with(vr, top, nfds)
        if top and top.get("vrings", 0) is None:
            del p["vrings"]
        expect_rpc(c, "device.start", p, INVALID_PARAMS, field=field, fds=fds,
                   what="device.start: %s" % what)
        closing(fds)
        fb.after("device.start: %s" % what)
    # kick/call must be eventfds: the daemon writes to them, and a full
    # blocking pipe in their place would stall its loop
    p, _ = start_with()
    rd, wr = os.pipe2(os.O_CLOEXEC)
    pipe_fds = [wr, os.eventfd(0, os.EFD_CLOEXEC)]
    expect_rpc(c, "device.start", p, INVALID_PARAMS, field="vrings[0].kick", fds=pipe_fds,
               what="device.start: a pipe as the kick fd")
    closing(pipe_fds + [rd])
    fb.after("device.start with a pipe as kick")
    p, fds = start_with({"call": 0})       # kick and call the same fd index
    expect_rpc(c, "device.start", p, INVALID_PARAMS, field="call", fds=fds,
               what="device.start: kick and call the same fd index")
    closing(fds)
    fb.after("device.start with one fd index used twice")
    check_eq(vmm.device_state("blk0")["state"], "ready", "still ready after refused starts")

    # -32004: device.start on a running device
    vmm.start_device("blk0", scenarios.BLK_FEATURES & dev["features"], [q.vq])
    check_eq(vmm.device_state("blk0")["state"], "running", "device running")
    fb.reset(c)
    p, fds = start_with()
    expect_rpc(c, "device.start", p, WRONG_STATE, fds=fds, what="device.start on a running device")
    closing(fds)
    fb.after("device.start on running")
    data = q.read_sectors(0, 8)
    check_eq(len(data), 4096, "the running device still does I/O after the refused start")
    vmm.stop_device("blk0")
    fb.reset(c)        # a stopped device no longer holds its rings' eventfds

    # -32005: qsd offers neither RARP nor NET_MTU
    expect_rpc(c, "device.net.rarp", {"vm": "vm0", "device": "blk0", "mac": "52:54:00:12:34:56"},
               NOT_SUPPORTED, what="device.net.rarp on qsd (no RARP protocol feature)")
    expect_rpc(c, "device.net.mtu", {"vm": "vm0", "device": "blk0", "mtu": 1500},
               NOT_SUPPORTED, what="device.net.mtu on qsd (no NET_MTU protocol feature)")
    fb.after("-32005 on qsd")
    check_eq(vmm.device_state("blk0")["state"], "stopped", "state unchanged by refused calls")
    vmm.remove_device("blk0")
    q.vq.close()
    fb.reset(c)
    return qsd, socks


def with_virtiofsd(t, daemon, c, fb, d):
    share = os.path.join(d, "share")
    os.makedirs(share, exist_ok=True)
    sock = daemon.backend_socket("fs.sock")
    fs = t.enter(VirtiofsdBackend(sock, share, log_dir=d))
    c.call("vm.create", {"vm": "fsvm"})
    c.call("device.add", {"vm": "fsvm", "device": "fs0", "socket": sock, "type": "fs"})
    fb.reset(c)
    expect_rpc(c, "device.config.get", {"vm": "fsvm", "device": "fs0", "offset": 0, "size": 4},
               NOT_SUPPORTED, what="device.config.get on virtiofsd (no CONFIG)")
    expect_rpc(c, "device.config.set", {"vm": "fsvm", "device": "fs0", "offset": 0,
                                        "data": "AAAAAA=="},
               NOT_SUPPORTED, what="device.config.set on virtiofsd (no CONFIG)")
    fb.after("-32005 on virtiofsd")
    check_eq(c.call("device.list", {"vm": "fsvm"})["devices"][0]["state"], "ready",
             "virtiofsd device still ready after -32005")
    c.call("vm.destroy", {"vm": "fsvm"})
    fs.wait_exit(5)
    log("ok: virtiofsd exited when vm.destroy closed its front-end")
    fb.reset(c)


def backend_failures(t, daemon, c, fb, d):
    """-32006: a listener that accepts and closes; -32006 from a refusal."""
    c.call("vm.create", {"vm": "bf"})
    fb.reset(c)
    with FakeListener(daemon.backend_socket("closer.sock"), "close") as fl:
        e = expect_rpc(c, "device.add", {"vm": "bf", "device": "dead0", "socket": fl.path},
                       BACKEND_ERROR, device="dead0",
                       what="device.add to a back-end that accepts and closes")
        log("  -> %s" % e)
        check(fl.connections() >= 1, "the closing listener was connected to")
    check_eq(c.call("device.list", {"vm": "bf"})["devices"], [],
             "a failed device.add leaves no device")
    fb.after("-32006 (closed)")

    # a back-end that refuses: vhub-test-backend acks SET_CONFIG / ADD_MEM_REG with failure
    try:
        from vhubtest.testbackend import TestBackend
        tb = TestBackend([daemon.backend_socket("tb.sock")], log_dir=d)
    except Exception as ex:  # Skip when the binary is not built
        log("SKIP part: vhub-test-backend unavailable: %s" % ex)
        return
    t.enter(tb)
    c.call("device.add", {"vm": "bf", "device": "tb0", "socket": tb.sockets[0]})
    fb.reset(c)
    tb.misbehave("SET_CONFIG", "refuse", count=1)
    expect_rpc(c, "device.config.set", {"vm": "bf", "device": "tb0", "offset": 32, "data": "AQ=="},
               BACKEND_ERROR, device="tb0", request="SET_CONFIG",
               what="device.config.set refused by the back-end")
    check_eq(c.call("device.list", {"vm": "bf"})["devices"][0]["state"], "ready",
             "a refused SET_CONFIG leaves the device ready")
    fb.after("-32006 (refused SET_CONFIG)")
    tb.misbehave("ADD_MEM_REG", "refuse", count=1)
    m = memfd(MiB)
    expect_rpc(c, "vm.memory.add", {"vm": "bf", "gpa": 0, "size": MiB, "fd": 0}, BACKEND_ERROR,
               device="tb0", request="ADD_MEM_REG", fds=[m],
               what="vm.memory.add refused by the back-end")
    os.close(m)
    check_eq(c.call("vm.memory.list", {"vm": "bf"})["regions"], [],
             "the refused region is not in the table")
    fb.after("-32006 (refused ADD_MEM_REG)")
    # a reply that violates the protocol (another request's number): -32006
    tb.misbehave("GET_CONFIG", "wrong-request", count=1)
    expect_rpc(c, "device.config.get", {"vm": "bf", "device": "tb0", "offset": 0, "size": 8},
               BACKEND_ERROR, device="tb0", request="GET_CONFIG",
               what="device.config.get answered with the wrong request number")
    c.call("vm.destroy", {"vm": "bf"})
    fb.reset(c)

    # memory slots: a back-end that takes 2 regions (-32008 names the device)
    tb2 = t.enter(TestBackend([daemon.backend_socket("tb2.sock")], args=["--mem-slots", "2"],
                              log_dir=d))
    c.call("vm.create", {"vm": "ms"})
    c.call("device.add", {"vm": "ms", "device": "small", "socket": tb2.sockets[0]})
    fds = [memfd(65536) for _ in range(3)]
    for i in range(2):
        c.call("vm.memory.add", {"vm": "ms", "gpa": i << 20, "size": 65536, "fd": 0}, fds=[fds[i]])
    fb.reset(c)
    e = expect_rpc(c, "vm.memory.add", {"vm": "ms", "gpa": 2 << 20, "size": 65536, "fd": 0},
                   LIMIT_REACHED, fds=[fds[2]],
                   what="a third region for a back-end with 2 memory slots")
    check(names_field(e["detail"], "small"), "the detail names the device", e["detail"])
    fb.after("-32008 memory slots")
    check_eq(len(tb2.regions(0)), 2, "the back-end still has its 2 regions")
    c.call("device.remove", {"vm": "ms", "device": "small"})
    c.call("vm.memory.add", {"vm": "ms", "gpa": 2 << 20, "size": 65536, "fd": 0}, fds=[fds[2]])
    closing(fds)
    fb.reset(c)
    # a device whose back-end cannot take the VM's 3 regions is refused at device.add
    expect_rpc(c, "device.add", {"vm": "ms", "device": "small", "socket": tb2.sockets[0]},
               LIMIT_REACHED, what="device.add of a 2-slot back-end to a VM with 3 regions")
    check_eq(c.call("device.list", {"vm": "ms"})["devices"], [], "no device after the refusal")
    fb.after("-32008 memory slots at device.add")
    c.call("vm.destroy", {"vm": "ms"})
    fb.reset(c)


def owner_gone_waiting(t, daemon, c, fb):
    """A connection closes while its device.add waits on a silent back-end."""
    with FakeListener(daemon.backend_socket("mute.sock"), "silent") as fl:
        before = c.call("daemon.info")["vms"]
        x = daemon.client()
        x.call("vm.create", {"vm": "gone"})
        x.request("device.add", {"vm": "gone", "device": "m", "socket": fl.path})
        wait_until(lambda: fl.bytes > 0, 5, what="the daemon to send its first request")
        check_eq(c.call("daemon.info")["vms"], before + 1, "daemon.info counts the new VM")
        x.close()
        # the back-end's GET_FEATURES has 5 s left: the VM is gone long before
        wait_until(lambda: all(v["vm"] != "gone" for v in c.call("vm.list")["vms"]), 2,
                   what="vm.list to drop the VM whose connection closed")
        check_eq(c.call("daemon.info")["vms"], before, "daemon.info no longer counts it")
        expect_rpc(c, "vm.memory.list", {"vm": "gone"}, NO_SUCH_VM, what="the closed VM is gone")
        check_eq(fl.eofs, 0, "(the back-end request was still waiting meanwhile)")
    # the listener goes away: the waiting device is dropped, nothing is left
    fb.after("a connection closed with a call waiting on a back-end")


def owner_gone_midcall(t, daemon, c, fb, d):
    """vm.destroy while a memory change waits on a slow back-end."""
    try:
        from vhubtest.testbackend import TestBackend
        tb = TestBackend([daemon.backend_socket("slow.sock")], log_dir=d)
    except Exception as ex:  # Skip when the binary is not built
        log("SKIP part: vhub-test-backend unavailable: %s" % ex)
        return
    t.enter(tb)
    c.call("vm.create", {"vm": "race"})
    c.call("device.add", {"vm": "race", "device": "slow", "socket": tb.sockets[0]})
    fb.reset(c)
    tb.misbehave("ADD_MEM_REG", "delay", delay_ms=400, count=1)
    m = memfd(1 << 20)
    add = c.request("vm.memory.add", {"vm": "race", "gpa": 0, "size": 1 << 20, "fd": 0}, fds=[m])
    os.close(m)
    time.sleep(0.1)
    destroy = c.request("vm.destroy", {"vm": "race"})
    check_eq(destroy.result(5), {}, "vm.destroy during a waiting vm.memory.add answers {}")
    r = add.response(5)
    check(r.error is None or r.error["code"] in (NO_SUCH_VM, BACKEND_ERROR),
          "the waiting vm.memory.add answers (success, or the VM/back-end went away)", r.msg)
    log("  vm.memory.add answered: %s" % (r.error or r.result))
    check(all(v["vm"] != "race" for v in c.call("vm.list")["vms"]), "the VM is gone")
    # the device's back-end connection was closed; the region's fd too
    tb.wait_until(lambda: not tb.connected(0), 5, "the test back-end to lose its front-end")
    tb.stop()
    fb.reset(c)


def timeouts(t, d):
    """-32007 with --backend-timeout-ms 300: a listener that never answers."""
    wd = os.path.join(d, "to")
    os.makedirs(wd)
    daemon = t.enter(Daemon(wd, extra_args=["--backend-timeout-ms", "300"]))
    c = daemon.client()
    c.call("vm.create", {"vm": "tv"})
    fb = FdBaseline(daemon, c)
    with FakeListener(daemon.backend_socket("silent.sock"), "silent") as fl:
        t0 = time.monotonic()
        pend = c.request("device.add", {"vm": "tv", "device": "mute0", "socket": fl.path})
        # the waiting call holds nothing else back on this connection
        check_eq(c.call("daemon.info", timeout=2)["pid"], daemon.pid,
                 "daemon.info answered while device.add waits on a silent back-end")
        try:
            pend.result(10)
            raise TestFailure("FAILED: device.add to a silent back-end succeeded")
        except RpcError as e:
            check_error(e, BACKEND_TIMEOUT, "device.add to a back-end that never answers",
                        device="mute0")
        took = time.monotonic() - t0
        check(0.25 <= took < 3.0, "-32007 after about the 300 ms timeout", "%.2fs" % took)
        check(fl.connections() == 1 and fl.bytes > 0, "the silent listener got requests")
        wait_until(lambda: fl.eofs == 1, 5, what="the daemon closed the lost connection")
        log("ok: the daemon closed its connection to the silent back-end")
    check_eq(c.call("device.list", {"vm": "tv"})["devices"], [], "no device after -32007")
    fb.after("-32007")

    # a live device whose back-end stops answering one request: -32007 naming it
    try:
        from vhubtest.testbackend import TestBackend
        tb = TestBackend([daemon.backend_socket("tb.sock")], log_dir=wd)
    except Exception as ex:  # Skip when the binary is not built
        log("SKIP part: vhub-test-backend unavailable: %s" % ex)
        tb = None
    if tb is not None:
        t.enter(tb)
        c.call("device.add", {"vm": "tv", "device": "tb0", "socket": tb.sockets[0]})
        tb.misbehave("GET_CONFIG", "silence", count=1)
        t0 = time.monotonic()
        expect_rpc(c, "device.config.get", {"vm": "tv", "device": "tb0", "offset": 0, "size": 8},
                   BACKEND_TIMEOUT, device="tb0", request="GET_CONFIG",
                   what="device.config.get that the back-end never answers")
        check(time.monotonic() - t0 < 3.0, "answered about the timeout after the request")
        c.call("device.remove", {"vm": "tv", "device": "tb0"})
    c.call("vm.destroy", {"vm": "tv"})
    daemon.stop()


# -------------------------------------------------------------- limits

def limits(t, d):
    wd = os.path.join(d, "lim")
    os.makedirs(wd)
    daemon = t.enter(Daemon(wd, extra_args=["--max-vms-per-uid", "2", "--max-devices-per-vm", "1",
                                            "--max-regions-per-vm", "2", "--max-line-bytes", "4096",
                                            "--backend-timeout-ms", "2000"]))
    c = daemon.client()
    fb = FdBaseline(daemon, c)

    c.call("vm.create", {"vm": "a"})
    c.call("vm.create", {"vm": "b"})
    expect_rpc(c, "vm.create", {"vm": "c"}, LIMIT_REACHED, what="a third VM with --max-vms-per-uid 2")
    c.call("vm.destroy", {"vm": "b"})
    c.call("vm.create", {"vm": "c"})
    log("ok: a VM slot freed by vm.destroy can be used again")
    fb.reset(c)

    # regions
    m = [memfd(65536) for _ in range(3)]
    c.call("vm.memory.add", {"vm": "a", "gpa": 0, "size": 65536, "fd": 0}, fds=[m[0]])
    c.call("vm.memory.add", {"vm": "a", "gpa": 0x100000, "size": 65536, "fd": 0}, fds=[m[1]])
    fb.reset(c)
    expect_rpc(c, "vm.memory.add", {"vm": "a", "gpa": 0x200000, "size": 65536, "fd": 0},
               LIMIT_REACHED, fds=[m[2]], what="a third region with --max-regions-per-vm 2")
    closing(m)
    fb.after("-32008 regions")
    check_eq(len(c.call("vm.memory.list", {"vm": "a"})["regions"]), 2, "still two regions")

    # devices: the second is refused before any connection is made
    socks = [daemon.backend_socket("n%d.sock" % i) for i in range(1)]
    t.enter(QsdNullBackend(socks, log_dir=wd))
    c.call("device.add", {"vm": "a", "device": "d1", "socket": socks[0]})
    fb.reset(c)
    with FakeListener(daemon.backend_socket("second.sock"), "none") as fl:
        expect_rpc(c, "device.add", {"vm": "a", "device": "d2", "socket": fl.path},
                   LIMIT_REACHED, what="a second device with --max-devices-per-vm 1")
        check_eq(fl.connections(), 0, "nothing connected for the refused device")
    fb.after("-32008 devices")
    # the per-VM limit is per VM
    c.call("device.remove", {"vm": "a", "device": "d1"})
    c.call("device.add", {"vm": "c", "device": "d1", "socket": socks[0]})
    c.call("device.remove", {"vm": "c", "device": "d1"})
    fb.reset(c)

    # --max-line-bytes 4096: exactly 4096 is fine, 4097 is refused and closes
    head = b'{"jsonrpc":"2.0","id":9,"method":"daemon.info"'
    x = daemon.client()
    x.send_raw(head + b" " * (4096 - len(head) - 1) + b"}\n")
    check_eq(x.wait_response(9, 5).result["pid"], daemon.pid, "a 4096-byte line is answered")
    x.send_raw(head + b" " * (4096 - len(head)) + b"}\n")
    r = x.wait_null_response(5)
    check_error(r.error, INVALID_REQUEST, "a 4097-byte line with --max-line-bytes 4096")
    check(x.wait_closed(5), "the connection is closed after the long line")
    x.close()
    fb.after("--max-line-bytes")
    c.call("vm.destroy", {"vm": "a"})
    c.call("vm.destroy", {"vm": "c"})
    daemon.stop()

    # connections and pending calls
    wd = os.path.join(d, "lim2")
    os.makedirs(wd)
    daemon = t.enter(Daemon(wd, extra_args=["--max-connections", "4", "--max-pending", "2",
                                            "--backend-timeout-ms", "1500"]))
    c = daemon.client()
    others = [daemon.client() for _ in range(3)]
    for o in others:
        o.call("daemon.info")
    fb = FdBaseline(daemon, c)
    for attempt in range(2):
        x = Client(daemon.control)
        r = x.wait_null_response(5)
        check_error(r.error, LIMIT_REACHED, "a 5th connection with --max-connections 4")
        check(x.wait_closed(5), "the refused connection is closed")
        x.close()
        fb.after("-32008 connections (%d)" % attempt)
    for o in others:
        check_eq(o.call("daemon.info")["pid"], daemon.pid, "the 4 admitted connections still work")
    others.pop().close()
    daemon.wait_fd_count(fb.base - 1)
    y = daemon.client()
    check_eq(y.call("daemon.info")["pid"], daemon.pid, "a connection slot freed is usable again")
    y.close()
    for o in others:
        o.close()
    fb.reset(c)

    c.call("vm.create", {"vm": "p"})
    with FakeListener(daemon.backend_socket("silent.sock"), "silent") as fl:
        p1 = c.request("device.add", {"vm": "p", "device": "s1", "socket": fl.path})
        p2 = c.request("device.add", {"vm": "p", "device": "s2", "socket": fl.path})
        check_eq(c.call("daemon.info", timeout=1)["pid"], daemon.pid,
                 "daemon.info answered beside two calls waiting on back-ends")
        expect_rpc(c, "device.add", {"vm": "p", "device": "s3", "socket": fl.path},
                   LIMIT_REACHED, timeout=1, what="a third waiting call with --max-pending 2")
        check(not p1.done() and not p2.done(), "the two waiting calls are still waiting")
        other = daemon.client()
        other.call("vm.create", {"vm": "q"})
        # the limit is per connection: another connection can still wait
        p4 = other.request("device.add", {"vm": "q", "device": "s4", "socket": fl.path})
        for p in (p1, p2, p4):
            try:
                p.result(10)
                raise TestFailure("FAILED: device.add to a silent back-end succeeded")
            except RpcError as e:
                check_error(e, BACKEND_TIMEOUT, "waiting call %d" % p.id)
        other.close()
    c.call("vm.destroy", {"vm": "p"})
    fb.after("-32008 pending")
    daemon.stop()


# ------------------------------------------------------------ regions

def regions(t, daemon, c, fb, d):
    c.call("vm.create", {"vm": "rg"})
    base = memfd(MiB)
    c.call("vm.memory.add", {"vm": "rg", "gpa": 0x100000, "size": MiB, "fd": 0,
                             "uaddr": 0x7f0000100000}, fds=[base])
    os.close(base)
    fb.reset(c)

    def bad(what, params, fd, field=None):
        p = {"vm": "rg", "gpa": 0x1000000, "size": 65536, "fd": 0}
        p.update(params)
        expect_rpc(c, "vm.memory.add", p, BAD_REGION, field=field, fds=[fd], what=what)
        os.close(fd)
        fb.after(what)

    bad("overlap in gpa (inside)", {"gpa": 0x180000, "uaddr": 0x7f0001000000}, memfd(65536))
    bad("overlap in gpa (straddling the start)", {"gpa": 0xF0000, "size": 0x20000,
                                                  "uaddr": 0x7f0001000000}, memfd(0x20000))
    bad("overlap in gpa (covering)", {"gpa": 0, "size": 0x400000, "uaddr": 0x7f0001000000},
        memfd(0x400000))
    bad("overlap in uaddr", {"gpa": 0x1000000, "uaddr": 0x7f00001F0000}, memfd(65536))
    mf = memfd(65536)
    expect_rpc(c, "vm.memory.add", {"vm": "rg", "gpa": 0x7f0000180000, "size": 65536, "fd": 0},
               BAD_REGION, fds=[mf], what="overlap in uaddr through the default uaddr = gpa")
    os.close(mf)
    fb.after("overlap in uaddr through the default uaddr")
    bad("size beyond the fd", {"size": 0x20000}, memfd(0x10000))
    bad("offset + size beyond the fd", {"offset": 0x8000, "size": 0x10000}, memfd(0x10000))
    bad("offset beyond the fd", {"offset": 0x20000, "size": 0x1000}, memfd(0x10000))
    bad("unaligned gpa", {"gpa": 0x1000800}, memfd(0x20000))
    bad("unaligned size", {"size": 0x10800}, memfd(0x20000))
    bad("unaligned offset", {"offset": 0x800}, memfd(0x20000))
    bad("unaligned uaddr", {"uaddr": 0x7f0002000123}, memfd(0x20000))
    bad("size 0", {"size": 0}, memfd(0x10000))
    bad("wraparound in gpa", {"gpa": "0xfffffffffffff000", "size": 0x2000}, memfd(0x2000))
    bad("wraparound in uaddr", {"uaddr": "0xffffffffffff0000", "size": 0x20000}, memfd(0x20000))
    rd, w = os.pipe2(os.O_CLOEXEC)
    os.close(rd)
    bad("a pipe", {}, w)
    s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    bad("a socket", {}, s1.detach())
    s2.close()
    mf = memfd(0x10000)
    ro = os.open("/proc/self/fd/%d" % mf, os.O_RDONLY | os.O_CLOEXEC)
    os.close(mf)
    bad("a read-only fd", {}, ro)
    f = os.path.join(d, "ro.img")
    with open(f, "wb") as fh:
        fh.truncate(0x10000)
    bad("a read-only regular file", {}, os.open(f, os.O_RDONLY | os.O_CLOEXEC))
    bad("a write-only regular file", {}, os.open(f, os.O_WRONLY | os.O_CLOEXEC))
    bad("/dev/null", {}, os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    bad("a directory", {}, os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    bad("an eventfd", {}, os.eventfd(0, os.EFD_CLOEXEC))

    # what is fine: adjacent regions, a shared regular file
    adj = memfd(MiB)
    c.call("vm.memory.add", {"vm": "rg", "gpa": 0x200000, "size": MiB, "fd": 0,
                             "uaddr": 0x7f0000200000}, fds=[adj])
    os.close(adj)
    rw = os.open(f, os.O_RDWR | os.O_CLOEXEC)
    c.call("vm.memory.add", {"vm": "rg", "gpa": 0x10000000, "size": 0x10000, "fd": 0,
                             "uaddr": 0x7f0010000000}, fds=[rw])
    os.close(rw)
    log("ok: a region adjacent in gpa and uaddr, and a read-write regular file, are accepted")
    expect_rpc(c, "vm.memory.remove", {"vm": "rg", "gpa": 0x300000}, BAD_REGION,
               what="vm.memory.remove where no region starts")
    expect_rpc(c, "vm.memory.remove", {"vm": "rg", "gpa": 0x101000}, BAD_REGION,
               what="vm.memory.remove inside a region, not at its start")
    regs = sorted(u64(r["gpa"]) for r in c.call("vm.memory.list", {"vm": "rg"})["regions"])
    check_eq(regs, [0x100000, 0x200000, 0x10000000], "vm.memory.list after every refusal")
    c.call("vm.destroy", {"vm": "rg"})
    fb.reset(c)


# ---------------------------------------------------------- -32010

def paths(t, daemon, c, fb, d):
    c.call("vm.create", {"vm": "pv"})
    fb.reset(c)
    bdir = daemon.backend_dir
    outside = os.path.join(d, "outside.sock")
    evil_dir = bdir + "-evil"
    os.makedirs(evil_dir)
    os.makedirs(os.path.join(bdir, "sub"))
    with FakeListener(outside, "none") as fo, \
            FakeListener(os.path.join(evil_dir, "e.sock"), "none") as fe, \
            FakeListener(os.path.join(bdir, "other-uid.sock"), "none", owner=65533) as fu:
        link = os.path.join(bdir, "link.sock")
        os.symlink(outside, link)
        dirlink = os.path.join(bdir, "dirlink")
        os.symlink(d, dirlink)
        cases = [
            ("a socket outside --backend-dir", outside, fo),
            ("a symlink inside pointing outside", link, fo),
            ("a path through a symlinked directory", os.path.join(dirlink, "outside.sock"), fo),
            ("a '..' path", os.path.join(bdir, "..", "outside.sock"), fo),
            ("a 'sub/../..' path", os.path.join(bdir, "sub", "..", "..", "outside.sock"), fo),
            ("a sibling directory sharing the prefix", fe.path, fe),
            ("a socket owned by another non-root uid", fu.path, fu),
            ("a relative path", os.path.relpath(fu.path), fu),
        ]
        for i, (what, path, fl) in enumerate(cases):
            for mode in ("client", "server"):
                if mode == "server" and fl is fu and path == fu.path:
                    what_m = what + " (server mode over it)"
                else:
                    what_m = "%s (%s mode)" % (what, mode)
                expect_rpc(c, "device.add", {"vm": "pv", "device": "x%d" % i, "socket": path,
                                             "mode": mode}, BACKEND_NOT_ALLOWED, what=what_m)
                check_eq(fl.connections(), 0, "%s: nothing connected" % what_m)
                fb.after(what_m)
        check(os.path.exists(outside) and os.path.exists(fu.path),
              "no socket file was replaced by a refused server-mode device.add")
        # a path that is not a socket, and one that does not resolve
        reg = os.path.join(bdir, "file.sock")
        open(reg, "w").close()
        expect_rpc(c, "device.add", {"vm": "pv", "device": "f", "socket": reg}, BACKEND_NOT_ALLOWED,
                   what="a regular file inside --backend-dir")
        fb.after("a regular file")
    check_eq(c.call("device.list", {"vm": "pv"})["devices"], [], "no device was added")
    c.call("vm.destroy", {"vm": "pv"})
    fb.reset(c)


def symlink_inside_ok(t, daemon, c, fb, qsd_socks):
    """A symlink that resolves inside --backend-dir is fine (resolved path checked)."""
    link = daemon.backend_socket("alias.sock")
    os.symlink(qsd_socks[2], link)
    c.call("vm.create", {"vm": "sl"})
    res = c.call("device.add", {"vm": "sl", "device": "b", "socket": link})
    check(u64(res["features"]) & (1 << 32), "device.add through a symlink inside the directory works")
    c.call("vm.destroy", {"vm": "sl"})
    fb.reset(c)


# ------------------------------------------------ batches, notifications

def batches(t, daemon, c, fb):
    c.send_raw(encode([
        {"jsonrpc": "2.0", "id": 101, "method": "daemon.info"},
        {"jsonrpc": "2.0", "id": 102, "method": "no.such.method"},
        {"jsonrpc": "2.0", "method": "vm.create", "params": {"vm": "bn"}},      # notification
        5,
        {"jsonrpc": "2.0", "id": 103, "method": "vm.create", "params": {"vm": "bx", "bad": 1}},
        {"jsonrpc": "2.0", "id": 104, "method": "vm.memory.list", "params": {"vm": "nosuchvm"}},
        {"jsonrpc": "2.0", "id": 105, "method": "vm.list"},
    ]))
    arr = wait_batch(c)
    check(isinstance(arr, list), "a batch is answered with an array")
    by_id = {}
    nulls = []
    for m in arr:
        check(isinstance(m, dict) and m.get("jsonrpc") == "2.0", "batch element is a response", m)
        if m.get("id") is None:
            nulls.append(m)
        else:
            by_id[m["id"]] = m
    check_eq(sorted(by_id), [101, 102, 103, 104, 105], "one response per request with an id")
    check_eq(len(arr), 6, "the notification has no response in the array")
    check_eq(by_id[101]["result"]["pid"], daemon.pid, "batch: daemon.info result")
    check_error(by_id[102]["error"], METHOD_NOT_FOUND, "batch: unknown method")
    check_error(by_id[103]["error"], INVALID_PARAMS, "batch: unknown member", field="bad")
    check_error(by_id[104]["error"], NO_SUCH_VM, "batch: no such VM")
    check("result" in by_id[105], "batch: vm.list result")
    check_eq(len(nulls), 1, "the non-object element got one id-null response")
    check_error(nulls[0]["error"], INVALID_REQUEST, "batch: a number as an element")
    wait_until(lambda: any(v["vm"] == "bn" for v in c.call("vm.list")["vms"]), 2,
               what="the batched notification's vm.create")
    log("ok: the notification inside the batch was executed")
    c.call("vm.destroy", {"vm": "bn"})
    check(all(v["vm"] != "bx" for v in c.call("vm.list")["vms"]), "the refused element did nothing")
    fb.after("a mixed batch")

    # empty batch: one error object, not an array
    c.send_raw(b"[]\n")
    r = c.wait_null_response(5)
    check_error(r.error, INVALID_REQUEST, "an empty batch")
    check(not c._batches, "an empty batch is not answered with an array")
    c.call("daemon.info")
    fb.after("an empty batch")

    # a batch of invalid elements only: an array of errors
    c.send_raw(b"[1, 2]\n")
    arr = wait_batch(c)
    check_eq(len(arr), 2, "[1, 2] gets two responses")
    for m in arr:
        check_error(m["error"], INVALID_REQUEST, "batch [1, 2] element")
    fb.after("a batch of non-objects")

    # invalid JSON in a batch is a parse error of the whole line
    c.send_raw(b'[{"jsonrpc":"2.0","id":1,"method":"daemon.info"},\n')
    r = c.wait_null_response(5)
    check_error(r.error, PARSE_ERROR, "a truncated batch")
    fb.after("a truncated batch")

    # only notifications: nothing at all comes back
    c.send_raw(encode([{"jsonrpc": "2.0", "method": "daemon.info"},
                       {"jsonrpc": "2.0", "method": "vm.create", "params": {"vm": "bn2"}},
                       {"jsonrpc": "2.0", "method": "no.such.method"}]))
    check(quiet_for(c, 0.3), "a batch of notifications gets no response at all")
    check(any(v["vm"] == "bn2" for v in c.call("vm.list")["vms"]),
          "the notifications in it were executed")
    c.call("vm.destroy", {"vm": "bn2"})

    # a batch element that waits on the model is still answered in the array
    c.call("vm.create", {"vm": "bw"})
    c.send_raw(encode([{"jsonrpc": "2.0", "id": 201, "method": "vm.destroy", "params": {"vm": "bw"}},
                       {"jsonrpc": "2.0", "id": 202, "method": "daemon.info"}]))
    arr = wait_batch(c)
    check_eq(sorted(m["id"] for m in arr), [201, 202], "batch with vm.destroy: both answered")
    check(all("result" in m for m in arr), "batch with vm.destroy: both succeeded")
    fb.after("batches")


def notifications(t, daemon, c, fb):
    c.notify("vm.create", {"vm": "nt"})
    c.notify("no.such.method", {})
    c.notify("vm.create", {"vm": "bad/name"})
    c.notify("vm.memory.list", {"vm": "nosuchvm"})
    c.notify("vm.create", ["params", "as", "array"])
    check(quiet_for(c, 0.3), "notifications (good, unknown, bad params) get no response")
    vms = [v["vm"] for v in c.call("vm.list")["vms"]]
    check("nt" in vms, "a notification is executed (vm.create nt)")
    c.notify("vm.destroy", {"vm": "nt"})
    wait_until(lambda: "nt" not in [v["vm"] for v in c.call("vm.list")["vms"]], 2,
               what="vm.destroy sent as a notification")
    check(quiet_for(c, 0.1), "still nothing unexpected received")
    check_eq(c.protocol_errors, [], "no framing trouble from the daemon")
    fb.after("notifications")


def nul_in_strings(t, d):
    """Valid JSON with "\\u0000" inside a string: the name is bad (-32602, with
    the request's id), not the JSON (-32700, id null)."""
    daemon = t.enter(Daemon(os.path.join(d)))
    c = daemon.client()
    fb = FdBaseline(daemon, c)
    c.send_raw(encode({"jsonrpc": "2.0", "id": 31, "method": "vm.create",
                       "params": {"vm": "vm\u0000x"}}))
    r = wait_id_or_null(c, 31)
    check_eq(r.id, 31, "a name with an escaped NUL: answered with the request's id")
    check_error(r.error, INVALID_PARAMS, "vm.create with a name holding \\u0000", field="vm")
    c.send_raw(encode({"jsonrpc": "2.0", "id": 32, "method": "daemon.info\u0000x"}))
    r = wait_id_or_null(c, 32)
    check_eq(r.id, 32, "a method with an escaped NUL: answered with the request's id")
    check_error(r.error, METHOD_NOT_FOUND, "method 'daemon.info\\u0000x'")
    check_eq(c.call("vm.list")["vms"], [], "nothing was created")
    fb.after("NUL in strings")
    daemon.stop()


def destroying_vm_name(t, d):
    """Once its owner's connection closed, the VM no longer lives: its name is
    free for vm.create even while its back-end has not answered yet."""
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", "3000"]))
    c = daemon.client()
    with FakeListener(daemon.backend_socket("mute.sock"), "silent") as fl:
        x = daemon.client()
        x.call("vm.create", {"vm": "gone"})
        x.request("device.add", {"vm": "gone", "device": "m", "socket": fl.path})
        wait_until(lambda: fl.bytes > 0, 5, what="the daemon to send its first request")
        x.close()
        wait_until(lambda: all(v["vm"] != "gone" for v in c.call("vm.list")["vms"]), 1,
                   what="vm.list to drop the VM whose connection closed")
        c.call("vm.create", {"vm": "gone"}, timeout=1)
        log("ok: the name of a VM whose connection closed can be used again at once")
        check_eq([v["vm"] for v in c.call("vm.list")["vms"]], ["gone"], "one VM of that name")
        c.call("vm.destroy", {"vm": "gone"})
    daemon.stop()


# ---------------------------------------------------------------- main

def main(t):
    d = t.tmpdir()
    if sys.argv[1:] == ["nul"]:
        return nul_in_strings(t, d)
    if sys.argv[1:] == ["destroying"]:
        return destroying_vm_name(t, d)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    fb = FdBaseline(daemon, c)

    check_eq(os.stat(daemon.control).st_mode & 0o7777, 0o660,
             "the control socket's mode is 0660 by default")
    framing(t, daemon, c, fb)
    half_close(t, daemon, c, fb)
    request_objects(t, daemon, c, fb)
    params_cases(t, daemon, c, fb)
    missing_things(t, daemon, c, fb)
    qsd, socks = with_qsd(t, daemon, c, fb, d)
    symlink_inside_ok(t, daemon, c, fb, socks)
    with_virtiofsd(t, daemon, c, fb, d)
    backend_failures(t, daemon, c, fb, d)
    owner_gone_waiting(t, daemon, c, fb)
    owner_gone_midcall(t, daemon, c, fb, d)
    regions(t, daemon, c, fb, d)
    paths(t, daemon, c, fb, d)
    batches(t, daemon, c, fb)
    notifications(t, daemon, c, fb)
    c.call("vm.destroy", {"vm": "vm0"})
    check_eq(c.call("vm.list")["vms"], [], "no VM left")
    check(daemon.alive, "the daemon survived every bad input")
    log("%d cases checked against the fd baseline" % fb.cases)
    daemon.stop()
    log("ok: vhubd exited 0 on SIGTERM")

    timeouts(t, d)
    limits(t, d)


if __name__ == "__main__":
    run(main)

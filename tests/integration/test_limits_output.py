#!/usr/bin/env python3
"""What one request line, and one client that never reads, can cost the daemon.

A VM with 512 regions makes every vm.memory.list answer about 40 KB.

- amplification: one batch line of 1000 vm.memory.list calls (72 KB) asks
  for ~40 MB of answers.  The daemon accounts the batch's answers against
  the 4 MiB output bound as it produces them and answers the rest -32008
  without running them: the client gets one array of 1000 responses (the
  first ones real, the rest -32008) that fits the bound, and the
  connection stays; the daemon's peak RSS grows by less than 32 MiB and
  it gives the memory back afterwards (RSS within 8 MiB of where it was);
  the same with the line repeated 5 times;
- slow readers: 8 clients each ask for ~3.8 MiB of answers and never read,
  and leave a 1 MiB line unfinished, once with big answers (40 KB) and once
  with small ones (120 bytes, ~30000 lines): the daemon holds at most 8 MiB
  per client (RSS growth / 8), every client is still connected (under the
  bound), and once they go the RSS is back within 8 MiB of the baseline;
- a client pushed past the bound is still dropped;
- notifications: a batch's notifications count as if they were answered,
  so 200 vm.memory.list notifications (~8 MB of answers) pass the bound:
  a vm.create notification after them is not run, the call after it is
  answered -32008.

Under AddressSanitizer (tests/run-all.sh's second build) the RSS bounds are
logged, not checked: its allocator keeps freed memory in quarantine; every
other check holds there too.
"""

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.daemon import Daemon                                  # noqa: E402
from vhubtest.limits import (peak_rss_kib, reset_peak_rss, rss_kib,  # noqa: E402
                             sanitized)
from vhubtest.testing import check, check_eq, log, run              # noqa: E402

MiB = 1 << 20
REGIONS = 512
BATCH = 1000
N_SLOW = 8
OUT_BOUND = 4 * MiB


def check_rss(daemon, cond, what, detail):
    """An RSS bound: checked, except under AddressSanitizer, whose allocator
    keeps freed memory (quarantine, redzones); the plain build checks it."""
    if sanitized(daemon.pid):
        log("note: not checked under AddressSanitizer: %s (%s)" % (what, detail))
        return
    check(cond, what, detail)


def request(req_id, method, params=None):
    msg = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg, separators=(",", ":")).encode()


def settle_rss(pid, settle=0.3, timeout=5.0):
    """RSS once it holds still."""
    deadline = time.monotonic() + timeout
    last, since = rss_kib(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        n = rss_kib(pid)
        if abs(n - last) > 64:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return rss_kib(pid)


def read_line(s, timeout=20.0):
    s.settimeout(timeout)
    buf = b""
    while not buf.endswith(b"\n"):
        data = s.recv(1 << 20)
        if not data:
            return buf, True
        buf += data
    return buf, False


def fill_vm(c, name):
    c.call("vm.create", {"vm": name})
    fd = os.memfd_create("vhubt-out", os.MFD_CLOEXEC)
    os.ftruncate(fd, REGIONS * 65536)
    for i in range(REGIONS):
        c.call("vm.memory.add", {"vm": name, "gpa": (1 << 40) + i * (1 << 30), "size": 65536,
                                 "offset": i * 65536, "fd": 0}, fds=[fd])
    os.close(fd)
    check_eq(len(c.call("vm.memory.list", {"vm": name})["regions"]), REGIONS,
             "the VM has %d regions" % REGIONS)


def amplification(daemon, c):
    pid = daemon.pid
    base = settle_rss(pid)
    line = b"[" + b",".join(request(i, "vm.memory.list", {"vm": "big"})
                            for i in range(BATCH)) + b"]\n"
    log("batch line: %d bytes, %d calls" % (len(line), BATCH))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(daemon.control)
    for rep in range(5):
        reset_peak_rss(pid)
        s.sendall(line)
        answer, closed = read_line(s)
        peak = peak_rss_kib(pid)
        after = settle_rss(pid)
        log("round %d: answer %d bytes; RSS %d KiB before, peak +%d KiB, after +%d KiB"
            % (rep, len(answer), base, peak - base, after - base))
        check(not closed, "round %d: the connection stays" % rep)
        check(len(answer) <= OUT_BOUND, "round %d: the answer fits the output bound" % rep,
              len(answer))
        arr = json.loads(answer)
        check_eq(len(arr), BATCH, "round %d: one response per call" % rep)
        ok = [r for r in arr if "result" in r]
        refused = [r for r in arr if "error" in r]
        check(len(ok) > 0 and all(len(r["result"]["regions"]) == REGIONS for r in ok),
              "round %d: %d real answers, each with every region" % (rep, len(ok)))
        check(len(refused) > 0 and all(r["error"]["code"] == -32008 for r in refused),
              "round %d: the other %d are -32008" % (rep, len(refused)))
        check_eq(sorted(r["id"] for r in arr), list(range(BATCH)), "round %d: every id answered" % rep)
        check_rss(daemon, peak - base < 32 * 1024, "round %d: peak RSS grew by less than 32 MiB" % rep,
                  "%d KiB" % (peak - base))
        check_rss(daemon, after - base < 8 * 1024, "round %d: RSS back within 8 MiB afterwards" % rep,
                  "%d KiB" % (after - base))
    s.sendall(request(9, "daemon.info") + b"\n")
    answer, closed = read_line(s)
    check(b'"id":9' in answer and b'"result"' in answer, "the connection still answers")
    s.close()


def notifications(daemon, c):
    note = json.dumps({"jsonrpc": "2.0", "method": "vm.memory.list", "params": {"vm": "big"}},
                      separators=(",", ":")).encode()
    late = json.dumps({"jsonrpc": "2.0", "method": "vm.create", "params": {"vm": "late"}},
                      separators=(",", ":")).encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(daemon.control)
    s.sendall(b"[" + b",".join([note] * 200 + [late, request(1, "daemon.info")]) + b"]\n")
    answer, closed = read_line(s)
    check(not closed, "a batch of notifications past the bound: the connection stays")
    arr = json.loads(answer)
    check_eq([(r["id"], r.get("error", {}).get("code")) for r in arr], [(1, -32008)],
             "only the call is answered, -32008: the notifications' answers filled the bound")
    check("late" not in [v["vm"] for v in c.call("vm.list")["vms"]],
          "the notification past the bound (vm.create) was not run")
    s.close()


def slow_round(daemon, what, one, make_requests):
    """N_SLOW clients ask for ~3.8 MiB of answers of `one` bytes each, never
    read, and leave a 1 MiB line unfinished; returns k (answers each)."""
    pid = daemon.pid
    k = int(3.8 * MiB // one)
    log("%s: answers of %d bytes, %d requests ask for %.2f MiB each" % (what, one, k, k * one / MiB))
    base = settle_rss(pid)
    clients = []
    for n in range(N_SLOW):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(daemon.control)
        s.sendall(make_requests(k))
        clients.append(s)
    # and a line that never ends: the input buffer grows to 1 MiB.  Sent
    # after every client's requests, and ended within ~5 s: a partial line
    # must be complete 10 s after its first byte (rpc-conn's line deadline),
    # and under ASan on a loaded machine the requests alone took longer
    for s in clients:
        s.sendall(b'{"jsonrpc":"2.0","id":"x","method":"daemon.info","pad":"' + b"p" * (MiB - 100))
    held = settle_rss(pid, settle=0.5, timeout=4.0)
    per = (held - base) / N_SLOW
    log("%s: %d clients that never read: RSS %d KiB -> %d KiB, %.0f KiB per client"
        % (what, N_SLOW, base, held, per))
    c2 = daemon.client()
    check_eq(c2.call("daemon.info")["pid"], daemon.pid, "%s: the daemon serves others meanwhile" % what)
    c2.close()
    # every one was kept: once it reads it gets every answer
    for s in clients:
        s.sendall(b'"}\n' + request("last", "daemon.info") + b"\n")
    got_all = True
    for s in clients:
        s.settimeout(10)
        buf = b""
        while b'"id":"last"' not in buf:
            data = s.recv(1 << 20)
            if not data:
                got_all = False
                break
            buf += data
        got_all = got_all and buf.count(b"\n") == k + 2
    check(got_all, "%s: each slow client was kept and, once it reads, gets all %d answers" % (what, k))
    check_rss(daemon, per <= 8 * 1024, "%s: at most 8 MiB held per client that never reads" % what,
              "%.0f KiB" % per)
    for s in clients:
        s.close()
    after = settle_rss(pid, settle=0.5)
    log("%s: after they left: RSS %d KiB" % (what, after))
    check_rss(daemon, after - base < 8 * 1024, "%s: RSS back within 8 MiB of the baseline" % what,
              "%d KiB" % (after - base))
    return k


def slow_readers(daemon, c):
    pid = daemon.pid
    # big answers: vm.memory.list of 512 regions, ~38 KB each
    one = len(json.dumps(c.call("vm.memory.list", {"vm": "big"}), separators=(",", ":"))) + 40
    k = slow_round(daemon, "big answers", one,
                   lambda k: b"".join(request(i, "vm.memory.list", {"vm": "big"}) + b"\n"
                                      for i in range(k)))
    # small answers: an error of ~120 bytes each, many lines
    small = len(b'{"jsonrpc":"2.0","id":12345,"error":{"code":-32601,"message":"method not found",'
                b'"data":{"detail":"unknown method nope"}}}\n')
    slow_round(daemon, "small answers", small,
               lambda k: b"".join(request(i, "nope") + b"\n" for i in range(k)))

    # past the bound a client is still dropped
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(daemon.control)
    s.sendall(b"".join(request(i, "vm.memory.list", {"vm": "big"}) + b"\n" for i in range(3 * k)))
    time.sleep(0.5)
    s.settimeout(10)
    closed = False
    try:
        while True:
            data = s.recv(1 << 20)
            if not data:
                closed = True
                break
    except (socket.timeout, ConnectionResetError):
        closed = True
    s.close()
    check(closed, "a client asking for three times the bound without reading is dropped")


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, log_level="info"))
    c = daemon.client()
    fill_vm(c, "big")
    which = sys.argv[1:] or ["amplification", "notifications", "slow"]
    if "amplification" in which:
        amplification(daemon, c)
    if "notifications" in which:
        notifications(daemon, c)
    if "slow" in which:
        slow_readers(daemon, c)


run(main)

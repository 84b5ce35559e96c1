#!/usr/bin/env python3
"""What one uid can make a restart carry, and a restart short of fds
(docs/restart.md "What a restart carries", "A start short of fds"; vhubd
under the service manager of vhubtest/servicemanager.py, as in
test_restart.py).

    test_restart_limits.py carry-cap   one uid fills the daemon's snapshot
                                       with the input of many connections:
                                       its own connections are closed,
                                       everyone else's state is carried
    test_restart_limits.py carry-cap-crash  the same, restored after a
                                       SIGKILL: the half requests carried,
                                       none of the long partial lines (a
                                       record holds one only at a planned
                                       restart)
    test_restart_limits.py fd-count    the restarted process holds exactly
                                       the fds the old one held (no stash
                                       end or copy left over per group)
    test_restart_limits.py nofile      a start under an RLIMIT_NOFILE too
                                       low for the stored fds fails, says
                                       why, keeps the store; with the limit
                                       back every device comes back

carry-cap: a planned restart carries each control connection's input read
and not handled, its batches' ids and the output it has not read, in the
daemon's snapshot, one document of at most 64 MiB.  uid 65534 opens 64
connections (its --max-connections-per-uid) and sends each a partial line
of almost 1 MiB (the line bound): 64 MiB of carried input.  root and uid
65533 each have a half-written request on their connection.  After a
planned restart: root's and 65533's connections get daemon.restarted, the
other half of their request completes it and it is answered (their half
was carried); uid 65534's connections that did not fit its share were
closed (their client sees the connection end), those that fit carried.
Before the bound the last snapshot did not fit: the new process took an
older one back, without the half requests (the second half was a parse
error) -- or no connection at all.
"""

import collections
import json
import os
import resource
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_backend_channel import connect_as                          # noqa: E402
from test_restart import BLK1, Managed, proc_fd_kinds               # noqa: E402
from test_restart_carry import RawReader                            # noqa: E402
from vhubtest import blk                                            # noqa: E402
from vhubtest.client import Client                                  # noqa: E402
from vhubtest.memory import GuestMemory                             # noqa: E402
from vhubtest.testbackend import TestBackend                        # noqa: E402
from vhubtest.testing import Skip, TestFailure, check, check_eq, log, run  # noqa: E402
from vhubtest.vmm import Vmm                                        # noqa: E402

ATTACKER = 65534
OTHER = 65533
LINE_MAX = 1024 * 1024


def connections_as(uid, path, n):
    """n connections to path whose SO_PEERCRED is uid."""
    out = [socket.socket(fileno=connect_as(path, uid).detach()) for _ in range(n)]
    log("uid %d made %d connections" % (uid, n))
    return out


def ended(reader):
    """Whether the daemon ended a RawReader's connection."""
    return not reader.thread.is_alive()


def wait_lines(reader, pred, timeout, what):
    """reader's lines once pred(lines, ended) holds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with reader.lock:
            lines = list(reader.lines)
        if pred(lines, ended(reader)):
            return lines
        time.sleep(0.02)
    raise TestFailure("FAILED: %s within %.0f s (lines %s, ended %s)"
                      % (what, timeout, reader.lines[-3:], ended(reader)))


def restarted(lines):
    return [m for m in lines if m.get("params", {}).get("event") == "daemon.restarted"]


def newest_record(sm, name):
    """(generation, length) of the newest copy of the stored snapshot file
    name (two slots, each with its header), or None."""
    if name not in sm.names():
        return None
    fd = sm.dup(name)
    try:
        slot = os.fstat(fd).st_size // 2
        heads = [os.pread(fd, 32, i * slot) for i in (0, 1)]
    finally:
        os.close(fd)
    valid = [(int.from_bytes(h[16:24], "little"), int.from_bytes(h[24:28], "little"))
             for h in heads if h[:8] == b"VHUBSNAP"]
    return max(valid) if valid else None


def wait_records_hold(sm, data, n, poke, timeout=20):
    """Until n of the control connections' records (a snapshot file each,
    "k<id>", since format 2) hold the bytes data, poke() making the daemon
    write again.  A record is rewritten when its connection reads, a
    partial line over 4 KiB only at a planned restart: the victims' half
    requests get into their records, the attacker's long lines into none
    (a crash closes those connections)."""
    end = time.monotonic() + timeout
    while True:
        holding = 0
        for name in sm.names():
            if name[:1] != "k" or not name[1:].isalnum():
                continue
            fd = sm.dup(name)
            try:
                holding += data in os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        if holding >= n:
            return
        if time.monotonic() > end:
            raise TestFailure("FAILED: %d of the connections' records hold %r, not %d, after %d s"
                              % (holding, data, n, timeout))
        poke()
        time.sleep(0.05)


def managed_for_all(t):
    """vhubd under the service manager whose control socket every uid may
    connect to (root only: the tests connect as other uids), and root's
    client: (Managed, Client)."""
    if os.geteuid() != 0:
        raise Skip("needs root to connect as other uids")
    d = t.tmpdir()
    os.chmod(d, 0o755)
    m = Managed(t, d, extra=["--control-mode", "0666"])
    return m, t.enter(Client(m.control, timeout=15))


def part_carry_cap(t, sig=signal.SIGTERM):
    m, root = managed_for_all(t)
    Vmm(root, "vm0").create()

    # the victims: root's raw connection and another uid's, each with half
    # of a request written
    half = [b'{"jsonrpc":"2.0","id":"mine","meth', b'od":"daemon.info"}\n']
    victims = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)]
    victims[0].connect(m.control)
    victims += connections_as(OTHER, m.control, 1)
    for s in victims:
        t.defer(s.close)
    # the attacker: 64 connections, each a line of almost LINE_MAX that
    # never ends
    hoard = connections_as(ATTACKER, m.control, 64)
    for s in hoard:
        t.defer(s.close)
    readers = [RawReader(s) for s in victims + hoard]
    root.call("daemon.info")            # every connection accepted
    for s in victims:
        s.sendall(half[0])
    # together a little over the snapshot's 64 MiB (the bound is LINE_MAX
    # bytes before the '\n')
    head = b'{"jsonrpc":"2.0","id":1,"method":"vm.list","params":{"pad":"'
    chunk = head + b"x" * (LINE_MAX - 8 - len(head))
    started = time.monotonic()
    for s in hoard:
        s.sendall(chunk)
    log("uid %d sent %d partial lines of %d bytes (%d MiB) in %.1f s"
        % (ATTACKER, len(hoard), len(chunk), len(hoard) * len(chunk) >> 20, time.monotonic() - started))
    time.sleep(0.5)                     # read by the daemon: nothing answers a partial line
    check(time.monotonic() - started < 8, "the partial lines are younger than their 10 s deadline")
    check(not any(r.lines or ended(r) for r in readers), "no answer to a partial line, no connection closed yet")
    if sig == signal.SIGKILL:
        # the victims' records hold their half requests (each written as
        # its connection reads; the crash restores what they hold)
        wait_records_hold(m.sm, half[0], len(victims), lambda: root.call("daemon.info"))
        m.restart(sig=sig)
    else:
        code = m.restart()
        check_eq(code, 0, "the old vhubd exits 0 (planned restart)")
    for s in victims:
        s.sendall(half[1])
    for who, r in zip(("root", "uid %d" % OTHER), readers[:2]):
        lines = wait_lines(r, lambda ls, closed: any(x.get("id") == "mine" for x in ls) or closed, 10,
                           "%s's half request answered" % who)
        check(restarted(lines) and lines[0] is restarted(lines)[0],
              "%s's connection was carried: daemon.restarted first" % who, lines[:2])
        answer = [x for x in lines if x.get("id") == "mine"]
        check(answer and "result" in answer[0] and answer[0]["result"].get("restarts") == 1,
              "%s's half request, carried across the restart, completed and answered" % who,
              lines[-2:])
    # the attacker's connections: each either carried or closed, the closed
    # ones seen closed by their client, and not all of them carried
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(ended(r) or restarted(r.lines) for r in readers[2:]):
        time.sleep(0.05)
    closed = [r for r in readers[2:] if ended(r) and not restarted(r.lines)]
    carried = [r for r in readers[2:] if restarted(r.lines) and not ended(r)]
    log("uid %d: %d connections carried, %d closed" % (ATTACKER, len(carried), len(closed)))
    check_eq(len(closed) + len(carried), len(hoard), "each of uid %d's connections carried or closed" % ATTACKER)
    check(closed, "uid %d's connections past its share were closed" % ATTACKER)
    if sig == signal.SIGKILL:
        check_eq(len(carried), 0, "a crash carries none of the connections mid-way into a line of almost 1 MiB")
    if sig == signal.SIGTERM:
        told = [r for r in closed if any(x.get("error", {}).get("code") == -32008 for x in r.lines)]
        check_eq(len(told), len(closed), "each closed connection was told why first (-32008)")
    with open(m.sm.log_path, errors="replace") as f:
        text = f.read()
    if sig == signal.SIGKILL:
        check("more than 4096 bytes into a line" in text, "the log says which connections were closed and why")
    else:
        check("over what a restart carries" in text and "uid %d" % ATTACKER in text,
              "the log says which connections were closed and why")
    check("snapshot was not written" not in text, "every snapshot was written")
    info = root.call("daemon.info")
    check_eq(info["restarts"], 1, "root's client connection was carried too")
    # the store keeps the groups of the connections carried, not of those closed
    conns = len(carried) + len(victims) + 1
    m.sm.wait_for(lambda: len([n for n in m.sm.names() if n.startswith("c")]) == conns, 5,
                  "the store to hold the %d carried connections' groups only" % conns)
    log("ok: the store holds the groups of the %d connections carried, none of those closed" % conns)
    root.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def blk_devices(t, m, c, d, n):
    """n VMs, each with a started one-ring device on its own test back-end
    (whose rings, inflight fd, memory, channel... are stored groups)."""
    out = []
    for i in range(n):
        sock = m.socket("b%d.sock" % i)
        t.enter(TestBackend([sock], args=["--queues", "1"], log_dir=d))
        mem = t.enter(GuestMemory(2 << 20))
        vmm = Vmm(c, "vm%d" % i)
        vmm.create()
        vmm.add_memory(mem)
        vmm.add_device("D", sock, type="blk")
        q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
        vmm.start_device("D", BLK1, [q.vq])
        out.append((vmm, mem, q))
    return out


def big_vm(t, c):
    """VM "big" with 300 one-page regions (one memfd each): its memory's
    group is more fds than one stash message carries (253)."""
    mem = t.enter(GuestMemory(4096))
    for i in range(1, 300):
        mem.add_region(i * 65536, 4096)
    big = Vmm(c, "big")
    big.create()
    big.add_memory(mem)
    return big


def managed_vms(t, n):
    """vhubd under the service manager with n VMs of a started device each
    and VM "big": (Managed, workdir, client, [(Vmm, memory, queue)], big)."""
    d = t.tmpdir()
    m = Managed(t, d, extra=["--vmm-dir", os.path.join(d, "vmm")])
    c = t.enter(Client(m.control, timeout=15))
    return m, d, c, blk_devices(t, m, c, d, n), big_vm(t, c)


def part_fd_count(t):
    # big's memory group is read back, not peeked, and stored again
    m, d, c, devs, _ = managed_vms(t, 6)
    # a shared object of vm0 (its own group)
    obj = os.memfd_create("vhubt-shared", os.MFD_CLOEXEC)
    os.ftruncate(obj, 4096)
    c.call("shared_object.add", {"vm": "vm0", "uuid": "8d5d7a8e-7c1b-4e5b-9a86-3a1c2d9f0e11", "fd": 0}, fds=[obj])
    os.close(obj)
    # a lingering VM (its connection gone) with a server-mode device: its
    # listener and directory are in its group
    srv = m.socket("srv.sock")
    other = t.enter(Client(m.control, timeout=15))
    Vmm(other, "lingering").create(linger_ms=60000)
    pend = other.request("device.add", {"vm": "lingering", "device": "S", "socket": srv, "mode": "server"})
    end = time.monotonic() + 5
    while not os.path.exists(srv) and time.monotonic() < end:
        time.sleep(0.01)
    t.enter(TestBackend(connect=[srv], log_dir=d, control=os.path.join(d, "srv.ctl")))
    pend.result(5.0)
    other.close()
    # a front-door device waiting for its VMM (its socket, its directory)
    fdoor = m.socket("fdoor.sock")
    t.enter(TestBackend([fdoor], log_dir=d, control=os.path.join(d, "fdoor.ctl")))
    Vmm(c, "fdoor").create()
    c.call("device.add", {"vm": "fdoor", "device": "F", "socket": fdoor, "type": "blk", "vmm_socket": True})
    other = t.enter(Client(m.control, timeout=15))
    other.call("events.subscribe", {})
    time.sleep(0.3)
    before = proc_fd_kinds(m.sm.pid)
    groups = sorted(m.sm.names())
    log("before: %d fds, %d stored groups" % (sum(before.values()), len(groups)))
    for k, sig in enumerate([signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL], 1):
        m.restart(sig=sig)
        for vmm, _, q in devs:
            check_eq(len(q.read_sectors(0, 1)), 512, "restart %d: %s's device serves its ring" % (k, vmm.vm))
        time.sleep(0.3)
        now = proc_fd_kinds(m.sm.pid)
        check(now == before, "restart %d (%s): the new process holds exactly the fds the old one held (%d)"
              % (k, signal.Signals(sig).name, sum(now.values())), (dict(now - before), dict(before - now)))
        names = sorted(m.sm.names())
        if k == 1:
            # the first planned stop moved the 8 devices, whose fds the
            # process that added them kept in their VMs' groups, into groups
            # of their own, as a format-1 vhubd has them (docs/restart.md,
            # "Versions"): 8 d<id> more, and the groups of the two VMs that
            # held nothing else gone
            added = [n for n in names if n not in groups]
            gone = [n for n in groups if n not in names]
            check_eq((len(added), all(n[:1] == "d" for n in added), len(gone), all(n[:1] == "v" for n in gone)),
                     (8, True, 2, True), "restart 1: each device in a group of its own (added %s, gone %s)"
                     % (added, gone))
            groups = names
        check_eq(names, groups, "restart %d: the store holds the same groups" % k)
    c.close()
    other.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


def stash_sizes(sm):
    """How many fds each stored group's stash holds, by name (peeked: the
    stash keeps them)."""
    import array
    import fcntl
    import termios
    out = {}
    for name in sm.names():
        fd = sm.dup(name)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        try:
            if s.type != socket.SOCK_SEQPACKET:
                continue
            queued = array.array("i", [0])
            fcntl.ioctl(s.fileno(), termios.FIONREAD, queued)
            _, anc, _, _ = s.recvmsg(1, socket.CMSG_SPACE(253 * 4), socket.MSG_PEEK | socket.MSG_DONTWAIT)
            fds = [int.from_bytes(data[i:i + 4], sys.byteorder) for level, kind, data in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS for i in range(0, len(data), 4)]
            for f in fds:
                os.close(f)
            out[name] = (queued[0], len(fds))
        finally:
            s.close()
    return out


def fail_start_short_of_fds(m, limit):
    """systemctl restart into a unit whose LimitNOFILE= (limit) is too low
    for what the store holds: the start fails, says why, and leaves the
    store as it was, stash by stash."""
    m.sm.send_signal(signal.SIGTERM)
    check_eq(m.sm.wait_exit(), 0, "the old vhubd exits 0 (planned restart)")
    # as the planned restart left it (its last step compacts stashes that
    # were appended to into one message each: docs/restart.md, "Groups")
    names = sorted(m.sm.names())
    sizes = stash_sizes(m.sm)
    m.sm.start(["prlimit", "--nofile=%d:%d" % (limit, limit), "--"] + m.argv)
    try:
        code = m.sm.wait_exit(30)
    except Exception:
        raise TestFailure("FAILED: vhubd short of fds did not exit (ready: %s)" % m.sm.ready)
    check(code != 0, "vhubd short of fds for what the store holds exits non-zero (%d)" % code)
    check(not m.sm.ready, "... without READY=1")
    with open(m.sm.log_path, errors="replace") as f:
        text = f.read()
    check("RLIMIT_NOFILE" in text and "LimitNOFILE" in text and "stored fds are kept" in text,
          "its log says it is short of fds, the limit, and that the store is kept")
    check_eq(sorted(m.sm.names()), names, "the store holds the same groups")
    check_eq(stash_sizes(m.sm), sizes, "... each with every fd it held")


def part_nofile(t):
    # big's memory group is read to be taken back (which empties it): read
    # only when every fd gets a number
    m, _, c, devs, big = managed_vms(t, 8)
    regions = big.memory_list()
    time.sleep(0.3)
    c.events()
    before = proc_fd_kinds(m.sm.pid)
    total = sum(before.values())
    limit = total - 20
    log("at rest: %d fds in %d stored groups; the next start gets RLIMIT_NOFILE %d"
        % (total, len(m.sm.names()), limit))

    fail_start_short_of_fds(m, limit)

    # the limit back: everything comes back, as if the failed start had not been
    m.sm.start(m.argv)
    m.sm.wait_ready()
    check_eq(c.wait_event(None, 10).get("event"), "daemon.restarted", "the VMM's connection is carried")
    for vmm, _, q in devs:
        check_eq(vmm.device_state("D")["state"], "running", "%s's device is running" % vmm.vm)
        check_eq(len(q.read_sectors(0, 1)), 512, "%s's device serves its ring" % vmm.vm)
    check_eq(big.memory_list(), regions, "the VM of 300 regions has them all")
    time.sleep(0.3)
    now = proc_fd_kinds(m.sm.pid)
    check(now == before, "the process holds the fds the one before the failed start held",
          (dict(now - before), dict(before - now)))
    c.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


PARTS = {
    "carry-cap": part_carry_cap,
    "carry-cap-crash": lambda t: part_carry_cap(t, signal.SIGKILL),
    "fd-count": part_fd_count,
    "nofile": part_nofile,
}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in PARTS:
        raise SystemExit("usage: test_restart_limits.py %s" % "|".join(PARTS))
    run(PARTS[sys.argv[1]])

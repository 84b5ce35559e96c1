#!/usr/bin/env python3
"""A long partial line fed in small writes (red team, issue 10): what the
daemon's restart records of control connections cost while one uid trickles
its lines, and what other uids' calls see meanwhile.  docs/restart.md has
the figures ("What a restart carries of the control connections", and "A
VMM's flood of tiny requests").  Not a pass/fail test.

vhubd under the service manager (the fd store and snapshots on).  uid 65534
opens CONNS connections and sends each PREFIX bytes of a line that never
ends, then one byte more to each in turn for SECONDS (under a line's 10 s
deadline).  Root's client times `device.list` of its VM all along; before
the trickle the same number of calls is timed with nobody trickling.
Reported: the calls' median and 99th percentile and the daemon's CPU time
over each phase, and the bytes of the connections' records written
(the daemon's debug log).

    bench_trickle.py [CONNS [PREFIX_KIB [SECONDS]]]   (default 16 512 4)
    meson test -C build --benchmark --suite bench -v trickle

The same for a front-door VMM (its session leaves "at rest" before each
message is read and comes back once it is answered: a VM snapshot write
each way): a VMM floods GET_FEATURES (one at a time, from another process)
on the front door of a VM with DEVICES devices; root's device.list of
another VM is timed as above, and the VM snapshots written counted.

    bench_trickle.py vmm [DEVICES [SECONDS]]           (default 64 4)

The same VMM sending SET_BACKEND_REQ_FD (a new channel each time) one after
the other instead: each replaces a socket of its device's fd-store group,
which is rebuilt through the service manager (a socket's peer must see it
close when the daemon closes it: it cannot stay in the stash).

    bench_trickle.py vmm-channel [DEVICES [SECONDS]]   (default 64 4)

VMMS front-door VMMs of one VM (each device on qemu-storage-daemon)
flooding GET_CONFIG, a request the back-end answers and the VM's snapshot
carries while in flight: each VMM sends its next as soon as it has the
answer (all from one child process).  Root's device.list of another VM is
timed as above; the VM snapshots written and GET_CONFIGs answered counted.

    bench_trickle.py vmm-config [VMMS [SECONDS]]       (default 64 4)

The same for a front-door device's back-end (the project's test back-end)
sending CONFIG_CHANGE_MSG (no NEED_REPLY) one after the other on its
channel, in a VM of DEVICES front-door devices (the others on
qemu-storage-daemon): each relayed request took a token that had the VM's
snapshot written.

    bench_trickle.py breq [DEVICES [SECONDS]]          (default 64 4)

And uid 65534 opening and closing control connections one after the other
(each one's socket is a group and its record a snapshot file: pushed to
the service manager as it is accepted, removed as it closes), against the
same with --no-fd-store (no store, no records):

    bench_trickle.py churn [SECONDS]                   (default 4)

Needs root (to connect as another uid).
"""

import os
import re
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from test_backend_channel import connect_as             # noqa: E402
from test_restart import Managed                        # noqa: E402
from vhubtest.client import Client                      # noqa: E402
from vhubtest.testing import Skip, log, run             # noqa: E402
from vhubtest.vmm import Vmm                            # noqa: E402

ATTACKER = 65534


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def record_bytes(path, kind="k"):
    """Bytes of the snapshots of kind (k: control connections' records, s:
    VMs') written, per the debug log; and how many."""
    total = n = 0
    with open(path, errors="replace") as f:
        for m in re.finditer(r"snapshot %s\w+ written: (\d+) bytes" % kind, f.read()):
            total += int(m.group(1))
            n += 1
    return total if kind == "k" else (total, n)


def timed_calls(client, until):
    out = []
    while time.monotonic() < until:
        t0 = time.perf_counter()
        client.call("device.list", {"vm": "vm0"})
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def phase(name, pid, calls, cpu0):
    calls.sort()
    log("%-9s device.list: %5d calls, median %7.0f us, mean %7.0f us, p99 %8.0f us, max %8.0f us; vhubd CPU "
        "%.2f s" % (name, len(calls), statistics.median(calls), statistics.mean(calls), calls[int(len(calls) * 0.99)],
                    calls[-1], cpu_seconds(pid) - cpu0))


def vmm_flood(path, until, channels=False):
    """A VMM's GET_FEATURES (or SET_BACKEND_REQ_FD) one after the other
    until `until` (run in a child process): how many."""
    from vhubtest import direct as vu
    fe = vu.DirectFrontend.connect(path)
    fe.handshake(vu.SUPPORTED_PROTOCOL_FEATURES | (1 << vu.PF_BACKEND_REQ))
    n = 0
    while time.monotonic() < until:
        if channels:
            a, b = socket.socketpair()
            fe.command(vu.SET_BACKEND_REQ_FD, b"", [b.fileno()])
            a.close()
            b.close()
        else:
            fe.get_features()
        n += 1
    fe.close()
    return n


def vmm_config_flood(paths, until):
    """Each VMM's GET_CONFIG, the next as soon as the answer is in, until
    `until` (run in a child process): how many answered."""
    import selectors
    import struct
    from vhubtest import direct as vu
    msg = struct.pack("<III", vu.GET_CONFIG, 1, 20) + struct.pack("<III", 0, 8, 0) + bytes(8)
    reply = 12 + 20
    sel = selectors.DefaultSelector()
    fes = []
    for p in paths:
        fe = vu.DirectFrontend.connect(p)
        fe.handshake()
        fes.append(fe)
    for fe in fes:
        fe.sock.setblocking(False)
        fe.sock.sendall(msg)
        sel.register(fe.sock, selectors.EVENT_READ, [fe, b""])
    n = 0
    while time.monotonic() < until:
        for key, _ in sel.select(0.1):
            fe, buf = key.data
            buf += fe.sock.recv(4096)
            while len(buf) >= reply:
                buf = buf[reply:]
                n += 1
                fe.sock.sendall(msg)
            key.data[1] = buf
    for fe in fes:
        fe.close()
    return n


def in_child(fn):
    """fn() run in a child process; returns what collects the number it
    returns (waiting for the child)."""
    rfd, wfd = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(rfd)
        try:
            os.write(wfd, b"%d" % fn())
        finally:
            os._exit(0)
    os.close(wfd)

    def collect():
        n = int(os.read(rfd, 64) or b"0")
        os.close(rfd)
        os.waitpid(child, 0)
        return n
    return collect


def flood_vm(t, devices, test_backend=False):
    """vhubd with vm0 (whose device.list is timed) and VM "flood" of
    front-door devices on qemu-storage-daemon, the first on the project's
    test back-end if test_backend: (Managed, root's client, the first
    device's VMM socket, the test back-end or None)."""
    from vhubtest.backends import QsdNullBackend
    from vhubtest.testbackend import TestBackend
    d = t.tmpdir()
    os.chmod(d, 0o755)
    m = Managed(t, d, extra=["--vmm-dir", os.path.join(d, "vmm"), "--log-level", "debug"])
    tb = t.enter(TestBackend([m.socket("tb.sock")], log_dir=d)) if test_backend else None
    sockets = [tb.socket] if tb else []
    null = t.enter(QsdNullBackend([m.socket("n%d.sock" % i) for i in range(devices - len(sockets))], log_dir=d))
    root = t.enter(Client(m.control, timeout=30))
    Vmm(root, "vm0").create()
    root.call("vm.create", {"vm": "flood"})
    paths = [root.call("device.add", {"vm": "flood", "device": "d%d" % i, "socket": s, "type": "blk",
                                      "vmm_socket": True})["vmm_socket"]
             for i, s in enumerate(sockets + null.sockets)]
    return m, root, paths, tb


def flood_phases(m, root, seconds, name, flood):
    """device.list timed idle, then while flood(until) runs in a child:
    (what flood returned, VM snapshots written, their KiB, messages to the
    service manager)."""
    pid = root.call("daemon.info")["pid"]
    cpu0 = cpu_seconds(pid)
    phase("idle", pid, timed_calls(root, time.monotonic() + seconds), cpu0)
    until = time.monotonic() + seconds + 0.5
    collect = in_child(lambda: flood(until))
    time.sleep(0.5)
    before = record_bytes(m.sm.log_path, "s")
    messages = len(m.sm.messages)
    cpu0 = cpu_seconds(pid)
    phase(name, pid, timed_calls(root, until), cpu0)
    after = record_bytes(m.sm.log_path, "s")
    return collect(), after[1] - before[1], (after[0] - before[0]) >> 10, len(m.sm.messages) - messages


def main_vmm(t, devices, seconds, channels=False):
    m, root, paths, _ = flood_vm(t, devices)
    n, snaps, kib, messages = flood_phases(m, root, seconds, "vmm-flood",
                                           lambda until: vmm_flood(paths[0], until, channels))
    log("a VMM of a VM with %d devices: %d %s in %.1f s; VM snapshots written meanwhile: %d (%d KiB); "
        "messages to the service manager: %d" % (devices, n, "SET_BACKEND_REQ_FD" if channels else "GET_FEATURES",
                                                 seconds + 0.5, snaps, kib, messages))


def main_vmm_config(t, vmms, seconds):
    m, root, paths, _ = flood_vm(t, vmms)
    n, snaps, kib, _ = flood_phases(m, root, seconds, "vmm-config",
                                    lambda until: vmm_config_flood(paths, until))
    log("%d VMMs of one VM: %d GET_CONFIG answered in %.1f s; VM snapshots written meanwhile: %d (%d KiB, "
        "%.2f per request)" % (vmms, n, seconds + 0.5, snaps, kib, snaps / max(n, 1)))


def main_breq(t, devices, seconds):
    m, root, _, tb = flood_vm(t, devices, test_backend=True)

    def flood(until):
        # the back-end's control connection is the child's while it floods
        n = 0
        while time.monotonic() < until:
            tb.config_change(need_reply=False)
            n += 1
            time.sleep(0.0002)  # one a wake-up of the daemon: a burst is read 64 at a time
        return n

    n, snaps, kib, _ = flood_phases(m, root, seconds, "breq", flood)
    log("a back-end of a VM with %d front-door devices: %d CONFIG_CHANGE_MSG in %.1f s; VM snapshots written "
        "meanwhile: %d (%d KiB)" % (devices, n, seconds + 0.5, snaps, kib))


def churn(path, until):
    """uid ATTACKER's connections opened and closed one after the other
    until `until` (run in a child process): how many."""
    os.setgroups([])
    os.setgid(ATTACKER)
    os.setuid(ATTACKER)
    n = 0
    while time.monotonic() < until:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path)
            except OSError:
                continue        # refused over its uid's connections: the close is not seen yet
        n += 1
    return n


def main_churn(t, seconds):
    if os.geteuid() != 0:
        raise Skip("needs root to connect as another uid")
    for store in (True, False):
        d = t.tmpdir()
        os.chmod(d, 0o755)
        m = Managed(t, d, extra=["--control-mode", "0666"] + ([] if store else ["--no-fd-store"]))
        root = t.enter(Client(m.control, timeout=30))
        Vmm(root, "vm0").create()
        pid = root.call("daemon.info")["pid"]
        cpu0 = cpu_seconds(pid)
        phase("idle", pid, timed_calls(root, time.monotonic() + seconds), cpu0)
        messages = len(m.sm.messages)
        until = time.monotonic() + seconds
        collect = in_child(lambda: churn(m.control, until))
        cpu0 = cpu_seconds(pid)
        calls = timed_calls(root, until)
        cpu = cpu_seconds(pid) - cpu0
        phase("churn", pid, calls, cpu0)
        n = collect()
        time.sleep(0.3)
        log("%s: uid %d opened and closed %d connections in %.1f s (vhubd CPU per connection ~%.0f us); "
            "messages to the service manager: %d" % ("fd store" if store else "--no-fd-store", ATTACKER, n,
                                                     seconds, cpu * 1e6 / max(n, 1), len(m.sm.messages) - messages))
        root.close()
        m.sm.stop_unit()


def main(t):
    if sys.argv[1:2] == ["churn"]:
        args = [int(a) for a in sys.argv[2:]]
        main_churn(t, *(args + [4][len(args):])[:1])
        return
    if sys.argv[1:2] == ["vmm-config"]:
        args = [int(a) for a in sys.argv[2:]]
        main_vmm_config(t, *(args + [64, 4][len(args):])[:2])
        return
    if sys.argv[1:2] == ["breq"]:
        args = [int(a) for a in sys.argv[2:]]
        main_breq(t, *(args + [64, 4][len(args):])[:2])
        return
    if sys.argv[1:2] in (["vmm"], ["vmm-channel"]):
        args = [int(a) for a in sys.argv[2:]]
        main_vmm(t, *(args + [64, 4][len(args):])[:2], channels=sys.argv[1] == "vmm-channel")
        return
    if os.geteuid() != 0:
        raise Skip("needs root to connect as another uid")
    args = [int(a) for a in sys.argv[1:]]
    conns, prefix_kib, seconds = (args + [16, 512, 4][len(args):])[:3]
    d = t.tmpdir()
    os.chmod(d, 0o755)
    m = Managed(t, d, extra=["--control-mode", "0666", "--log-level", "debug"])
    root = t.enter(Client(m.control, timeout=30))
    Vmm(root, "vm0").create()
    pid = root.call("daemon.info")["pid"]

    cpu0 = cpu_seconds(pid)
    phase("idle", pid, timed_calls(root, time.monotonic() + seconds), cpu0)

    hoard = [socket.socket(fileno=connect_as(m.control, ATTACKER).detach()) for _ in range(conns)]
    for s in hoard:
        t.defer(s.close)
    root.call("daemon.info")
    head = b'{"jsonrpc":"2.0","id":1,"method":"vm.list","params":{"pad":"'
    for s in hoard:
        s.sendall(head + b"x" * (prefix_kib * 1024 - len(head)))
    time.sleep(0.3)
    before = record_bytes(m.sm.log_path)
    sent = 0
    cpu0 = cpu_seconds(pid)
    until = time.monotonic() + seconds

    def trickle():
        nonlocal sent
        while time.monotonic() < until:
            for s in hoard:
                s.send(b"x")
                sent += 1
            time.sleep(0.0005)

    th = threading.Thread(target=trickle)
    th.start()
    calls = timed_calls(root, until)
    th.join()
    phase("trickle", pid, calls, cpu0)
    time.sleep(0.3)
    log("uid %d: %d connections, %d KiB each, %d bytes trickled; connections' records written: %d MiB"
        % (ATTACKER, conns, prefix_kib, sent, (record_bytes(m.sm.log_path) - before) >> 20))


if __name__ == "__main__":
    run(main)

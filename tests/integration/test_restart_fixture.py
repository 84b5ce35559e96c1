#!/usr/bin/env python3
"""Upgrade: the snapshots a real vhubd wrote, kept as a fixture of their
format version (issue 10: "a newer daemon reads the previous version's
snapshots"; docs/restart.md, "The snapshot format").

fixtures/restart-v<N>[.<n>]/ holds the snapshot files (the memfds' whole
contents, both slots) that vhubd left in the fd store at a planned restart of
the scenario below: "S" (the daemon; in format 1 its control connections
too), one "s<id>" per VM and, since format 2, one "k<id>" per control
connection.  restart-v<N> is what the first writer of format version N
wrote; restart-v<N>.<n> what a later writer of the same version wrote after
records were added or dropped that every reader of that version copes with
(restart-v1.1: h-redteam's device credentials and per-VM token count added,
the daemon-wide token count dropped; restart-v2.1: h-devadd's D_VM_GROUP, a
device whose fds are in its VM's group).  Two checks:

  read    vhubd started with a store holding only one fixture's snapshot
          files (as after an upgrade from the daemon that wrote them, the
          other fds aside) reads them -- every fixture kept: READY=1,
          "restoring the state of the earlier run", restarts counts on from
          the fixture's, both VMs back under their names with their owner,
          devices and linger state; nothing malformed.  Fds the fixture names
          but the store does not hold are "gone", as the restore treats any
          fd not passed back (regions dropped, the device lost and retrying,
          the VMM's shared object dropped).
  shape   the snapshots today's vhubd writes for the same scenario have the
          same record tree as the newest fixture of today's version: every
          record's tag path, kind, flags and fixed length (values differ:
          paths, fd keys, clocks).  A writer that adds, drops or retypes a
          record fails here until it bumps the version (a change an older
          reader would misread) or says why readers of the version cope, and
          adds its own fixture beside the others:

              python3 tests/integration/test_restart_fixture.py write

A third, run by hand with an earlier build (not registered: the suite
builds one tree):

  upgrade VHUBD_PREVIOUS=<an earlier vhubd> test_restart_fixture.py upgrade:
          a planned restart from it into today's vhubd carries a started qsd
          device serving I/O and two connections; a restart back into it is
          refused when today's format is newer than it reads (exit non-zero,
          the log says why, the store untouched) and today's takes the state
          back again.

The scenario: vm0 (linger_ms 10 min) with an 8 MiB region, a test back-end
device blk0 started with one ring, a second device blk1, the VMM's shared
object and one blk1 exported; vm1 (linger_ms 10 min) whose owner connection
closed (lingering); a second connection subscribed to every VM's events.
"""

import os
import re
import signal
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                              # noqa: E402
from vhubtest.client import Client                               # noqa: E402
from vhubtest.memory import GuestMemory                          # noqa: E402
from vhubtest.servicemanager import ServiceError, ServiceManager  # noqa: E402
from vhubtest.testbackend import TestBackend                     # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run_parts  # noqa: E402
from vhubtest.vmm import Vmm                                     # noqa: E402
from test_restart import Managed                                 # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def writer_version():
    """VHUB_SNAP_VERSION, the version today's writer speaks."""
    with open(os.path.join(HERE, "..", "..", "daemon", "vhub-snapshot.h")) as f:
        return int(re.search(r"#define VHUB_SNAP_VERSION\s+(\d+)u", f.read()).group(1))


FORMAT_VERSION = writer_version()
FIXTURES = os.path.join(HERE, "fixtures")
NEST, U64, U32, BOOL, STR, BYTES, FDNAME, I64 = range(1, 9)
FIXED = {U64: 8, U32: 4, BOOL: 1, I64: 8}
BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)
LINGER_MS = 600000
S_RESTARTS = 1          # the daemon's snapshot: restarts carried so far


def fixtures():
    """[(version, generation, directory)], oldest first: restart-v<version>
    is a version's first writer, restart-v<version>.<n> a later writer of
    the same version (records added or dropped that a reader of that version
    copes with)."""
    out = []
    for name in os.listdir(FIXTURES):
        m = re.fullmatch(r"restart-v(\d+)(?:\.(\d+))?", name)
        if m:
            out.append((int(m.group(1)), int(m.group(2) or 0), os.path.join(FIXTURES, name)))
    return sorted(out)


def newest_fixture(version):
    mine = [f for f in fixtures() if f[0] == version]
    return mine[-1] if mine else None


def newest_doc(data):
    """The newest valid document of a snapshot file's contents (two slots):
    (version, compat, generation, payload)."""
    slot = len(data) // 2
    check(slot >= 4096 and slot & (slot - 1) == 0 and len(data) == 2 * slot,
          "a snapshot file is two power-of-two slots (%d bytes)" % len(data))
    best = None
    for i in range(2):
        d = data[i * slot:(i + 1) * slot]
        if d[:8] != b"VHUBSNAP":
            continue
        version, compat, hsize, gen, plen, crc = struct.unpack_from("<HHIQII", d, 8)
        if hsize != 32 or 32 + plen > slot:
            continue
        if best is None or gen > best[2]:
            best = (version, compat, gen, d[32:32 + plen])
    if best is None:
        raise TestFailure("no document in the snapshot file")
    return best


def shape(payload, path=()):
    """The record tree without its values: [(tag path, kind, flags, length
    of a fixed-size value)] in order."""
    out = []
    off = 0
    while off < len(payload):
        tag, kind, flags, n = struct.unpack_from("<HBBI", payload, off)
        value = payload[off + 8:off + 8 + n]
        if len(value) != n:
            raise TestFailure("record %s does not fit its document" % (path + (tag,),))
        p = path + (tag,)
        out.append((p, kind, flags, n if kind in FIXED or kind == BYTES else None))
        if kind == NEST:
            out += shape(value, p)
        off += 8 + n
    return out


def doc_summary(payload):
    """Tag path -> values, for the read check's expectations."""
    vals = {}
    off = 0
    while off < len(payload):
        tag, kind, flags, n = struct.unpack_from("<HBBI", payload, off)
        value = payload[off + 8:off + 8 + n]
        if kind == U64:
            vals.setdefault(tag, []).append(struct.unpack("<Q", value)[0])
        elif kind == STR:
            vals.setdefault(tag, []).append(value.decode())
        off += 8 + n
    return vals


def produce(t):
    """Run SCENARIO under a service manager; the snapshot files a planned
    restart leaves in the store: {name: bytes}."""
    d = t.tmpdir()
    m = Managed(t, d)
    tbs = [t.enter(TestBackend([m.socket("blk%d.sock" % i)], args=["--queues", "1"], log_dir=d))
           for i in range(2)]
    c = t.enter(Client(m.control, timeout=10))
    watcher = t.enter(Client(m.control, timeout=10))
    mem = t.enter(GuestMemory(8 << 20))
    vmm = Vmm(c, "vm0")
    vmm.create(linger_ms=LINGER_MS)
    vmm.add_memory(mem)
    watcher.call("events.subscribe", {})
    vmm.add_device("blk0", tbs[0].socket, type="blk", reconnect_ms=1000)
    vmm.add_device("blk1", tbs[1].socket, type="blk")
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("blk0", BLK1, [q.vq])
    check_eq(len(q.read_sectors(0, 1)), 512, "blk0 serves its ring")
    obj = os.memfd_create("vhubt-vmm-object", os.MFD_CLOEXEC)
    os.ftruncate(obj, 4096)
    c.call("shared_object.add", {"vm": "vm0", "uuid": "5b1c8c1e-6a0c-4a54-9d3e-7d1f0a2b3c4d",
                                 "fd": 0}, fds=[obj])
    os.close(obj)
    tbs[1].export(size=4096, fill="b1")
    other = Client(m.control, timeout=10)
    Vmm(other, "vm1").create(linger_ms=LINGER_MS)
    other.close()
    watcher.wait_event(lambda e: e.get("event") == "vm.lingering" and e.get("vm") == "vm1", 5)
    m.sm.send_signal(signal.SIGTERM)
    check_eq(m.sm.wait_exit(), 0, "the planned restart's old vhubd exits 0")
    files = {}
    for name in m.sm.names():
        if name == "S" or (name[:1] in "sk" and name[1:].isalnum()):
            fd = m.sm.dup(name)
            files[name] = os.pread(fd, os.fstat(fd).st_size, 0)
            os.close(fd)
    # since format 2 each control connection's record is a file of its own
    check_eq(sorted(files), ["S", "k1", "k2", "s1", "s2"],
             "the store holds the daemon's, two VMs' and two connections' snapshots")
    m.sm.release_store()
    c.close()
    watcher.close()
    q.vq.close()
    return files


def load(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".snap"):
            with open(os.path.join(d, f), "rb") as fh:
                out[f[:-5]] = fh.read()
    return out


def part_write(t):
    """Write today's writer's snapshots as the next fixture of its version
    (restart-v<version> if there is none yet, else restart-v<version>.<n+1>)."""
    files = produce(t)
    last = newest_fixture(FORMAT_VERSION)
    name = "restart-v%d" % FORMAT_VERSION if last is None else \
        "restart-v%d.%d" % (FORMAT_VERSION, last[1] + 1)
    d = os.path.join(FIXTURES, name)
    os.makedirs(d)
    for name, data in files.items():
        with open(os.path.join(d, name + ".snap"), "wb") as f:
            f.write(data)
        log("wrote %s: %d bytes" % (os.path.join(d, name + ".snap"), len(data)))


def part_shape(t):
    newest = newest_fixture(FORMAT_VERSION)
    check(newest is not None, "a fixture of today's format version %d exists" % FORMAT_VERSION)
    fixture = load(newest[2])
    log("comparing with %s" % os.path.basename(newest[2]))
    today = produce(t)
    check_eq(sorted(today), sorted(fixture), "the same snapshot files as the fixture")
    diffs = []
    for name in sorted(fixture):
        fv, fc, _, fpay = newest_doc(fixture[name])
        tv, tc, _, tpay = newest_doc(today[name])
        check_eq((tv, tc), (fv, fc), "%s: today's writer writes the fixture's version and compat" % name)
        want, got = shape(fpay), shape(tpay)
        if want != got:
            import difflib
            diffs.append("%s:\n%s" % (name, "\n".join(difflib.unified_diff(
                [repr(x) for x in want], [repr(x) for x in got], "fixture", "today", lineterm="", n=1))))
        else:
            log("ok: %s: %d records, the same tree as %s" % (name, len(got), os.path.basename(newest[2])))
    if diffs:
        raise TestFailure("the record tree changed since %s.  A change a reader of version %d would "
                          "misread: bump VHUB_SNAP_VERSION (and compat).  Records added or dropped "
                          "that every reader of version %d copes with: say so in docs/restart.md.  "
                          "Either way keep the fixtures there are (the read check reads them all) "
                          "and add today's with `test_restart_fixture.py write`:\n%s"
                          % (os.path.basename(newest[2]), FORMAT_VERSION, FORMAT_VERSION,
                             "\n".join(diffs)))


def part_read(t):
    found = fixtures()
    check(found, "fixtures of snapshot versions exist")
    for version, generation, d in found:
        read_one(t, version, d)


def read_one(t, version, directory):
    files = load(directory)
    version = os.path.basename(directory)[len("restart-v"):]
    daemon_doc = doc_summary(newest_doc(files["S"])[3])
    restarts = daemon_doc[S_RESTARTS][0]
    d = t.tmpdir()
    control = os.path.join(d, "control.sock")
    backends = os.path.join(d, "backends")
    os.makedirs(backends)
    sm = t.enter(ServiceManager(d))
    t.add_log("vhubd reading the version %s fixture" % version, sm.log_path)
    for name, data in files.items():
        fd = os.memfd_create("vhub-snapshot", os.MFD_CLOEXEC)
        os.write(fd, data)
        sm.put(name, fd)
        os.close(fd)
    from vhubtest.daemon import vhubd_path
    sm.start([vhubd_path(), "--control", control, "--backend-dir", backends, "--log-level", "info"])
    sm.wait_ready()
    with open(sm.log_path, errors="replace") as f:
        text = f.read()
    check("restoring the state of the earlier run (a planned restart, restart %d, 2 VMs)"
          % (restarts + 1) in text, "version %s: vhubd reads the fixture's snapshots" % version)
    for bad in ("malformed", "cannot restore", "unreadable", "needs a newer"):
        check(bad not in text, "version %s: the log says nothing is %r" % (version, bad))
    c = t.enter(Client(control, timeout=10))
    info = c.call("daemon.info")
    check_eq(info["restarts"], restarts + 1, "version %s: restarts counts on from the fixture's"
             % version)
    vms = {v["vm"]: v for v in c.call("vm.list")["vms"]}
    check_eq(sorted(vms), ["vm0", "vm1"], "version %s: both VMs are back" % version)
    check_eq(vms["vm0"]["devices"], ["blk0", "blk1"], "version %s: vm0's devices" % version)
    check_eq(vms["vm0"]["uid"], 0, "version %s: vm0's owner uid" % version)
    check_eq(vms["vm0"]["regions"], 0, "version %s: vm0's region, whose fd the store does not "
             "hold, is gone" % version)
    c.call("vm.attach", {"vm": "vm0"})
    devs = {x["device"]: x for x in c.call("device.list", {"vm": "vm0"})["devices"]}
    check(devs["blk0"]["socket"].endswith("/backends/blk0.sock"),
          "version %s: blk0's socket path as the fixture names it" % version, devs["blk0"])
    log("version %s: devices after the restore: %s" % (version, {n: x["state"] for n, x in devs.items()}))
    c.call("vm.attach", {"vm": "vm1"})
    c.call("vm.destroy", {"vm": "vm1"})
    c.call("vm.destroy", {"vm": "vm0"})
    c.close()
    check_eq(sm.stop_unit(), 0, "version %s: systemctl stop: vhubd exits 0" % version)


def part_upgrade(t):
    """Run by hand with an earlier build: VHUBD_PREVIOUS=<its vhubd>.  A
    planned restart from it into today's vhubd carries everything (a
    started qsd device serving I/O, the VMM's and a subscriber's
    connections); when today's format is newer than what it reads, a
    restart back into it is refused (exit non-zero, the log says why, the
    store untouched) and today's takes the state back again."""
    from test_restart import listing, one_blk_device
    previous = os.environ.get("VHUBD_PREVIOUS")
    check(previous and os.access(previous, os.X_OK), "VHUBD_PREVIOUS names an earlier vhubd", previous)
    today = os.environ["VHUBD"]
    d = t.tmpdir()
    os.environ["VHUBD"] = previous
    try:
        m = Managed(t, d)
    finally:
        os.environ["VHUBD"] = today
    _, c, _, vmm, q = one_blk_device(t, m, d)
    watcher = t.enter(Client(m.control, timeout=10))
    watcher.call("events.subscribe", {})
    data = os.urandom(4096)
    q.write_sectors(0, data)
    before = listing(c)

    def carried(k, what):
        for x in (c, watcher):
            ev = x.wait_event(lambda e: e.get("event") == "daemon.restarted", 10)
            check_eq(ev.get("restarts"), k, "%s: both connections carried (daemon.restarted)" % what)
        check_eq(listing(c), before, "%s: everything listed as before" % what)
        check_eq(q.read_sectors(0, 8), data, "%s: the device serves its ring, the data there" % what)

    m.argv[0] = today
    m.restart()
    carried(1, "from the earlier build to today's")
    stored = sorted(m.sm.names())
    m.sm.send_signal(signal.SIGTERM)
    check_eq(m.sm.wait_exit(), 0, "today's vhubd: a planned restart exits 0")
    m.sm.start([previous] + m.argv[1:])
    try:
        code = m.sm.wait_exit(5)
    except ServiceError:
        code = None     # still running: it reads today's format
    if code is None:
        m.sm.wait_ready()
        carried(2, "back into the earlier build (it reads today's format)")
        m.restart()
        carried(3, "today's again")
    else:
        with open(m.sm.log_path, errors="replace") as f:
            text = f.read()
        check(code != 0 and "needs a newer vhubd" in text,
              "back into the earlier build: refused (exit %s), the log says why" % code)
        check_eq(sorted(m.sm.names()), stored, "back into the earlier build: the store untouched")
        m.sm.start(m.argv)
        m.sm.wait_ready()
        carried(2, "today's again after the refusal")
    vmm.stop_device("blk0")
    vmm.remove_device("blk0")
    vmm.destroy()
    q.vq.close()
    check_eq(m.sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


if __name__ == "__main__":
    run_parts({"read": part_read, "shape": part_shape, "write": part_write, "upgrade": part_upgrade}, "read")

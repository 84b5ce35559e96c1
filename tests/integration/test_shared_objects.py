#!/usr/bin/env python3
"""Shared objects (virtio-dmabuf UUIDs) through vhubd, per the control contract.

Every back-end is its own vhub-test-backend process (an exporter that is
SIGSTOPped must not freeze the importer).  vhubd runs with
--backend-timeout-ms 500.

- device export: A exports a memfd (SHARED_OBJECT_ADD), B looks it up and
  gets an fd to the same memory: B writes through its mapping and the bytes
  are in A's memfd (read through /proc/<A>/fd), and bytes written into A's
  memfd are what B's next lookup reads;
- VMM export: shared_object.add with a memfd, a back-end's lookup reads the
  VMM's bytes and its write shows up in the VMM's mapping;
- shared_object.list names the owners ("vmm", "A"); the lookup reply is the
  u64 + fd and nothing else (no extra ack reaches the back-end);
- per VM: a second VM with its own device cannot look up vm0's objects (nor
  vm0 its), and the same UUID may exist in both VMs, each with its own fd;
- SHARED_OBJECT_ADD of a taken UUID and SHARED_OBJECT_REMOVE by a non-owner
  are refused (nonzero ack) and change nothing; the exporter's own REMOVE
  works; without NEED_REPLY, ADD and REMOVE act and LOOKUP is still answered;
- an exporter refusing GET_SHARED_OBJECT: the lookup fails, nothing else does;
- shared_object.add/remove errors: duplicate -32003, malformed UUID and bad
  params -32602, remove of an unknown UUID or of a device's object fails;
- exporter removed (device.remove) or killed (SIGKILL, reconnect_ms large):
  its objects leave shared_object.list and lookups fail;
- exporter hung (SIGSTOP): the lookup fails after the deadline while
  device.config.get on a third device, and on the importer itself, answers
  quickly throughout the stall;
- lookups in parallel (and an exporter looking up its own object) are all
  served; an importer removed, an exporter removed, or the VM destroyed while
  a lookup waits on the exporter: one consistent answer, the daemon goes on;
- the per-VM limit: shared_object.add beyond it -32008, a device's
  SHARED_OBJECT_ADD refused;
- vm.destroy drops the VMM's objects; the daemon's fd count is back to its
  baseline at the end (every VMM fd and forwarded fd closed).
"""

import mmap
import os
import select
import sys
import time
import types
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.client import (ALREADY_EXISTS, INVALID_PARAMS, LIMIT_REACHED,  # noqa: E402
                             RpcError)
from vhubtest.daemon import Daemon                                     # noqa: E402
from vhubtest.testbackend import AsyncCommand, TestBackend  # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run   # noqa: E402
from vhubtest.vmm import Vmm                                           # noqa: E402

TIMEOUT_MS = 500
PF_SHARED_OBJECT = 1 << 18
NEVER_MS = 3600 * 1000  # reconnect_ms: the killed exporter stays disconnected


def memfd_with(data, size=4096, name="vhubt-vmm-object"):
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    return fd


def shared_memfd_paths(pid):
    """/proc paths of the test back-end's exported memfds."""
    out = []
    base = "/proc/%d/fd" % pid
    for n in os.listdir(base):
        try:
            if os.readlink(os.path.join(base, n)).startswith("/memfd:vhub-tb-shared"):
                out.append(os.path.join(base, n))
        except OSError:
            pass
    return out


def objects(c, vm):
    return {o["uuid"]: o["owner"] for o in c.call("shared_object.list", {"vm": vm})["objects"]}


def check_lookup_fails(tb, uuid, what):
    r = tb.lookup(uuid)
    check(r["result"] != 0 and not r["fd"], "%s: nonzero reply and no fd" % what, r)
    return r


def chan(tb):
    return tb.conn()["chan"]


def setup(t):
    """vhubd with vm0 and its devices on the test back-end: A exports, B imports,
    C is a bystander, R is removed, K killed; D is for a second VM."""
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", str(TIMEOUT_MS)]))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    log("daemon fd baseline: %d" % baseline)

    def backend(name):
        return t.enter(TestBackend([daemon.backend_socket(name + ".sock")], log_dir=d))

    # A exports, B imports, C is a bystander, R is removed, K killed,
    # D belongs to a second VM.
    tbs = {n: backend(n) for n in "ABCRKD"}
    vmm = Vmm(c, "vm0")
    vmm.create()
    for n in "ABCR":
        info = vmm.add_device(n, tbs[n].socket, reconnect_ms=100)
        check(info["protocol_features"] & PF_SHARED_OBJECT, "%s: SHARED_OBJECT negotiated" % n)
    vmm.add_device("K", tbs["K"].socket, reconnect_ms=NEVER_MS)
    A, B, C, R, K, D = (tbs[n] for n in "ABCRKD")
    for tb in (A, B, C, R, K):
        tb.wait_connected()
    check_eq(objects(c, "vm0"), {}, "shared_object.list of a fresh VM")
    return types.SimpleNamespace(A=A, B=B, C=C, D=D, K=K, R=R, backend=backend, baseline=baseline,
                                 c=c, daemon=daemon, vmm=vmm)


def part_device_export(t, w):
    """A device's export, looked up by another device."""
    A, c, B = w.A, w.c, w.B
    ua = A.export(size=4096, fill="a1")
    check_eq(objects(c, "vm0"), {ua: "A"}, "shared_object.list after A's SHARED_OBJECT_ADD")
    r = B.lookup(ua, read=16, write="c0ffee", offset=8)
    check(r["result"] == 0 and r["fd"], "B's lookup of A's object: reply 0 with an fd", r)
    check_eq(r["size"], 4096, "the fd B received: size")
    check_eq(r["data"], "a1" * 16, "B reads A's fill pattern through its mapping")
    check_eq(r.get("wrote"), 3, "B wrote 3 bytes through its mapping")
    # A's writer holds a dup of the fd until its reply is fully sent; the
    # reply reaches B through vhubd, possibly before A has closed that dup
    deadline = time.monotonic() + 5
    paths = shared_memfd_paths(A.pid)
    while len(paths) != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
        paths = shared_memfd_paths(A.pid)
    check_eq(len(paths), 1, "A holds one exported memfd")
    fd = os.open(paths[0], os.O_RDWR | os.O_CLOEXEC)
    try:
        check_eq(os.pread(fd, 16, 0).hex(), "a1" * 8 + "c0ffee" + "a1" * 5,
                 "B's write is in A's memfd (same memory)")
        os.pwrite(fd, bytes.fromhex("5eed5eed"), 0)
    finally:
        os.close(fd)
    r = B.lookup(ua, read=8)
    check_eq(r["data"], "5eed5eed" + "a1" * 4,
             "a write into A's memfd is what B's next lookup reads")
    check_eq(A.shared_objects()[0]["lookups"], 2, "A answered GET_SHARED_OBJECT once per lookup")
    vars(w).update(ua=ua)


def part_vmm_export(t, w):
    """The VMM's export."""
    c, ua, B, C = w.c, w.ua, w.B, w.C
    uv = str(uuidlib.uuid4())
    vfd = memfd_with(b"\x7e" * 64 + b"VMM-OBJECT")
    vmap = mmap.mmap(vfd, 4096)
    t.defer(vmap.close)
    t.defer(os.close, vfd)
    c.call("shared_object.add", {"vm": "vm0", "uuid": uv, "fd": 0}, fds=[vfd])
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm"}, "shared_object.list owners (A, vmm)")
    r = B.lookup(uv, read=80, write="feedf00d", offset=100)
    check(r["result"] == 0 and r["fd"], "B's lookup of the VMM's object: reply 0 with an fd", r)
    check_eq(bytes.fromhex(r["data"]), b"\x7e" * 64 + b"VMM-OBJECT" + b"\0" * 6,
             "B reads the VMM's memfd content")
    check_eq(vmap[100:104], bytes.fromhex("feedf00d"), "B's write shows in the VMM's mapping")
    vmap[0:4] = b"WXYZ"
    check_eq(C.lookup(uv, read=4)["data"], b"WXYZ".hex(), "a VMM write is seen by C's lookup")
    for tb, n in ((B, "B"), (C, "C")):
        ch = chan(tb)
        check(ch["unexpected"] == 0 and ch["pending"] == 0,
              "%s: every lookup got exactly its own reply (no extra ack)" % n, ch)
    vars(w).update(uv=uv)


def part_second_vm(t, w):
    """A second VM: its own table."""
    c, D, ua, uv = w.c, w.D, w.ua, w.uv
    B = w.B
    vmm1 = Vmm(c, "vm1")
    vmm1.create()
    vmm1.add_device("D", D.socket)
    D.wait_connected()
    check_lookup_fails(D, ua, "vm1's D looks up vm0's device-exported object")
    check_lookup_fails(D, uv, "vm1's D looks up vm0's VMM-exported object")
    ud = D.export(fill="dd")
    check_eq(objects(c, "vm1"), {ud: "D"}, "vm1's list holds only D's object")
    check_lookup_fails(B, ud, "vm0's B looks up vm1's object")
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm"}, "vm0's list unchanged by vm1")
    # the same UUID in both VMs: each VM's back-ends see their own
    v1fd = memfd_with(b"VM1!")
    t.defer(os.close, v1fd)
    c.call("shared_object.add", {"vm": "vm1", "uuid": uv, "fd": 0}, fds=[v1fd])
    check_eq(D.lookup(uv, read=4)["data"], b"VM1!".hex(),
             "vm1's own object under vm0's UUID: D gets vm1's fd")
    check_eq(B.lookup(uv, read=4)["data"], b"WXYZ".hex(), "vm0's B still gets vm0's fd")
    c.call("shared_object.remove", {"vm": "vm1", "uuid": uv})
    vars(w).update(ud=ud, vmm1=vmm1)


def part_requests_change_nothing(t, w):
    """Device requests that must change nothing."""
    B, ua, uv, D = w.B, w.ua, w.uv, w.D
    c, A = w.c, w.A
    a = B.command({"cmd": "export", "uuid": ua, "fill": "bb"})
    check(a["reply"] != 0, "B's SHARED_OBJECT_ADD of A's UUID: nonzero ack", a)
    a = B.command({"cmd": "export", "uuid": uv, "fill": "bb"})
    check(a["reply"] != 0, "B's SHARED_OBJECT_ADD of the VMM's UUID: nonzero ack", a)
    a = B.remove(ua)
    check(a["reply"] != 0, "B's SHARED_OBJECT_REMOVE of A's object: nonzero ack", a)
    a = B.remove(uv)
    check(a["reply"] != 0, "B's SHARED_OBJECT_REMOVE of the VMM's object: nonzero ack", a)
    a = D.remove(ua)
    check(a["reply"] != 0, "vm1's D removing vm0's object: nonzero ack", a)
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm"}, "list unchanged by non-owners")
    check_eq(B.lookup(ua, read=4)["data"], "5eed5eed", "A's object still served")
    ua2 = A.export(fill="a2")
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm", ua2: "A"}, "A's second export listed")
    a = A.remove(ua2)
    check_eq(a["reply"], 0, "A's SHARED_OBJECT_REMOVE of its own object: ack 0")
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm"}, "A's removed object left the list")
    check_lookup_fails(B, ua2, "lookup of a removed object")
    # without NEED_REPLY: ADD and REMOVE still act, LOOKUP is answered anyway
    ua3 = A.export(fill="a3", need_reply=False)
    A.wait_until(lambda: ua3 in objects(c, "vm0"), 5, "A's export without NEED_REPLY listed")
    r = B.lookup(ua3, read=2, need_reply=False)
    check(r["result"] == 0 and r["data"] == "a3a3",
          "a lookup without NEED_REPLY gets its reply and the fd", r)
    A.remove(ua3, need_reply=False)
    A.wait_until(lambda: ua3 not in objects(c, "vm0"), 5, "A's remove without NEED_REPLY")
    log("ok: SHARED_OBJECT_ADD / REMOVE without NEED_REPLY act without an ack")
    check_lookup_fails(B, str(uuidlib.uuid4()), "lookup of an unknown UUID")


def part_exporter_refuses(t, w):
    """An exporter refusing GET_SHARED_OBJECT."""
    A, B, ua, vmm = w.A, w.B, w.ua, w.vmm
    A.misbehave("GET_SHARED_OBJECT", "refuse", count=1)
    check_lookup_fails(B, ua, "lookup while the exporter refuses GET_SHARED_OBJECT")
    check_eq(vmm.device_state("A")["state"], "ready", "a refusing exporter stays connected")
    check_eq(B.lookup(ua, read=4)["data"], "5eed5eed", "the next lookup works again")


def part_parallel_lookups(t, w):
    """Lookups in parallel, and an exporter looking up its own object."""
    B, C, A, ua = w.B, w.C, w.A, w.ua
    par = [AsyncCommand(tb, {"cmd": "lookup", "uuid": ua, "read": 4}) for tb in (B, C, A)]
    for n, p in zip("BCA", par):
        r = p.result(5)
        check(r.get("ok") and r["result"] == 0 and r["data"] == "5eed5eed",
              "parallel lookup by %s served" % n, r)


def part_importer_gone(t, w):
    """The importer goes away while its lookup waits for the exporter."""
    A, C, ua, vmm = w.A, w.C, w.ua, w.vmm
    daemon, B = w.daemon, w.B
    A.misbehave("GET_SHARED_OBJECT", "delay", delay_ms=300, count=1)
    asked = A.requests().get("GET_SHARED_OBJECT", 0)
    p = AsyncCommand(C, {"cmd": "lookup", "uuid": ua, "read": 4, "timeout_ms": 3000})
    A.wait_request("GET_SHARED_OBJECT", count=asked + 1)
    vmm.remove_device("C")
    log("C's pending lookup, C removed meanwhile: %s" % p.result(5))
    time.sleep(0.4)  # A's late answer reaches the daemon, C is gone
    check(daemon.alive, "vhubd survives an exporter answering for a removed importer")
    check_eq(B.lookup(ua, read=4)["data"], "5eed5eed", "B's lookup still served")
    check_eq(vmm.device_state("A")["state"], "ready", "A still connected")
    vmm.add_device("C", C.socket)
    C.wait_connected(connections=2)


def part_vmm_add_remove_errors(t, w):
    """The VMM's shared_object.add / remove errors."""
    c, uv, ua, B = w.c, w.uv, w.ua, w.B
    dup = memfd_with(b"dup")
    try:
        e = expect_error(RpcError, c.call, "shared_object.add",
                         {"vm": "vm0", "uuid": uv, "fd": 0}, fds=[dup],
                         what="shared_object.add of the VMM's own UUID again")
        check_eq(e.code, ALREADY_EXISTS, "duplicate UUID (VMM's)")
        e = expect_error(RpcError, c.call, "shared_object.add",
                         {"vm": "vm0", "uuid": ua, "fd": 0}, fds=[dup],
                         what="shared_object.add of A's UUID")
        check_eq(e.code, ALREADY_EXISTS, "duplicate UUID (a device's)")
        for bad in ("not-a-uuid", uv.replace("-", ""), "{%s}" % uv, uv[:-1], uv + "0",
                    uv[:8] + "_" + uv[9:], "", 42):
            e = expect_error(RpcError, c.call, "shared_object.add",
                             {"vm": "vm0", "uuid": bad, "fd": 0}, fds=[dup],
                             what="shared_object.add uuid=%r" % (bad,))
            check_eq(e.code, INVALID_PARAMS, "malformed uuid %r" % (bad,))
        fresh = str(uuidlib.uuid4())
        for params, fds, what in (({"vm": "vm0", "uuid": fresh}, [], "no fd"),
                                  ({"vm": "vm0", "uuid": fresh, "fd": 1}, [dup], "fd index beyond"),
                                  ({"vm": "vm0", "uuid": fresh, "fd": 0, "owner": "A"}, [dup],
                                   "unknown member")):
            e = expect_error(RpcError, c.call, "shared_object.add", params, fds=fds,
                             what="shared_object.add with %s" % what)
            check_eq(e.code, INVALID_PARAMS, "shared_object.add with %s" % what)
    finally:
        os.close(dup)
    e = expect_error(RpcError, c.call, "shared_object.remove",
                     {"vm": "vm0", "uuid": str(uuidlib.uuid4())},
                     what="shared_object.remove of an unknown UUID")
    log("remove of an unknown UUID: error %d" % e.code)
    e = expect_error(RpcError, c.call, "shared_object.remove", {"vm": "vm0", "uuid": ua},
                     what="shared_object.remove of A's object by the VMM")
    log("remove of a device's object by the VMM: error %d" % e.code)
    e = expect_error(RpcError, c.call, "shared_object.remove", {"vm": "vm0", "uuid": "xyz"},
                     what="shared_object.remove of a malformed UUID")
    check_eq(e.code, INVALID_PARAMS, "shared_object.remove of a malformed UUID")
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm"}, "list unchanged by the failed calls")
    check_eq(B.lookup(ua, read=4)["data"], "5eed5eed", "A's object still served after them")


def part_exporter_removed(t, w):
    """Exporter removed with device.remove (once with a lookup in flight)."""
    R, B, vmm, c = w.R, w.B, w.vmm, w.c
    ur = R.export(fill="55")
    check_eq(B.lookup(ur, read=2)["data"], "5555", "R's object served")
    R.misbehave("GET_SHARED_OBJECT", "delay", delay_ms=200, count=1)
    p = AsyncCommand(B, {"cmd": "lookup", "uuid": ur, "read": 2, "timeout_ms": 3000})
    R.wait_request("GET_SHARED_OBJECT", count=2)
    vmm.remove_device("R")
    r = p.result(5)
    log("a lookup in flight while its exporter was removed: %s" % r)
    check(r.get("ok") and (r["result"] != 0) == (not r["fd"]),
          "the importer got exactly one consistent answer (reply and fd agree)", r)
    check(ur not in objects(c, "vm0"), "device.remove drops R's objects from the list")
    check_lookup_fails(B, ur, "lookup of a removed device's object")


def part_exporter_killed(t, w):
    """Exporter killed."""
    K, B, c, ua = w.K, w.B, w.c, w.ua
    uv, vmm = w.uv, w.vmm
    uk = K.export(fill="4b")
    check_eq(B.lookup(uk, read=2)["data"], "4b4b", "K's object served")
    K.misbehave("GET_SHARED_OBJECT", "silence", count=1)
    p = AsyncCommand(B, {"cmd": "lookup", "uuid": uk, "timeout_ms": 5000})
    K.wait_request("GET_SHARED_OBJECT", count=2)
    K.kill()
    r = p.result(5)
    log("lookup pending while its exporter was killed: %.3fs %s" % (p.elapsed, r))
    check(r.get("ok") and r["result"] != 0 and not r["fd"],
          "a lookup pending when its exporter is killed fails", r)
    ev = c.wait_event(lambda e: e["event"] == "device.disconnected" and e.get("device") == "K",
                      10)
    log("K lost: %s" % ev.get("reason"))
    check(uk not in objects(c, "vm0"), "a killed exporter's objects leave the list")
    check_eq(objects(c, "vm0"), {ua: "A", uv: "vmm"}, "only K's objects went")
    check_lookup_fails(B, uk, "lookup of a killed exporter's object")
    check_eq(vmm.device_state("K")["state"], "disconnected", "K stays disconnected")


def part_exporter_hung(t, w):
    """Exporter hung: the lookup fails at the deadline, the rest runs."""
    A, B, ua, vmm = w.A, w.B, w.ua, w.vmm
    c, uv = w.c, w.uv
    A.sigstop()
    t.defer(lambda: A.alive and A.sigcont())
    stall = AsyncCommand(B, {"cmd": "lookup", "socket": 0, "uuid": ua, "timeout_ms": 8000})
    lat = {"C": [], "B": []}
    while True:
        for n in ("C", "B"):
            t0 = time.monotonic()
            vmm.config_get(n, 0, 8)
            lat[n].append(time.monotonic() - t0)
        if select.select([stall.sock], [], [], 0.02)[0]:
            break
        if time.monotonic() - stall.started > 8:
            break
    r = stall.result(5)
    log("hung exporter: lookup answered after %.3fs: %s" % (stall.elapsed, r))
    check(r.get("ok") and r["result"] != 0 and not r["fd"],
          "lookup of a hung exporter's object: nonzero reply, no fd", r)
    check(TIMEOUT_MS / 1000.0 * 0.8 <= stall.elapsed <= TIMEOUT_MS / 1000.0 * 4,
          "the lookup failed at the deadline (%.3fs, --backend-timeout-ms %d)"
          % (stall.elapsed, TIMEOUT_MS))
    for n in ("C", "B"):
        log("device.config.get on %s during the stall: %d calls, max %.1f ms"
            % (n, len(lat[n]), 1000 * max(lat[n])))
        # blocked behind the stall, a call would take the whole deadline
        check(len(lat[n]) >= 5 and sorted(lat[n])[len(lat[n]) // 2] < 0.05
              and max(lat[n]) < 0.6 * TIMEOUT_MS / 1000.0,
              "device.config.get on %s answered quickly throughout the stall" % n)
    ch = chan(B)
    check(ch["unexpected"] == 0 and ch["pending"] == 0,
          "B got exactly one reply for the failed lookup", ch)
    # A missed its GET_SHARED_OBJECT deadline: lost, and its objects with it
    c.wait_event(lambda e: e["event"] == "device.disconnected" and e.get("device") == "A", 5)
    check_eq(objects(c, "vm0"), {uv: "vmm"}, "a lost (hung) exporter's objects leave the list")
    A.sigcont()
    c.wait_event(lambda e: e["event"] == "device.reconnected" and e.get("device") == "A", 10)
    check_lookup_fails(B, ua, "lookup after the exporter came back (it has not exported again)")
    check_eq(vmm.config_get("B", 0, 8), vmm.config_get("B", 0, 8), "B still served")


def part_vm_limit(t, w):
    """The per-VM limit (1024 by default) counts every exporter."""
    c, B = w.c, w.B
    have = len(objects(c, "vm0"))
    lim_fd = memfd_with(b"limit")
    try:
        added = 0
        while True:
            try:
                c.call("shared_object.add", {"vm": "vm0", "uuid": str(uuidlib.uuid4()), "fd": 0},
                       fds=[lim_fd])
            except RpcError as e:
                check_eq(e.code, LIMIT_REACHED, "shared_object.add beyond the limit")
                break
            added += 1
            check(added <= 100000, "the number of shared objects is bounded")
    finally:
        os.close(lim_fd)
    log("the limit was reached at %d objects" % (have + added))
    a = B.command({"cmd": "export", "fill": "bb"})
    check(a["reply"] != 0, "a device's SHARED_OBJECT_ADD at the limit: nonzero ack", a)
    check_eq(len(objects(c, "vm0")), have + added, "nothing added at the limit")


def part_destroy_during_lookup(t, w):
    """Vm.destroy while a lookup waits for its exporter."""
    backend, vmm1, ud, D = w.backend, w.vmm1, w.ud, w.D
    daemon, vmm = w.daemon, w.vmm
    E = backend("E")
    vmm1.add_device("E", E.socket)
    E.wait_connected()
    check_eq(E.lookup(ud, read=2)["data"], "dddd", "vm1's E looks up D's object")
    D.misbehave("GET_SHARED_OBJECT", "delay", delay_ms=300, count=1)
    p = AsyncCommand(E, {"cmd": "lookup", "uuid": ud, "timeout_ms": 3000})
    D.wait_request("GET_SHARED_OBJECT", count=2)
    vmm1.destroy()
    log("E's lookup while vm1 was destroyed: %s" % p.result(5))
    time.sleep(0.4)  # D's delayed answer falls on a closed connection
    check(daemon.alive and vmm.config_get("B", 0, 8) is not None,
          "vhubd survives vm.destroy with a lookup in flight")


def part_destroy_drops_vmm_objects(t, w):
    """Vm.destroy drops the VMM's objects."""
    vmm, c, daemon, baseline = w.vmm, w.c, w.daemon, w.baseline
    vmm.destroy()
    vmm.create()
    check_eq(objects(c, "vm0"), {}, "a re-created vm0 has no objects")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


def main(t):
    w = setup(t)
    part_device_export(t, w)
    part_vmm_export(t, w)
    part_second_vm(t, w)
    part_requests_change_nothing(t, w)
    part_exporter_refuses(t, w)
    part_parallel_lookups(t, w)
    part_importer_gone(t, w)
    part_vmm_add_remove_errors(t, w)
    part_exporter_removed(t, w)
    part_exporter_killed(t, w)
    part_exporter_hung(t, w)
    part_vm_limit(t, w)
    part_destroy_during_lookup(t, w)
    part_destroy_drops_vmm_objects(t, w)


if __name__ == "__main__":
    run(main)

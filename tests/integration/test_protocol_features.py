#!/usr/bin/env python3
"""The protocol of late 2026 through vhubd: request 45, bits 20-23, in-band
kicks, SET_VRING_ENDIAN (issue 12, docs/protocol-coverage.md).

    test_protocol_features.py skip-drain      device.stop drain:false, then device.start
    test_protocol_features.py base-inflight   GET_VRING_BASE_INFLIGHT without SKIP_DRAIN
    test_protocol_features.py negotiation     20 needs 12, 23 needs 20+12, 21 never, its log line
    test_protocol_features.py shmem           device.add's shmem from GET_SHMEM_CONFIG
    test_protocol_features.py inband          rings without a kick fd, device.kick
    test_protocol_features.py endian          SET_VRING_ENDIAN for a legacy driver
    test_protocol_features.py qsd             -32005 where qemu-storage-daemon lacks them

No Debian back-end has any of these yet, so the peer is the project's test
back-end (tests/backend), which implements each as the spec says: on
GET_VRING_BASE_SKIP_DRAIN it suspends every request in flight at once and
leaves it marked in the inflight region (spec "Inflight I/O tracking"); with
GET_VRING_BASE_INFLIGHT a plain GET_VRING_BASE completes what is done and
suspends the rest; on the next start it resubmits what the region holds, in
counter order.  qemu-storage-daemon (which offers none of them) gives the
-32005 cases.

The I/O is virtio-blk in memfd guest memory (BlkRing / Workload of
test_reconnect_qsd.py): writes of known patterns to distinct 1 KiB extents
and reads of extents already written, each checked as it completes, every
request made available exactly once and expected to complete exactly once.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_reconnect_qsd import BlkRing, Workload, u16                # noqa: E402
from vhubtest import scenarios                                       # noqa: E402
from vhubtest.backends import QsdBackend                             # noqa: E402
from vhubtest.client import (BACKEND_ERROR, INVALID_PARAMS, NOT_SUPPORTED,  # noqa: E402
                             WRONG_STATE, RpcError, u64, u64_json)
from vhubtest.daemon import Daemon                                   # noqa: E402
from vhubtest.events import poll_event, wait_event                   # noqa: E402
from vhubtest.memory import GuestMemory                              # noqa: E402
from vhubtest.testbackend import TestBackend                         # noqa: E402
from vhubtest.testing import check, check_eq, expect_error, log, run, run_seed  # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                         # noqa: E402

PF = {"MQ": 0, "REPLY_ACK": 3, "BACKEND_REQ": 5, "CROSS_ENDIAN": 6, "INFLIGHT_SHMFD": 12,
      "INBAND_NOTIFICATIONS": 14, "GET_VRING_BASE_INFLIGHT": 20, "GPA_ADDRESSES": 21,
      "SHMEM": 22, "GET_VRING_BASE_SKIP_DRAIN": 23}
TB_DEFAULT_PF = 0xdbe2b          # tests/backend/README.md
VERSION_1 = 1 << 32
DEVICE_LIST_KEYS = {"device", "state", "socket", "features", "acked_features",
                    "protocol_features", "queues", "reconnects"}
DEVICE_LIST_EXTENSIONS = {"type"}   # docs/control-api.md: present where device.add had one
DISK = 64 << 20


def bit(name):
    return 1 << PF[name]


def has(pf, name):
    return bool(pf & bit(name))


def expect_rpc(code, fn, *args, what=None, **kw):
    e = expect_error(RpcError, fn, *args, what=what, **kw)
    check_eq(e.code, code, "%s: error code" % what)
    return e


class Setup:
    """A daemon, one VM with 16 MiB of memfd memory, a test back-end with a
    64 MiB disk file on `sock`, and blk0 added on it."""

    def __init__(self, t, tb_args=(), device="blk0", add=True):
        self.t = t
        self.d = t.tmpdir()
        self.img = scenarios.sparse_image(os.path.join(self.d, "disk.img"), DISK)
        self.daemon = t.enter(Daemon(self.d))
        t.add_log("vhubd", self.daemon.log_path)
        self.c = self.daemon.client()
        self.baseline = self.daemon.settled_fd_count(self.c)
        self.sock = self.daemon.backend_socket("tb0.sock")
        self.tb = TestBackend([self.sock], args=["--disk", self.img, "--disk-size", str(DISK)]
                              + list(tb_args), log_dir=self.d)
        t.add_log("test back-end", self.tb.log_path)
        t.enter(self.tb)
        self.mem = t.enter(GuestMemory(16 << 20))
        self.vmm = Vmm(self.c, "vm0")
        self.vmm.create()
        self.vmm.add_memory(self.mem)
        self.dev = self.vmm.add_device(device, self.sock, type="blk") if add else None

    def finish(self, rings=()):
        for r in rings:
            r.close()
        self.vmm.destroy()
        self.daemon.check_fd_baseline(self.baseline)


def start_rings(vmm, device, features, rings, no_kick=()):
    """device.start of BlkRings at their .base; rings whose index is in
    no_kick go without a kick fd (in-band kicks)."""
    fds, vrings = [], []
    for r in rings:
        v = {"index": r.index, "size": r.size, "desc": u64_json(r.desc),
             "avail": u64_json(r.avail), "used": u64_json(r.used), "base": r.base}
        if r.index not in no_kick:
            fds.append(r.kick_fd)
            v["kick"] = len(fds) - 1
        fds.append(r.call_fd)
        v["call"] = len(fds) - 1
        vrings.append(v)
    return vmm.c.call("device.start", {"vm": vmm.vm, "device": device,
                                       "features": u64_json(features), "vrings": vrings}, fds=fds)


def stop(vmm, device, drain=None):
    params = {"vm": vmm.vm, "device": device}
    if drain is not None:
        params["drain"] = drain
    return vmm.c.call("device.stop", params)["vrings"]


def wait_fetched(tb, rings):
    """Until the back-end has fetched everything the driver made available."""
    want = {r.index: r.avail_idx for r in rings}
    tb.wait_until(lambda: all(v["last_avail"] == want[v["index"]]
                              for v in tb.vrings(0) if v["index"] in want),
                  10.0, "the back-end fetching every request made available")


def check_quiet(wl, seconds, what):
    """Nothing completes for `seconds` (longer than any hold of the back-end)."""
    used = [r.used_idx for r in wl.rings]
    time.sleep(seconds)
    check_eq([r.used_idx for r in wl.rings], used, what)


# ---- skip-drain ----

def skip_drain(t):
    """device.stop drain:false with requests in flight, then device.start:
    every suspended request completes exactly once, with its data."""
    seed = run_seed()
    log("seed %d (VHUB_TEST_SEED)" % seed)
    pf = TB_DEFAULT_PF | bit("GET_VRING_BASE_INFLIGHT") | bit("GET_VRING_BASE_SKIP_DRAIN")
    s = Setup(t, ["--queues", "2", "--complete", "random", "--delay-ms", "150",
                  "--seed", str(seed & 0x7fffffff), "--protocol-features", "%x" % pf])
    neg = s.dev["protocol_features"]
    for name in ("INFLIGHT_SHMFD", "GET_VRING_BASE_INFLIGHT", "GET_VRING_BASE_SKIP_DRAIN"):
        check(has(neg, name), "%s negotiated" % name)
    rings = [BlkRing(s.mem, i) for i in range(2)]
    s.vmm.start_device("blk0", scenarios.BLK_FEATURES, rings)
    wl = Workload(rings, DISK, 24, seed)
    wl.run_for(0.4)
    check(wl.completed > 0, "I/O flows before the first stop (%d requests)" % wl.completed)

    suspended_total = 0
    resubmitted_before = 0
    for cycle in range(1, 7):
        wl.fill()
        wl.paused = True
        fetched_all = cycle % 2 == 1      # odd cycles: everything fetched; even: stop at once
        if fetched_all:
            wait_fetched(s.tb, rings)
        wl.reap()
        used = {r.index: r.used_idx for r in rings}
        avail = {r.index: r.avail_idx for r in rings}
        t0 = time.monotonic()
        res = stop(s.vmm, "blk0", drain=False)
        dt = time.monotonic() - t0
        log("cycle %d: stopped without draining in %.0f ms: %s (driver: avail %s used %s)"
            % (cycle, dt * 1000, res, avail, used))
        check_eq(sorted(v["index"] for v in res), [0, 1], "cycle %d: both rings stopped" % cycle)
        wl.reap()                         # what completed before the stop took effect
        for v in res:
            i = v["index"]
            used_now = rings[i].used_idx
            check(u16(v["base"] - used[i]) <= u16(avail[i] - used[i]),
                  "cycle %d ring %d: base %d within [used %d, avail %d]"
                  % (cycle, i, v["base"], used[i], avail[i]))
            check_eq(v["inflight"], u16(v["base"] - used_now),
                     "cycle %d ring %d: inflight = base - used index (every fetched request not "
                     "used is suspended)" % (cycle, i))
            if fetched_all:
                check_eq(v["base"], avail[i], "cycle %d ring %d: base = avail index (all "
                         "fetched)" % (cycle, i))
                check_eq(v["inflight"], rings[i].outstanding,
                         "cycle %d ring %d: suspended = what the driver has outstanding"
                         % (cycle, i))
            suspended_total += v["inflight"]
        check(sum(v["inflight"] for v in res) > 0 or not fetched_all,
              "cycle %d: requests were in flight at the stop" % cycle)
        # a stopped device completes nothing: the back-end's holds are <= 225 ms
        check_quiet(wl, 0.4, "cycle %d: no used index moves while stopped" % cycle)
        check_eq(s.vmm.device_state("blk0")["state"], "stopped", "cycle %d: state" % cycle)
        tbv = s.tb.vrings(0)
        check_eq([v["in_flight"] for v in tbv], [0, 0], "cycle %d: the back-end holds nothing"
                 % cycle)
        for r in rings:
            r.base = res[r.index]["base"]
        start_rings(s.vmm, "blk0", scenarios.BLK_FEATURES, rings)
        wl.paused = False
        wl.run_for(0.15)
        resub = sum(v["resubmitted"] for v in s.tb.vrings(0))
        log("cycle %d: the back-end resubmitted %d requests from the kept inflight region"
            % (cycle, resub - resubmitted_before))
        resubmitted_before = resub
    wl.drain(15.0)
    reqs = s.tb.requests(0)
    check_eq(reqs.get("GET_VRING_BASE_SKIP_DRAIN"), 12, "12 GET_VRING_BASE_SKIP_DRAIN (6 stops x 2)")
    check_eq(reqs.get("GET_VRING_BASE", 0), 0, "no plain GET_VRING_BASE")
    check_eq(reqs.get("GET_INFLIGHT_FD"), 1, "one inflight region for the device's lifetime")
    check_eq(reqs.get("SET_INFLIGHT_FD"), 7, "the kept region handed back at every start")
    tbv = s.tb.vrings(0)
    check(suspended_total > 0, "requests were suspended (%d)" % suspended_total)
    check_eq(sum(v["suspended"] for v in tbv), suspended_total,
             "the back-end suspended as many as device.stop reported")
    check_eq(sum(v["resubmitted"] for v in tbv), suspended_total,
             "the back-end resubmitted exactly the suspended requests")

    # suspended, then the back-end dies while the device is stopped: the
    # daemon keeps the region, and the next back-end completes them
    wl.fill()
    wl.paused = True
    wait_fetched(s.tb, rings)
    res = stop(s.vmm, "blk0", drain=False)
    held = sum(v["inflight"] for v in res)
    check(held > 0, "requests suspended before the kill (%d)" % held)
    s.tb.kill()
    wait_event(s.c, "device.disconnected", "blk0")
    s.tb.start()
    ev = wait_event(s.c, "device.reconnected", "blk0", timeout=15)
    check_eq(ev["vrings"], [], "restored as stopped (no rings)")
    check_eq(s.vmm.device_state("blk0")["state"], "stopped", "stopped after the restore")
    check_quiet(wl, 0.3, "the new back-end starts nothing by itself")
    for r in rings:
        r.base = res[r.index]["base"]
    start_rings(s.vmm, "blk0", scenarios.BLK_FEATURES, rings)
    wl.paused = False
    wl.drain(15.0)
    check_eq(s.tb.requests(0).get("GET_INFLIGHT_FD", 0), 0, "the new back-end was handed the "
             "kept region, not asked for one")
    check_eq(sum(v["resubmitted"] for v in s.tb.vrings(0)), held,
             "the new back-end resubmitted the %d requests suspended before the kill" % held)
    check_eq(wl.strays(), 0, "no used entry for a head that was not in flight")
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion had status OK and reads the extent's one write")
    n = wl.verify_readback()
    log("ok: %d written extents read back through the rings" % n)
    stop(s.vmm, "blk0")
    wl.verify_image(s.img, DISK)
    s.finish(rings)


# ---- base-inflight ----

def base_inflight(t):
    """GET_VRING_BASE_INFLIGHT without SKIP_DRAIN: drain:false is refused,
    a plain stop may leave requests suspended (reported per ring) and the
    next start completes them exactly once."""
    pf = TB_DEFAULT_PF | bit("GET_VRING_BASE_INFLIGHT")
    s = Setup(t, ["--queues", "2", "--delay-ms", "1500", "--protocol-features", "%x" % pf])
    neg = s.dev["protocol_features"]
    check(has(neg, "GET_VRING_BASE_INFLIGHT"), "GET_VRING_BASE_INFLIGHT negotiated")
    check(not has(neg, "GET_VRING_BASE_SKIP_DRAIN"), "SKIP_DRAIN not negotiated (not offered)")
    rings = [BlkRing(s.mem, i) for i in range(2)]
    s.vmm.start_device("blk0", scenarios.BLK_FEATURES, rings)
    wl = Workload(rings, DISK, 16, 1)
    wl.fill()
    wait_fetched(s.tb, rings)
    wl.paused = True
    expect_rpc(NOT_SUPPORTED, stop, s.vmm, "blk0", drain=False,
               what="device.stop drain:false without GET_VRING_BASE_SKIP_DRAIN")
    check_eq(s.vmm.device_state("blk0")["state"], "running", "still running after the refusal")
    expect_rpc(INVALID_PARAMS, stop, s.vmm, "blk0", drain="no", what="device.stop drain:\"no\"")

    res = stop(s.vmm, "blk0")
    log("plain stop with 1.5 s holds: %s" % res)
    wl.reap()                             # a hold that ran out by the stop completed
    for v in res:
        r = rings[v["index"]]
        check_eq(v["base"], r.avail_idx, "ring %d: base = avail index" % r.index)
        check_eq(v["inflight"], r.outstanding, "ring %d: every request not completed was "
                 "suspended (%d)" % (r.index, r.outstanding))
    suspended = sum(v["inflight"] for v in res)
    check(suspended > 0, "GET_VRING_BASE suspended requests (%d of 32)" % suspended)
    reqs = s.tb.requests(0)
    check_eq(reqs.get("GET_VRING_BASE"), 2, "plain GET_VRING_BASE x2")
    check_eq(reqs.get("GET_VRING_BASE_SKIP_DRAIN", 0), 0, "no GET_VRING_BASE_SKIP_DRAIN")
    check_quiet(wl, 0.5, "nothing completes while stopped")
    for r in rings:
        r.base = res[r.index]["base"]
    start_rings(s.vmm, "blk0", scenarios.BLK_FEATURES, rings)
    wl.paused = False
    wl.drain(10.0)
    check_eq(sum(v["resubmitted"] for v in s.tb.vrings(0)), suspended,
             "the suspended requests were resubmitted after the start")
    check_eq(wl.strays(), 0, "no stray completion")
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion OK with the right data")

    # nothing held: the same stop drains, and says so
    s.tb.set_complete(delay_ms=0)
    wl.run_for(0.2)
    wl.drain(10.0)
    res = stop(s.vmm, "blk0")
    check_eq([v["inflight"] for v in res], [0, 0], "a stop with nothing held leaves nothing "
             "suspended")
    check_eq([v["base"] for v in res], [r.used_idx for r in rings], "base = used index")
    wl.verify_image(s.img, DISK)
    s.finish(rings)


# ---- negotiation ----

def negotiation(t):
    """Bits 20-23 are acked only where the spec allows them; bit 21 never,
    with one log line per device offering it without 22."""
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    t.add_log("vhubd", daemon.log_path)
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    info_pf = u64(c.call("daemon.info")["protocol_features"])
    for name in ("CROSS_ENDIAN", "GET_VRING_BASE_INFLIGHT", "SHMEM", "GET_VRING_BASE_SKIP_DRAIN",
                 "INBAND_NOTIFICATIONS", "INFLIGHT_SHMFD"):
        check(has(info_pf, name), "daemon.info protocol_features has %s" % name)
    check(not has(info_pf, "GPA_ADDRESSES"), "daemon.info protocol_features lacks bit 21")
    mem, vmm = vm_with_memory(t, c, 4 << 20)

    no12 = TB_DEFAULT_PF & ~bit("INFLIGHT_SHMFD")
    cases = [
        # device, offered, must be acked, must not be acked
        ("all", TB_DEFAULT_PF | bit("GET_VRING_BASE_INFLIGHT") | bit("GET_VRING_BASE_SKIP_DRAIN")
         | bit("SHMEM") | bit("GPA_ADDRESSES") | bit("CROSS_ENDIAN"),
         ["GET_VRING_BASE_INFLIGHT", "GET_VRING_BASE_SKIP_DRAIN", "SHMEM", "CROSS_ENDIAN"],
         ["GPA_ADDRESSES"]),
        ("no12", no12 | bit("GET_VRING_BASE_INFLIGHT") | bit("GET_VRING_BASE_SKIP_DRAIN"),
         [], ["INFLIGHT_SHMFD", "GET_VRING_BASE_INFLIGHT", "GET_VRING_BASE_SKIP_DRAIN"]),
        ("no20", TB_DEFAULT_PF | bit("GET_VRING_BASE_SKIP_DRAIN"),
         ["INFLIGHT_SHMFD"], ["GET_VRING_BASE_INFLIGHT", "GET_VRING_BASE_SKIP_DRAIN"]),
        ("rustvmm", TB_DEFAULT_PF | bit("GPA_ADDRESSES"), [], ["GPA_ADDRESSES", "SHMEM"]),
    ]
    tbs = {}
    for name, offer, want, unwanted in cases:
        sock = daemon.backend_socket("%s.sock" % name)
        tb = t.enter_logged("test back-end %s" % name,
                            TestBackend([sock], args=["--protocol-features", "%x" % offer], log_dir=d))
        tbs[name] = tb
        dev = vmm.add_device(name, sock, type="blk")
        neg = dev["protocol_features"]
        check_eq(neg, neg & offer, "%s: negotiated only offered bits" % name)
        for w in want:
            check(has(neg, w), "%s: %s acked" % (name, w))
        for u in unwanted:
            check(not has(neg, u), "%s: %s not acked" % (name, u))
        conn = tb.conn(0)
        check_eq(u64(conn["protocol_features"]), neg, "%s: the back-end got the same set" % name)
        check_eq(tb.socket_status(0)["last_error"], None, "%s: the back-end saw nothing wrong"
                 % name)

    def mixup_lines():
        with open(daemon.log_path, errors="replace") as f:
            return [ln for ln in f if "rust-vmm" in ln]
    lines = mixup_lines()
    check_eq(len(lines), 1, "one rust-vmm mix-up log line")
    check("device=rustvmm" in lines[0] and "21" in lines[0] and "SHMEM" in lines[0],
          "it names the device, bit 21 and SHMEM", lines[0].strip())
    # a restore is not a new device: no second line
    tbs["rustvmm"].restart()
    wait_event(c, "device.reconnected", "rustvmm", timeout=15)
    check_eq(len(mixup_lines()), 1, "still one line after the device was restored")
    for name, _, _, _ in cases:
        vmm.remove_device(name)
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


# ---- shmem ----

def shmem(t):
    """device.add reports GET_SHMEM_CONFIG's sizes where SHMEM is negotiated;
    nothing changes elsewhere; a bad config fails the add; a restored
    back-end must report the same sizes."""
    pf = TB_DEFAULT_PF | bit("SHMEM")
    sizes = [1 << 20, 0, 64 << 10, 2 << 30]
    s = Setup(t, ["--protocol-features", "%x" % pf, "--shmem", "1M,0,64K,2G"])
    check(has(s.dev["protocol_features"], "SHMEM"), "SHMEM negotiated")
    check_eq([u64(x) for x in s.dev["shmem"]], sizes, "device.add shmem = GET_SHMEM_CONFIG sizes "
             "by shmid")
    check_eq(s.tb.requests(0).get("GET_SHMEM_CONFIG"), 1, "one GET_SHMEM_CONFIG")
    check_eq(set(s.vmm.device_state("blk0")) - DEVICE_LIST_EXTENSIONS, DEVICE_LIST_KEYS,
             "device.list entry unchanged (no shmem in it)")

    def add_tb(name, args, offer=pf):
        sock = s.daemon.backend_socket("%s.sock" % name)
        tb = TestBackend([sock], args=["--protocol-features", "%x" % offer] + args, log_dir=s.d)
        s.t.add_log("test back-end %s" % name, tb.log_path)
        s.t.enter(tb)
        return tb, sock

    _, sock = add_tb("none", [])
    dev = s.vmm.add_device("none", sock, type="blk")
    check_eq(dev.get("shmem"), [], "SHMEM without regions: shmem []")
    _, sock = add_tb("plain", [], offer=TB_DEFAULT_PF)
    dev = s.vmm.add_device("plain", sock, type="blk")
    check("shmem" not in dev, "no SHMEM: no shmem member (%s)" % sorted(dev))
    check_eq(set(dev), {"features", "protocol_features", "queues", "max_mem_slots"},
             "device.add result otherwise unchanged")
    for name, arg, why in (("unaligned", "4097", "not a multiple of the page size"),
                           ("half", "1M,2K", "not a multiple of the page size")):
        tb, sock = add_tb(name, ["--shmem", arg])
        e = expect_rpc(BACKEND_ERROR, s.vmm.add_device, name, sock,
                       what="device.add with shmem sizes %s" % arg)
        check(why in str(e), "the error says why: %s" % e)
        check(name not in [x["device"] for x in s.vmm.device_list()], "%s is not added" % name)
    check_eq(s.c.call("daemon.info")["devices"], 3, "the daemon serves on (3 devices)")

    # a restored back-end with other sizes: the VMM's layout would be wrong
    s.tb.kill()
    wait_event(s.c, "device.disconnected", "blk0")
    s.tb.start(args=["--disk", s.img, "--disk-size", str(DISK), "--protocol-features", "%x" % pf,
                     "--shmem", "1M,0,128K,2G"])
    ev = wait_event(s.c, "device.failed", "blk0", timeout=15)
    log("restore with other sizes: %s" % ev["reason"])
    check("shared memory regions" in ev["reason"], "device.failed names the shared memory "
          "regions")
    check_eq(s.vmm.device_state("blk0")["state"], "failed", "blk0 failed")
    s.finish()


# ---- inband ----

def inband(t):
    """A ring started without a kick fd is kicked in-band: device.kick ->
    VRING_KICK drives its I/O; the back-end does not poll it."""
    pf = TB_DEFAULT_PF | bit("INBAND_NOTIFICATIONS")
    s = Setup(t, ["--queues", "2", "--protocol-features", "%x" % pf])
    check(has(s.dev["protocol_features"], "INBAND_NOTIFICATIONS"), "INBAND_NOTIFICATIONS negotiated")
    rings = [BlkRing(s.mem, i) for i in range(2)]
    start_rings(s.vmm, "blk0", scenarios.BLK_FEATURES, rings, no_kick=(0,))
    tbv = s.tb.vrings(0)
    check(not tbv[0]["kick_fd"] and tbv[1]["kick_fd"], "ring 0 has no kick fd, ring 1 has one")
    check(not tbv[0]["polling"], "the back-end waits for in-band kicks on ring 0 (no polling)")
    check_eq(s.tb.requests(0).get("VRING_KICK"), 1, "device.start kicked ring 0 in-band once")
    wl = Workload(rings[:1], DISK, 8, 2)

    def kick():
        return s.c.call("device.kick", {"vm": "vm0", "device": "blk0", "index": 0})
    for rnd in range(5):
        wl.paused = False
        for r in wl.rings:                       # queue without the eventfd kick
            while r.outstanding < wl.depth:
                req = wl._new()
                r.submit(req)
                wl.all_reqs.append(req)
        wl.paused = True
        check_quiet(wl, 0.2, "round %d: nothing happens without a kick" % rnd)
        check_eq(kick(), {}, "round %d: device.kick" % rnd)
        wl.drain(5.0, "round %d: the kicked requests to complete" % rnd)
    check_eq(s.tb.requests(0).get("VRING_KICK"), 6, "one VRING_KICK per device.kick (+1 at start)")
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion OK with the right data")
    check_eq(s.tb.vrings(0)[0]["calls"] > 0, True, "completions were signalled on the call fd")
    # ring 1 has its fd: device.kick is still a VRING_KICK (spec allows it)
    check_eq(s.c.call("device.kick", {"vm": "vm0", "device": "blk0", "index": 1}), {},
             "device.kick on a ring with a kick fd")
    expect_rpc(INVALID_PARAMS, s.c.call, "device.kick", {"vm": "vm0", "device": "blk0", "index": 5},
               what="device.kick of a ring that was not started")
    expect_rpc(INVALID_PARAMS, s.c.call, "device.kick", {"vm": "vm0", "device": "blk0"},
               what="device.kick without index")
    stop(s.vmm, "blk0")
    expect_rpc(WRONG_STATE, s.c.call, "device.kick", {"vm": "vm0", "device": "blk0", "index": 0},
               what="device.kick of a stopped device")
    check_eq(s.tb.requests(0).get("VRING_KICK"), 7, "no VRING_KICK reached the stopped back-end")
    s.finish(rings)


# ---- endian ----

def endian(t):
    """A legacy driver (no VERSION_1) with CROSS_ENDIAN: SET_VRING_ENDIAN
    little-endian once per ring before it starts; none for a 1.x driver."""
    pf = TB_DEFAULT_PF | bit("CROSS_ENDIAN")
    s = Setup(t, ["--queues", "2", "--protocol-features", "%x" % pf])
    check(has(s.dev["protocol_features"], "CROSS_ENDIAN"), "CROSS_ENDIAN negotiated")
    legacy = scenarios.BLK_FEATURES & ~VERSION_1
    rings = [BlkRing(s.mem, i) for i in range(2)]
    start_rings(s.vmm, "blk0", legacy, rings)
    check_eq(s.tb.requests(0).get("SET_VRING_ENDIAN"), 2, "SET_VRING_ENDIAN once per ring")
    check_eq([v["endian"] for v in s.tb.vrings(0)], ["little", "little"],
             "rings set little-endian (the host's order)")
    wl = Workload(rings, DISK, 8, 3)
    wl.run_for(0.2)
    wl.drain(5.0)
    check(wl.completed > 0, "legacy I/O flows (%d)" % wl.completed)
    check_eq(wl.bad, [], "with the right data")
    # restore: the new back-end is told again before its rings start
    s.tb.restart()
    ev = wl.run_until(lambda: poll_event(s.c, "device.reconnected", "blk0"), 15.0, "reconnected")
    check_eq(ev["exact"], True, "restored exactly")
    check_eq(s.tb.requests(0).get("SET_VRING_ENDIAN"), 2, "the restored back-end got it per ring")
    wl.run_for(0.2)
    wl.drain(5.0)
    res = stop(s.vmm, "blk0")
    for r in rings:
        r.base = res[r.index]["base"]
    start_rings(s.vmm, "blk0", scenarios.BLK_FEATURES, rings)
    check_eq(s.tb.requests(0).get("SET_VRING_ENDIAN"), 2, "none for a VERSION_1 driver")
    wl.run_for(0.2)
    wl.drain(5.0)
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion OK with the right data")
    stop(s.vmm, "blk0")
    wl.verify_image(s.img, DISK)
    s.finish(rings)


# ---- qsd ----

def qsd(t):
    """qemu-storage-daemon 7.2 offers none of bits 20-23 nor INBAND: each
    request for them is -32005 and the device keeps working."""
    d = t.tmpdir()
    img = scenarios.sparse_image(os.path.join(d, "disk.img"), DISK)
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    q = t.enter(QsdBackend(img, daemon.backend_socket("qsd.sock"), num_queues=2, log_dir=d))
    t.add_log("qemu-storage-daemon", q.log_path)
    mem, vmm = vm_with_memory(t, c, 16 << 20)
    dev = vmm.add_device("blk0", q.socket, type="blk")
    for name in ("GET_VRING_BASE_INFLIGHT", "GPA_ADDRESSES", "SHMEM", "GET_VRING_BASE_SKIP_DRAIN",
                 "INBAND_NOTIFICATIONS", "INFLIGHT_SHMFD"):
        check(not has(dev["protocol_features"], name), "qsd: %s not negotiated" % name)
    check("shmem" not in dev, "qsd: no shmem in device.add")
    rings = [BlkRing(mem, i) for i in range(2)]
    e = expect_rpc(NOT_SUPPORTED, start_rings, vmm, "blk0", scenarios.BLK_FEATURES, rings,
                   no_kick=(1,), what="device.start with a ring without a kick fd")
    check("INBAND_NOTIFICATIONS" in str(e), "it names INBAND_NOTIFICATIONS: %s" % e)
    check_eq(vmm.device_state("blk0")["state"], "ready", "still ready")
    vmm.start_device("blk0", scenarios.BLK_FEATURES, rings)
    wl = Workload(rings, DISK, 8, 4)
    wl.run_for(0.2)
    e = expect_rpc(NOT_SUPPORTED, stop, vmm, "blk0", drain=False,
                   what="device.stop drain:false on qsd")
    check("GET_VRING_BASE_SKIP_DRAIN" in str(e), "it names GET_VRING_BASE_SKIP_DRAIN: %s" % e)
    expect_rpc(NOT_SUPPORTED, c.call, "device.kick", {"vm": "vm0", "device": "blk0", "index": 0},
               what="device.kick on qsd")
    check_eq(vmm.device_state("blk0")["state"], "running", "still running")
    wl.run_for(0.2)
    wl.drain(10.0)
    res = stop(vmm, "blk0")
    check(all("inflight" not in v for v in res), "no inflight count without bit 20")
    check_eq({v["index"]: v["base"] for v in res}, {r.index: r.avail_idx for r in rings},
             "qsd drained: base = avail index")
    wl.check_completed_once()
    check_eq(wl.bad, [], "every completion OK with the right data")
    wl.verify_image(img, DISK)
    for r in rings:
        r.close()
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


SCENARIOS = {"skip-drain": skip_drain, "base-inflight": base_inflight, "negotiation": negotiation,
             "shmem": shmem, "inband": inband, "endian": endian, "qsd": qsd}


def main(t):
    which = sys.argv[1:] or list(SCENARIOS)
    for name in which:
        log("=== %s" % name)
        SCENARIOS[name](t)


if __name__ == "__main__":
    run(main)

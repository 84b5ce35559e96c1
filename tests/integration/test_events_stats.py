#!/usr/bin/env python3
"""Events a controller can rely on, and device.stats (docs/control-api.md,
"Events" and "device.stats"), against real processes.

1. Lifecycle through JSON-RPC, on qemu-storage-daemon: vm.create,
   device.add, device.start, device.stop, device.reset (of a stopped device:
   no event; of a running one: device.stopped), device.remove, vm.destroy
   (with a running device) give vm.created, device.added, device.started,
   device.stopped, device.removed and vm.destroyed {reason: "destroy"}, in
   that order, to the owning connection -- each before the call that caused
   it answers -- and, identical (the model stamps an event once), to a
   subscriber.  Every event has `uid` and a `timestamp` in RFC 3339 UTC with
   microseconds, inside the wall-clock interval of the call that caused it,
   never going backwards.  A device.add that fails (nothing listening, a
   back-end that closes during the handshake) gives no device event at all.
   The other causes of vm.destroyed (owner_closed, linger_expired) and the
   isolation of every event are test_identity.py's.  (The front door's
   devices get the same events from the same state setter; their test
   comes with the front door's integration.)
2. device.stats against vhub-test-backend, which counts what it saw: the
   requests it received and the replies it sent (every connection), and
   the requests it sent on the back-end channel, equal the daemon's
   requests, replies and backend_requests after device.add, after I/O,
   after CONFIG_CHANGE_MSGs, after the back-end dropped the connection and
   the daemon restored the device (a second connection), and after a
   request the back-end never answered (a timeout: -32007, a loss).
   losses, reconnects, timeouts, last_loss (reason and timestamp exactly as
   device.disconnected said), since_ms (time in the state: grows, restarts
   at a change), handshake_us, restore_us (as long as the events say the
   outage lasted), and the eventfd_skipped extension (an in-band VRING_CALL
   to a call eventfd whose counter is full).
3. device.stats across a SIGKILL of qemu-storage-daemon and its restart
   300 ms later: losses 1, reconnects 1 (as device.list), last_loss as
   device.disconnected, restore_us at least the 300 ms and as long as the
   events say, handshake_us > 0 and within the restore; the device runs
   and reads again.
"""

import datetime
import os
import re
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                                        # noqa: E402
from vhubtest.backends import QsdBackend, QsdNullBackend                   # noqa: E402
from vhubtest.client import RpcError                                       # noqa: E402
from vhubtest.contract import FakeListener, expect_rpc                     # noqa: E402
from vhubtest.daemon import Daemon                                         # noqa: E402
from vhubtest.events import wait_event                                     # noqa: E402
from vhubtest.memory import GuestMemory                                    # noqa: E402
from vhubtest.testbackend import TestBackend                               # noqa: E402
from vhubtest.testing import check, check_eq, log, run                     # noqa: E402
from vhubtest.vmm import Vmm, vm_with_memory                               # noqa: E402

TIMEOUT_MS = 1000
BLK1 = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)
NO_SUCH_DEVICE = -32002
BACKEND_ERROR = -32006
BACKEND_TIMEOUT = -32007
# the test back-end's default offer plus INBAND_NOTIFICATIONS (14): in-band VRING_CALL
TB_PROTOCOL_FEATURES = 0xdbe2b | 1 << 14
EVENTFD_MAX = 0xfffffffffffffffe
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def when(ev):
    """An event's timestamp as seconds since the epoch; checks its form."""
    check(isinstance(ev.get("timestamp"), str) and TIMESTAMP.fullmatch(ev["timestamp"]) is not None,
          "%s: timestamp in RFC 3339 UTC with microseconds" % ev.get("event"), ev.get("timestamp"))
    return datetime.datetime.strptime(ev["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def brief(events):
    return [(e["event"], e["vm"], e.get("device"), e.get("reason")) for e in events]


class Recorder:
    """The owner's events, each checked against the wall-clock interval of
    the call that caused it; everything, in order, for the comparison with a
    subscriber."""

    def __init__(self, c, uid=0):
        self.c = c
        self.uid = uid
        self.all = []
        self.last = 0.0

    def call(self, what, fn, want):
        """fn() must have queued exactly want's events by the time it returns."""
        t0 = time.time()
        fn()
        t1 = time.time()
        got = self.c.events()
        check_eq(brief(got), want, "%s: its events, before it answered" % what)
        for e in got:
            at = when(e)
            check_eq(e.get("uid"), self.uid, "%s: %s carries the VM's uid" % (what, e["event"]))
            # 5 ms for clock granularity between us and the daemon
            check(t0 - 0.005 <= at <= t1 + 0.005 and at >= self.last,
                  "%s: %s stamped while the call ran, not before an earlier event" % (what, e["event"]),
                  (t0, at, t1, self.last))
            self.last = at
        self.all += got
        return got


def failing_add(c, path, what):
    try:
        c.call("device.add", {"vm": "life", "device": "x", "socket": path})
    except RpcError as e:
        check_eq(e.code, BACKEND_ERROR, "device.add to %s: -32006" % what)
    else:
        check(False, "device.add to %s fails" % what)


def lifecycle(t, d, daemon, c):
    sub = daemon.client()
    sub.call("events.subscribe", {})
    socks = [daemon.backend_socket("life%d.sock" % i) for i in range(2)]
    t.enter(QsdNullBackend(socks, size=8 << 20, num_queues=1, log_dir=d))
    mem = t.enter(GuestMemory(4 << 20))
    vmm = Vmm(c, "life")
    rec = Recorder(c)

    rec.call("vm.create", vmm.create, [("vm.created", "life", None, None)])
    rec.call("vm.memory.add", lambda: vmm.add_memory(mem), [])
    rec.call("device.add", lambda: vmm.add_device("b", socks[0], type="blk"),
             [("device.added", "life", "b", None)])
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    rec.call("device.start", lambda: vmm.start_device("b", BLK1, [q.vq]),
             [("device.started", "life", "b", None)])
    check_eq(len(q.read_sectors(0, 1)), 512, "the started device reads")
    rec.call("device.config.get", lambda: vmm.config_get("b", 0, 8), [])
    rec.call("device.stop", lambda: vmm.stop_device("b"), [("device.stopped", "life", "b", None)])
    rec.call("device.reset of a stopped device",
             lambda: c.call("device.reset", {"vm": "life", "device": "b"}), [])
    q2 = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    rec.call("device.start again", lambda: vmm.start_device("b", BLK1, [q2.vq]),
             [("device.started", "life", "b", None)])
    rec.call("device.reset of a running device",
             lambda: c.call("device.reset", {"vm": "life", "device": "b"}),
             [("device.stopped", "life", "b", None)])
    rec.call("device.remove", lambda: vmm.remove_device("b"), [("device.removed", "life", "b", None)])

    # a device.add that fails announces nothing: nothing listening, or a
    # back-end that closes during the handshake
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.bind(daemon.backend_socket("deaf.sock"))       # bound, never listening
    t.defer(deaf.close)
    rec.call("device.add to a socket nobody listens on",
             lambda: failing_add(c, deaf.getsockname(), "a socket nobody listens on"), [])
    with FakeListener(daemon.backend_socket("closer.sock"), "close") as closer:
        rec.call("device.add to a back-end that closes",
                 lambda: failing_add(c, closer.path, "a back-end that closes"), [])
        check(closer.connections() >= 1, "the daemon did connect to the closing back-end")

    # vm.destroy with a running device: its device.removed, then vm.destroyed
    rec.call("device.add", lambda: vmm.add_device("b2", socks[1], type="blk"),
             [("device.added", "life", "b2", None)])
    q3 = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    rec.call("device.start", lambda: vmm.start_device("b2", BLK1, [q3.vq]),
             [("device.started", "life", "b2", None)])
    rec.call("vm.destroy", vmm.destroy, [("device.removed", "life", "b2", None),
                                         ("vm.destroyed", "life", None, "destroy")])
    for x in (q, q2, q3):
        x.vq.close()

    # the subscriber saw the same events, stamped the same
    deadline = time.monotonic() + 5
    seen = []
    while len(seen) < len(rec.all) and time.monotonic() < deadline:
        seen += sub.events()
        time.sleep(0.01)
    check_eq(seen, rec.all, "a subscriber gets the owner's events, identical (stamped once, by the model)")
    log("ok: %d lifecycle events, each before its call's answer, stamped while it ran" % len(rec.all))
    sub.close()


def tb_counts(tb):
    s = tb.socket_status(0)
    return {"requests": sum(s["requests"].values()), "replies": s["replies"],
            "backend_requests": s["backend_requests"]}


def stats(c, vm, device):
    return c.call("device.stats", {"vm": vm, "device": device})


def check_matches(c, tb, what):
    """The daemon's counts are the back-end's, once both are idle."""
    st = stats(c, "st", "t")
    got = {k: st[k] for k in ("requests", "replies", "backend_requests")}
    check_eq(got, tb_counts(tb), "%s: device.stats requests, replies and backend_requests are what the "
             "back-end received, answered and sent" % what)
    return st


def stats_test_backend(t, d, daemon, c):
    sock = daemon.backend_socket("tb.sock")
    tb = t.enter_logged("test back-end",
                        TestBackend([sock], args=["--queues", "1", "--protocol-features", "%x" % TB_PROTOCOL_FEATURES],
                                    log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4 << 20, vm="st")
    t0 = time.monotonic()
    vmm.add_device("t", sock, type="blk")
    took_us = (time.monotonic() - t0) * 1e6
    st = check_matches(c, tb, "after device.add")
    check(st["requests"] >= 5 and st["replies"] >= 3, "the handshake's requests and replies counted", st)
    check_eq((st["state"], st["timeouts"], st["losses"], st["reconnects"], st["backend_requests"],
              st["eventfd_skipped"]), ("ready", 0, 0, 0, 0, 0), "a fresh device's counters")
    check("last_loss" not in st and "restore_us" not in st, "no last_loss nor restore_us before a loss", st)
    check(0 < st["handshake_us"] <= took_us, "handshake_us: more than 0, less than device.add took "
          "(%.0f us)" % took_us, st["handshake_us"])
    time.sleep(0.3)
    check(stats(c, "st", "t")["since_ms"] >= 300, "since_ms grows while the state lasts")

    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("t", BLK1, [q.vq])
    for i in range(8):
        check_eq(len(q.read_sectors(i, 1)), 512, "a read")
    st = check_matches(c, tb, "after device.start and I/O")
    check(st["state"] == "running" and st["since_ms"] < 300, "since_ms starts over at a change of state", st)

    # the back-end channel: CONFIG_CHANGE_MSG, each answered (REPLY_ACK)
    for _ in range(3):
        tb.config_change()
    check_eq(check_matches(c, tb, "after 3 CONFIG_CHANGE_MSGs")["backend_requests"], 3,
             "backend_requests")
    # an in-band VRING_CALL to a call eventfd whose counter is full: not written
    try:
        os.eventfd_read(q.vq.call_fd)   # the calls of the reads above: counter 0
    except BlockingIOError:
        pass
    os.eventfd_write(q.vq.call_fd, EVENTFD_MAX)
    tb.vring_call(queue=0)
    st = check_matches(c, tb, "after an in-band VRING_CALL")
    check_eq(st["eventfd_skipped"], 1, "eventfd_skipped: the full call eventfd was not written (an extension)")
    os.eventfd_read(q.vq.call_fd)      # the driver catches up
    check_eq(len(q.read_sectors(0, 1)), 512, "the ring works on")

    # the back-end drops the connection: a loss, and a restore on a new one
    c.events()
    tb.disconnect()
    gone = wait_event(c, "device.disconnected", "t")
    back = wait_event(c, "device.reconnected", "t")
    check_eq(len(q.read_sectors(1, 1)), 512, "the restored device reads")
    st = check_matches(c, tb, "after a loss and a restore (two connections)")
    check_eq(tb.connections(0), 2, "the back-end saw a second connection")
    check_eq((st["state"], st["losses"], st["reconnects"], st["timeouts"]), ("running", 1, 1, 0),
             "state, losses, reconnects, timeouts after one loss")
    check_eq(st.get("last_loss"), {"reason": gone["reason"], "timestamp": gone["timestamp"]},
             "last_loss: device.disconnected's reason and timestamp")
    outage = when(back) - when(gone)
    check("restore_us" in st and abs(st["restore_us"] / 1e6 - outage) < 0.05,
          "restore_us: as long as device.disconnected to device.reconnected (%.1f ms)" % (outage * 1e3),
          st.get("restore_us"))
    check(0 < st["handshake_us"] <= st["restore_us"], "handshake_us: the restore's handshake, within it", st)

    # a request the back-end never answers: -32007, a timeout and a loss
    tb.misbehave("GET_CONFIG", "silence", count=1)
    expect_rpc(c, "device.config.get", {"vm": "st", "device": "t", "offset": 0, "size": 8}, BACKEND_TIMEOUT,
               what="GET_CONFIG the back-end never answers", timeout=10)
    gone = wait_event(c, "device.disconnected", "t")
    wait_event(c, "device.reconnected", "t")
    st = check_matches(c, tb, "after a timeout and a restore")
    check_eq((st["timeouts"], st["losses"], st["reconnects"]), (1, 2, 2), "timeouts, losses, reconnects")
    check_eq(st["last_loss"], {"reason": gone["reason"], "timestamp": gone["timestamp"]},
             "last_loss: the timeout's device.disconnected")
    check("GET_CONFIG" in st["last_loss"]["reason"], "last_loss.reason names the request",
          st["last_loss"]["reason"])
    check_eq(c.call("device.list", {"vm": "st"})["devices"][0]["reconnects"], st["reconnects"],
             "device.list's reconnects is device.stats'")
    log("device.stats after all of it: %s" % st)

    vmm.stop_device("t")
    check_eq(stats(c, "st", "t")["state"], "stopped", "device.stats' state follows device.list's")
    vmm.remove_device("t")
    expect_rpc(c, "device.stats", {"vm": "st", "device": "t"}, NO_SUCH_DEVICE, what="device.stats of a removed device")
    vmm.destroy()
    q.vq.close()


def stats_qsd(t, d, daemon, c):
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, 4 << 20)
    sock = daemon.backend_socket("qsd.sock")
    qsd = t.enter_logged("qemu-storage-daemon", QsdBackend(img, sock, num_queues=1, log_dir=d))
    mem, vmm = vm_with_memory(t, c, 4 << 20, vm="q")
    vmm.add_device("b", sock, type="blk", reconnect_ms=50)
    q = blk.BlkQueue(mem, index=0, size=16, max_io=4096)
    vmm.start_device("b", BLK1, [q.vq])
    first = q.read_sectors(0, 1)
    st0 = stats(c, "q", "b")
    check(st0["handshake_us"] > 0 and st0["losses"] == 0 and "restore_us" not in st0, "before the kill", st0)

    qsd.kill()
    gone = wait_event(c, "device.disconnected", "b")
    time.sleep(0.3)
    qsd.start()
    back = wait_event(c, "device.reconnected", "b")
    check_eq(q.read_sectors(0, 1), first, "the restored device reads the same data")
    st = stats(c, "q", "b")
    check_eq((st["state"], st["losses"], st["reconnects"], st["timeouts"]), ("running", 1, 1, 0),
             "after a SIGKILL and a restart: state, losses, reconnects, timeouts")
    check_eq(st["last_loss"], {"reason": gone["reason"], "timestamp": gone["timestamp"]},
             "last_loss: device.disconnected's reason and timestamp")
    outage = when(back) - when(gone)
    check(st["restore_us"] >= 300000 and abs(st["restore_us"] / 1e6 - outage) < 0.05,
          "restore_us: at least the 300 ms qsd was away, as long as the events say (%.1f ms)" % (outage * 1e3),
          st["restore_us"])
    check(0 < st["handshake_us"] < st["restore_us"], "handshake_us: the restore's, within it", st)
    check(st["requests"] > st0["requests"] and st["replies"] > st0["replies"],
          "the restore's requests and replies counted", (st0, st))
    check_eq(c.call("device.list", {"vm": "q"})["devices"][0]["reconnects"], 1, "device.list agrees")
    log("qsd restore: %.1f ms, its handshake %.1f ms" % (st["restore_us"] / 1e3, st["handshake_us"] / 1e3))
    vmm.destroy()
    q.vq.close()


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", str(TIMEOUT_MS)]))
    c = daemon.client()
    base = daemon.settled_fd_count(c)
    lifecycle(t, d, daemon, c)
    if os.environ.get("VHUB_TEST_BACKEND"):
        stats_test_backend(t, d, daemon, c)
    else:
        # not a skip of the whole test: the rest ran
        log("VHUB_TEST_BACKEND not set: device.stats against the test back-end not exercised")
    stats_qsd(t, d, daemon, c)
    daemon.check_fd_baseline(base, "the daemon's fds back to baseline")
    check_eq(c.call("vm.list")["vms"], [], "no VM left")
    try:
        c.call("device.stats", {"vm": "q", "device": "b"})
    except RpcError as e:
        check_eq(e.code, -32001, "device.stats of a destroyed VM")
    daemon.stop()


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""A VMM's eventfd must not stall the daemon (issue 15, "Stalls").

The daemon writes to eventfds a VMM handed it: the kick of every ring at the
end of device.start, and the call / err fd of a ring when the back-end sends
an in-band VRING_CALL / VRING_ERR.  The VMM shares the open file description
of each, so it can clear O_NONBLOCK and push the counter to 2^64-2, where a
write of 1 blocks until someone reads.  The daemon must never depend on the
peer's file status flags: it must not block, must keep answering everyone,
and must say (once, rate-limited) that the VMM's eventfd was full.

vhub-test-backend X (INBAND_NOTIFICATIONS added) with the misbehaviour
"ignore-fd" on SET_VRING_KICK: it holds the kick fd without ever draining it
(and polls the ring instead), so nothing but the VMM decides the counter.

1. start kick: device.start with a blocking kick eventfd at 2^64-2.  Another
   client's daemon.info is answered while the start is under way, the start
   itself answers {}, the counter is untouched (nothing was added, nothing
   blocked), the ring does I/O (polled), and the daemon log names the full
   kick once.
2. in-band calls: a running ring whose call and err eventfds the VMM made
   blocking (after device.start, through the shared description) and set to
   2^64-2; 200 VRING_CALLs and 200 VRING_ERRs from the back-end are each
   acked 0 (the eventfd is signalled already: nothing is lost), a second
   client is answered between them, and the daemon logs the full eventfd at
   most a few times (rate-limited, with a count), not 400 times.  Once the
   VMM drains its call eventfd, the next VRING_CALL signals it again.
3. the daemon's fd count is back at its baseline and it exits 0 on SIGTERM.
"""

import fcntl
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import blk, scenarios                                # noqa: E402
from vhubtest.client import ClientError                            # noqa: E402
from vhubtest.daemon import Daemon                                 # noqa: E402
from vhubtest.testbackend import TestBackend, TestBackendError     # noqa: E402
from vhubtest.testing import check, check_eq, log, run             # noqa: E402
from vhubtest.virtq import Virtqueue                               # noqa: E402
from vhubtest.vmm import vm_with_memory                            # noqa: E402

TB_DEFAULT_PF = 0xdbe2b       # vhub-test-backend's default protocol features
PF_INBAND = 1 << 14
FULL = (1 << 64) - 2            # the largest value an eventfd counter holds
N_INBAND = 200
RATELIMIT_S = 10                # VHUB_LOG_RATELIMIT_USEC
MORE = re.compile(r"\((\d+) more since the last report, (\d+) in all\)")
FEATURES = scenarios.BLK_FEATURES & ~(1 << blk.VIRTIO_BLK_F_MQ)


def hostile_eventfd(fd=None):
    """An eventfd (new, or fd) made blocking and filled to 2^64-2: a write of 1
    now blocks until someone reads."""
    if fd is None:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    os.eventfd_write(fd, FULL)
    return fd


def counter(fd):
    """Read (and so reset) an eventfd's counter without ever blocking."""
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, fl)


def answered(client, what, timeout=3.0):
    """daemon.info on `client` must be answered within timeout."""
    t0 = time.monotonic()
    try:
        info = client.call("daemon.info", timeout=timeout)
    except ClientError as e:
        check(False, "%s: another client's daemon.info is answered" % what, e)
    check("pid" in info, "%s: another client's daemon.info answered in %.1f ms"
          % (what, (time.monotonic() - t0) * 1000))


def notify(send, kind, i):
    """An in-band notification from the back-end must be acked 0."""
    try:
        a = send(queue=0, timeout_ms=3000)
    except TestBackendError as e:
        check(False, "%s %s on a full eventfd is answered by the daemon" % (kind, i), e)
    if a.get("reply") != 0:
        check(False, "%s %s on a full eventfd acked 0" % (kind, i), a)


def full_lines(daemon):
    with open(daemon.log_path, errors="replace") as f:
        return [ln for ln in f if "not writable" in ln]


def part_start_kick(t, daemon, c, other, vmm, mem, X):
    X.misbehave("SET_VRING_KICK", "ignore-fd", count=1)
    q = blk.BlkQueue(mem, index=0, size=64, max_io=4096)
    t.defer(q.vq.close)
    kick = hostile_eventfd()
    t.defer(os.close, kick)
    params, fds = vmm.start_params("X", FEATURES, [q.vq])
    # The daemon gets the hostile kick; the test's own Virtqueue.kick() goes
    # to its private eventfd (the back-end polls the ring anyway).
    fds[params["vrings"][0]["kick"]] = kick
    p = c.request("device.start", params, fds=fds)
    end = time.monotonic() + 3.0
    while not p.done() and time.monotonic() < end:
        time.sleep(0.01)
    # the start's last stage writes the kick: by now the daemon did (or is stuck)
    answered(other, "device.start with a full blocking kick eventfd")
    try:
        res = p.result(5.0)
    except ClientError as e:
        check(False, "device.start with a full kick eventfd answers", e)
    check_eq(res, {}, "device.start with a full kick eventfd answers {}")
    answered(other, "after the start")
    check(X.vrings(0)[0]["ignored_fd"], "X holds the kick fd without draining it")
    check_eq(counter(kick), FULL, "the kick counter is untouched (the daemon added nothing)")
    check_eq(vmm.device_state("X")["state"], "running", "X is running")
    data = q.read_sectors(0, 8)
    check_eq(len(data), 4096, "X's ring does I/O (polled)")
    check_eq(len(full_lines(daemon)), 1, "the full kick eventfd is logged once")
    log("daemon: %s" % full_lines(daemon)[0].strip())
    vmm.stop_device("X")


def part_inband(t, daemon, c, other, vmm, mem, X):
    vq = Virtqueue(mem, size=64, index=0)
    t.defer(vq.close)
    err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    t.defer(os.close, err)
    params, fds = vmm.start_params("X", FEATURES, [vq])
    fds.append(err)
    params["vrings"][0]["err"] = len(fds) - 1
    c.call("device.start", params, fds=fds)
    time.sleep(0.05)
    counter(vq.call_fd)
    counter(err)
    a = X.vring_call(queue=0)
    check_eq((a.get("reply"), counter(vq.call_fd)), (0, 1),
             "a VRING_CALL on a healthy call eventfd: acked 0, signalled once")

    # The VMM turns both eventfds hostile through the description it shares.
    hostile_eventfd(vq.call_fd)
    hostile_eventfd(err)
    for kind, send in (("VRING_CALL", X.vring_call), ("VRING_ERR", X.vring_err)):
        for i in range(N_INBAND):
            notify(send, kind, i)
            if i % 50 == 0:
                answered(other, "%s %d on a full eventfd" % (kind, i))
    log("ok: %d VRING_CALL and %d VRING_ERR on full eventfds acked 0" % (N_INBAND, N_INBAND))
    answered(other, "after %d in-band notifications" % (2 * N_INBAND))
    check_eq(counter(vq.call_fd), FULL, "the call counter is untouched")
    check_eq(counter(err), FULL, "the err counter is untouched")
    a = X.vring_call(queue=0)
    check_eq((a.get("reply"), counter(vq.call_fd)), (0, 1),
             "once the VMM drained it, a VRING_CALL signals its call eventfd again")

    # One more after the rate limit's interval: its line counts the rest.
    hostile_eventfd(vq.call_fd)
    time.sleep(RATELIMIT_S + 0.5)
    notify(X.vring_call, "VRING_CALL", "after the interval")
    lines = full_lines(daemon)
    for ln in lines:
        log("daemon: %s" % ln.strip())
    events = 1 + 2 * N_INBAND + 1     # the start kick, the in-band ones, the last one
    # one line per 10 s at most: the start kick's, the one after the wait,
    # and one more if the in-band burst outlasted the first interval
    check(2 <= len(lines) <= 4, "%d unsignalled eventfds logged in %d lines (rate-limited)"
          % (events, len(lines)))
    counted = len(lines) + sum(int(m.group(1)) for m in map(MORE.search, lines) if m)
    check_eq(counted, events, "the lines account for every unsignalled eventfd")
    m = MORE.search(lines[-1])
    check(m and int(m.group(2)) == events, "the last line says %d in all" % events, lines[-1])
    counter(vq.call_fd)
    vmm.stop_device("X")


def main(t):
    d = t.tmpdir()
    daemon = t.enter(Daemon(d, extra_args=["--backend-timeout-ms", "1000"]))
    c = daemon.client()
    other = daemon.client()
    baseline = daemon.settled_fd_count(c)
    X = t.enter(TestBackend([daemon.backend_socket("x.sock")], log_dir=d,
                            args=["--protocol-features", hex(TB_DEFAULT_PF | PF_INBAND)]))
    mem, vmm = vm_with_memory(t, c, 4 << 20)
    info = vmm.add_device("X", X.socket)
    check(info["protocol_features"] & PF_INBAND, "X: INBAND_NOTIFICATIONS negotiated")

    part_start_kick(t, daemon, c, other, vmm, mem, X)
    part_inband(t, daemon, c, other, vmm, mem, X)

    vmm.remove_device("X")
    vmm.destroy()
    daemon.check_fd_baseline(baseline)


run(main)

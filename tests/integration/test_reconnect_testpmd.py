#!/usr/bin/env python3
"""dpdk-testpmd (io forwarding) SIGKILLed and restarted under vhubd.

    test_reconnect_testpmd.py listen   testpmd listens, vhubd connects (client mode)
    test_reconnect_testpmd.py server   vhubd listens (device.add mode "server"),
                                       testpmd connects to it (client=1)

listen: after SIGKILL testpmd cannot bind again while its socket file
exists, so the harness deletes it and starts a new testpmd on the same path;
vhubd sees the socket appear (inotify) and restores the device.  DPDK
answers its first request up to ~1 s after it listens, well inside the
daemon's back-end timeout.  The harness does not ack VIRTIO_F_IN_ORDER here,
and the RX ring always has many buffers posted and unused, so
device.reconnected must say exact=false with the RX ring's outstanding = the
buffers posted and not used at the kill (the contract's rule), and TX's
outstanding = frames not yet consumed.

server: vhubd keeps listening on a socket under its back-end directory;
the restarted testpmd (client=1) connects by itself.  Here the harness acks
IN_ORDER (testpmd offers it), so the same restore is exact=true although RX
has hundreds of buffers outstanding: with in-order use the used index says
exactly which were consumed.

Either way frames sent on TX come back on RX again after each restart
(testpmd's port must be forwarding first: wait_forwarding), byte for byte,
each once; two kills per mode, reconnects 1 and 2.  testpmd busy-polls a
CPU: meson runs this non-parallel.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.events import no_event, wait_event                # noqa: E402
from vhubtest import net                                       # noqa: E402
from vhubtest.backends import TestpmdBackend                   # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.procs import wait_until                          # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import vm_with_memory                        # noqa: E402

VIRTIO_F_IN_ORDER = 35
KILLS = 2


def loopback(p, tag, nframes=100, timeout=5.0):
    """Frames tagged `tag` sent on TX come back on RX, each once, intact.
    Frames of other tags (sent before a kill) are counted, not failed."""
    frames = [net.build_frame(i, 60 + (i * 97) % 1400, tag=tag) for i in range(nframes)]
    got, other = {}, 0
    step = 64
    deadline = time.monotonic() + timeout
    for i in range(0, nframes, step):
        p.send(frames[i:i + step])
        want = min(i + step, nframes)
        while len(got) < want:
            for f in p.recv():
                ident = net.parse_frame(f)
                if ident is None or ident[0] != tag:
                    other += 1
                    continue
                if ident[1] in got:
                    check(False, "tag %d: frame %d received once" % (tag, ident[1]))
                got[ident[1]] = f
            if time.monotonic() > deadline:
                check(False, "tag %d: %d of %d frames came back within %.1fs (rx used %d avail "
                      "%d, tx used %d avail %d)" % (tag, len(got), want, timeout, p.rx.used_idx,
                                                   p.rx.avail_idx, p.tx.used_idx,
                                                   p.tx.avail_idx))
            p.rx.wait_for_used(0.01)
    check(all(got[s] == frames[s] for s in range(nframes)),
          "tag %d: %d frames (60..1459 bytes) came back byte for byte%s"
          % (tag, nframes, ", %d older frames seen too" % other if other else ""))


def main(t):
    mode = sys.argv[1] if len(sys.argv) > 1 else "listen"
    if mode not in ("listen", "server"):
        raise SystemExit("usage: test_reconnect_testpmd.py [listen|server]")
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    baseline = daemon.settled_fd_count(c)
    sock = daemon.backend_socket("net0.sock")
    server = mode == "server"
    pmd = TestpmdBackend(sock, queues=1, client=server, log_dir=d)
    t.add_log("testpmd", pmd.log_path)
    mem, vmm = vm_with_memory(t, c, 16 << 20)
    if server:
        # device.add answers once the back-end has connected and shaken hands
        pend = c.request("device.add", {"vm": "vm0", "device": "net0", "socket": sock,
                                        "type": "net", "mode": "server", "queues": 2})
        wait_until(lambda: os.path.exists(sock), 5.0, what="vhubd to listen on %s" % sock)
        t.enter(pmd)
        dev = pend.result(15.0)
        log("device.add (server mode) answered once testpmd connected: %s" % dev)
    else:
        t.enter(pmd)
        dev = vmm.add_device("net0", sock, type="net", queues=2)
    offered = int(dev["features"]) if not isinstance(dev["features"], str) \
        else int(dev["features"], 16)
    features = (1 << 32)
    if server:
        check(offered & (1 << VIRTIO_F_IN_ORDER), "testpmd offers VIRTIO_F_IN_ORDER")
        features |= 1 << VIRTIO_F_IN_ORDER
    p = net.NetQueuePair(mem, pair=0, size=256)
    vmm.start_device("net0", features, p.vqs)
    pmd.wait_forwarding()
    p.post_rx()
    p.rx.kick()
    loopback(p, tag=100)

    for k in range(1, KILLS + 1):
        avail = {vq.index: vq.avail_idx for vq in p.vqs}
        pmd.kill()
        used = {vq.index: vq.used_idx for vq in p.vqs}      # final now
        if not server:
            check(os.path.exists(sock), "kill %d: the killed testpmd left its socket file" % k)
            os.unlink(sock)   # it cannot bind again while the file exists
        disc = wait_event(c, "device.disconnected", "net0")
        log("kill %d: device.disconnected (%s)" % (k, disc["reason"]))
        t0 = time.monotonic()
        pmd.start(wait=not server)
        ev = wait_event(c, "device.reconnected", "net0", timeout=15.0)
        log("kill %d: device.reconnected %.0f ms after the restart began: %s"
            % (k, (time.monotonic() - t0) * 1000, ev))
        check_eq(ev["reconnects"], k, "kill %d: reconnects" % k)
        for v in ev["vrings"]:
            i = v["index"]
            check_eq(v["base"], used[i], "kill %d ring %d: base = used index at the kill" % (k, i))
            check_eq(v["outstanding"], (avail[i] - used[i]) & 0xFFFF,
                     "kill %d ring %d: outstanding = made available and not used" % (k, i))
        most = max(v["outstanding"] for v in ev["vrings"])
        check(most > 1, "kill %d: the RX ring had %d buffers outstanding" % (k, most))
        check_eq(ev["exact"], server,
                 "kill %d: exact %s (IN_ORDER %s)" % (k, server, "acked" if server else "not acked"))
        check_eq(vmm.device_state("net0")["state"], "running", "kill %d: device.list state" % k)
        pmd.wait_forwarding()
        loopback(p, tag=100 + k)
        no_event(c, "device.failed", "net0")

    check_eq(vmm.device_state("net0")["reconnects"], KILLS, "device.list reconnects")
    vmm.stop_device("net0")
    vmm.remove_device("net0")
    if server:
        check(not os.path.exists(sock), "device.remove removed the server socket")
    vmm.destroy()
    for vq in p.vqs:
        vq.close()
    daemon.check_fd_baseline(baseline)


if __name__ == "__main__":
    run(main)

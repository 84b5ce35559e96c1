#!/usr/bin/env python3
"""Red team (issue 10): one uid's objects could fill the service manager's
fd store, and then nobody else's survived a restart.

The store holds at most FileDescriptorStoreMax= entries (16,384 in the
unit), one per group and snapshot file: a VM is up to three (v<id>, o<id>,
s<id>; its devices' fds are in v<id>), a front-door device one more
(f<id>), a control connection two (c<id>, k<id>).  Without a per-uid share a
non-root uid at the default limits held ~8,500 entries: two such uids
filled the store, and every push after that failed ("not stored: it will
not survive a restart") -- root's VMs and devices included.

Now each non-root uid may hold a quarter of the store (all of them
together all but a quarter, which root keeps), counted as entries are
pushed and removed; what would take it past its share is refused before
it is made (-32008), a connection the way the connection limit refuses
one.

Shown at a small scale: a store of 64 entries ($FDSTORE, which systemd
>= 254 sets from the unit): uid 65534 opens 40 connections (80 entries);
those past its share of 16 entries are refused with -32008 and the store
keeps room; root then creates a VM with a device and restarts the daemon
(planned): root's VM and device come back.
"""

import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_backend_channel import connect_as                          # noqa: E402
from vhubtest.client import Client                                  # noqa: E402
from vhubtest.daemon import vhubd_path                              # noqa: E402
from vhubtest.servicemanager import ServiceManager                  # noqa: E402
from vhubtest.testbackend import TestBackend                        # noqa: E402
from vhubtest.testing import check, check_eq, log, run              # noqa: E402

STORE = 64
ATTACKER = 65534
CONNECTIONS = 40


def main(t):
    d = t.tmpdir()
    os.chmod(d, 0o755)
    control = os.path.join(d, "control.sock")
    backends = os.path.join(d, "backends")
    os.makedirs(backends)
    sm = t.enter(ServiceManager(d, fd_store_max=STORE))
    t.add_log("vhubd under the service manager", sm.log_path)
    env = dict(os.environ, FDSTORE=str(STORE))
    sm.start([vhubd_path(), "--control", control, "--backend-dir", backends, "--control-mode", "0666",
              "--max-connections-per-uid", str(CONNECTIONS)], env=env)
    sm.wait_ready()
    root = t.enter(Client(control, timeout=10))
    root.call("daemon.info")
    hoard = [socket.socket(fileno=connect_as(control, ATTACKER).detach()) for _ in range(CONNECTIONS)]
    for s in hoard:
        t.defer(s.close)
    served = refused = 0
    for i, s in enumerate(hoard):
        s.settimeout(10)
        try:
            s.sendall(b'{"jsonrpc":"2.0","id":%d,"method":"daemon.info"}\n' % i)
        except (BrokenPipeError, ConnectionResetError):
            pass                # refused: its answer is waiting to be read
        reply = json.loads(s.makefile("rb").readline())
        if "result" in reply:
            served += 1
            continue
        check_eq(reply.get("error", {}).get("code"), -32008,
                 "a connection past uid %d's share: resource limit" % ATTACKER)
        check("fd-store entries" in reply["error"]["data"]["detail"], "the detail names the fd store", reply)
        refused += 1
    log("uid %d's %d connections: %d served, %d refused; the store holds %d entries of %d"
        % (ATTACKER, CONNECTIONS, served, refused, sm.count(), STORE))
    check(refused > 0, "uid %d's connections past its share of the store are refused" % ATTACKER)
    check(served * 2 <= STORE // 4, "what uid %d holds stays within its share (%d entries)" % (ATTACKER, STORE // 4),
          served)
    root.call("daemon.info")
    check(sm.count() < STORE - 8, "the store keeps room for the others", sm.names())

    tb = t.enter(TestBackend([os.path.join(backends, "tb.sock")], log_dir=d))
    root.call("vm.create", {"vm": "victim", "linger_ms": 60000})
    root.call("device.add", {"vm": "victim", "device": "blk0", "socket": tb.socket, "type": "blk"})
    check_eq(sm.restart(), 0, "the old vhubd exits 0 (planned restart)")
    sm.wait_ready()
    root.close()
    root = t.enter(Client(control, timeout=10))
    vms = [v["vm"] for v in root.call("vm.list")["vms"]]
    check("victim" in vms, "root's VM survived the restart next to uid %d's connections" % ATTACKER, vms)
    check_eq([x["device"] for x in root.call("device.list", {"vm": "victim"})["devices"]], ["blk0"],
             "and its device")
    root.close()
    check_eq(sm.stop_unit(), 0, "systemctl stop: vhubd exits 0")


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""Red team: a server-mode device's directory fd escapes the per-uid fd
budget.

A server-mode device holds two fds while no back-end is connected: its
listening socket and the O_PATH fd of the directory it was bound in (the
name is removed relative to it, never by path).  vhub_device_fds_held()
counted the listening socket only, so every such device cost the daemon
one fd that no budget saw: with --max-fds-per-uid 20, uid 65534 added 16
idle server-mode devices (device.add asks for room for 4 more fds each
time) and made the daemon hold 33 fds for it.

The test: --max-fds-per-uid 20; uid 65534 adds server-mode devices in its
own directory until it is refused.  The refusal must be -32008 naming
--max-fds-per-uid, and the daemon must hold no more fds for the uid than
its budget; root is still served.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, Child, mkdir, start_daemon, workdir  # noqa: E402
from vhubtest.client import LIMIT_REACHED, Client              # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402

BUDGET = 20
TRIES = 40


def vmm(control, udir, w_fd, r_fd):
    """As USER: a VM, then TRIES server-mode device.add in one go (each
    waits for a back-end that never comes); reports the answers that came
    at once: {"refused": n, "first": error}."""
    c = Client(control, timeout=30)
    c.call("vm.create", {"vm": "v"})
    pending = [c.request("device.add", {"vm": "v", "device": "s%d" % i, "mode": "server",
                                        "socket": os.path.join(udir, "s%d.sock" % i)})
               for i in range(TRIES)]
    time.sleep(1.0)
    answered = [p.response(0) for p in pending if p.done()]
    errors = [a.error for a in answered if a.error]
    os.write(w_fd, json.dumps({"answered": len(answered), "refused": len(errors),
                               "first": errors[0] if errors else None}).encode() + b"\n")
    os.read(r_fd, 1)
    c.close()


def main(t):
    d = workdir(t)
    # the back-ends never come: the devices wait for them past the test
    daemon = start_daemon(t, d, ["--max-fds-per-uid", str(BUDGET), "--backend-timeout-ms", "60000"])
    udir = mkdir(os.path.join(daemon.backend_dir, "u"), USER, 0o755)
    root = daemon.client()
    base = daemon.settled_fd_count(root)

    uid = Child(USER, vmm, daemon.control, udir)
    try:
        res = json.loads(uid.readline())
        held = daemon.settled_fd_count(root) - base
        log("uid %d asked for %d idle server-mode devices: %s; the daemon holds %d fds for it (budget %d)"
            % (USER, TRIES, res, held, BUDGET))
        check(res["refused"] > 0, "uid %d is refused some of its %d devices" % (USER, TRIES), res)
        check_eq(res["answered"], res["refused"], "... and only those are answered yet (the others wait)")
        check_eq(res["first"]["code"], LIMIT_REACHED, "... with -32008")
        check("--max-fds-per-uid" in res["first"]["data"]["detail"], "... naming --max-fds-per-uid",
              res["first"]["data"]["detail"])
        check(held <= BUDGET, "the daemon holds no more fds for uid %d than its budget of %d" % (USER, BUDGET),
              "it holds %d for %d waiting devices" % (held, TRIES - res["refused"]))
        check_eq(root.call("daemon.info")["pid"], daemon.pid, "root is served")
    finally:
        uid.wait()


run(main)

#!/usr/bin/env python3
"""Identity and isolation (SO_PEERCRED) and VM lifetime, per the control contract.

An unprivileged client (a child that drops to uid/gid 65534 with
setresgid/setresuid and talks over its own connections) sees no trace of
root's VMs: vm.list omits them, every method naming them answers -32001
exactly as for a VM that does not exist (also with "uid": 0), daemon.info
counts only its own VMs, it can create its own vm0 beside root's vm0, it
may use a back-end socket owned by root or by itself -- if it could connect
to it itself -- but not one owned by another non-root uid (-32010, nothing
connected), and it receives no events
of root's VMs.  Root names the user's VM with "uid": 65534.

Lifetime: a VM dies with the connection that created it (its back-end
connection is closed: the qemu-storage-daemon export accepts a new
front-end); with linger_ms it survives, `vm.lingering` reaches subscribers of
the same uid, vm.attach from a new connection takes it over (and only a
lingering VM can be attached); without an attach it is destroyed after
linger_ms.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.backends import QsdNullBackend                                  # noqa: E402
from vhubtest.contract import (ALL_METHODS_NAMING_A_VM, FakeListener,         # noqa: E402
                               FdBaseline, check_error, expect_rpc)
from vhubtest.daemon import Daemon                                            # noqa: E402
from vhubtest.limits import UnprivAgent                                       # noqa: E402
from vhubtest.memory import memfd                                             # noqa: E402
from vhubtest.procs import wait_until                                         # noqa: E402
from vhubtest.testing import Skip, TestFailure, check, check_eq, log, run     # noqa: E402

USER = 65534       # nobody
OTHER = 65533      # another unprivileged uid that owns a back-end socket

NO_SUCH_VM = -32001
WRONG_STATE = -32004
BACKEND_ERROR = -32006
NOT_ALLOWED = -32010

def vm_names(client_or_list):
    vms = client_or_list if isinstance(client_or_list, list) else client_or_list.call("vm.list")["vms"]
    return sorted((v["vm"], v["uid"]) for v in vms)


def events_until(client, pred, timeout=5.0, got=None):
    """Every event queued on client up to and including the first pred
    accepts (got: those collected before, kept in order)."""
    got = [] if got is None else got
    deadline = time.monotonic() + timeout
    while not any(pred(e) for e in got):
        if time.monotonic() > deadline:
            raise TestFailure("FAILED: no such event within %.1fs; got %r" % (timeout, got))
        got += client.events()
        time.sleep(0.01)
    return got


def same_error_modulo_name(a, b, name_a, name_b):
    """Two error dicts are identical once the VM names are swapped."""
    da = json.dumps(a, sort_keys=True).replace(name_a, "<VM>")
    db = json.dumps(b, sort_keys=True).replace(name_b, "<VM>")
    return da == db


def isolation_agent(t, daemon):
    """The unprivileged client: uid USER, no supplementary groups, connected."""
    agent = UnprivAgent(daemon.control, uid=USER)
    t.defer(agent.stop)
    who = agent.cmd(op="whoami")
    check_eq(who["resuid"], [USER, USER, USER], "the agent runs as uid %d (real, effective, saved)" % USER)
    check_eq(who["groups"], [], "the agent has no supplementary groups")
    agent.connect("a")
    return agent


def root_world(agent, c, fb, socks):
    """Root's world: vm0 with a region and a device, and rootonly."""
    c.call("vm.create", {"vm": "vm0"})
    c.call("vm.create", {"vm": "rootonly"})
    m = memfd(1 << 20)
    c.call("vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 1 << 20, "fd": 0}, fds=[m])
    os.close(m)
    c.call("device.add", {"vm": "vm0", "device": "blk0", "socket": socks[0]})
    root_mem = c.call("vm.memory.list", {"vm": "vm0"})
    fb.reset(c)

    check_eq(agent.call("vm.list")["vms"], [], "uid %d: vm.list omits root's VMs" % USER)
    info = agent.call("daemon.info")
    check_eq((info["vms"], info["devices"]), (0, 0),
             "uid %d: daemon.info counts none of root's VMs and devices" % USER)
    rinfo = c.call("daemon.info")
    check_eq((rinfo["vms"], rinfo["devices"]), (2, 1), "root: daemon.info counts root's VMs")
    return root_mem


def root_vms_invisible(agent, c, fb, socks, root_mem):
    """Every method naming root's VMs answers -32001, exactly as a VM that does not exist."""
    for method, params, nfds in ALL_METHODS_NAMING_A_VM:
        if "socket" in params:
            params = dict(params, socket=socks[2])
        kw = {"eventfds": nfds} if method == "device.start" else {"memfds": nfds}
        for vm in ("vm0", "rootonly"):
            for extra in ({}, {"uid": 0}):
                p = dict(params, vm=vm, **extra)
                if method == "device.remove" or "device" in p:
                    p.setdefault("device", "blk0")
                e = agent.error(method, p, **kw)
                what = "uid %d: %s naming root's %s%s" % (USER, method, vm,
                                                            " with uid 0" if extra else "")
                check_error(e, NO_SUCH_VM, what)
                ghost = agent.error(method, dict(p, vm="ghost%d" % len(vm)), **kw)
                check(same_error_modulo_name(e, ghost, vm, "ghost%d" % len(vm)),
                      "%s: the same answer as for a VM that does not exist" % what,
                      "%r vs %r" % (e, ghost))
    fb.after("uid %d naming root's VMs" % USER)
    check_eq(vm_names(c), [("rootonly", 0), ("vm0", 0)], "root's VMs are all still there")
    check_eq(c.call("vm.memory.list", {"vm": "vm0"}), root_mem, "root's vm0 memory is untouched")
    check_eq([x["state"] for x in c.call("device.list", {"vm": "vm0"})["devices"]], ["ready"],
             "root's device is untouched")
    e = agent.error("vm.create", {"vm": "forroot", "uid": 0})
    check(e["code"] in (NO_SUCH_VM, -32602), "uid %d cannot create a VM for root" % USER, e)
    check_eq(vm_names(c), [("rootonly", 0), ("vm0", 0)], "... nothing was created")


def own_vm0_beside_roots(agent, c, root_mem):
    """Its own vm0 beside root's vm0."""
    agent.call("vm.create", {"vm": "vm0"})
    agent.call("vm.memory.add", {"vm": "vm0", "gpa": 0x100000, "size": 65536, "fd": 0},
               memfds=1, memfd_size=65536)
    check_eq(agent.call("vm.list")["vms"],
             [{"vm": "vm0", "uid": USER, "devices": [], "regions": 1}],
             "uid %d: vm.list shows exactly its own vm0" % USER)
    check_eq(c.call("vm.memory.list", {"vm": "vm0"}), root_mem, "root's vm0 is not the user's vm0")
    check_eq(vm_names(c), [("rootonly", 0), ("vm0", 0), ("vm0", USER)],
             "root's vm.list shows every VM with its uid")
    agent.call("vm.memory.list", {"vm": "vm0", "uid": USER})
    log("ok: uid %d may name its own uid" % USER)
    e = agent.error("vm.memory.list", {"vm": "vm0", "uid": OTHER})
    check_error(e, NO_SUCH_VM, "uid %d naming uid %d" % (USER, OTHER))
    info = agent.call("daemon.info")
    check_eq((info["vms"], info["devices"]), (1, 0), "uid %d: daemon.info counts its one VM" % USER)
    check_eq(c.call("daemon.info")["vms"], 3, "root: daemon.info counts every VM")


def root_names_user_vm(agent, c):
    """Root names the user's VM with "uid"."""
    regs = c.call("vm.memory.list", {"vm": "vm0", "uid": USER})["regions"]
    check_eq([(r["gpa"], r["size"]) for r in regs], [(0x100000, 65536)],
             "root names the user's vm0 with \"uid\": %d" % USER)
    check_eq(c.call("device.list", {"vm": "vm0", "uid": USER})["devices"], [],
             "root: device.list of the user's vm0")
    c.call("vm.create", {"vm": "made-by-root", "uid": USER})
    check(("made-by-root", USER) in vm_names(agent.call("vm.list")["vms"]),
          "root may create a VM for uid %d, and that uid sees it" % USER)
    c.call("vm.destroy", {"vm": "made-by-root", "uid": USER})


def user_backend_sockets(agent, daemon, c, socks):
    """Back-end sockets: root's or its own are fine if the uid may connect to them itself; another
    uid's is not."""
    os.chmod(socks[1], 0o755)
    e = agent.error("device.add", {"vm": "vm0", "device": "blk1", "socket": socks[1]})
    check_error(e, NOT_ALLOWED, "uid %d: device.add to root's socket it may not write (0755)" % USER)
    os.chmod(socks[1], 0o666)
    agent.call("device.add", {"vm": "vm0", "device": "blk1", "socket": socks[1]})
    log("ok: uid %d may use a back-end socket owned by root that others may write" % USER)
    with FakeListener(daemon.backend_socket("user.sock"), "close", owner=USER) as own:
        e = agent.error("device.add", {"vm": "vm0", "device": "mine", "socket": own.path})
        check_error(e, BACKEND_ERROR, "device.add to the user's own closing listener")
        check(own.connections() >= 1, "uid %d may use a socket it owns (the daemon connected)" % USER)
    with FakeListener(daemon.backend_socket("other.sock"), "none", owner=OTHER) as other:
        e = agent.error("device.add", {"vm": "vm0", "device": "theirs", "socket": other.path})
        check_error(e, NOT_ALLOWED, "uid %d: device.add to a socket owned by uid %d" % (USER, OTHER))
        e = agent.error("device.add", {"vm": "vm0", "device": "theirs", "socket": other.path,
                                       "mode": "server"})
        check_error(e, NOT_ALLOWED, "uid %d: server-mode device.add over uid %d's socket"
                    % (USER, OTHER))
        check_eq(other.connections(), 0, "nothing connected to uid %d's socket" % OTHER)
        check(os.path.exists(other.path), "uid %d's socket file is still there" % OTHER)
    check_eq(sorted(x["device"] for x in
                    c.call("device.list", {"vm": "vm0", "uid": USER})["devices"]),
             ["blk1"], "the user's vm0 has only the allowed device")
    info = agent.call("daemon.info")
    check_eq((info["vms"], info["devices"]), (1, 1), "uid %d: daemon.info counts its device" % USER)


def events_isolated(agent, daemon, c, socks):
    """Events: a subscriber of uid 65534 gets nothing of root's VMs, whatever the event; root's
    subscription without vm gets every uid's."""
    agent.events()          # its own VM's events so far (it owns vm0)
    agent.call("events.subscribe", {})
    sub = daemon.client()
    sub.call("events.subscribe", {})
    tmp = daemon.client()
    tmp.call("vm.create", {"vm": "rl", "linger_ms": 60000})
    tmp.call("device.add", {"vm": "rl", "device": "d", "socket": socks[2]})
    tmp.close()
    got = events_until(sub, lambda e: e["event"] == "vm.lingering" and e["vm"] == "rl")
    check_eq(got[-1]["linger_ms"], 60000, "root's subscriber sees root's vm.lingering")
    agent.call("vm.create", {"vm": "uvm"})
    agent.call("vm.destroy", {"vm": "uvm"})
    e = agent.error("vm.attach", {"vm": "rl"})
    check_error(e, NO_SUCH_VM, "uid %d: vm.attach of root's lingering VM" % USER)
    e = agent.error("vm.attach", {"vm": "rl", "uid": 0})
    check_error(e, NO_SUCH_VM, "uid %d: vm.attach of root's lingering VM with uid 0" % USER)
    c.call("vm.destroy", {"vm": "rl"})
    got = events_until(sub, lambda e: e["event"] == "vm.destroyed" and e["vm"] == "rl", got=got)
    seen = [(e["event"], e["vm"], e["uid"], e.get("device"), e.get("reason")) for e in got]
    check_eq([x for x in seen if x[1] in ("rl", "uvm")],
             [("vm.created", "rl", 0, None, None), ("device.added", "rl", 0, "d", None),
              ("vm.lingering", "rl", 0, None, None), ("vm.created", "uvm", USER, None, None),
              ("vm.destroyed", "uvm", USER, None, "destroy"), ("device.removed", "rl", 0, "d", None),
              ("vm.destroyed", "rl", 0, None, "destroy")],
             "root's subscription without vm: root's VMs' events and uid %d's, each with its uid" % USER)
    mine = agent.events(wait=0.3)
    check_eq([(e["event"], e["vm"], e["uid"]) for e in mine],
             [("vm.created", "uvm", USER), ("vm.destroyed", "uvm", USER)],
             "uid %d's subscriber sees its own VM's events and no trace of root's VMs "
             "(vm.created, device.added, vm.lingering, device.removed, vm.destroyed)" % USER)
    return sub


def user_closes(agent, c, sub, socks, fb):
    """The user's connection closes: its VM goes, root's stay."""
    agent.close("a")
    wait_until(lambda: ("vm0", USER) not in vm_names(c), 5,
               what="the user's vm0 destroyed with its connection")
    got = events_until(sub, lambda e: e["event"] == "vm.destroyed" and e["vm"] == "vm0")
    check_eq([(e["event"], e["vm"], e["uid"], e.get("device"), e.get("reason")) for e in got],
             [("device.removed", "vm0", USER, "blk1", None),
              ("vm.destroyed", "vm0", USER, None, "owner_closed")],
             "root's subscriber: uid %d's VM went with its connection (reason owner_closed)" % USER)
    sub.close()
    check_eq(vm_names(c), [("rootonly", 0), ("vm0", 0)], "root's VMs survive the user's close")
    # and the user's device's back-end connection was closed: the export is free
    c.call("vm.create", {"vm": "probe"})
    c.call("device.add", {"vm": "probe", "device": "p", "socket": socks[1]}, timeout=5)
    log("ok: the export the user's VM used accepts a new front-end")
    c.call("vm.destroy", {"vm": "probe"})
    c.call("vm.destroy", {"vm": "rootonly"})
    c.call("vm.destroy", {"vm": "vm0"})
    agent.stop()
    check_eq(agent.p.returncode, 0, "the agent exited cleanly")
    fb.reset(c)


def isolation(t, d, daemon, c, fb, socks):
    agent = isolation_agent(t, daemon)
    root_mem = root_world(agent, c, fb, socks)
    root_vms_invisible(agent, c, fb, socks, root_mem)
    own_vm0_beside_roots(agent, c, root_mem)
    root_names_user_vm(agent, c)
    user_backend_sockets(agent, daemon, c, socks)
    sub = events_isolated(agent, daemon, c, socks)
    user_closes(agent, c, sub, socks, fb)


def limits_per_uid(t, d):
    """--max-vms-per-uid counts each uid's VMs separately."""
    wd = os.path.join(d, "lim")
    os.makedirs(wd)
    os.chmod(wd, 0o755)
    daemon = t.enter(Daemon(wd, extra_args=["--control-mode", "0666", "--max-vms-per-uid", "1"]))
    c = daemon.client()
    agent = UnprivAgent(daemon.control, uid=USER)
    t.defer(agent.stop)
    agent.connect("a")
    c.call("vm.create", {"vm": "r1"})
    expect_rpc(c, "vm.create", {"vm": "r2"}, -32008, what="root's second VM with a limit of 1")
    agent.call("vm.create", {"vm": "u1"})
    log("ok: uid %d's first VM is not counted against root's" % USER)
    check_error(agent.error("vm.create", {"vm": "u2"}), -32008, "uid %d's second VM" % USER)
    agent.stop()
    daemon.stop()


def brief(events):
    return [(e["event"], e["vm"], e.get("device"), e.get("reason")) for e in events]


def lifetime(t, d, daemon, c, fb, socks):
    # every VM's life as a subscriber of the same uid sees it
    watch = daemon.client()
    watch.call("events.subscribe", {})
    fb.reset(c)             # watch's connection is one fd more until the end
    # A VM is destroyed when its creating connection closes.
    own = daemon.client()
    own.call("vm.create", {"vm": "eph"})
    m = memfd(1 << 20)
    own.call("vm.memory.add", {"vm": "eph", "gpa": 0, "size": 1 << 20, "fd": 0}, fds=[m])
    os.close(m)
    own.call("device.add", {"vm": "eph", "device": "b", "socket": socks[3]})
    check(("eph", 0) in vm_names(c), "another connection of the same uid sees eph")
    check_eq(brief(own.events()), [("vm.created", "eph", None, None), ("device.added", "eph", "b", None)],
             "the creating connection gets vm.created and device.added")
    own.close()
    wait_until(lambda: ("eph", 0) not in vm_names(c), 5, what="eph destroyed when its connection closed")
    log("ok: the VM went away with its creating connection")
    got = events_until(watch, lambda e: e["event"] == "vm.destroyed" and e["vm"] == "eph")
    check_eq(brief(got), [("vm.created", "eph", None, None), ("device.added", "eph", "b", None),
                          ("device.removed", "eph", "b", None), ("vm.destroyed", "eph", None, "owner_closed")],
             "a subscriber sees eph's whole life; vm.destroyed's reason: owner_closed")
    c.call("vm.create", {"vm": "probe"})
    c.call("device.add", {"vm": "probe", "device": "p", "socket": socks[3]}, timeout=5)
    log("ok: its back-end connection was closed: the qsd export accepts a new front-end")
    c.call("vm.destroy", {"vm": "probe"})
    got = events_until(watch, lambda e: e["event"] == "vm.destroyed" and e["vm"] == "probe")
    check_eq(brief(got)[-2:], [("device.removed", "probe", "p", None), ("vm.destroyed", "probe", None, "destroy")],
             "vm.destroy: the device's device.removed, then vm.destroyed with reason destroy")
    fb.after("a VM destroyed with its connection")

    # With linger_ms it survives; subscribers get vm.lingering; vm.attach takes it over.
    sub = daemon.client()
    sub.call("events.subscribe", {})
    owner = daemon.client()
    owner.call("vm.create", {"vm": "lin", "linger_ms": 1500})
    owner.call("device.add", {"vm": "lin", "device": "b", "socket": socks[3]})
    other = daemon.client()
    expect_rpc(other, "vm.attach", {"vm": "lin"}, WRONG_STATE,
               what="vm.attach of a VM whose owner is connected")
    check_eq(brief(sub.events()), [("vm.created", "lin", None, None), ("device.added", "lin", "b", None)],
             "no event but vm.created and device.added before the owner closes")
    owner.close()
    t_close = time.monotonic()
    ev = sub.wait_event(lambda e: e["event"] == "vm.lingering" and e["vm"] == "lin", 5)
    check_eq(ev["linger_ms"], 1500, "vm.lingering carries linger_ms")
    check(("lin", 0) in vm_names(c), "the lingering VM is still listed")
    check_eq([x["state"] for x in c.call("device.list", {"vm": "lin"})["devices"]], ["ready"],
             "its device stays ready while it lingers")
    time.sleep(0.3)
    other.call("vm.attach", {"vm": "lin"})
    log("ok: vm.attach from a new connection of the same uid took it over")
    expect_rpc(c, "vm.attach", {"vm": "lin"}, WRONG_STATE,
               what="a second vm.attach while the new owner is connected")
    time.sleep(max(0, t_close + 2.0 - time.monotonic()))
    check(("lin", 0) in vm_names(c), "the attached VM outlives its old linger_ms")
    check_eq(c.call("device.list", {"vm": "lin"})["devices"][0]["state"], "ready",
             "its device is still ready")

    # The new owner leaves too: it lingers again and, unattached, is destroyed after linger_ms.
    other.close()
    t_close = time.monotonic()
    sub.wait_event(lambda e: e["event"] == "vm.lingering" and e["vm"] == "lin", 5)
    time.sleep(0.7)
    check(("lin", 0) in vm_names(c), "still there halfway through linger_ms")
    wait_until(lambda: ("lin", 0) not in vm_names(c), 5, what="lin destroyed after linger_ms")
    took = time.monotonic() - t_close
    got = events_until(sub, lambda e: e["event"] == "vm.destroyed" and e["vm"] == "lin")
    check_eq(brief(got), [("device.removed", "lin", "b", None), ("vm.destroyed", "lin", None, "linger_expired")],
             "lin's end: device.removed, then vm.destroyed with reason linger_expired")
    check(1.3 <= took < 3.5, "destroyed about linger_ms (1500) after the close", "%.2fs" % took)
    c.call("vm.create", {"vm": "probe"})
    c.call("device.add", {"vm": "probe", "device": "p", "socket": socks[3]}, timeout=5)
    log("ok: the expired VM's back-end connection was closed")
    c.call("vm.destroy", {"vm": "probe"})
    expect_rpc(c, "vm.attach", {"vm": "lin"}, NO_SUCH_VM, what="vm.attach after the linger expired")
    sub.close()
    fb.after("linger, attach and expiry")

    # vm.destroy of a lingering VM works, and vm.attach of a destroyed one is -32001
    owner = daemon.client()
    owner.call("vm.create", {"vm": "lin2", "linger_ms": 60000})
    owner.close()
    wait_until(lambda: ("lin2", 0) in vm_names(c), 2, what="lin2 lingers")
    c.call("vm.destroy", {"vm": "lin2"})
    expect_rpc(c, "vm.attach", {"vm": "lin2"}, NO_SUCH_VM, what="vm.attach of a destroyed VM")
    got = events_until(watch, lambda e: e["event"] == "vm.destroyed" and e["vm"] == "lin2")
    check_eq(brief([e for e in got if e["vm"] == "lin2"]),
             [("vm.created", "lin2", None, None), ("vm.lingering", "lin2", None, None),
              ("vm.destroyed", "lin2", None, "destroy")],
             "a lingering VM destroyed by vm.destroy: reason destroy")
    fb.after("vm.destroy of a lingering VM")
    watch.close()
    fb.reset(c)


def main(t):
    if os.geteuid() != 0:
        raise Skip("needs root to run a client as uid %d and chown sockets" % USER)
    d = t.tmpdir()
    os.chmod(d, 0o755)       # the unprivileged client traverses it to the socket
    daemon = t.enter(Daemon(d, extra_args=["--control-mode", "0666",
                                           "--backend-timeout-ms", "2000"]))
    st = os.stat(daemon.control)
    check_eq(st.st_mode & 0o777, 0o666, "--control-mode 0666 applied to the control socket")
    c = daemon.client()
    fb = FdBaseline(daemon, c)
    socks = [daemon.backend_socket("n%d.sock" % i) for i in range(4)]
    t.enter(QsdNullBackend(socks, log_dir=d))

    isolation(t, d, daemon, c, fb, socks)
    lifetime(t, d, daemon, c, fb, socks)
    check_eq(c.call("vm.list")["vms"], [], "no VM left")
    daemon.stop()
    limits_per_uid(t, d)


if __name__ == "__main__":
    run(main)

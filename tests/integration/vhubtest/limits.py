"""Helpers for the resource-limit tests (tests/integration/test_limits_*.py).

    ticks = cpu_ticks(pid)             # utime + stime from /proc/PID/stat
    rss, peak = rss_kib(pid), peak_rss_kib(pid)
    reset_peak_rss(pid)                # VmHWM starts again from VmRSS
    a = UnprivAgent(control, uid=65534)  # a child running as that uid
    a.connect("a"); a.call("vm.create", {...}, conn="a")
    a.pin_shared_objects(...)          # as many shared objects as it can
"""

import os
import time

from .agent import PACKAGE_DIR, AgentProcess, reachable_by
from .testing import Skip, TestFailure


def cpu_ticks(pid):
    """utime + stime of pid, in clock ticks."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return int(fields[11]) + int(fields[12])


def idle_ticks(pid, seconds=2.0):
    """CPU ticks pid used over `seconds` of wall time."""
    before = cpu_ticks(pid)
    time.sleep(seconds)
    return cpu_ticks(pid) - before


def _status_kib(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_kib(pid):
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid):
    return _status_kib(pid, "VmHWM")


def reset_peak_rss(pid):
    """Make VmHWM start again from the current RSS (proc(5), clear_refs 5)."""
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("5")


def sanitized(pid):
    """The process runs with AddressSanitizer: its allocator keeps freed
    memory in quarantine and adds redzones, so RSS says nothing about what
    the code itself holds."""
    with open("/proc/%d/maps" % pid) as f:
        return "libasan" in f.read()


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


# The unprivileged side: one process, several connections, driven line by
# line over stdin/stdout.  "pin" loops inside the agent (hundreds of calls).
AGENT = r'''
import json, os, sys, time
from vhubtest.client import Client, RpcError, ClientError
conns = {}
out = sys.stdout

def memfd(size=4096):
    fd = os.memfd_create("vhubt-pin", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd

def call(conn, method, params, fds=(), timeout=10):
    try:
        return {"result": conns[conn].call(method, params, fds=list(fds), timeout=timeout)}
    except RpcError as e:
        return {"error": {"code": e.code, "message": e.message, "data": e.data}}

for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    try:
        if op == "whoami":
            res = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                   "groups": os.getgroups(), "resuid": list(os.getresuid())}
        elif op == "connect":
            try:
                conns[cmd["conn"]] = Client(cmd["path"])
                res = {}
            except OSError as e:
                res = {"oserror": str(e)}
        elif op == "close":
            conns.pop(cmd["conn"]).close()
            res = {}
        elif op == "call":
            fds = [memfd(cmd.get("memfd_size", 4096)) for _ in range(cmd.get("memfds", 0))]
            fds += [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(cmd.get("eventfds", 0))]
            try:
                res = call(cmd["conn"], cmd["method"], cmd.get("params"), fds,
                           cmd.get("timeout", 10))
            except ClientError as e:
                res = {"closed": str(e)}
            finally:
                for fd in fds:
                    os.close(fd)
        elif op == "events":
            time.sleep(cmd.get("wait", 0))
            res = {"events": conns[cmd["conn"]].events()}
        elif op == "hoard":
            # one line that never ends, its fds sent in chunks: they all
            # queue up in the daemon waiting for the line's end
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.settimeout(5)
            s.connect(cmd["path"])
            sent, answer = 0, b""
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.info","params":{},"pad":"')
            try:
                for k in cmd["chunks"]:
                    fds = [memfd() for _ in range(k)]
                    try:
                        socket.send_fds(s, [b"x" * 16], fds)
                    finally:
                        for fd in fds:
                            os.close(fd)
                    sent += k
            except OSError:
                pass
            try:
                while b"\n" not in answer:
                    data = s.recv(4096)
                    if not data:
                        break
                    answer += data
                closed = s.recv(4096) == b""
            except ConnectionResetError:
                closed = True    # it closed with our bytes unread
            except OSError:
                closed = None
            s.close()
            res = {"sent": sent, "answer": answer.decode(errors="replace"), "closed": closed}
        elif op == "first_null":
            r = conns[cmd["conn"]].wait_null_response(cmd.get("timeout", 5))
            res = {"error": r.error}
        elif op == "pin":
            # shared objects (one memfd each) in lingering VMs of its own
            # until refused; a connection the daemon drops is replaced, as an
            # attacker would
            pinned, vms, last, drops = 0, 0, None, 0
            conn = cmd["conn"]
            v = k = 0
            created = False
            while v < cmd["vms"] and last is None and drops < 20:
                name = "%s%d" % (cmd["prefix"], v)
                try:
                    if not created:
                        r = call(conn, "vm.create", {"vm": name, "linger_ms": 600000})
                        if "error" in r:
                            last = r["error"]
                            break
                        created = True
                        vms += 1
                    while k < cmd["per_vm"]:
                        fd = memfd()
                        try:
                            r = call(conn, "shared_object.add",
                                     {"vm": name, "uuid": "00000000-0000-4000-8000-%012x"
                                      % (v * 100000 + k), "fd": 0}, [fd])
                        finally:
                            os.close(fd)
                        if "error" in r:
                            last = r["error"]
                            break
                        pinned += 1
                        k += 1
                    v, k, created = v + 1, 0, False
                except ClientError:
                    drops += 1
                    try:
                        conns[conn].close()
                        conns[conn] = Client(cmd["path"])
                        call(conn, "vm.attach", {"vm": name})
                    except (OSError, ClientError):
                        break
            res = {"pinned": pinned, "vms": vms, "last_error": last, "drops": drops}
        else:
            res = {"fatal": "unknown op %s" % op}
    except Exception as e:
        res = {"fatal": "%s: %s" % (type(e).__name__, e)}
    out.write(json.dumps(res) + "\n")
    out.flush()
'''


class UnprivAgent(AgentProcess):
    """A child process running as uid/gid, talking to vhubd over its own
    connections, driven by one JSON command per line."""

    def __init__(self, control, uid=65534, gid=None):
        if os.geteuid() != 0:
            raise Skip("the limit tests need root to run a client as another uid")
        if not reachable_by(os.path.join(PACKAGE_DIR, "vhubtest", "client.py"), uid, 0o4):
            raise Skip("uid %d cannot read the test package under %s" % (uid, PACKAGE_DIR))
        self.control = control
        super().__init__(AGENT, uid, gid)

    def connect(self, conn="a"):
        return self.cmd(op="connect", conn=conn, path=self.control)

    def close(self, conn="a"):
        return self.cmd(op="close", conn=conn)

    def call(self, method, params=None, conn="a", **kw):
        """The result; raises RpcError on an error response."""
        res = self.cmd(op="call", conn=conn, method=method, params=params, **kw)
        if "closed" in res:
            raise TestFailure("FAILED: uid %d's connection %s closed during %s: %s"
                              % (self.uid, conn, method, res["closed"]))
        return self.result(res)

    def error(self, method, params, conn="a", **kw):
        """The error dict of a call that must fail."""
        res = self.cmd(op="call", conn=conn, method=method, params=params, **kw)
        if "error" not in res:
            raise TestFailure("FAILED: %s %s as uid %d: expected an error, got %r"
                              % (method, params, self.uid, res))
        return res["error"]

    def events(self, conn="a", wait=0):
        """The events the connection received so far (after `wait` seconds)."""
        return self.cmd(op="events", conn=conn, wait=wait)["events"]

    def raw_call(self, method, params=None, conn="a", **kw):
        """The agent's answer as it is: {"result"}, {"error"} or {"closed"}."""
        return self.cmd(op="call", conn=conn, method=method, params=params, **kw)

    def hoard(self, chunks):
        """A line that never ends, fds sent with each of its chunks."""
        return self.cmd(op="hoard", chunks=list(chunks), path=self.control)

    def pin_shared_objects(self, vms, per_vm, prefix="pin", conn="a"):
        return self.cmd(op="pin", conn=conn, vms=vms, per_vm=per_vm, prefix=prefix,
                        path=self.control)

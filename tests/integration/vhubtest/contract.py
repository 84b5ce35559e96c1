"""What every contract test checks of the daemon's answers, and the pieces
they share (tests/integration/test_contract_errors.py and the tests that
look at the same rules from another side).

    check_error(e, code, what, field=...)   # an RpcError or raw error dict
    expect_rpc(c, method, params, code)     # the call must fail with code
    fb = FdBaseline(daemon, c); ...; fb.after("a case")
    with FakeListener(path, "silent") as fl: ...   # a back-end that never answers
    ALL_METHODS_NAMING_A_VM                 # (method, params without vm, fds)
"""

import json
import os
import re
import select
import socket
import threading
import time

from .client import BACKEND_ERROR, BACKEND_TIMEOUT, RpcError
from .procs import unlink_if_exists
from .testing import TestFailure, check, check_eq, log

# vhost-user front-end request names (the spec's, without VHOST_USER_)
VHOST_USER_REQUESTS = {
    "GET_FEATURES", "SET_FEATURES", "SET_OWNER", "RESET_OWNER", "SET_MEM_TABLE",
    "SET_LOG_BASE", "SET_LOG_FD", "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE",
    "GET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR",
    "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_VRING_ENABLE",
    "SEND_RARP", "NET_SET_MTU", "SET_BACKEND_REQ_FD", "SET_SLAVE_REQ_FD", "IOTLB_MSG",
    "SET_VRING_ENDIAN", "GET_CONFIG", "SET_CONFIG", "CREATE_CRYPTO_SESSION",
    "CLOSE_CRYPTO_SESSION", "POSTCOPY_ADVISE", "POSTCOPY_LISTEN", "POSTCOPY_END",
    "GET_INFLIGHT_FD", "SET_INFLIGHT_FD", "GPU_SET_SOCKET", "RESET_DEVICE",
    "VRING_KICK", "GET_MAX_MEM_SLOTS", "ADD_MEM_REG", "REM_MEM_REG", "SET_STATUS",
    "GET_STATUS", "GET_SHARED_OBJECT", "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE",
}


def names_field(detail, field):
    """detail mentions `field` as a word (e.g. 'gpa', 'vrings[0].kick')."""
    return re.search(r"(?<![A-Za-z0-9_])%s(?![A-Za-z0-9_])" % re.escape(field), detail) is not None


def check_error(e, code, what, field=None, device=None, request=None):
    """e: an RpcError (or a raw error dict).  Asserts code, detail, field."""
    if isinstance(e, RpcError):
        got_code, data = e.code, e.data
    else:
        got_code, data = e.get("code"), e.get("data")
    check_eq(got_code, code, "%s: error code" % what)
    check(isinstance(data, dict) and isinstance(data.get("detail"), str) and data["detail"].strip(),
          "%s: error.data.detail is a sentence" % what, data)
    if field is not None:
        check(names_field(data["detail"], field), "%s: detail names '%s'" % (what, field),
              data["detail"])
    if code in (BACKEND_ERROR, BACKEND_TIMEOUT):
        check(isinstance(data.get("device"), str) and isinstance(data.get("request"), str),
              "%s: error.data has device and request" % what, data)
        check(data["request"] in VHOST_USER_REQUESTS,
              "%s: error.data.request names a vhost-user request" % what, data["request"])
        if device is not None:
            check_eq(data["device"], device, "%s: error.data.device" % what)
        if request is not None:
            check_eq(data["request"], request, "%s: error.data.request" % what)
    return data


def expect_rpc(c, method, params, code, what=None, field=None, fds=(), timeout=None, **kw):
    """c.call must fail with `code`; returns error.data."""
    what = what or "%s %s" % (method, json.dumps(params)[:120])
    try:
        res = c.call(method, params, fds=fds, timeout=timeout)
    except RpcError as e:
        return check_error(e, code, what, field, **kw)
    raise TestFailure("FAILED: %s: expected error %d, got result %r" % (what, code, res))


def closing(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def half_closed_session(path, lines, timeout=10.0):
    """Send every line (bytes, each ending in a newline), SHUT_WR, read until
    the daemon closes; (the messages it sent, seconds)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    s.connect(path)
    start = time.monotonic()
    s.sendall(b"".join(lines))
    s.shutdown(socket.SHUT_WR)
    buf = b""
    while True:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    s.close()
    return [json.loads(x) for x in buf.split(b"\n") if x.strip()], time.monotonic() - start


class FdBaseline:
    """The daemon's fd count must return to `base` after every case."""

    def __init__(self, daemon, client):
        self.daemon = daemon
        self.base = daemon.settled_fd_count(client)
        self.cases = 0
        log("daemon %d fd baseline: %d" % (daemon.pid, self.base))

    def reset(self, client):
        self.base = self.daemon.settled_fd_count(client)

    def after(self, what):
        self.daemon.check_fd_baseline(self.base, "fd count back to baseline after %s" % what)
        self.cases += 1


class FakeListener:
    """A unix listener standing in for a back-end.

    mode "none":   never accepts; connections() counts those waiting in the
                   backlog (a connect() to a unix socket completes there).
    mode "close":  accepts and closes at once.
    mode "silent": accepts and reads forever, never answers.
    """

    def __init__(self, path, mode="none", owner=None):
        self.path = path
        self.mode = mode
        unlink_if_exists(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)
        self.sock.listen(64)
        if owner is not None:
            os.chown(path, owner, owner)
        self.accepted = 0
        self.eofs = 0
        self.bytes = 0
        self._conns = []
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = None
        if mode != "none":
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self):
        while True:
            with self._lock:
                conns = list(self._conns)
            rl, _, _ = select.select([self.sock, self._stop_r] + conns, [], [])
            if self._stop_r in rl:
                return
            if self.sock in rl:
                s, _ = self.sock.accept()
                with self._lock:
                    self.accepted += 1
                    if self.mode == "close":
                        s.close()
                    else:
                        self._conns.append(s)
            for s in rl:
                if s in conns:
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    with self._lock:
                        self.bytes += len(data)
                        if not data:
                            self.eofs += 1
                            self._conns.remove(s)
                            s.close()

    def connections(self):
        """Connections made so far (accepted, or waiting in the backlog)."""
        if self.mode == "none":
            n = 0
            self.sock.setblocking(False)
            while True:
                try:
                    s, _ = self.sock.accept()
                except BlockingIOError:
                    break
                s.close()
                self.accepted += 1
            self.sock.setblocking(True)
            return self.accepted
        time.sleep(0.05)   # the accept thread catches up with the backlog
        with self._lock:
            return self.accepted

    def open_connections(self):
        with self._lock:
            return len(self._conns)

    def close(self):
        os.write(self._stop_w, b"x")
        if self._thread:
            self._thread.join(2)
        with self._lock:
            for s in self._conns:
                s.close()
            self._conns = []
        self.sock.close()
        closing([self._stop_r, self._stop_w])
        unlink_if_exists(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


ALL_METHODS_NAMING_A_VM = [
    # (method, params without vm, number of fds)
    ("vm.attach", {}, 0),
    ("vm.destroy", {}, 0),
    ("vm.memory.add", {"gpa": 0, "size": 65536, "fd": 0}, 1),
    ("vm.memory.remove", {"gpa": 0}, 0),
    ("vm.memory.list", {}, 0),
    ("device.add", {"device": "d0", "socket": "/nonexistent/d0.sock"}, 0),
    ("device.remove", {"device": "d0"}, 0),
    ("device.list", {}, 0),
    ("device.config.get", {"device": "d0", "offset": 0, "size": 4}, 0),
    ("device.config.set", {"device": "d0", "offset": 0, "data": "AAAAAA=="}, 0),
    ("device.start", {"device": "d0", "features": 0,
                      "vrings": [{"index": 0, "size": 128, "desc": 0, "avail": 4096,
                                  "used": 8192, "kick": 0, "call": 1}]}, 2),
    ("device.stop", {"device": "d0"}, 0),
    ("device.reset", {"device": "d0"}, 0),
    ("device.net.rarp", {"device": "d0", "mac": "52:54:00:12:34:56"}, 0),
    ("device.net.mtu", {"device": "d0", "mtu": 1500}, 0),
    ("vm.dirty_log.start", {}, 0),
    ("vm.dirty_log.stop", {}, 0),
    ("device.state.save", {"device": "d0", "fd": 0}, 1),
    ("device.state.load", {"device": "d0", "fd": 0}, 1),
    ("device.state.check", {"device": "d0"}, 0),
    ("shared_object.add", {"uuid": "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978", "fd": 0}, 1),
    ("shared_object.remove", {"uuid": "6f1c9e52-4b7a-4f0e-9a51-2d3c4b5a6978"}, 0),
    ("shared_object.list", {}, 0),
    ("device.backend_reply", {"device": "d0", "token": 1, "result": 0}, 0),
    ("events.subscribe", {}, 0),
    ("device.stats", {"device": "d0"}, 0),
]

"""JSON-RPC 2.0 client for vhubd's control socket (docs/control-api.md).

Framing: one compact JSON value per line.  A message carrying fds declares
"fds": N at top level and its fds ride as SCM_RIGHTS on the sendmsg of that
line.  Received fds are queued in arrival order and each message that
declares "fds": N takes N from the front.

    c = Client(path)
    vm = c.call("vm.create", {"vm": "vm0"})
    c.call("vm.memory.add", {"vm": "vm0", "gpa": 0, "size": n, "fd": 0}, fds=[memfd])
    p = c.request("device.stop", {...})        # async: send now
    res = p.result(timeout=5)                  # ... wait later
    ev = c.wait_event(lambda e: e["event"] == "device.disconnected", 5)

A reader thread receives everything; responses are matched by id (any
order), notifications (method "event") are queued for wait_event, and
responses with id null (framing/parse errors) are queued for
wait_null_response.
"""

import itertools
import json
import os
import socket
import threading
import time

MAX_FDS_PER_MSG = 253
U53 = (1 << 53) - 1

# JSON-RPC and contract error codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
NO_SUCH_VM = -32001
NO_SUCH_DEVICE = -32002
ALREADY_EXISTS = -32003
WRONG_STATE = -32004
NOT_SUPPORTED = -32005
BACKEND_ERROR = -32006
BACKEND_TIMEOUT = -32007
LIMIT_REACHED = -32008
BAD_REGION = -32009
BACKEND_NOT_ALLOWED = -32010
DAEMON_RESTARTED = -32011


class RpcError(Exception):
    """An error response: code, message, data (dict or None), fds it carried."""

    def __init__(self, code, message, data=None, fds=()):
        self.code = code
        self.message = message
        self.data = data
        self.fds = list(fds)
        super().__init__("%s: %s%s" % (code, message, " %s" % json.dumps(data) if data else ""))


class ClientError(Exception):
    """Transport trouble: closed connection, timeout, malformed message."""


class ConnectionClosed(ClientError):
    pass


def u64(value):
    """Parse a u64 field sent as an integer or a "0x…" hex string."""
    if isinstance(value, bool):
        raise ValueError("boolean is not a u64: %r" % value)
    if isinstance(value, int):
        v = value
    elif isinstance(value, str) and value[:2].lower() == "0x":
        v = int(value, 16)
    else:
        raise ValueError("not a u64 (int or 0x string): %r" % (value,))
    if not 0 <= v < 1 << 64:
        raise ValueError("u64 out of range: %r" % (value,))
    return v


def u64_json(v):
    """Encode a u64 as the contract wants: int up to 53 bits, else hex string."""
    v = int(v)
    return v if v <= U53 else "0x%x" % v


def encode(obj):
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


class Response:
    """A received response: result or error, plus the fds it carried (owned by you)."""

    def __init__(self, msg, fds):
        self.msg = msg
        self.id = msg.get("id")
        self.fds = fds
        self.error = msg.get("error")
        self.result = msg.get("result")

    def raise_for_error(self):
        if self.error is not None:
            e = self.error
            raise RpcError(e.get("code"), e.get("message"), e.get("data"), self.fds)
        return self


class Pending:
    """A request sent and not yet answered (the async variant)."""

    def __init__(self, client, req_id, method):
        self.client = client
        self.id = req_id
        self.method = method

    def response(self, timeout=None):
        return self.client.wait_response(self.id, timeout)

    def result(self, timeout=None):
        """The result (raises RpcError on an error response)."""
        return self.response(timeout).raise_for_error().result

    def result_fds(self, timeout=None):
        r = self.response(timeout).raise_for_error()
        return r.result, r.fds

    def done(self):
        return self.client.has_response(self.id)


class Client:
    def __init__(self, path, timeout=10.0, connect_timeout=5.0):
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise
                time.sleep(0.01)
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self._responses = {}      # id -> Response
        self._null = []           # responses with id null
        self._batches = []        # array responses
        self._events = []         # notification params
        self._other = []          # anything else (unexpected requests, junk)
        self._fdq = []            # received fds not yet claimed
        self.closed = False       # peer closed (EOF) or reader failed
        self.close_reason = None
        self.protocol_errors = []  # framing trouble the *daemon* caused
        self._reader = threading.Thread(target=self._read_loop, name="vhub-client-reader",
                                        daemon=True)
        self._reader.start()

    # ---- sending ----
    def send_raw(self, data, fds=()):
        """Send bytes exactly as given (fds attached to the first byte)."""
        data = bytes(data)
        nosig = socket.MSG_NOSIGNAL
        try:
            with self._send_lock:
                if fds:
                    n = socket.send_fds(self.sock, [data], list(fds), nosig, None)
                    # A partial write keeps the fds with the first chunk; the
                    # rest follows plain.
                    if n < len(data):
                        self.sock.sendall(data[n:], nosig)
                else:
                    self.sock.sendall(data, nosig)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ConnectionClosed("send failed: the daemon closed the connection (%s)" % e) from e

    def _next_id(self):
        return next(self._ids)

    def request(self, method, params=None, fds=(), req_id=None):
        """Send a request now; returns a Pending to wait on later."""
        if req_id is None:
            req_id = self._next_id()
        msg = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        if fds:
            if len(fds) > MAX_FDS_PER_MSG:
                raise ValueError("at most %d fds per message" % MAX_FDS_PER_MSG)
            msg["fds"] = len(fds)
        self.send_raw(encode(msg), fds)
        return Pending(self, req_id, method)

    def call(self, method, params=None, fds=(), timeout=None):
        """Request and wait: the result, or RpcError."""
        return self.request(method, params, fds).result(timeout)

    def call_fds(self, method, params=None, fds=(), timeout=None):
        """Like call() but returns (result, fds received with the response)."""
        return self.request(method, params, fds).result_fds(timeout)

    def notify(self, method, params=None):
        msg = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send_raw(encode(msg))

    def batch(self, calls, timeout=None):
        """Send [(method, params)...] as one batch; returns the response array
        (raw dicts, in the daemon's order) once it arrives."""
        ids = []
        reqs = []
        for method, params in calls:
            i = self._next_id()
            ids.append(i)
            r = {"jsonrpc": "2.0", "id": i, "method": method}
            if params is not None:
                r["params"] = params
            reqs.append(r)
        self.send_raw(encode(reqs))
        want = set(ids)

        def match():
            for b in self._batches:
                if {m.get("id") for m in b if isinstance(m, dict)} & want:
                    self._batches.remove(b)
                    return b
            return None
        return self._wait(match, timeout, "batch response for ids %s" % ids)

    # ---- receiving ----
    def _read_loop(self):
        buf = b""
        try:
            while True:
                data, fds, flags, _ = socket.recv_fds(self.sock, 65536, MAX_FDS_PER_MSG)
                if flags & socket.MSG_CTRUNC:
                    self.protocol_errors.append("MSG_CTRUNC: control data truncated")
                with self._lock:
                    self._fdq.extend(fds)
                    if not data:
                        self.closed = True
                        self.close_reason = "EOF"
                        self._lock.notify_all()
                        return
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        self._dispatch(line)
                    self._lock.notify_all()
        except OSError as e:
            with self._lock:
                self.closed = True
                self.close_reason = "error: %s" % e
                self._lock.notify_all()

    def _take_fds(self, n):
        if not isinstance(n, int) or n < 0 or n > len(self._fdq):
            self.protocol_errors.append("message declares fds=%r with %d queued"
                                        % (n, len(self._fdq)))
            n = len(self._fdq) if not isinstance(n, int) or n < 0 else min(n, len(self._fdq))
        taken, self._fdq = self._fdq[:n], self._fdq[n:]
        return taken

    def _dispatch(self, line):
        if not line.strip():
            return
        try:
            msg = json.loads(line)
        except ValueError as e:
            self.protocol_errors.append("invalid JSON from daemon: %s: %r" % (e, line[:200]))
            return
        if isinstance(msg, list):
            self._batches.append(msg)
            return
        if not isinstance(msg, dict):
            self._other.append(msg)
            return
        fds = self._take_fds(msg["fds"]) if "fds" in msg else []
        if msg.get("jsonrpc") != "2.0":
            self.protocol_errors.append("message without jsonrpc 2.0: %r" % (msg,))
        if "method" in msg and "id" not in msg:
            if msg["method"] == "event":
                params = dict(msg.get("params") or {})
                if fds:
                    params["_fds"] = fds
                self._events.append(params)
            else:
                self._other.append(msg)
            return
        if "id" in msg and ("result" in msg or "error" in msg):
            r = Response(msg, fds)
            if msg["id"] is None:
                self._null.append(r)
            else:
                self._responses[msg["id"]] = r
            return
        self._other.append(msg)

    def _wait(self, pick, timeout, what):
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                v = pick()
                if v is not None:
                    return v
                if self.closed:
                    raise ConnectionClosed("connection closed (%s) while waiting for %s"
                                           % (self.close_reason, what))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClientError("timed out after %.1fs waiting for %s" % (timeout, what))
                self._lock.wait(left)

    def has_response(self, req_id):
        with self._lock:
            return req_id in self._responses

    def wait_response(self, req_id, timeout=None):
        return self._wait(lambda: self._responses.pop(req_id, None), timeout,
                          "response to id %r" % (req_id,))

    def wait_null_response(self, timeout=None):
        """The next response with id null (framing/parse errors)."""
        return self._wait(lambda: self._null.pop(0) if self._null else None, timeout,
                          "a response with id null")

    def wait_event(self, predicate=None, timeout=None):
        """The first queued event (params dict) matching predicate; removes it."""
        def pick():
            for i, ev in enumerate(self._events):
                if predicate is None or predicate(ev):
                    return self._events.pop(i)
            return None
        return self._wait(pick, timeout, "an event")

    def events(self):
        """Every queued event, removed from the queue."""
        with self._lock:
            evs, self._events = self._events, []
            return evs

    def wait_closed(self, timeout=None):
        """True once the daemon closed this connection."""
        try:
            self._wait(lambda: True if self.closed else None, timeout, "close")
        except ConnectionClosed:
            pass
        return self.closed

    def unclaimed_fds(self):
        with self._lock:
            return list(self._fdq)

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._reader.join(2)
        with self._lock:
            for fd in self._fdq:
                os.close(fd)
            self._fdq = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


__all__ = ["Client", "RpcError", "ClientError", "ConnectionClosed", "Pending", "Response",
           "u64", "u64_json", "encode"] + [k for k in dir() if k.isupper()]

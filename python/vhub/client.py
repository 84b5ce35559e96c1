# SPDX-License-Identifier: MIT
"""Blocking client for vhubd's control socket (JSON-RPC 2.0 with fds).

    import vhub
    c = vhub.Client()                                  # the default socket
    c.call("vm.create", {"vm": "vm0"})
    c.call("vm.memory.add", {"vm": "vm0", "gpa": 0, "size": n, "fd": 0}, fds=[memfd])
    res, fds = c.call_fds("vm.dirty_log.start", {"vm": "vm0"})
    p = c.request("device.stop", {...})                # send now ...
    res = p.result(timeout=5)                          # ... wait later
    ev = c.wait_event(lambda e: e["event"] == "device.disconnected", 5)

A reader thread receives everything: responses are matched by id (they may
come in any order), events are queued for wait_event()/events(), responses
with id null (the daemon refusing our framing) for wait_null_response().
Calls may come from several threads.

fds: what you pass in ``fds=`` stays yours (the kernel copies them into the
message).  fds that come back (call_fds, Response.fds, RpcError.fds,
Event.fds) are yours to close.  Timeouts are per call, in seconds (None: the
client's default).  Errors: vhub.errors.
"""

import itertools
import os
import socket
import threading
import time

from . import framing
from .errors import ClientError, ConnectionClosed, ProtocolError, RpcError, Timeout
from .framing import MAX_FDS_PER_MSG, encode, u64, u64_json  # noqa: F401 (re-exported)

ABANDONED_MAX = 4096
MAX_QUEUED_MESSAGES = 65536   # responses + events read and not fetched


def default_socket_path():
    """$VHUB_SOCKET if set; else /run/vhub/control.sock for root; else
    $XDG_RUNTIME_DIR/vhub/control.sock; else /run/vhub/control.sock."""
    env = os.environ.get("VHUB_SOCKET")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() == 0 or not xdg:
        return "/run/vhub/control.sock"
    return os.path.join(xdg, "vhub", "control.sock")


class Response:
    """A received response: result or error, plus the fds it carried (yours)."""

    def __init__(self, msg, fds):
        self.msg = msg
        self.id = msg.get("id")
        self.fds = fds
        self.error = msg.get("error")
        self.result = msg.get("result")

    def raise_for_error(self):
        if self.error is not None:
            raise RpcError.from_error(self.error, self.fds)
        return self


class Pending:
    """A request sent and not yet answered."""

    def __init__(self, client, req_id, method):
        self.client = client
        self.id = req_id
        self.method = method

    def response(self, timeout=None):
        """Wait for the Response.  A Timeout leaves it pending (wait again, or
        abandon())."""
        return self.client.wait_response(self.id, timeout)

    def result(self, timeout=None):
        """The result (raises RpcError on an error response)."""
        return self.response(timeout).raise_for_error().result

    def result_fds(self, timeout=None):
        r = self.response(timeout).raise_for_error()
        return r.result, r.fds

    def done(self):
        return self.client.has_response(self.id)

    def abandon(self):
        """Drop the response, now or when it arrives (its fds are closed)."""
        self.client.abandon(self.id)


class Client:
    """One connection to vhubd.

    path: the control socket (None: default_socket_path()).  timeout: the
    default per-call timeout in seconds.  connect_timeout: how long to keep
    retrying while the socket does not exist yet or refuses (a daemon that
    is starting); 0 tries once.  sock: an already connected AF_UNIX stream
    socket to use instead (the client owns it).
    """

    def __init__(self, path=None, timeout=10.0, connect_timeout=5.0, sock=None):
        self.timeout = timeout
        if sock is None:
            self.path = default_socket_path() if path is None else path
            sock = _connect(self.path, connect_timeout)
        else:
            self.path = path
        self.sock = sock
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._send_lock = threading.Lock()
        self._decoder = framing.Decoder()
        self._responses = {}      # id -> Response
        self._abandoned = set()   # ids whose response is dropped on arrival
        self._null = []           # responses with id null
        self._batches = []        # array responses
        self._events = []         # framing.Event, arrival order
        self._other = []          # anything else (requests to us, other notifications)
        self.closed = False       # peer closed (EOF), framing broken, or close()d
        self._broken = False      # closed because the daemon broke the framing
        self.close_reason = None
        self.protocol_errors = []  # framing violations the *daemon* committed
        self._reader = threading.Thread(target=self._read_loop, name="vhub-client-reader",
                                        daemon=True)
        self._reader.start()

    # ---- sending ----
    def send_raw(self, data, fds=()):
        """Send bytes exactly as given (fds attached to the first byte)."""
        data = bytes(data)
        nosig = socket.MSG_NOSIGNAL
        if self.closed:
            raise self._closed_error("sending")
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
        except OSError as e:
            if self.closed:
                raise self._closed_error("sending") from e
            raise

    def _next_id(self):
        return next(self._ids)

    def request(self, method, params=None, fds=(), req_id=None):
        """Send a request now; returns a Pending to wait on later."""
        if req_id is None:
            req_id = self._next_id()
        self.send_raw(framing.request_line(req_id, method, params, len(fds)), fds)
        return Pending(self, req_id, method)

    def call(self, method, params=None, fds=(), timeout=None):
        """Request and wait: the result, or RpcError.  Fds the response carries
        are closed (use call_fds to get them)."""
        res, rfds = self.call_fds(method, params, fds, timeout)
        framing.close_fds(rfds)
        return res

    def call_fds(self, method, params=None, fds=(), timeout=None):
        """Like call() but returns (result, fds received with the response)."""
        p = self.request(method, params, fds)
        try:
            return p.result_fds(timeout)
        except Timeout:
            p.abandon()
            raise

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
            for i, b in enumerate(self._batches):
                if {m.get("id") for m in b if isinstance(m, dict)} & want:
                    del self._batches[i]
                    return b
            return None
        return self._wait(match, timeout, "batch response for ids %s" % ids)

    # ---- receiving ----
    def _read_loop(self):
        try:
            while True:
                data, anc, flags, _ = self.sock.recvmsg(framing.RECV_SIZE, framing.ANC_SIZE,
                                                        socket.MSG_CMSG_CLOEXEC)
                fds = framing.fds_from_ancdata(anc)
                with self._lock:
                    if flags & socket.MSG_CTRUNC:
                        framing.close_fds(fds)
                        self._decoder.close()
                        raise ProtocolError("fds lost: control data truncated (MSG_CTRUNC)")
                    if not data:
                        framing.close_fds(fds)
                        self._mark_closed("EOF")
                        return
                    for msg, mfds in self._decoder.feed(data, fds):
                        self._dispatch(msg, mfds)
                    if len(self._responses) + len(self._events) + len(self._null) + \
                            len(self._batches) + len(self._other) > MAX_QUEUED_MESSAGES:
                        raise ProtocolError("more than %d messages queued and not fetched"
                                            % MAX_QUEUED_MESSAGES)
                    self._lock.notify_all()
        except ProtocolError as e:
            with self._lock:
                self.protocol_errors.append(str(e))
                self._broken = True
                self._mark_closed("protocol error: %s" % e)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError as e:
            with self._lock:
                self._mark_closed("error: %s" % e)

    def _mark_closed(self, reason):
        """Under the lock."""
        if not self.closed:
            self.closed = True
            self.close_reason = reason
        self._decoder.close()
        self._lock.notify_all()

    def _closed_error(self, doing):
        cls = ProtocolError if self._broken else ConnectionClosed
        return cls("connection closed (%s) while %s" % (self.close_reason, doing))

    def _dispatch(self, msg, fds):
        """Under the lock."""
        kind = framing.classify(msg)
        if kind == "batch":
            framing.close_fds(fds)    # the daemon refuses fd results inside batches
            self._batches.append(msg)
        elif kind == "event":
            self._events.append(framing.make_event(msg, fds))
        elif kind == "null":
            self._null.append(Response(msg, fds))
        elif kind == "response":
            if msg["id"] in self._abandoned:
                self._abandoned.discard(msg["id"])
                framing.close_fds(fds)
            else:
                self._responses[msg["id"]] = Response(msg, fds)
        else:
            framing.close_fds(fds)
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
                    raise self._closed_error("waiting for %s" % what)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout("timed out after %.1fs waiting for %s" % (timeout, what))
                self._lock.wait(left)

    def has_response(self, req_id):
        with self._lock:
            return req_id in self._responses

    def wait_response(self, req_id, timeout=None):
        return self._wait(lambda: self._responses.pop(req_id, None), timeout,
                          "response to id %r" % (req_id,))

    def abandon(self, req_id):
        """Forget a request: its response is dropped (fds closed) now or when
        it arrives."""
        with self._lock:
            r = self._responses.pop(req_id, None)
            if r is not None:
                framing.close_fds(r.fds)
            elif len(self._abandoned) < ABANDONED_MAX:
                self._abandoned.add(req_id)

    def wait_null_response(self, timeout=None):
        """The next response with id null (framing/parse errors)."""
        return self._wait(lambda: self._null.pop(0) if self._null else None, timeout,
                          "a response with id null")

    def wait_event(self, predicate=None, timeout=None):
        """The first queued event (an Event: its params) matching predicate;
        removes it."""
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
        """fds received that no message has claimed (yet)."""
        with self._lock:
            return self._decoder.queued_fds

    def close(self):
        """Close the connection and every fd received and not handed out."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(2)
        self.sock.close()
        with self._lock:
            self._mark_closed(self.close_reason or "closed")
            for r in list(self._responses.values()) + self._null:
                framing.close_fds(r.fds)
            for ev in self._events:
                framing.close_fds(ev.fds)
            self._responses, self._null, self._events, self._batches = {}, [], [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _connect(path, connect_timeout):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                sock.close()
                raise
            time.sleep(0.01)
        except BaseException:
            sock.close()
            raise


__all__ = ["Client", "Pending", "Response", "default_socket_path"]

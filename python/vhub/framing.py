# SPDX-License-Identifier: MIT
"""The control API's framing and value conventions, without any I/O.

Framing ("Transport and framing" in the contract): one compact JSON value per
line.  A message that carries fds says ``"fds": N`` at top level and its fds
travel as SCM_RIGHTS with the bytes of that line.  The receiver queues fds
in arrival order and each message takes its N from the front.  Fewer queued
fds than a message declares, or fds queued when no partial line remains,
is a framing violation.

Decoder turns what recvmsg() returned (bytes and fds) into messages with
their fds; both clients (vhub.client, vhub.aio) use it, so they frame
alike.  encode()/request_line() build what goes out.
"""

import json
import os
import socket
import struct

from .errors import ProtocolError

MAX_FDS_PER_MSG = 253             # the kernel's limit for one sendmsg (SCM_MAX_FD)
MAX_LINE = 64 << 20               # one incoming JSON line
MAX_QUEUED_FDS = 1024             # received, not yet claimed by a message
RECV_SIZE = 65536
# recvmsg() control buffer for the most fds one message can carry
ANC_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_MSG * struct.calcsize("i"))
U53 = (1 << 53) - 1


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
    """One line: compact JSON (no raw newline can appear inside) and "\\n"."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def request_line(req_id, method, params=None, n_fds=0):
    """The line of one request; "fds": n_fds when it carries fds."""
    if not isinstance(method, str):
        raise TypeError("method must be a string")
    if not 0 <= n_fds <= MAX_FDS_PER_MSG:
        raise ValueError("at most %d fds per message" % MAX_FDS_PER_MSG)
    msg = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    if n_fds:
        msg["fds"] = n_fds
    return encode(msg)


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fds_from_ancdata(ancdata):
    """The fds of recvmsg()'s ancillary data, in order."""
    fds = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(data) // struct.calcsize("i")
            fds.extend(struct.unpack("%di" % n, data[:n * struct.calcsize("i")]))
    return fds


class Event(dict):
    """An event notification: its params (``event``, ``vm``, ...).  The fds
    it carried (yours to close) are ``.fds``, also under the key "_fds"."""

    @property
    def name(self):
        return self.get("event")

    @property
    def fds(self):
        return self.get("_fds", [])


class Decoder:
    """Bytes and fds in, (message, fds) out, as the contract frames them.

    feed() takes what one recvmsg() returned.  fds ride with the first byte
    of their line, so they are queued before the bytes are cut into lines.
    Returns the complete messages in order, each with the fds it declared
    (a batch array: the fds its members declared, in order).  Raises
    ProtocolError on a framing violation; the decoder is then closed: every
    fd it held is closed and further feeds raise again.  The fds of
    messages already returned are the caller's.
    """

    def __init__(self, max_line=MAX_LINE, max_queued_fds=MAX_QUEUED_FDS):
        self.max_line = max_line
        self.max_queued_fds = max_queued_fds
        self._buf = bytearray()
        self._fdq = []
        self.error = None

    @property
    def queued_fds(self):
        return list(self._fdq)

    @property
    def partial(self):
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def feed(self, data, fds=()):
        if self.error is not None:
            close_fds(fds)
            raise ProtocolError("framing violation from the daemon: %s" % self.error)
        self._fdq.extend(fds)
        out = []
        try:
            if len(self._fdq) > self.max_queued_fds:
                self._fail("%d fds queued and not claimed (limit %d)"
                           % (len(self._fdq), self.max_queued_fds))
            self._buf += data
            start = 0
            while True:
                nl = self._buf.find(b"\n", start)
                if nl < 0:
                    break
                line = bytes(self._buf[start:nl])
                start = nl + 1
                msg = self._parse(line)
                if msg is not None:
                    out.append((msg, self._take(msg)))
            del self._buf[:start]
            if len(self._buf) > self.max_line:
                self._fail("a line longer than %d bytes" % self.max_line)
            if not self._buf and self._fdq:
                self._fail("%d fd(s) received that no message declared" % len(self._fdq))
        except ProtocolError:
            for _, taken in out:
                close_fds(taken)
            raise
        return out

    def close(self):
        """Close every fd still queued; the decoder accepts nothing more."""
        close_fds(self._fdq)
        self._fdq = []
        self._buf = bytearray()
        if self.error is None:
            self.error = "closed"

    def _fail(self, why):
        self.close()
        self.error = why
        raise ProtocolError("framing violation from the daemon: %s" % why)

    def _parse(self, line):
        if not line.strip():
            return None       # a blank line carries nothing
        try:
            msg = json.loads(line)
        except ValueError as e:
            self._fail("invalid JSON (%s): %r" % (e, line[:200]))
        if not isinstance(msg, (dict, list)):
            self._fail("a line that is neither an object nor an array: %r" % (line[:200],))
        return msg

    def _take(self, msg):
        members = msg if isinstance(msg, list) else [msg]
        want = 0
        for m in members:
            if not isinstance(m, dict) or "fds" not in m:
                continue
            n = m["fds"]
            if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_FDS_PER_MSG:
                self._fail("bad \"fds\": %r" % (n,))
            want += n
        if want > len(self._fdq):
            self._fail("a message declares %d fd(s), %d received" % (want, len(self._fdq)))
        taken, self._fdq = self._fdq[:want], self._fdq[want:]
        return taken


def classify(msg):
    """What a decoded message is: "response" (id and result/error), "null"
    (an error with id null: the daemon refusing our framing), "event", "batch",
    "notification" (another method without id), or "other"."""
    if isinstance(msg, list):
        return "batch"
    if "id" in msg and "method" not in msg and ("result" in msg or "error" in msg):
        return "null" if msg["id"] is None else "response"
    if "method" in msg and "id" not in msg:
        return "event" if msg["method"] == "event" else "notification"
    return "other"


def make_event(msg, fds):
    params = msg.get("params")
    ev = Event(params if isinstance(params, dict) else {})
    if fds:
        ev["_fds"] = list(fds)
    return ev

"""A QMP (QEMU Machine Protocol) client over a unix socket, stdlib only.

    q = Qmp(path)                          # greeting + qmp_capabilities
    q.execute("query-status")              # -> {"running": True, ...}
    q.execute("stop", timeout=3.0)         # QmpTimeout if no answer in time
    sent = q.send("stop"); ...; q.answer(sent, timeout=3.0)   # answered late
    q.events                               # every event seen so far

Every wait has a deadline: a QEMU whose main loop is blocked (a hung
vhost-user back-end) shows up as QmpTimeout, never as a hang of the test.
"""

import json
import select
import socket
import time


class QmpError(Exception):
    """QEMU answered with an error (its "class" and "desc")."""

    def __init__(self, cmd, error):
        super().__init__("%s: %s: %s" % (cmd, error.get("class"), error.get("desc")))
        self.error = error


class QmpTimeout(TimeoutError):
    pass


class Qmp:
    def __init__(self, path, timeout=10.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.buf = b""
        self.events = []
        self._next_id = 1
        try:
            self.sock.connect(path)
            greeting = self._read_message(time.monotonic() + timeout, "the greeting")
            if "QMP" not in greeting:
                raise RuntimeError("not a QMP greeting: %r" % greeting)
            self.version = greeting["QMP"].get("version", {}).get("qemu")
            self.execute("qmp_capabilities", timeout=timeout)
        except BaseException:
            self.sock.close()
            raise

    def execute(self, cmd, args=None, timeout=10.0):
        """Run cmd; its "return" value, QmpError on an error, QmpTimeout
        when no answer came within timeout seconds."""
        return self.answer(self.send(cmd, args), timeout)

    def send(self, cmd, args=None):
        """Send cmd without waiting (a command QEMU answers late, while the
        test does something else); answer() waits for its answer."""
        msg_id = self._next_id
        self._next_id += 1
        msg = {"execute": cmd, "id": msg_id}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return (msg_id, cmd)

    def answer(self, sent, timeout=10.0):
        """The "return" value of a command send() sent (QmpError,
        QmpTimeout as execute())."""
        msg_id, cmd = sent
        deadline = time.monotonic() + timeout
        while True:
            m = self._read_message(deadline, cmd)
            if "event" in m:
                self.events.append(m)
            elif m.get("id") == msg_id:
                if "error" in m:
                    raise QmpError(cmd, m["error"])
                return m.get("return")

    def wait_event(self, name, timeout=10.0):
        """The first event called name (already seen or arriving in time)."""
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            m = self._read_message(deadline, "event %s" % name)
            if "event" in m:
                self.events.append(m)

    def _read_message(self, deadline, what):
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise QmpTimeout("QMP %s: no answer from %s in time" % (what, self.path))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP %s: %s closed" % (what, self.path))
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

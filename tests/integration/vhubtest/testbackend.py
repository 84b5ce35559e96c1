"""vhub-test-backend: the project's scriptable vhost-user back-end (tests/backend).

    tb = TestBackend([sock0, sock1], args=["--complete", "random", "--delay-ms", "20"])
    with tb:                                  # start(); stop() (SIGTERM) on exit
        ...front-end handshakes on sock0...
        tb.misbehave("ADD_MEM_REG", "refuse", count=1)
        uuid = tb.export(size=4096, fill="ab")        # SHARED_OBJECT_ADD
        r = tb.lookup(uuid, write="c0ffee")           # SHARED_OBJECT_LOOKUP
        tb.regions(0); tb.vrings(0); tb.requests(0)
        tb.kill(); tb.restart()                       # SIGKILL, same sockets

The binary comes from $VHUB_TEST_BACKEND (meson sets it); without it the test
is skipped (exit 77).  The process runs through procs.spawn(): pdeathsig and
an atexit sweep mean it never outlives the test.  The control protocol (one
JSON object per line) is documented in tests/backend/README.md; command()
sends any object and returns the answer.
"""

import json
import os
import select
import shutil
import signal
import socket
import time

from . import procs
from .backends import Backend
from .testing import Skip

BINARY_ENV = "VHUB_TEST_BACKEND"


class TestBackendError(Exception):
    """A control command answered {"ok": false}."""

    def __init__(self, cmd, answer):
        self.cmd = cmd
        self.answer = answer
        super().__init__("%s: %s" % (cmd.get("cmd"), answer.get("error")))


class TestBackend(Backend):
    """vhub-test-backend serving `sockets` (listen) and/or `connect` (client mode)."""
    name = "vhub-test-backend"

    def __init__(self, sockets=(), connect=(), args=(), log_dir=None, control=None):
        sockets, connect = list(sockets), list(connect)
        if not sockets and not connect:
            raise ValueError("TestBackend needs at least one socket or connect path")
        if log_dir is None:
            log_dir = os.path.dirname((sockets or connect)[0])
        super().__init__(sockets, log_dir=log_dir)
        self.connect_paths = connect
        self.args = list(args)
        self.control_path = control or os.path.join(
            log_dir, "%s.ctl" % os.path.basename(self.log_path)[:-len(".log")])
        self._ctl = None
        self._ctl_buf = b""

    # ---- process ----

    @property
    def listens(self):
        return bool(self.sockets)

    @property
    def binary(self):
        path = os.environ.get(BINARY_ENV)
        if not path or not os.access(path, os.X_OK):
            raise Skip("%s not set or not executable (build tests/backend)" % BINARY_ENV)
        return path

    def argv(self):
        argv = [self.binary]
        for s in self.sockets:
            argv += ["--socket", s]
        for s in self.connect_paths:
            argv += ["--connect", s]
        return argv + ["--control", self.control_path] + self.args

    def start(self, args=None, wait=True, timeout=10.0):
        """Start (args replaces the extra arguments if given); waits for the
        control socket, which the back-end binds after its vhost-user ones."""
        if isinstance(args, bool):  # start(False): Backend's positional wait
            args, wait = None, args
        if args is not None:
            self.args = list(args)
        self._close_control()
        return super().start(wait=wait, timeout=timeout)

    def wait_for_socket(self, timeout=10.0):
        super().wait_for_socket(timeout)

        def ready():
            if self.proc.poll() is not None:
                self.print_log()
                raise RuntimeError("%s exited with %s before its control socket listened"
                                   % (self.name, self.proc.returncode))
            return procs.unix_listening(self.control_path)
        procs.wait_until(ready, timeout, what="%s control socket" % self.name)

    def kill(self):
        """SIGKILL, as a crash (sockets stay; restart() binds them again)."""
        self._close_control()
        return super().kill()

    def stop(self, timeout=10.0):
        """SIGTERM and wait; returns the exit code (0 on a clean exit)."""
        self._close_control()
        return super().stop(timeout)

    def restart(self, args=None, wait=True, timeout=10.0):
        self.kill()
        return self.start(args=args, wait=wait, timeout=timeout)

    def sigstop(self):
        """Freeze the whole process (hangs every socket at once)."""
        os.kill(self.pid, signal.SIGSTOP)

    def sigcont(self):
        os.kill(self.pid, signal.SIGCONT)

    # ---- control protocol ----

    def _close_control(self):
        if self._ctl is not None:
            self._ctl.close()
        self._ctl = None
        self._ctl_buf = b""

    def _control(self):
        if self._ctl is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.control_path)
            self._ctl = s
        return self._ctl

    def command(self, cmd, check=True, timeout=None):
        """Send one command (a dict) and return its answer (a dict).  Raises
        TestBackendError if check and the answer is not ok.  Commands that
        wait for the front-end's reply take up to their timeout_ms."""
        if timeout is None:
            timeout = cmd.get("timeout_ms", 5000) / 1000.0 + 5.0
        s = self._control()
        s.settimeout(timeout)
        try:
            s.sendall(json.dumps(cmd, separators=(",", ":")).encode() + b"\n")
            deadline = time.monotonic() + timeout
            while b"\n" not in self._ctl_buf:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError("%s closed its control socket" % self.name)
                self._ctl_buf += chunk
        except (OSError, ConnectionError):
            self._close_control()
            raise
        line, self._ctl_buf = self._ctl_buf.split(b"\n", 1)
        answer = json.loads(line)
        if check and not answer.get("ok"):
            raise TestBackendError(cmd, answer)
        return answer

    def _cmd(self, name, sock=None, **kw):
        cmd = {"cmd": name}
        if sock is not None:
            cmd["socket"] = sock
        cmd.update({k: v for k, v in kw.items() if v is not None})
        return self.command(cmd)

    # ---- reports ----

    def status(self):
        return self.command({"cmd": "status"})

    def socket_status(self, sock=0):
        return self._cmd("socket", sock)["socket"]

    def conn(self, sock=0):
        """The current connection's state, or None if no front-end."""
        return self.socket_status(sock)["conn"]

    def connected(self, sock=0):
        return self.socket_status(sock)["connected"]

    def connections(self, sock=0):
        return self.socket_status(sock)["connections"]

    def regions(self, sock=0):
        """[{gpa, size, uaddr, mmap_offset}] of the current connection."""
        return self._cmd("regions", sock)["regions"]

    def vrings(self, sock=0):
        return self._cmd("vrings", sock)["vrings"]

    def requests(self, sock=0):
        """{"GET_FEATURES": n, ...}: requests received on that socket, all connections."""
        return self.socket_status(sock)["requests"]

    def completed(self, sock=0):
        return self.socket_status(sock)["completed"]

    def shared_objects(self, sock=0):
        return self.socket_status(sock)["shared_objects"]

    def wait_until(self, pred, timeout=10.0, what="back-end condition"):
        return procs.wait_until(pred, timeout, interval=0.01, what=what)

    def wait_connected(self, sock=0, timeout=10.0, connections=None):
        """Until a front-end is connected (and, if given, the socket has seen
        at least that many connections)."""
        def ok():
            st = self.socket_status(sock)
            return st["connected"] and (connections is None or st["connections"] >= connections)
        return self.wait_until(ok, timeout, "front-end connection on socket %d" % sock)

    def wait_request(self, request, count=1, sock=0, timeout=10.0):
        """Until `request` has been received `count` times in total."""
        return self.wait_until(lambda: self.requests(sock).get(request, 0) >= count, timeout,
                               "%d x %s on socket %d" % (count, request, sock))

    # ---- behaviour ----

    def misbehave(self, request, action, sock=0, count=None, arg=None, **kw):
        """action: refuse, bad-flags, wrong-request, oversized, extra-fds,
        silence, close, hang, delay (delay_ms=N).  count: the next N times
        (default: forever)."""
        return self._cmd("misbehave", sock, request=request, action=action, count=count,
                         arg=arg, **kw)

    def clear_misbehave(self, sock=0, request=None):
        return self._cmd("clear-misbehave", sock, request=request)

    def hang(self, sock=0):
        return self._cmd("hang", sock)

    def resume(self, sock=0):
        return self._cmd("resume", sock)

    def disconnect(self, sock=0):
        return self._cmd("disconnect", sock)

    def set_complete(self, order=None, delay_ms=None):
        return self._cmd("set-complete", order=order, delay_ms=delay_ms)

    # ---- shared objects and the back-end channel ----

    def export(self, sock=0, uuid=None, size=4096, fill="ab", send=True, **kw):
        """Export a memfd of `size` bytes filled with hex `fill`; returns its UUID."""
        return self._cmd("export", sock, uuid=uuid, size=size, fill=fill, send=send, **kw)["uuid"]

    def remove(self, uuid, sock=0, send=True, **kw):
        return self._cmd("remove", sock, uuid=uuid, send=send, **kw)

    def lookup(self, uuid, sock=0, read=16, write=None, offset=0, **kw):
        """SHARED_OBJECT_LOOKUP: {result, fd, size, data (hex), wrote}."""
        return self._cmd("lookup", sock, uuid=uuid, read=read, write=write, offset=offset, **kw)

    def config_change(self, sock=0, **kw):
        return self._cmd("config-change", sock, **kw)

    def host_notifier(self, queue=0, sock=0, fd=True, **kw):
        return self._cmd("host-notifier", sock, queue=queue, fd=fd, **kw)

    def shmem_map(self, sock=0, **kw):
        return self._cmd("shmem-map", sock, **kw)

    def shmem_unmap(self, sock=0, **kw):
        return self._cmd("shmem-unmap", sock, **kw)

    def iotlb(self, sock=0, **kw):
        return self._cmd("iotlb", sock, **kw)

    def vring_call(self, queue=0, sock=0, **kw):
        return self._cmd("vring-call", sock, queue=queue, **kw)

    def vring_err(self, queue=0, sock=0, **kw):
        return self._cmd("vring-err", sock, queue=queue, **kw)

    def backend_request(self, request, sock=0, payload=None, **kw):
        """Any back-end request by name, payload as hex."""
        return self._cmd("backend-request", sock, request=request, payload=payload, **kw)

    def flood(self, sock=0, kind="messages", count=1000):
        return self._cmd("flood", sock, kind=kind, count=count)


class AsyncCommand:
    """One test back-end command on a control connection of its own, so the
    test keeps going while the back-end waits for the daemon's reply (a
    lookup, a forwarded request).  result() waits for the answer."""

    def __init__(self, tb, cmd):
        self.cmd = cmd
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(tb.control_path)
        self.started = time.monotonic()
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")
        self.buf = b""
        self.answer = None
        self.elapsed = None

    def done(self):
        return b"\n" in self.buf or bool(select.select([self.sock], [], [], 0)[0])

    def result(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError("no answer to %s within %.1fs" % (self.cmd, timeout))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("test back-end closed its control connection")
            self.buf += chunk
        self.elapsed = time.monotonic() - self.started
        self.sock.close()
        self.answer = json.loads(self.buf.split(b"\n", 1)[0])
        return self.answer


class TestBackendAs(TestBackend):
    """vhub-test-backend running as uid (setpriv: with groups as its
    supplementary groups, none by default; killed with its parent), from
    binary, a copy that uid can execute."""

    def __init__(self, binary, uid, groups=(), **kw):
        self._binary = binary
        self.uid = uid
        self.groups = list(groups)
        super().__init__(**kw)

    @property
    def binary(self):
        return self._binary

    def argv(self):
        groups = ["--groups", ",".join(map(str, self.groups))] if self.groups else ["--clear-groups"]
        return [shutil.which("setpriv"), "--reuid", str(self.uid), "--regid", str(self.uid)] + groups + \
            ["--pdeathsig", "KILL", "--"] + super().argv()

"""The service manager's side of sd_notify and the fd store, played by the
test: these machines do not run systemd as PID 1, so a test that restarts
vhubd "as systemd would" needs this (docs/restart.md, "How the tests play
systemd").

    sm = t.enter(ServiceManager(t.tmpdir(), fd_store_max=4096))
    sm.start([vhubd, ...])           # NOTIFY_SOCKET set; LISTEN_* if the store holds fds
    sm.wait_ready()                  # READY=1 from the main pid
    sm.names(), sm.count()           # what the store holds, in the order it would pass it
    sm.restart()                     # SIGTERM, wait, start again with the stored fds
    sm.restart(sig=signal.SIGKILL)   # a crash with Restart=on-failure: the store is kept too
    sm.stop_unit()                   # `systemctl stop`: SIGTERM, wait, then the store is emptied
    sm.hold(); ...; sm.release(cut)  # a crash between two messages: what came from cut on is lost

What it does is systemd 252's behaviour as read in its src/core/service.c
and manager.c (the facts, with the functions they come from, are in
docs/restart.md):

- One datagram socket (a path, or "@name" in the abstract namespace) with
  SO_PASSCRED.  A datagram without credentials, with a NUL byte, longer than
  4096 bytes (NOTIFY_BUFFER_MAX) or whose fds were cut short (MSG_CTRUNC)
  is dropped, its fds closed.  NotifyAccess=main: only the main pid is heard
  (others are recorded in `rejected`).
- READY=1, STOPPING=1, STATUS=, WATCHDOG=1, MAINPID= are recorded; MAINPID=
  moves the main pid.
- FDSTOREREMOVE=1 (it wins over FDSTORE=1) drops every entry of the FDNAME=
  given (a missing or invalid name: ignored).  FDSTORE=1 adds each fd under
  FDNAME= ("stored" if absent or invalid) unless the store is full
  (FileDescriptorStoreMax=: the rest are closed) or an fd refers to the same
  open file as one already stored (same_fd(): closed, its name lost).
  Without FDPOLL=0 a stored fd is polled and dropped on POLLHUP/POLLERR.
  Fds sent without FDSTORE=1 are closed.
- Entries are prepended (LIST_PREPEND): a start passes the socket units'
  fds first, then the stored fds newest first, as fds 3, 4, ... with
  LISTEN_FDS, LISTEN_FDNAMES (colon-separated, in fd order) and LISTEN_PID
  (the new process's pid: set by `sh -c 'LISTEN_PID=$$ ... exec'`, so
  the pid is the daemon's own).  The kernel's limit on one environment
  string (128 KiB) applies to LISTEN_FDNAMES exactly as under systemd: the
  exec fails.
- A restart (planned or a crash) keeps the store; only a stop of the unit
  (no job queued) releases it.
"""

import array
import ctypes
import errno
import os
import platform
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

from . import procs
from .testing import log

NOTIFY_BUFFER_MAX = 4096        # systemd: PIPE_BUF
NOTIFY_FD_MAX = 768             # systemd: fds accepted in one message
FDNAME_MAX = 255

_SYS_KCMP = {"x86_64": 312, "aarch64": 272, "i686": 349, "i386": 349}.get(platform.machine())
_KCMP_FILE = 0
_libc = ctypes.CDLL(None, use_errno=True)


def fdname_is_valid(name):
    """systemd's fdname_is_valid(): printable ASCII but ':', at most 255."""
    if name is None or len(name) > FDNAME_MAX:
        return False
    return all(32 <= ord(c) < 127 and c != ":" for c in name)


def same_fd(a, b):
    """systemd's same_fd(): the same open file (kcmp), else the fallback it
    uses without kcmp (same inode, same flags, not a device)."""
    if a == b:
        return True
    if _SYS_KCMP is not None:
        pid = os.getpid()
        r = _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
        if r >= 0:
            return r == 0
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EACCES, errno.EPERM):
            raise OSError(ctypes.get_errno(), "kcmp")
    sa, sb = os.fstat(a), os.fstat(b)
    import stat as st
    if st.S_IFMT(sa.st_mode) != st.S_IFMT(sb.st_mode):
        return False
    if st.S_ISCHR(sa.st_mode) or st.S_ISBLK(sa.st_mode):
        return False
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    import fcntl
    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)


class StoredFd:
    __slots__ = ("name", "fd", "poll")

    def __init__(self, name, fd, poll):
        self.name, self.fd, self.poll = name, fd, poll


class ServiceError(Exception):
    pass


def eventfd_id(fd):
    """The kernel's id of an eventfd (fdinfo "eventfd-id:"), or None for
    any other fd: tells one eventfd's file from another across processes
    (the stash's copy and the test's own)."""
    try:
        with open("/proc/self/fdinfo/%d" % fd) as f:
            for line in f:
                if line.startswith("eventfd-id:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class ServiceManager:
    def __init__(self, workdir, fd_store_max=4096, abstract=False, sockets=(), name="service"):
        """sockets: [(fdname, socket)] passed first at every start, as a
        .socket unit's (FileDescriptorName=); they stay owned by the caller."""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:         # a store of thousands of fds, and their copies at start
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.workdir = workdir
        self.fd_store_max = fd_store_max
        self.sockets = list(sockets)
        self.name = name
        self.log_path = os.path.join(workdir, name + ".log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # systemd's notify socket takes 8 MiB (NOTIFY_RCVBUF_SIZE)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)      # SO_RCVBUFFORCE (root)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        if abstract:
            self.notify_socket = "@vhubt-notify-%d-%d" % (os.getpid(), id(self))
            self.sock.bind("\0" + self.notify_socket[1:])
        else:
            self.notify_socket = os.path.join(workdir, name + ".notify")
            self.sock.bind(self.notify_socket)
        self.proc = None
        self.argv, self.env = None, None
        self.main_pid = None
        self.exit_codes = []            # every exit: returncode (negative: killed by that signal)
        self.starts = 0
        self.lock = threading.Condition()
        self.store = []                 # StoredFd, newest first
        self.messages = []              # (monotonic time, pid, [lines]) accepted
        self.rejected = []              # (pid, reason)
        self.warnings = []              # what systemd would log and ignore
        self.ready = False
        self.stopping = False
        self.status = None
        self.watchdog_pings = []
        self.held = None                # hold(): datagrams read, not applied yet
        self._stop_pipe = os.pipe2(os.O_CLOEXEC)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="servicemanager", daemon=True)
        self._thread.start()

    # ---- the notify socket, read continuously as PID 1 does

    def _loop(self):
        while True:
            with self.lock:
                polled = [e for e in self.store if e.poll]
            p = select.poll()
            p.register(self.sock.fileno(), select.POLLIN)
            p.register(self._stop_pipe[0], select.POLLIN)
            for e in polled:
                try:
                    p.register(e.fd, 0)     # POLLHUP/POLLERR are always reported
                except OSError:
                    pass                    # not pollable (a regular file): kept, as systemd does (EPERM)
            try:
                events = p.poll(100 if polled else None)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == self._stop_pipe[0]:
                    return
                if fd == self.sock.fileno():
                    self._receive()
                elif ev & (select.POLLHUP | select.POLLERR):
                    with self.lock:
                        for e in list(self.store):
                            if e.fd == fd and e.poll:
                                self.store.remove(e)
                                os.close(e.fd)
                                self.warnings.append("POLLHUP on stored fd %s: closed" % e.name)
                        self.lock.notify_all()

    def _receive(self):
        # receive and apply under the lock: holding it with the socket
        # empty means every datagram sent so far has been applied
        with self.lock:
            try:
                data, anc, flags, _ = self.sock.recvmsg(NOTIFY_BUFFER_MAX + 1,
                                                        socket.CMSG_SPACE(NOTIFY_FD_MAX * 4) +
                                                        socket.CMSG_SPACE(12),
                                                        socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            fds, pid = [], None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(payload) // 4
                    fds += list(struct.unpack("%di" % n, payload[:4 * n]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("iII", payload[:12])[0]
            if self.held is not None:
                self.held.append((data, flags, fds, pid))
                self.lock.notify_all()
                return
            try:
                self._dispatch(data, flags, fds, pid)
            finally:
                self.lock.notify_all()

    # ---- a crash between two of the service's messages

    def hold(self):
        """From now on what the service sends is read but not applied, until
        release() (the test's view of it: held_lines())."""
        with self.lock:
            self.held = []

    def held_lines(self):
        with self.lock:
            return [data.decode(errors="replace").split("\n") for data, _, _, _ in self.held]

    def release(self, cut=None):
        """Apply what was held, in order -- but from the first datagram for
        which cut(lines) is true on, close their fds and drop them: the store
        as a process killed right before it sent that one would leave it.
        Call it once the process is gone (what it sent is read first)."""
        while True:
            with self.lock:
                r, _, _ = select.select([self.sock], [], [], 0)
            if not r:
                break
            self._receive()
        with self.lock:
            held, self.held = self.held, None
            dropping = False
            for data, flags, fds, pid in held:
                dropping = dropping or (cut is not None and cut(data.decode(errors="replace").split("\n")))
                if dropping:
                    for fd in fds:
                        os.close(fd)
                else:
                    self._dispatch(data, flags, fds, pid)
            self.lock.notify_all()

    def _dispatch(self, data, flags, fds, pid):
        def drop(reason):
            self.warnings.append(reason)
            for fd in fds:
                os.close(fd)

        if flags & socket.MSG_CTRUNC:
            return drop("notification with too many fds: ignored")
        if flags & socket.MSG_TRUNC or len(data) > NOTIFY_BUFFER_MAX:
            return drop("overly long notification datagram: ignored")
        if pid is None:
            return drop("notification without credentials: ignored")
        if b"\0" in data:
            return drop("notification with embedded NUL bytes: ignored")
        if pid != self.main_pid:
            self.rejected.append((pid, data.decode(errors="replace")))
            for fd in fds:
                os.close(fd)
            return
        lines = data.decode(errors="replace").split("\n")
        self.messages.append((time.monotonic(), pid, lines))
        tags = {}
        for line in lines:
            k, sep, v = line.partition("=")
            if sep and k not in tags:
                tags[k] = v
        if "MAINPID" in tags:
            try:
                new = int(tags["MAINPID"])
                os.kill(new, 0)
                self.main_pid = new
            except (ValueError, OSError):
                self.warnings.append("bad MAINPID=%s: ignored" % tags["MAINPID"])
        if "STOPPING=1" in lines:
            self.stopping = True
        elif "READY=1" in lines:
            self.ready = True
        if "STATUS" in tags:
            self.status = tags["STATUS"]
        if "WATCHDOG=1" in lines:
            self.watchdog_pings.append(time.monotonic())
        if "FDSTOREREMOVE=1" in lines:
            name = tags.get("FDNAME")
            if name is None or not fdname_is_valid(name):
                self.warnings.append("FDSTOREREMOVE=1 without a valid FDNAME=: ignored")
            else:
                for e in [e for e in self.store if e.name == name]:
                    self.store.remove(e)
                    os.close(e.fd)
        elif "FDSTORE=1" in lines:
            name = tags.get("FDNAME")
            if name is not None and not fdname_is_valid(name):
                self.warnings.append("invalid FDNAME=: ignored")
                name = None
            poll = "FDPOLL=0" not in lines
            for i, fd in enumerate(fds):
                if len(self.store) >= self.fd_store_max:
                    self.warnings.append("store full (FileDescriptorStoreMax=%d): %d fds closed"
                                         % (self.fd_store_max, len(fds) - i))
                    for rest in fds[i:]:
                        os.close(rest)
                    break
                if any(same_fd(e.fd, fd) for e in self.store):
                    self.warnings.append("fd for %s already stored: dropped" % (name or "stored"))
                    os.close(fd)
                    continue
                self.store.insert(0, StoredFd(name or "stored", fd, poll))
            fds = []
        for fd in fds:          # fds on a message that does not store them
            os.close(fd)

    # ---- the service

    def _fds_to_pass(self):
        with self.lock:
            passed = [(name, s.fileno()) for name, s in self.sockets]
            passed += [(e.name, e.fd) for e in self.store]
        return passed

    def start(self, argv, env=None, stdin=subprocess.DEVNULL, stdout=None):
        """Start the service's main process; returns the Popen."""
        if self.proc and self.proc.poll() is None:
            raise ServiceError("already running (pid %d)" % self.proc.pid)
        self.argv, self.env = list(argv), env
        passed = self._fds_to_pass()
        n = len(passed)
        env = dict(os.environ if env is None else env)
        for k in ("LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID", "NOTIFY_SOCKET", "MAINPID"):
            env.pop(k, None)
        env["NOTIFY_SOCKET"] = self.notify_socket
        # every fd is first copied above the 3..n+2 it will take, so that
        # moving one into place cannot overwrite another still to move.  The
        # move is done by a small exec-in-place wrapper (python, not bash:
        # bash marks the fds >= 10 its `exec N<&M` makes close-on-exec, so
        # the 8th stored fd on would never reach the service)
        high = []
        try:
            for _, fd in passed:
                high.append(_fcntl_dupfd(fd, n + 3 + 16))
            if n:
                env["LISTEN_FDS"] = str(n)
                env["LISTEN_FDNAMES"] = ":".join(name for name, _ in passed)
            # LISTEN_PID must be the exec'ed daemon's pid: the wrapper's,
            # which exec keeps (setpriv, first in argv, execs in place too)
            # -I -S: no site module (it costs ~45 ms of interpreter start
            # here, inside every measured restart); the wrapper needs os only
            cmd = [sys.executable, "-I", "-S", "-c", _MOVE_FDS,
                   ",".join(str(h) for h in high)] + list(argv)
            if procs._SETPRIV:
                cmd = [procs._SETPRIV, "--pdeathsig", "KILL", "--"] + cmd
            out = stdout if stdout is not None else open(self.log_path, "ab")
            # under the lock: the service may notify before Popen returns,
            # and the reader, waiting for the lock, then knows its pid
            with self.lock:
                try:
                    self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=out,
                                                 stderr=subprocess.STDOUT if stdout is None else None,
                                                 env=env, pass_fds=high, close_fds=True)
                finally:
                    if stdout is None:
                        out.close()
                self.main_pid = self.proc.pid
                self.ready = self.stopping = False
                self.starts += 1
        finally:
            for h in high:
                os.close(h)
        procs._children.append(self.proc)
        procs._install_sigterm()
        log("service manager: started %s (pid %d) with %d fds passed" % (os.path.basename(argv[0]),
                                                                         self.proc.pid, n))
        return self.proc

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def wait_for(self, pred, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                v = pred()
                if v:
                    return v
                if self.proc and self.proc.poll() is not None:
                    raise ServiceError("%s: the service exited (%s) while waiting for %s"
                                       % (self.name, self.proc.returncode, what))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceError("%s: timed out after %.1fs waiting for %s" % (self.name, timeout, what))
                self.lock.wait(min(left, 0.05))

    def wait_ready(self, timeout=10.0):
        """Wait for READY=1 from the main pid; returns the time it came."""
        self.wait_for(lambda: self.ready, timeout, "READY=1")
        with self.lock:
            return next(t for t, _, lines in reversed(self.messages) if "READY=1" in lines)

    def wait_message(self, line, timeout=10.0):
        """Wait for an accepted message with this exact line (e.g. "X_DONE=1")."""
        def seen():
            return any(line in lines for _, _, lines in self.messages)
        return self.wait_for(seen, timeout, line)

    def wait_exit(self, timeout=10.0):
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServiceError("%s (pid %d) did not exit within %.0fs" % (self.name, self.proc.pid, timeout))
        if self.proc in procs._children:
            procs._children.remove(self.proc)
        self.exit_codes.append(code)
        self._settle()
        return code

    def _settle(self):
        """Apply every message the process sent before it died, as systemd
        reads its notify socket before it handles SIGCHLD (its event source
        has the higher priority)."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            with self.lock:
                if self.held is not None:
                    return          # release() applies them
                r, _, _ = select.select([self.sock], [], [], 0)
                if not r:
                    return
            time.sleep(0.002)

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def terminate(self, timeout=10.0):
        """SIGTERM and wait; returns the exit code."""
        self.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self, timeout=10.0):
        """SIGKILL (a crash) and wait; returns the exit code (-9)."""
        self.send_signal(signal.SIGKILL)
        return self.wait_exit(timeout)

    def restart(self, argv=None, env=None, sig=signal.SIGTERM, timeout=10.0, **kw):
        """`systemctl restart` (SIGTERM) or a crash with Restart=on-failure
        (sig=SIGKILL, SIGABRT...): the store is kept and passed to the new
        process, started with the same argv unless given.  Returns the old
        process's exit code."""
        self.send_signal(sig)
        code = self.wait_exit(timeout)
        self.start(argv or self.argv, env=env if env is not None else self.env, **kw)
        return code

    def stop_unit(self, timeout=10.0):
        """`systemctl stop`: SIGTERM, wait, then the store is released
        (no job queued for the unit).  Returns the exit code."""
        code = self.terminate(timeout) if self.proc and self.proc.poll() is None else self.proc.returncode
        self.release_store()
        return code

    def release_store(self):
        with self.lock:
            for e in self.store:
                os.close(e.fd)
            self.store = []
            self.lock.notify_all()

    # ---- the store

    def put(self, name, fd):
        """Store a dup of fd under name, as if a process had pushed it with
        FDPOLL=0 (a store carried from another run: an upgrade test)."""
        with self.lock:
            self.store.insert(0, StoredFd(name, _fcntl_dupfd(fd, 3), False))
            self.lock.notify_all()

    def remove(self, name):
        """Drop every stored fd of that name, as FDSTOREREMOVE=1 would (a
        test rearranging a store between two starts)."""
        with self.lock:
            for e in [e for e in self.store if e.name == name]:
                self.store.remove(e)
                os.close(e.fd)
            self.lock.notify_all()

    def stash_drop(self, name, drop):
        """Fault injection between two starts: the stored stash `name` (a
        SOCK_SEQPACKET socket whose queue holds a group's fds, docs/restart.md
        "Groups") is replaced by one holding its fds but those for which
        drop(fd) is true, in one message, as the daemon's own compaction
        would leave it.  Returns how many were dropped."""
        with self.lock:
            e = [e for e in self.store if e.name == name][0]
            kept, dropped = [], 0
            stash = socket.socket(fileno=os.dup(e.fd))
            try:
                while True:
                    try:
                        data, anc, _, _ = stash.recvmsg(1, socket.CMSG_SPACE(253 * 4),
                                                        socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
                    except BlockingIOError:
                        break
                    if not data and not anc:
                        break           # its writing end closed (the daemon that held it is gone)
                    for level, kind, payload in anc:
                        if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                            continue
                        fds = array.array("i")
                        fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                        for fd in fds:
                            if drop(fd):
                                os.close(fd)
                                dropped += 1
                            else:
                                kept.append(fd)
            finally:
                stash.close()
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            b.setblocking(False)    # as the daemon makes its stashes
            a.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", kept))])
            a.close()
            for fd in kept:
                os.close(fd)
            os.close(e.fd)
            e.fd = _fcntl_dupfd(b.fileno(), 3)
            b.close()
            self.lock.notify_all()
            return dropped

    def stash_drop_groups(self, drop, kinds="dv"):
        """stash_drop(name, drop) on every stored group whose name starts
        with one of kinds (a device's group, or its VM's that holds the fds
        of a device added since the last start: docs/restart.md,
        "Versions").  Returns {name: how many dropped} for those that lost
        any."""
        out = {}
        for name in self.names():
            if name[:1] in kinds and len(name) > 1:
                n = self.stash_drop(name, drop)
                if n:
                    out[name] = n
        return out

    def stale_member_lines(self):
        """The daemon's log lines saying a group was not stored because its
        stash names a closed fd: a member closed before it left its group
        (the fd store's contract, daemon/vhub-fdstore.h).  A test that makes
        a restore fail half-way expects none."""
        with open(self.log_path, "rb") as f:
            return [l.decode(errors="replace") for l in f.read().splitlines()
                    if b"not stored (Bad file descriptor)" in l]

    def names(self):
        """Stored names in the order a start passes them (newest first)."""
        with self.lock:
            return [e.name for e in self.store]

    def count(self):
        with self.lock:
            return len(self.store)

    def dup(self, name):
        """A dup (O_CLOEXEC) of the stored fd of that name, for the test to
        look at (e.g. read a snapshot memfd); KeyError if absent."""
        with self.lock:
            for e in self.store:
                if e.name == name:
                    return _fcntl_dupfd(e.fd, 3)
        raise KeyError(name)

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self.proc and self.proc.poll() is None:
            procs.reap(self.proc, signal.SIGKILL)
        os.write(self._stop_pipe[1], b"x")
        self._thread.join(5)
        os.close(self._stop_pipe[0])
        os.close(self._stop_pipe[1])
        self.release_store()
        self.sock.close()
        if not self.notify_socket.startswith("@"):
            procs.unlink_if_exists(self.notify_socket)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _fcntl_dupfd(fd, lowest):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


# argv[1]: the high fds to move to 3, 4, ... (comma-separated, may be
# empty); then the command.  Sets LISTEN_PID (when fds are passed) to its own
# pid and execs in place.
_MOVE_FDS = """
import os, sys
high = [int(x) for x in sys.argv[1].split(",") if x]
for i, h in enumerate(high):
    os.dup2(h, 3 + i, inheritable=True)
for h in high:
    if h >= 3 + len(high):
        os.close(h)
if high:
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execvp(sys.argv[2], sys.argv[2:])
"""


def have_bash():
    return shutil.which("bash") is not None

"""A real Linux guest under QEMU (TCG) with vhost-user devices.

    image = guest_image.prepare()                       # kernel + initramfs, cached
    qsd = t.enter(QsdBackend(img, sock, num_queues=2, log_dir=d))
    g = t.enter(Guest(d, [BlkDevice(qsd.socket)], image))
    g.wait_ready()                                      # modules loaded, commands accepted
    r = g.run("blk-basic", "/dev/vda", 0, 256, 512, 256, sha)   # StepResult, fields r["size"]
    g.begin("blk-write", "/dev/vda", 1, 1024, 256, 0)   # runs until told to stop
    g.wait_progress("blk-write", lambda f: int(f.get("n", 0)) >= 64)
    g.stop_steps(); r = g.result("blk-write")
    g.qmp().execute("query-status")
    g.poweroff()

The devices only name a socket: pointing the same guest and the same steps
at a back-end directly or at another front-end's socket is a matter of the
path given to BlkDevice/FsDevice/NetDevice.  QEMU is the vhost-user
front-end (client) on each device's socket, so the socket must listen
before the Guest starts.

The serial console is a unix socket QEMU listens on and waits for (nothing
the guest prints is lost); a reader thread timestamps every line and
copies the console to console.log.  The guest's protocol is in
tests/guest/steps/lib.sh; the steps are tests/guest/steps/*.sh.  Every
wait has a timeout and fails loudly with the console's tail; QEMU exiting
or a kernel panic fails at once.  docs/testing-guests.md has the details.
"""

import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time

from . import guest_image, procs
from .backends import require_binary
from .qmp import Qmp
from .testing import TestFailure, log

# The firmware clears the screen: escape sequences are not part of any line.
_ANSI_ESCAPE = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_a-z])")
QEMU = os.environ.get("VHUB_QEMU", "/usr/bin/qemu-system-x86_64")
BOOT_TIMEOUT = 45.0
STEP_TIMEOUT = 45.0
BLOCK = 4096


# ---- devices: each names the socket QEMU connects to ----------------------

class Device:
    kind = "device"

    def __init__(self, socket_path, dev_id, chardev_opts=""):
        self.socket = socket_path
        self.id = dev_id
        self.chardev_opts = chardev_opts    # e.g. ",reconnect=1"

    def chardev_args(self):
        return ["-chardev", "socket,id=chr-%s,path=%s%s" % (self.id, self.socket, self.chardev_opts)]

    def qemu_args(self):
        raise NotImplementedError


class BlkDevice(Device):
    """vhost-user-blk-pci; the guest's first disk is /dev/vda."""
    kind = "blk"

    def __init__(self, socket_path, num_queues=2, dev_id="blk0", chardev_opts=""):
        super().__init__(socket_path, dev_id, chardev_opts)
        self.num_queues = num_queues

    def qemu_args(self):
        return self.chardev_args() + [
            "-device", "vhost-user-blk-pci,id=%s,chardev=chr-%s,num-queues=%d"
            % (self.id, self.id, self.num_queues)]


class FsDevice(Device):
    """vhost-user-fs-pci with a mount tag."""
    kind = "fs"

    def __init__(self, socket_path, tag="fs0", dev_id="fs0", chardev_opts=""):
        super().__init__(socket_path, dev_id, chardev_opts)
        self.tag = tag

    def qemu_args(self):
        return self.chardev_args() + [
            "-device", "vhost-user-fs-pci,id=%s,chardev=chr-%s,tag=%s" % (self.id, self.id, self.tag)]


class NetDevice(Device):
    """-netdev vhost-user + virtio-net-pci; the guest's eth0.

    vectors=0: with MSI-X, QEMU 7.2 under TCG segfaults in vhost_net_start.
    packed: offer packed virtqueues (VIRTIO_F_RING_PACKED) to the guest."""
    kind = "net"

    def __init__(self, socket_path, dev_id="net0", mac="52:54:00:00:00:01", chardev_opts="", packed=False):
        super().__init__(socket_path, dev_id, chardev_opts)
        self.mac = mac
        self.packed = packed

    def qemu_args(self):
        return self.chardev_args() + [
            "-netdev", "vhost-user,id=%s,chardev=chr-%s" % (self.id, self.id),
            "-device", "virtio-net-pci,id=dev-%s,netdev=%s,mac=%s,vectors=0%s"
            % (self.id, self.id, self.mac, ",packed=on" if self.packed else "")]


# ---- what the guest says ---------------------------------------------------

class ConsoleLine:
    __slots__ = ("t", "text")

    def __init__(self, t, text):
        self.t = t          # time.monotonic() when the line was complete
        self.text = text


class StepResult:
    """One GUEST-RESULT line: step, ok, fields (k=v as strings), detail
    (the failure text), log (the step's GUEST-LOG lines), t (arrival)."""

    def __init__(self, step, ok, fields, detail, log_lines, t):
        self.step = step
        self.ok = ok
        self.fields = fields
        self.detail = detail
        self.log = log_lines
        self.t = t

    def __getitem__(self, key):
        return self.fields[key]

    def int(self, key):
        return int(self.fields[key])

    def __repr__(self):
        return "StepResult(%s %s %s)" % (self.step, "ok" if self.ok else "fail",
                                         self.detail or self.fields)


def parse_fields(words):
    return dict(w.split("=", 1) for w in words if "=" in w)


class Progress(dict):
    """A GUEST-PROGRESS line's k=v fields (bare words map to ""), and t:
    when the line arrived."""

    def __init__(self, words, t):
        super().__init__((w.split("=", 1) if "=" in w else (w, "")) for w in words)
        self.t = t


# ---- the VM ----------------------------------------------------------------

class Guest:
    """QEMU (TCG) booting the test guest with `devices`; a context manager
    that kills QEMU if it is still running and prints its logs on failure."""

    def __init__(self, workdir, devices, image=None, mem_mb=512, smp=2, append="",
                 extra_args=(), name="guest"):
        require_binary(QEMU, "qemu-system-x86_64 (package qemu-system-x86)")
        self.workdir = workdir
        self.devices = list(devices)
        self.image = image or guest_image.prepare()
        self.mem_mb = mem_mb
        self.smp = smp
        self.append = append
        self.extra_args = list(extra_args)
        self.name = name
        self.console_path = os.path.join(workdir, "%s-console.sock" % name)
        self.qmp_path = os.path.join(workdir, "%s-qmp.sock" % name)
        self.console_log = os.path.join(workdir, "%s-console.log" % name)
        self.log_path = os.path.join(workdir, "%s-qemu.log" % name)
        self.proc = None
        self.t_spawn = None     # time.monotonic() just before QEMU was spawned
        self.t_ready = None     # ... when GUEST-READY arrived
        self.lines = []
        self._cond = threading.Condition()
        self._eof = False
        self._sock = None
        self._reader = None
        self._qmp = None
        self._step_start = {}   # step -> index into lines where it began
        self._progress_at = {}  # step -> where its next wait_progress() looks

    def argv(self):
        mem = "%dM" % self.mem_mb
        append = "console=ttyS0 quiet panic=-1 rdinit=/init " + self.append
        argv = [QEMU, "-accel", "tcg", "-nodefaults", "-nographic", "-no-reboot",
                "-m", mem,
                # vhost-user back-ends map guest RAM: it must be a shared memfd.
                "-object", "memory-backend-memfd,id=mem,size=%s,share=on" % mem,
                "-numa", "node,memdev=mem",
                "-smp", str(self.smp),
                "-kernel", self.image.kernel, "-initrd", self.image.initrd,
                "-append", append.strip(),
                "-chardev", "socket,id=con,path=%s,server=on,wait=on" % self.console_path,
                "-serial", "chardev:con",
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        for d in self.devices:
            argv += d.qemu_args()
        return argv + self.extra_args

    # -- process -------------------------------------------------------------

    def start(self, timeout=20.0):
        for p in (self.console_path, self.qmp_path):
            procs.unlink_if_exists(p)
        argv = self.argv()
        with open(self.log_path, "ab") as f:
            f.write(("==== %s\n" % " ".join(shlex.quote(a) for a in argv)).encode())
        self.t_spawn = time.monotonic()
        self.proc = procs.spawn(argv, log_path=self.log_path)

        def listening():
            if self.proc.poll() is not None:
                raise TestFailure("QEMU exited with %s before its console listened (%s)"
                                  % (self.proc.returncode, self._qemu_log_tail()))
            return procs.unix_listening(self.console_path)
        procs.wait_until(listening, timeout, interval=0.002, what="QEMU's console socket")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.connect(self.console_path)
        self._reader = threading.Thread(target=self._read_console, name="console-" + self.name,
                                        daemon=True)
        self._reader.start()
        return self

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def kill(self):
        if self.proc is not None:
            procs.reap(self.proc, signal.SIGKILL)

    def poweroff(self, timeout=30.0):
        """The guest syncs and powers off; QEMU must exit 0."""
        self.send("poweroff")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TestFailure("QEMU still running %.0fs after poweroff\n%s"
                              % (timeout, self.console_tail()))
        rc = procs.reap(self.proc)
        if rc != 0:
            raise TestFailure("QEMU exited with %s after poweroff (%s)" % (rc, self._qemu_log_tail()))
        log("ok: guest powered off, QEMU exited 0 (%.2fs after start)"
            % (time.monotonic() - self.t_spawn))

    def qmp(self, timeout=10.0):
        """The QMP connection (opened on first use)."""
        if self._qmp is None:
            self._qmp = Qmp(self.qmp_path, timeout=timeout)
        return self._qmp

    # -- console -------------------------------------------------------------

    def _read_console(self):
        pending = b""
        with open(self.console_log, "ab") as out:
            while True:
                try:
                    chunk = self._sock.recv(65536)
                except OSError:
                    chunk = b""
                now = time.monotonic()
                if chunk:
                    out.write(chunk)
                    out.flush()
                    pending += chunk
                *done, pending = pending.split(b"\n")
                if not chunk and pending:
                    done.append(pending)
                with self._cond:
                    for raw in done:
                        text = _ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace").replace("\r", ""))
                        self.lines.append(ConsoleLine(now, text))
                    if not chunk:
                        self._eof = True
                    self._cond.notify_all()
                if not chunk:
                    return

    def send(self, line):
        self._sock.sendall(line.encode() + b"\n")

    def console_tail(self, n=40):
        with self._cond:
            tail = [l.text for l in self.lines[-n:]]
        return "---- %s console (last %d lines) ----\n%s\n---- end of console ----" % (
            self.name, len(tail), "\n".join(tail))

    def _qemu_log_tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return "QEMU said: " + " | ".join(f.read().splitlines()[-10:])
        except OSError:
            return "no QEMU log"

    def wait_line(self, pred, timeout, what, since=0):
        """(index, ConsoleLine) of the first line from `since` on with
        pred(text) true.  A kernel panic, a GUEST-ERROR, QEMU's exit or the
        timeout raise TestFailure with the console's tail."""
        deadline = time.monotonic() + timeout
        i = since
        with self._cond:
            while True:
                while i < len(self.lines):
                    text = self.lines[i].text
                    if pred(text):
                        return i, self.lines[i]
                    if "Kernel panic" in text or text.startswith("GUEST-ERROR"):
                        self._fail_locked("guest: %r while waiting for %s" % (text, what))
                    i += 1
                if self._eof:
                    self._fail_locked("QEMU closed the console (exit %s) while waiting for %s; %s"
                                      % (self.proc.poll(), what, self._qemu_log_tail()))
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail_locked("timed out after %.0fs waiting for %s" % (timeout, what))
                self._cond.wait(left)

    def _fail_locked(self, msg):
        tail = "\n".join(l.text for l in self.lines[-40:])
        raise TestFailure("%s\n---- %s console (last lines) ----\n%s\n---- end of console ----"
                          % (msg, self.name, tail))

    # -- the guest's protocol ------------------------------------------------

    def wait_ready(self, timeout=BOOT_TIMEOUT):
        """Fields of GUEST-READY (uptime, cpus, kernel, modules)."""
        _, line = self.wait_line(lambda s: s.startswith("GUEST-READY"), timeout, "GUEST-READY")
        self.t_ready = line.t
        fields = parse_fields(line.text.split()[1:])
        log("guest ready %.2fs after QEMU start: %s" % (line.t - self.t_spawn, line.text))
        return fields

    def first_io(self):
        """GUEST-FIRST-IO's fields (uptime, probe_us: virtio_blk's init and
        probe in the guest) and .t, its arrival; None without a disk."""
        with self._cond:
            for line in self.lines:
                if line.text.startswith("GUEST-FIRST-IO"):
                    return Progress(line.text.split()[1:], line.t)
        return None

    def first_io_time(self):
        """Seconds from QEMU's spawn to GUEST-FIRST-IO (None: no disk)."""
        first = self.first_io()
        return None if first is None else first.t - self.t_spawn

    def begin(self, step, *args):
        """Start a step in the guest (it runs in the background there)."""
        if self.t_ready is None:
            # The serial port drops what arrives before /init reads it.
            raise RuntimeError("begin(%s) before wait_ready()" % step)
        with self._cond:
            self._step_start[step] = self._progress_at[step] = len(self.lines)
        self.send(" ".join(["run", step] + [str(a) for a in args]))

    def stop_steps(self):
        """Ask steps that run until told to stop to finish."""
        self.send("stop")

    def wait_progress(self, step, until=None, timeout=STEP_TIMEOUT):
        """The first GUEST-PROGRESS line of `step` since begin() (a Progress)
        for which until(progress) is true (any line without until).  Lines
        are consumed: the next call looks after the one returned."""
        prefix = "GUEST-PROGRESS %s " % step
        result = "GUEST-RESULT %s " % step
        i = self._progress_at[step]
        while True:
            i, line = self.wait_line(lambda s: s.startswith(prefix) or s.startswith(result),
                                     timeout, "progress of step %s" % step, since=i)
            if line.text.startswith(result):
                raise TestFailure("step %s ended while waiting for its progress: %s"
                                  % (step, line.text))
            i += 1
            progress = Progress(line.text.split()[2:], line.t)
            if until is None or until(progress):
                self._progress_at[step] = i
                return progress

    def result(self, step, timeout=STEP_TIMEOUT, expect_ok=True):
        """The step's GUEST-RESULT; a failure raises unless expect_ok=False."""
        prefix = "GUEST-RESULT %s " % step
        since = self._step_start.pop(step)
        self._progress_at.pop(step, None)
        i, line = self.wait_line(lambda s: s.startswith(prefix), timeout,
                                 "the result of step %s" % step, since=since)
        words = line.text.split()
        ok = words[2] == "ok"
        with self._cond:
            log_lines = [l.text for l in self.lines[since:i]
                         if l.text.startswith("GUEST-LOG %s " % step)]
        r = StepResult(step, ok, parse_fields(words[3:]) if ok else {},
                       None if ok else " ".join(words[3:]), log_lines, line.t)
        log("guest: %s" % line.text)
        if expect_ok and not ok:
            raise TestFailure("guest step %s failed: %s\n%s" % (step, r.detail, "\n".join(log_lines)))
        return r

    def run(self, step, *args, timeout=STEP_TIMEOUT, expect_ok=True):
        self.begin(step, *args)
        return self.result(step, timeout, expect_ok)

    # -- context manager -----------------------------------------------------

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type, *exc):
        if self.alive:
            self.kill()
        if self._qmp is not None:
            self._qmp.close()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)   # wakes the reader's recv()
            except OSError:
                pass
            if self._reader is not None:
                self._reader.join(5)
            self._sock.close()
        if exc_type is not None:
            procs.print_log(self.console_log, "%s console" % self.name, limit=80)
            procs.print_log(self.log_path, "%s QEMU" % self.name)
        return False


# ---- what the host checks afterwards -------------------------------------

def blk_block(writer, n):
    """Writer `writer`'s block number n, as tests/guest/steps/lib.sh's
    blk_block writes it: 128 copies of a 32-byte record."""
    return (b"vhubtest-blk w%03d n%011d \n" % (100 + writer, 10000000000 + n)) * (BLOCK // 32)


def blk_write_model(model, first, area, counts):
    """Put into `model` (a bytearray of the whole disk) what step blk-write
    with these counts left on disk: in each writer's area of `area` blocks,
    slot s holds the last block n < count with n % area == s."""
    for w, count in enumerate(counts):
        for slot in range(min(count, area)):
            n = slot + ((count - 1 - slot) // area) * area
            off = (first + w * area + slot) * BLOCK
            model[off:off + BLOCK] = blk_block(w, n)
    return model


def parse_counts(result):
    return [int(c) for c in result["counts"].split(",")]

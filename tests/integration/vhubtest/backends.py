"""Launchers for the real vhost-user back-ends (see shared/backends.md).

Each Backend: start(), wait_for_socket(), kill() (SIGKILL), stop() (SIGTERM,
returns the exit code), restart(), alive, pid, log_path; a context manager
that stops it.  A missing binary raises Skip (the test exits 77 and says why).
Stale socket files are removed before (re)start so "listening" is judged
from /proc/net/unix without connecting (virtiofsd exits when a front-end
leaves, so a probe connection would kill it).
"""

import itertools
import os
import signal
import tempfile

from . import procs
from .testing import Skip

QSD = os.environ.get("VHUB_QSD", "/usr/bin/qemu-storage-daemon")
VIRTIOFSD = os.environ.get("VHUB_VIRTIOFSD", "/usr/lib/qemu/virtiofsd")
TESTPMD = os.environ.get("VHUB_TESTPMD", "/usr/bin/dpdk-testpmd")

_serial = itertools.count()


def require_binary(path, what):
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise Skip("%s not installed: %s missing" % (what, path))
    return path


class Backend:
    name = "backend"
    listens = True  # False when the back-end connects to us (client mode)

    def __init__(self, sockets, log_dir=None):
        self.sockets = list(sockets)
        self.socket = self.sockets[0] if self.sockets else None
        self.log_dir = log_dir or os.path.dirname(self.socket)
        self.log_path = os.path.join(self.log_dir, "%s-%d.log" % (self.name, next(_serial)))
        self.proc = None
        self.starts = 0

    def argv(self):
        raise NotImplementedError

    def env(self):
        return None

    def start(self, wait=True, timeout=10.0):
        if self.alive:
            raise RuntimeError("%s already running" % self.name)
        if self.listens:
            for s in self.sockets:
                procs.unlink_if_exists(s)
        with open(self.log_path, "ab") as f:
            f.write(b"==== start %d: %s\n" % (self.starts, " ".join(self.argv()).encode()))
        self.proc = procs.spawn(self.argv(), log_path=self.log_path, env=self.env())
        self.starts += 1
        if wait:
            self.wait_for_socket(timeout)
        return self

    def wait_for_socket(self, timeout=10.0):
        """Until every socket listens (server mode) or the process is up."""
        def ready():
            if self.proc.poll() is not None:
                procs.print_log(self.log_path, self.name)
                raise RuntimeError("%s exited with %s before listening"
                                   % (self.name, self.proc.returncode))
            if not self.listens:
                return True
            return all(procs.unix_listening(s) for s in self.sockets)
        procs.wait_until(ready, timeout, what="%s to listen on %s" % (self.name, self.sockets))

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL, as a crash."""
        if self.proc is None:
            return None
        return procs.reap(self.proc, signal.SIGKILL)

    def stop(self, timeout=10.0):
        """SIGTERM and wait; returns the exit code (None if never started)."""
        if self.proc is None:
            return None
        return procs.reap(self.proc, signal.SIGTERM, timeout)

    def restart(self, wait=True, timeout=10.0):
        self.kill()
        return self.start(wait=wait, timeout=timeout)

    def wait_exit(self, timeout=5.0):
        procs.wait_until(lambda: self.proc.poll() is not None, timeout,
                         what="%s to exit" % self.name)
        return self.proc.returncode

    def print_log(self):
        procs.print_log(self.log_path, self.name)

    def log_text(self):
        """Everything the process wrote so far ("" before it started)."""
        try:
            with open(self.log_path, "r", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.print_log()
        self.stop()
        return False


class QsdBackend(Backend):
    """qemu-storage-daemon exporting IMG as vhost-user-blk on `socket`."""
    name = "qsd"

    def __init__(self, image, socket, num_queues=2, log_dir=None):
        require_binary(QSD, "qemu-storage-daemon")
        super().__init__([socket], log_dir)
        self.image = image
        self.num_queues = num_queues

    def argv(self):
        return [QSD,
                "--blockdev", "driver=file,node-name=file0,filename=%s" % self.image,
                "--blockdev", "driver=raw,node-name=disk0,file=file0",
                "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                            "addr.path=%s,writable=on,num-queues=%d" % (self.socket, self.num_queues)]


class QsdNullBackend(Backend):
    """One qemu-storage-daemon serving a null-co export on each socket."""
    name = "qsd-null"

    def __init__(self, sockets, size=1048576, num_queues=1, log_dir=None):
        require_binary(QSD, "qemu-storage-daemon")
        super().__init__(sockets, log_dir)
        self.size = size
        self.num_queues = num_queues

    def argv(self):
        argv = [QSD]
        for i, s in enumerate(self.sockets):
            argv += ["--blockdev", "driver=null-co,node-name=n%d,size=%d" % (i, self.size),
                     "--export", "type=vhost-user-blk,id=e%d,node-name=n%d,addr.type=unix,"
                                 "addr.path=%s,writable=on,num-queues=%d"
                                 % (i, i, s, self.num_queues)]
        return argv


class VirtiofsdBackend(Backend):
    """QEMU 7.2's C virtiofsd sharing `shared_dir`; exits when its front-end leaves."""
    name = "virtiofsd"

    def __init__(self, socket, shared_dir, log_dir=None, extra=()):
        require_binary(VIRTIOFSD, "virtiofsd")
        super().__init__([socket], log_dir)
        self.shared_dir = shared_dir
        self.extra = list(extra)

    def argv(self):
        return [VIRTIOFSD, "--socket-path=%s" % self.socket, "-o", "source=%s" % self.shared_dir] + self.extra


class TestpmdBackend(Backend):
    """dpdk-testpmd with a net_vhost port in io forward mode.

    client=True puts `client=1` in the vdev: testpmd connects to a socket the
    front-end listens on (and reconnects ~2 ms after it closes).
    """
    name = "testpmd"

    def __init__(self, socket, queues=1, client=False, forward_mode="io", log_dir=None,
                 extra_vdev=""):
        require_binary(TESTPMD, "dpdk-testpmd")
        super().__init__([socket], log_dir)
        self.queues = queues
        self.client = client
        self.listens = not client
        self.forward_mode = forward_mode
        self.extra_vdev = extra_vdev
        self.runtime_dir = tempfile.mkdtemp(prefix="testpmd-rt-", dir=self.log_dir)
        self.file_prefix = "vhubtest%d_%d" % (os.getpid(), next(_serial))

    def env(self):
        env = dict(os.environ)
        env["RUNTIME_DIRECTORY"] = self.runtime_dir
        return env

    def argv(self):
        vdev = "net_vhost0,iface=%s,queues=%d" % (self.socket, self.queues)
        if self.client:
            vdev += ",client=1"
        if self.extra_vdev:
            vdev += "," + self.extra_vdev
        return [TESTPMD, "-l", "0-1", "--no-huge", "-m", "256", "--no-pci", "--no-shconf",
                "--no-telemetry", "--file-prefix=%s" % self.file_prefix,
                "--vdev", vdev, "--",
                "--total-num-mbufs=8192", "--rxq=%d" % self.queues, "--txq=%d" % self.queues,
                "--nb-cores=1", "--forward-mode=%s" % self.forward_mode,
                "--stats-period", "5", "--auto-start"]

    def wait_forwarding(self, timeout=10.0):
        """Until testpmd has started its ports and forwarding.

        In client mode testpmd connects while it is still starting up; frames
        sent before its port is started are received but never transmitted
        back (seen with DPDK 22.11), so a test must wait for this."""
        marker = "start packet forwarding"

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("testpmd exited with %s" % self.proc.returncode)
            text = self.log_text()
            # Count only the current run's output (the log is appended per start).
            return marker in text[text.rfind("==== start"):]
        procs.wait_until(ready, timeout, interval=0.01, what="testpmd to start forwarding")

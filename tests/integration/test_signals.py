#!/usr/bin/env python3
"""What each signal does to vhubd (issue 15, "SIGHUP and SIGUSR1 kill the
daemon uncleanly"; contract: "SIGHUP is not fatal: it is logged and reloads
the log level; no signal leaves sockets behind").

Every daemon here has a client-mode device (a vhub-test-backend it connects
to) and a server-mode device (a vhub-test-backend that connects to the
socket vhubd listens on), so the control socket and a server-mode socket
both exist.

1. survived: SIGHUP, SIGUSR1, SIGUSR2, SIGPIPE, SIGALRM, SIGTSTP, SIGTTIN,
   SIGTTOU, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGXFSZ, SIGRTMIN, SIGRTMAX,
   sent one after the other to one daemon: after each it is running (not
   stopped), answers daemon.info on an old and a new connection, both
   devices are still ready, both sockets exist; each logged one (all but
   SIGPIPE, SIGXFSZ and SIGALRM) has its line.
2. SIGHUP reloads the log level from --log-level-file: absent -> the
   --log-level (info: no debug line for a device.config.get); "debug" ->
   debug lines appear; a file holding no level -> the level stays (and
   says why); "warning" -> no info line for a new VM; file removed ->
   back to info.
3. clean exit: SIGTERM, SIGINT, SIGXCPU -> exit 0, the control socket and
   the server-mode socket are gone, both back-ends saw their connection
   close.
4. fatal: SIGQUIT, SIGABRT, SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS,
   SIGTRAP -> the daemon dies (non-zero: the signal, or a sanitizer's exit
   code) but the control socket and the server-mode socket are gone.
"""

import os
import resource
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest.client import Client                             # noqa: E402
from vhubtest.daemon import Daemon                             # noqa: E402
from vhubtest.memory import GuestMemory                        # noqa: E402
from vhubtest.procs import wait_until                          # noqa: E402
from vhubtest.testbackend import TestBackend                   # noqa: E402
from vhubtest.testing import check, check_eq, log, run         # noqa: E402
from vhubtest.vmm import Vmm                                   # noqa: E402

SURVIVED = ["SIGHUP", "SIGUSR1", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTSTP", "SIGTTIN",
            "SIGTTOU", "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGXFSZ", "SIGRTMIN",
            "SIGRTMAX"]
SILENT = {"SIGPIPE", "SIGXFSZ", "SIGALRM"}      # ignored without a log line
CLEAN = ["SIGTERM", "SIGINT", "SIGXCPU"]
FATAL = ["SIGQUIT", "SIGABRT", "SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGSYS", "SIGTRAP"]


def signum(name):
    return int(getattr(signal, name))


class Setup:
    """A daemon with a client-mode device A and a server-mode device S."""

    def __init__(self, t, name, extra_args=(), log_level="info"):
        self.dir = t.tmpdir(prefix="vhubsig-")
        self.daemon = Daemon(self.dir, log_level=log_level, extra_args=list(extra_args))
        t.add_log("vhubd (%s)" % name, self.daemon.log_path)
        self.daemon.start()
        t.defer(self._stop)
        self.c = self.daemon.client()
        self.client_sock = self.daemon.backend_socket("a.sock")
        self.server_sock = self.daemon.backend_socket("s.sock")
        self.ta = t.enter(TestBackend([self.client_sock], log_dir=self.dir))
        self.mem = t.enter(GuestMemory(1 << 20))
        self.vmm = Vmm(self.c, "vm0")
        self.vmm.create()
        self.vmm.add_memory(self.mem)
        self.vmm.add_device("A", self.client_sock)
        pend = self.c.request("device.add", {"vm": "vm0", "device": "S",
                                             "socket": self.server_sock, "mode": "server"})
        wait_until(lambda: os.path.exists(self.server_sock), 5.0,
                   what="vhubd to listen on %s" % self.server_sock)
        self.ts = t.enter(TestBackend(connect=[self.server_sock], log_dir=self.dir,
                                      control=os.path.join(self.dir, "ts.ctl")))
        pend.result(5.0)
        self.ta.wait_connected()
        self.ts.wait_connected()

    def _stop(self):
        if self.daemon.alive:
            self.daemon.stop(expect_code=None)

    def sockets(self):
        return {"control": os.path.exists(self.daemon.control),
                "server-mode": os.path.exists(self.server_sock)}

    def log_text(self):
        with open(self.daemon.log_path, errors="replace") as f:
            return f.read()


def process_state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def wait_log(s, text, what, timeout=3.0):
    wait_until(lambda: text in s.log_text(), timeout, what=what)


def check_serving(s, what):
    check(s.daemon.alive, "%s: vhubd is alive" % what)
    st = process_state(s.daemon.pid)
    check(st not in ("T", "t"), "%s: vhubd is not stopped (state %s)" % (what, st))
    check("pid" in s.c.call("daemon.info", timeout=3), "%s: an old connection is answered" % what)
    with Client(s.daemon.control, timeout=3) as fresh:
        check("pid" in fresh.call("daemon.info"), "%s: a new connection is answered" % what)
    states = {d["device"]: d["state"] for d in s.vmm.device_list()}
    check_eq(states, {"A": "ready", "S": "ready"}, "%s: both devices" % what)
    check_eq(s.sockets(), {"control": True, "server-mode": True}, "%s: both sockets" % what)


def part_survived(t):
    s = Setup(t, "survived")
    for name in SURVIVED:
        before = len(s.log_text())
        os.kill(s.daemon.pid, signum(name))
        if name not in SILENT:
            wait_until(lambda: "signal %d (" % signum(name) in s.log_text()[before:], 3.0,
                       what="vhubd to log %s" % name)
            line = [ln for ln in s.log_text()[before:].splitlines()
                    if "signal %d (" % signum(name) in ln][0]
            log("%s: %s" % (name, line))
        else:
            time.sleep(0.1)
        check_serving(s, name)
    s.daemon.stop()   # exit 0 checked
    check_eq(s.sockets(), {"control": False, "server-mode": False},
             "after SIGTERM: both sockets removed")


def part_reload(t):
    level_file = os.path.join(t.tmpdir(), "level")
    s = Setup(t, "reload", extra_args=["--log-level-file", level_file])

    def hup(expect, what):
        before = len(s.log_text())
        os.kill(s.daemon.pid, signal.SIGHUP)
        wait_until(lambda: expect in s.log_text()[before:], 3.0, what=what)
        log("ok: %s" % what)
        return before

    def debug_lines_for_config_get():
        before = len(s.log_text())
        s.vmm.config_get("A", 0, 8)
        s.c.call("daemon.info")
        return [ln for ln in s.log_text()[before:].splitlines() if " debug:" in ln]

    hup("log level info (from --log-level)", "SIGHUP without the file: --log-level's info")
    check_eq(debug_lines_for_config_get(), [], "at info: no debug line for device.config.get")
    with open(level_file, "w") as f:
        f.write("debug\n")
    hup("log level debug (from %s)" % level_file, "SIGHUP with 'debug' in the file")
    lines = debug_lines_for_config_get()
    check(any("GET_CONFIG" in ln for ln in lines), "at debug: device.config.get logs GET_CONFIG",
          lines)
    with open(level_file, "w") as f:
        f.write("loud\n")
    hup("log level stays debug: %s holds no log level" % level_file,
        "SIGHUP with no level in the file: the level stays, and the log says why")
    check(debug_lines_for_config_get(), "still at debug")
    with open(level_file, "w") as f:
        f.write("warning")
    before = hup("reloading the log level", "SIGHUP with 'warning' in the file")
    Vmm(s.c, "vm1").create()
    time.sleep(0.1)
    check_eq([ln for ln in s.log_text()[before:].splitlines()
              if " info:" in ln or " debug:" in ln], [], "at warning: no info or debug line")
    os.unlink(level_file)
    hup("log level info (from --log-level)", "SIGHUP after the file is gone: info again")
    check_serving(s, "after the reloads")
    s.daemon.stop()


def part_clean(t):
    for name in CLEAN:
        s = Setup(t, name)
        os.kill(s.daemon.pid, signum(name))
        code = s.daemon.proc.wait(10)
        check_eq(code, 0, "%s: vhubd exits 0" % name)
        check_eq(s.sockets(), {"control": False, "server-mode": False},
                 "%s: both sockets removed" % name)
        for tb, which in ((s.ta, "client-mode"), (s.ts, "server-mode")):
            wait_until(lambda: not tb.socket_status(0)["connected"], 3.0,
                       what="%s back-end to see the connection closed" % which)
        log("ok: %s: both back-ends saw their connection closed" % name)
        check("shutting down" in s.log_text(), "%s: the shutdown is logged" % name)


def part_fatal(t):
    for name in FATAL:
        s = Setup(t, name)
        os.kill(s.daemon.pid, signum(name))
        code = s.daemon.proc.wait(10)
        check(code != 0, "%s: vhubd died (exit status %s)" % (name, code))
        check_eq(s.sockets(), {"control": False, "server-mode": False},
                 "%s: both sockets removed" % name)


def main(t):
    # the fatal signals would dump cores
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    part_survived(t)
    part_reload(t)
    part_clean(t)
    part_fatal(t)


run(main)

#!/usr/bin/env python3
"""vhubd's systemd integration, tested without systemd as PID 1: the test
plays systemd's part.

    test_systemd.py notify     NOTIFY_SOCKET + watchdog: READY=1 only once the
                               control socket accepts (and sent by the main pid,
                               as NotifyAccess=main wants), STATUS= follows the
                               VM/device counts, WATCHDOG=1 at half of
                               WATCHDOG_USEC, none for another WATCHDOG_PID,
                               STOPPING=1 on SIGTERM, exit 0
    test_systemd.py activate   socket activation through Debian's
                               systemd-socket-activate --fdname=control: the
                               inherited socket is used, the first (queued)
                               connection and later ones are served, no socket
                               of its own is created; without it, the socket
                               goes into the first of $RUNTIME_DIRECTORY
    test_systemd.py logging    logs on stderr when JOURNAL_STREAM is unset or
                               names another file; --log-level debug shows
                               debug lines, --log-level err hides info lines
    test_systemd.py docs       the units parse as systemd expects them
                               (Type=notify, the socket's FileDescriptorName)
                               and vhubd(8) names every option of vhubd --help
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import procs                                          # noqa: E402
from vhubtest.client import Client                                  # noqa: E402
from vhubtest.daemon import vhubd_path                              # noqa: E402
from vhubtest.sdnotify import NotifyListener, spawn_vhubd, start_watched  # noqa: E402
from vhubtest.sdnotify import service_env as base_env              # noqa: E402
from vhubtest.testing import Skip, TestFailure, check, check_eq, log, run  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WATCHDOG_USEC = 2000000


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(path)
    return s


def terminate(p, timeout=10.0):
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TestFailure("FAILED: vhubd did not exit within %.0fs of SIGTERM" % timeout)


# ---- (a) NOTIFY_SOCKET and the watchdog

def scenario_notify(t):
    d = t.tmpdir()
    p, n, control = start_watched(t, d, ["--log-level", "debug"], WATCHDOG_USEC)

    first = n.recv(10.0)
    check(first is not None, "a first notification arrives")
    check("READY" in first[2] and first[2]["READY"] == "1", "the first notification is READY=1", first[2])
    # READY=1 promises a listening socket: connect at once, no retry
    try:
        connect(control).close()
    except OSError as e:
        raise TestFailure("FAILED: READY=1 was sent before the control socket accepts (%s)" % e)
    log("ok: the control socket accepts as soon as READY=1 arrives")
    check_eq(first[1], p.pid, "READY=1 comes from the main pid (NotifyAccess=main)")
    check_eq(first[2].get("STATUS"), "0 VMs, 0 devices", "READY=1 carries the initial STATUS")

    c = Client(control)
    t.defer(c.close)
    c.call("vm.create", {"vm": "vm0"})
    m = n.wait_for("STATUS", value="1 VMs, 0 devices")
    check(m[1] == p.pid, "STATUS after vm.create: 1 VMs, 0 devices")
    c.call("vm.destroy", {"vm": "vm0"})
    n.wait_for("STATUS", value="0 VMs, 0 devices")
    log("ok: STATUS back to 0 VMs after vm.destroy")

    # WATCHDOG=1 at about WATCHDOG_USEC/2 from the event loop
    pings = []
    start = time.monotonic()
    while time.monotonic() - start < 3.6:
        m = n.recv(3.6 - (time.monotonic() - start))
        if m and m[2].get("WATCHDOG") == "1":
            pings.append(m[0])
    check(len(pings) >= 3, "WATCHDOG=1 keeps arriving (%d in 3.6 s)" % len(pings))
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    half = WATCHDOG_USEC / 2e6
    check(all(0.5 * half <= g <= 1.5 * half for g in gaps),
          "WATCHDOG=1 every ~%.1f s (half of WATCHDOG_USEC)" % half, ["%.2f" % g for g in gaps])

    c.close()
    code = terminate(p)
    m = n.wait_for("STOPPING", value="1", timeout=2.0)
    check(m[1] == p.pid, "STOPPING=1 on SIGTERM")
    check_eq(code, 0, "exit status after SIGTERM")

    # WATCHDOG_PID naming another process: the watchdog is not ours to feed
    n2 = NotifyListener(os.path.join(d, "notify2.sock"))
    t.defer(n2.close)
    env = base_env(NOTIFY_SOCKET=n2.path, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1")
    log_path = os.path.join(d, "vhubd2.log")
    t.add_log("vhubd2 log", log_path)
    p2 = procs.spawn([vhubd_path(), "--control", os.path.join(d, "c2.sock"), "--backend-dir",
                      os.path.join(d, "backends")], log_path=log_path, env=env)
    t.defer(procs.reap, p2, signal.SIGKILL)
    n2.wait_for("READY", value="1")
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        m = n2.recv(deadline - time.monotonic())
        check(m is None or "WATCHDOG" not in m[2], "no WATCHDOG=1 when WATCHDOG_PID is another pid")
    check_eq(terminate(p2), 0, "exit status after SIGTERM (no watchdog)")


# ---- (b) socket activation

def scenario_activate(t):
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        raise Skip("systemd-socket-activate not installed (Debian: package systemd)")
    d = t.tmpdir()
    control = os.path.join(d, "activated.sock")
    os.makedirs(os.path.join(d, "backends"))
    default_sock = "/run/vhub/control.sock" if os.geteuid() == 0 else None
    existed = default_sock is not None and os.path.exists(default_sock)
    log_path = os.path.join(d, "vhubd.log")
    t.add_log("vhubd (socket-activated) log", log_path)
    # no --control: the socket must come from LISTEN_FDS
    p = procs.spawn([tool, "-l", control, "--fdname=control", vhubd_path(), "--backend-dir",
                     os.path.join(d, "backends"), "--log-level", "debug"], log_path=log_path,
                    env=base_env())
    t.defer(procs.reap, p, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not os.path.exists(control):
        check(time.monotonic() < deadline and p.poll() is None, "systemd-socket-activate listens")
        time.sleep(0.01)
    # the first connection starts vhubd; it is queued on the inherited socket
    c = Client(control, timeout=10)
    t.defer(c.close)
    info = c.call("daemon.info")
    check_eq(info["pid"], p.pid, "daemon.info over the inherited socket (vhubd exec'd in place)")
    c2 = Client(control, timeout=10)
    t.defer(c2.close)
    c2.call("vm.create", {"vm": "vm0"})
    check_eq([v["vm"] for v in c.call("vm.list")["vms"]], ["vm0"], "a second connection is served too")
    with open(log_path) as f:
        text = f.read()
    check("inherited socket" in text, "vhubd says it listens on the inherited socket")
    if default_sock and not existed:
        check(not os.path.exists(default_sock), "no socket of its own at %s" % default_sock)
    c.close()
    c2.close()
    check_eq(terminate(p), 0, "exit status after SIGTERM")
    check(os.path.exists(control), "the inherited socket's file is left to its owner (systemd)")

    # RuntimeDirectory=vhub vhost-user without the socket unit: the control
    # socket is the first runtime directory's control.sock
    rt, other = os.path.join(d, "rt"), os.path.join(d, "rt-other")
    os.makedirs(rt)
    os.makedirs(other)
    env = base_env(RUNTIME_DIRECTORY="%s:%s" % (rt, other))
    p, _ = spawn_vhubd(t, d, ["--backend-dir", os.path.join(d, "backends")], env, name="vhubd-rtdir")
    path = os.path.join(rt, "control.sock")
    deadline = time.monotonic() + 10
    while True:
        try:
            c = Client(path)
            break
        except OSError:
            check(time.monotonic() < deadline and p.poll() is None,
                  "vhubd listens on $RUNTIME_DIRECTORY/control.sock")
            time.sleep(0.01)
    check_eq(c.call("daemon.info")["pid"], p.pid, "RUNTIME_DIRECTORY (first of two): control.sock there")
    check_eq(os.listdir(other), [], "nothing in the second runtime directory")
    c.close()
    check_eq(terminate(p), 0, "exit status after SIGTERM")


# ---- (c) logging

def scenario_logging(t):
    d = t.tmpdir()
    os.makedirs(os.path.join(d, "backends"))

    def run_with(name, level, env):
        control = os.path.join(d, name + ".sock")
        args = ["--control", control, "--backend-dir", os.path.join(d, "backends")]
        if level:
            args += ["--log-level", level]
        log_path = os.path.join(d, name + ".log")
        t.add_log(name, log_path)
        p = procs.spawn([vhubd_path()] + args, log_path=log_path, env=env)
        t.defer(procs.reap, p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                c = Client(control)
                break
            except OSError:
                check(time.monotonic() < deadline and p.poll() is None, "%s: vhubd starts" % name)
                time.sleep(0.01)
        c.call("vm.create", {"vm": "vm0"})
        c.call("vm.memory.add", {"vm": "vm0", "gpa": 0, "size": 4096, "fd": 0}, fds=[_memfd(4096)])
        c.call("vm.destroy", {"vm": "vm0"})
        c.close()
        check_eq(terminate(p), 0, "%s: exit status after SIGTERM" % name)
        with open(log_path) as f:
            return f.read()

    text = run_with("default", None, base_env())
    check(re.search(r"^vhubd\[[0-9.]+\] info: ", text, re.M) is not None,
          "JOURNAL_STREAM unset: info lines on stderr")
    check(re.search(r"\] debug: ", text) is None, "default level (info): no debug lines")

    text = run_with("debug", "debug", base_env())
    check(re.search(r"^vhubd\[[0-9.]+\] debug: ", text, re.M) is not None, "--log-level debug: debug lines")
    check(re.search(r"\] info: ", text) is not None, "--log-level debug: info lines too")

    text = run_with("err", "err", base_env())
    check(re.search(r"\] (info|debug|notice|warning): ", text) is None, "--log-level err: no info or debug lines",
          text[:300])

    # JOURNAL_STREAM naming some other file: stderr is not the journal
    st = os.stat("/dev/null")
    text = run_with("foreign-stream", "info", base_env(JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino)))
    check(re.search(r"^vhubd\[[0-9.]+\] info: ", text, re.M) is not None,
          "JOURNAL_STREAM of another file: still plain lines on stderr")

    # a bad level is a usage error, before anything starts
    p = subprocess.run([vhubd_path(), "--log-level", "loud"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=base_env(), timeout=10)
    check(p.returncode != 0 and b"log-level" in p.stderr, "--log-level loud is refused", p.stderr)


def _memfd(size):
    fd = os.memfd_create("vhubt-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


# ---- (d) the units and the man page agree with the daemon

def scenario_docs(t):
    service = os.path.join(SRC, "systemd", "vhubd.service")
    sock = os.path.join(SRC, "systemd", "vhubd.socket")

    def keys(path):
        out = {}
        for line in open(path):
            line = line.strip()
            if line and not line.startswith(("#", "[")) and "=" in line:
                k, _, v = line.partition("=")
                out.setdefault(k, []).append(v)
        return out

    s = keys(service)
    check_eq(s.get("Type"), ["notify"], "vhubd.service: Type=notify")
    check(s.get("ExecStart", [""])[0].startswith("/usr/sbin/vhubd"), "vhubd.service: ExecStart=/usr/sbin/vhubd")
    check("vhub" in s.get("RuntimeDirectory", [""])[0].split(), "vhubd.service: RuntimeDirectory=vhub")
    check(s.get("WatchdogSec") is not None, "vhubd.service: WatchdogSec=")
    k = keys(sock)
    check_eq(k.get("ListenStream"), ["/run/vhub/control.sock"], "vhubd.socket: ListenStream")
    check_eq(k.get("FileDescriptorName"), ["control"], "vhubd.socket: FileDescriptorName=control")
    check_eq(k.get("Service"), ["vhubd.service"], "vhubd.socket: Service=vhubd.service")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        p = subprocess.run([analyze, "security", "--offline=true", "--no-pager", service],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        m = re.search(rb"Overall exposure level for vhubd.service: ([0-9.]+)", p.stdout)
        if m:
            check(float(m.group(1)) <= 2.0, "systemd-analyze security: exposure %s (at most 2.0)"
                  % m.group(1).decode())
        else:
            log("systemd-analyze security --offline unsupported here: %s" % p.stdout[-200:])

    if analyze:
        # verify both units as systemd would load them (the daemon's path
        # replaced by one that exists here; --man=no: no man pages needed)
        d = t.tmpdir()
        with open(service) as f:
            text = re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", f.read())
        with open(os.path.join(d, "vhubd.service"), "w") as f:
            f.write(text)
        shutil.copy(sock, os.path.join(d, "vhubd.socket"))
        p = subprocess.run([analyze, "verify", "--man=no", os.path.join(d, "vhubd.socket"),
                            os.path.join(d, "vhubd.service")],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        out = p.stdout.decode().strip()
        if p.returncode != 0 and "unrecognized option" in out:
            log("systemd-analyze verify --man=no unsupported here: %s" % out)
        else:
            check(p.returncode == 0 and out == "", "systemd-analyze verify: both units load cleanly", out)

    helptext = subprocess.run([vhubd_path(), "--help"], stdout=subprocess.PIPE, timeout=10).stdout.decode()
    options = sorted(set(re.findall(r"--[a-z][a-z-]+", helptext)))
    check(len(options) >= 10, "vhubd --help lists its options", options)
    man = open(os.path.join(SRC, "docs", "vhubd.8")).read().replace("\\-", "-")
    missing = [o for o in options if o not in man]
    check_eq(missing, [], "options of vhubd --help missing from docs/vhubd.8")


SCENARIOS = {
    "notify": scenario_notify,
    "activate": scenario_activate,
    "logging": scenario_logging,
    "docs": scenario_docs,
}


def main(t):
    names = sys.argv[1:] or list(SCENARIOS)
    for name in names:
        if name not in SCENARIOS:
            raise TestFailure("unknown scenario %s (have: %s)" % (name, ", ".join(SCENARIOS)))
    for name in names:
        log("==== %s" % name)
        SCENARIOS[name](t)


run(main)

#!/usr/bin/env python3
"""What vhubd sends to the journal, read from a journal socket the test plays.

vhubd logs to the journal when its stderr is the journal's stream
(JOURNAL_STREAM names stderr's device and inode, as systemd sets it), and
then sd_journal_sendv() sends one datagram per line to
/run/systemd/journal/socket.  The daemon runs in a mount namespace of its own
(`unshare -m`) in which that path is the test's datagram socket: the daemon
is the real one, its interface unchanged.

One VM that root makes for uid 4242, with a real qemu-storage-daemon device
(reconnect_ms 0) that is killed, at --log-level debug.  Checked:

- every entry has MESSAGE, PRIORITY 0..7, SYSLOG_IDENTIFIER=vhubd, and
  CODE_FILE / CODE_LINE / CODE_FUNC of the line that logged it: a source file
  of the daemon other than the logging module, a line of it with a log call
  nearby, inside the function CODE_FUNC names;
- an entry with VM= has UID= (4242, not the daemon's own 0) and a MESSAGE
  that starts with "jvm: ", or "jvm/jblk: " when it has DEVICE=jblk;
- an entry with VHOST_REQUEST= names that request in MESSAGE too, and the
  handshake's requests are among them;
- the lines an operator looks for are there with their priority: VM created
  (info), device added (info), back-end lost (warning), its state becoming
  failed (info), VM destroyed (info);
- without the journal, the same lines on stderr carry vm=, uid= and device=.
"""

import array
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import procs, scenarios                               # noqa: E402
from vhubtest.backends import QsdBackend                            # noqa: E402
from vhubtest.client import Client                                  # noqa: E402
from vhubtest.daemon import vhubd_path                              # noqa: E402
from vhubtest.memory import memfd                                   # noqa: E402
from vhubtest.sdnotify import service_env as base_env              # noqa: E402
from vhubtest.testing import Skip, TestFailure, check, check_eq, log, run  # noqa: E402

SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OTHER_UID = 4242
VM, DEV = "jvm", "jblk"
# the shell inside the namespace: the journal's directory (or, where the
# host has none, all of /run) becomes the test's, then vhubd replaces it
NS_SCRIPT = r'''set -e
fake=$1; shift
if [ -d /run/systemd/journal ]; then
    mount --bind "$fake/systemd/journal" /run/systemd/journal
else
    mount --bind "$fake" /run
fi
exec "$@"
'''


class JournalSocket:
    """journald's native socket: datagrams of KEY=value lines, or KEY\\n +
    le64 length + value for values with newlines; a too big entry comes as
    a memfd (SCM_RIGHTS) instead."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(path)
        self.entries = []
        self.errors = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        self.sock.settimeout(0.1)
        while not self.stopping:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * 4))
            except socket.timeout:
                continue
            except OSError as e:
                self.errors.append(str(e))
                return
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    for fd in fds:
                        data = os.pread(fd, 1 << 20, 0)
                        os.close(fd)
            try:
                entry = parse_native(data)
            except ValueError as e:
                self.errors.append("%s: %r" % (e, data[:200]))
                continue
            with self.lock:
                self.entries.append(entry)

    def snapshot(self):
        with self.lock:
            return list(self.entries)

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


def parse_native(data):
    entry = {}
    i = 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            v = data[nl + 9:nl + 9 + n]
            if data[nl + 9 + n:nl + 10 + n] != b"\n":
                raise ValueError("binary field %r not ended by a newline" % k)
            i = nl + 10 + n
        key = k.decode()
        if key in entry:
            raise ValueError("field %s twice" % key)
        entry[key] = v.decode(errors="replace")
    return entry


def source_of(code_file):
    """The source file CODE_FILE names, found in this tree whatever prefix
    the build directory gave it."""
    parts = code_file.split("/")
    for i in range(len(parts)):
        cand = os.path.join(SRC, *parts[i:])
        if os.path.isfile(cand):
            return cand
    return None


FUNC_DEF = re.compile(r"^[A-Za-z_][\w \*]*?\b(\w+)\(")
LOG_CALL = re.compile(r"\b(\w+_log|vhub_log_\w+|log_(full|error|warning|notice|info|debug))\(")


def enclosing_function(lines, lineno):
    """The function whose body holds line lineno (1-based): the last
    definition at column 0 above it, as this code base writes them."""
    for k in range(lineno - 1, -1, -1):
        m = FUNC_DEF.match(lines[k])
        if m and not lines[k].rstrip().endswith(";") and not lines[k].startswith("#"):
            return m.group(1)
    return None


def check_location(entries):
    sources = {}
    seen_files = set()
    for e in entries:
        what = "entry %r" % e.get("MESSAGE", "")[:80]
        for k in ("CODE_FILE", "CODE_LINE", "CODE_FUNC"):
            if k not in e:
                raise TestFailure("FAILED: %s has no %s: %r" % (what, k, e))
        f = e["CODE_FILE"]
        if os.path.basename(f) == "vhub-log.c":
            raise TestFailure("FAILED: %s: CODE_FILE is the logging module's own (%s:%s %s)"
                              % (what, f, e["CODE_LINE"], e["CODE_FUNC"]))
        path = source_of(f)
        if path is None:
            raise TestFailure("FAILED: %s: CODE_FILE=%s is no source file of this tree" % (what, f))
        if path not in sources:
            with open(path) as fh:
                sources[path] = fh.read().splitlines()
        lines = sources[path]
        line = int(e["CODE_LINE"])
        if not 1 <= line <= len(lines):
            raise TestFailure("FAILED: %s: CODE_LINE=%d outside %s (%d lines)" % (what, line, f, len(lines)))
        near = lines[max(0, line - 8):line + 3]
        if not any(LOG_CALL.search(x) for x in near):
            raise TestFailure("FAILED: %s: no log call near %s:%d" % (what, f, line))
        func = enclosing_function(lines, line)
        if func != e["CODE_FUNC"]:
            raise TestFailure("FAILED: %s: %s:%d is in %s(), CODE_FUNC says %s"
                              % (what, f, line, func, e["CODE_FUNC"]))
        seen_files.add(os.path.relpath(path, SRC))
    log("ok: every entry's CODE_FILE/CODE_LINE/CODE_FUNC is its caller's, in %s" % sorted(seen_files))
    return seen_files


def named(msg, request):
    return re.search(r"(?<![A-Za-z0-9_])%s(?![A-Za-z0-9_])" % re.escape(request), msg) is not None


def connect(path, p, what):
    deadline = time.monotonic() + 10
    while True:
        try:
            return Client(path)
        except OSError:
            check(time.monotonic() < deadline and p.poll() is None, "%s: vhubd starts" % what)
            time.sleep(0.02)


def terminate(p):
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(10)
    except subprocess.TimeoutExpired:
        raise TestFailure("FAILED: vhubd did not exit within 10s of SIGTERM")


def vm_lifecycle(t, d, control, p, what, with_device):
    """Root makes VM for OTHER_UID, gives it memory and (with_device) a
    qemu-storage-daemon disk that is then killed; then destroys it."""
    c = connect(control, p, what)
    c.call("vm.create", {"vm": VM, "uid": OTHER_UID})
    ram = memfd(1 << 20)
    c.call("vm.memory.add", {"vm": VM, "uid": OTHER_UID, "gpa": 0, "size": 1 << 20, "fd": 0}, fds=[ram])
    os.close(ram)
    if with_device:
        img = scenarios.sparse_image(os.path.join(d, "disk.img"), 1 << 20)
        sock = os.path.join(d, "backends", DEV + ".sock")
        qsd = t.enter(QsdBackend(img, sock, num_queues=1, log_dir=d))
        c.call("device.add", {"vm": VM, "uid": OTHER_UID, "device": DEV, "socket": sock, "type": "blk",
                              "reconnect_ms": 0})
        qsd.kill()
        deadline = time.monotonic() + 10
        while c.call("device.list", {"vm": VM, "uid": OTHER_UID})["devices"][0]["state"] != "failed":
            check(time.monotonic() < deadline, "%s: the device fails once its back-end is killed" % what)
            time.sleep(0.05)
        c.call("device.remove", {"vm": VM, "uid": OTHER_UID, "device": DEV})
    c.call("vm.destroy", {"vm": VM, "uid": OTHER_UID})
    c.close()


def scenario_journal(t, d):
    fake_run = os.path.join(d, "run")
    os.makedirs(os.path.join(fake_run, "systemd", "journal"))
    if not os.path.isdir("/run/systemd/journal") and \
            (os.path.realpath(d) + "/").startswith("/run/"):
        raise TestFailure("FAILED: the test's directory %s is under /run, which the namespace replaces "
                          "(set VHUB_TEST_TMPDIR elsewhere)" % d)
    journal = JournalSocket(os.path.join(fake_run, "systemd", "journal", "socket"))
    t.defer(journal.close)

    control = os.path.join(d, "journal.sock")
    log_path = os.path.join(d, "vhubd-journal.log")
    open(log_path, "wb").close()
    t.add_log("vhubd (journal) stderr", log_path)
    st = os.stat(log_path)
    env = base_env(JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", NS_SCRIPT, "sh", fake_run,
            vhubd_path(), "--control", control, "--backend-dir", os.path.join(d, "backends"),
            "--log-level", "debug"]
    p = procs.spawn(argv, log_path=log_path, env=env)
    t.defer(procs.reap, p, signal.SIGKILL)
    vm_lifecycle(t, d, control, p, "journal", with_device=True)
    check_eq(terminate(p), 0, "vhubd (journal) exits 0 on SIGTERM")
    time.sleep(0.2)     # the last datagrams
    entries = journal.snapshot()
    check_eq(journal.errors, [], "every datagram parsed as the journal's native protocol")
    with open(log_path, errors="replace") as f:
        stray = [ln for ln in f if ln.startswith("vhubd[")]
    check_eq(stray, [], "with JOURNAL_STREAM naming stderr, no line went to stderr")
    check(len(entries) >= 20, "the daemon logged to the journal socket (%d entries)" % len(entries))

    for e in entries:
        for k in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"):
            if k not in e:
                raise TestFailure("FAILED: entry without %s: %r" % (k, e))
        if e["SYSLOG_IDENTIFIER"] != "vhubd" or not re.fullmatch(r"[0-7]", e["PRIORITY"]):
            raise TestFailure("FAILED: SYSLOG_IDENTIFIER/PRIORITY of %r" % e)
    log("ok: every entry has MESSAGE, PRIORITY 0..7, SYSLOG_IDENTIFIER=vhubd")
    files = check_location(entries)
    check({"daemon/vhub-vm.c", "daemon/vhub-device.c"} <= files,
          "lines come from the model's own files (vhub-vm.c, vhub-device.c)", sorted(files))

    vm_entries = [e for e in entries if "VM" in e]
    check(len(vm_entries) >= 10, "%d entries name a VM" % len(vm_entries))
    for e in vm_entries:
        if e["VM"] != VM:
            raise TestFailure("FAILED: VM=%s, not %s: %r" % (e["VM"], VM, e))
        if e.get("UID") != str(OTHER_UID):
            raise TestFailure("FAILED: entry about VM %s without UID=%d: %r" % (VM, OTHER_UID, e))
        want = "%s/%s: " % (VM, e["DEVICE"]) if "DEVICE" in e else "%s: " % VM
        if not e["MESSAGE"].startswith(want):
            raise TestFailure("FAILED: MESSAGE does not start with %r: %r" % (want, e["MESSAGE"]))
    log("ok: every entry about the VM has UID=%d and its MESSAGE names the VM (and device)" % OTHER_UID)
    dev_entries = [e for e in vm_entries if e.get("DEVICE") == DEV]
    check(len(dev_entries) >= 5, "%d entries name the device" % len(dev_entries))
    check(all("DEVICE" not in e or "VM" in e for e in entries), "no DEVICE= without VM=")

    req_entries = [e for e in entries if "VHOST_REQUEST" in e]
    for e in req_entries:
        if not named(e["MESSAGE"], e["VHOST_REQUEST"]):
            raise TestFailure("FAILED: VHOST_REQUEST=%s not named in MESSAGE %r"
                              % (e["VHOST_REQUEST"], e["MESSAGE"]))
        if e.get("DEVICE") != DEV:
            raise TestFailure("FAILED: VHOST_REQUEST= on an entry about no device: %r" % e)
    reqs = {e["VHOST_REQUEST"] for e in req_entries}
    check({"GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_OWNER"} <= reqs,
          "the handshake's requests have VHOST_REQUEST= (and MESSAGE names them)", sorted(reqs))

    def find(pattern, prio, device=None):
        got = [e for e in vm_entries if re.search(pattern, e["MESSAGE"])
               and (device is None or e.get("DEVICE") == device)]
        check(got, "an entry matching %r" % pattern)
        check_eq(got[0]["PRIORITY"], str(prio), "PRIORITY of %r" % got[0]["MESSAGE"])
        return got[0]

    find(r"^jvm: VM created", 6)
    find(r"^jvm/jblk: device added", 6, DEV)
    lost = find(r"^jvm/jblk: back-end lost", 4, DEV)
    check_eq(lost["CODE_FILE"].split("/")[-1], "vhub-device-link.c", "back-end lost: logged by the link's file (vhub-device-link.c)")
    check_eq(lost["CODE_FUNC"], "device_on_lost", "back-end lost: CODE_FUNC")
    find(r"^jvm/jblk: state ready -> disconnected \(", 6, DEV)
    find(r"^jvm/jblk: device failed: ", 3, DEV)
    find(r"^jvm: VM destroyed", 6)
    others = [e for e in entries if "VM" not in e]
    check(others and all("UID" not in e for e in others),
          "lines about no VM (%d) carry no UID=" % len(others))


def scenario_stderr(t, d):
    control = os.path.join(d, "stderr.sock")
    log_path = os.path.join(d, "vhubd-stderr.log")
    t.add_log("vhubd (stderr)", log_path)
    p = procs.spawn([vhubd_path(), "--control", control, "--backend-dir", os.path.join(d, "backends")],
                    log_path=log_path, env=base_env())
    t.defer(procs.reap, p, signal.SIGKILL)
    vm_lifecycle(t, d, control, p, "stderr", with_device=False)
    check_eq(terminate(p), 0, "vhubd (stderr) exits 0 on SIGTERM")
    with open(log_path, errors="replace") as f:
        lines = [ln.rstrip("\n") for ln in f if ln.startswith("vhubd[")]
    ctx = " vm=%s uid=%d " % (VM, OTHER_UID)
    for pat in (r"\] info: vm=jvm uid=4242 VM created", r"\] info: vm=jvm uid=4242 VM destroyed"):
        check(any(re.search(pat, ln) for ln in lines), "stderr: %s" % pat, lines[-5:])
    check(all(ctx in ln for ln in lines if " vm=" in ln), "stderr: every VM line has vm= and uid=")


def main(t):
    if os.geteuid() != 0:
        raise Skip("needs root: the daemon's journal socket is replaced in a mount namespace")
    d = t.tmpdir()
    os.makedirs(os.path.join(d, "backends"))
    scenario_journal(t, d)
    scenario_stderr(t, d)


run(main)

#!/usr/bin/env python3
"""vhubctl against the real vhubd and a real qemu-storage-daemon.

Every subcommand that works against the daemon is run as a process, its
table output and its --json output are checked against what the daemon
says through the Python client, and so are the exit codes: 0 success,
1 the daemon answered with an error (code, message and detail on stderr),
2 usage error, 3 cannot connect.

Covered: daemon info; vm create (--linger-ms, --hold), attach, list,
destroy; vm memory add (--memfd and a file), list, remove; device add, list,
config get (hex, --base64, --json) and set, start (vrings from a file,
eventfds made by vhubctl), stop, reset, net mtu, state save, stop --no-drain
and kick (-32005 on qemu-storage-daemon), state save/load/check through vhub-test-backend
(pipes both ways); vm dirty-log start --save / stop; shared-object add,
list, remove; events (--vm, all, table and JSON lines); call (raw params,
fds, unknown method); --uid as root; $VHUB_SOCKET.

Help: `vhubctl help COMMAND` and `COMMAND --help` print the same text for
every command: its usage, a description, every option of its synopsis with
what it does -- exactly the options vhubctl(1) gives the command -- and an
example that runs that command.  Feature names: the virtio features of a
blk device by their names (generic and blk's own, checked against this
file's own table of the virtio spec's bits), the protocol features by the
vhost-user spec's, unnamed bits as bitN, --json the numbers.  `vm list`'s
LINGER counts down for a VM without an owner (linger_remaining_ms, an
extension) and is - while one owns it; `device list`'s TYPE (type, an
extension).  -32010: a missing socket inside the back-end directory says
"no such socket", outside it the same words as an existing path there.
"""

import base64
import datetime
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vhubtest import scenarios                            # noqa: E402
from vhubtest.backends import QsdBackend                  # noqa: E402
from vhubtest.client import u64                           # noqa: E402
from vhubtest.daemon import Daemon                        # noqa: E402
from vhubtest.testbackend import TestBackend              # noqa: E402
from vhubtest.testing import TestFailure, check, check_eq, log, run  # noqa: E402

IMAGE_SIZE = 16 << 20
LINGER_MS = 30000
SRC = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GLOBAL_OPTIONS = {"socket", "json", "uid", "timeout", "help", "version"}

# The names vhubctl must print, from the specifications (an oracle of this
# test's own, not vhubctl's table): virtio 1.3 "Reserved Feature Bits" plus
# vhost's LOG_ALL and vhost-user's PROTOCOL_FEATURES; virtio-blk's bits; the
# vhost-user protocol features.
VIRTIO_GENERIC = {24: "NOTIFY_ON_EMPTY", 26: "LOG_ALL", 27: "ANY_LAYOUT", 28: "RING_INDIRECT_DESC",
                  29: "EVENT_IDX", 30: "PROTOCOL_FEATURES", 32: "VERSION_1", 33: "ACCESS_PLATFORM",
                  34: "RING_PACKED", 35: "IN_ORDER", 36: "ORDER_PLATFORM", 37: "SR_IOV",
                  38: "NOTIFICATION_DATA", 39: "NOTIF_CONFIG_DATA", 40: "RING_RESET", 41: "ADMIN_VQ"}
VIRTIO_BLK = {0: "BARRIER", 1: "SIZE_MAX", 2: "SEG_MAX", 4: "GEOMETRY", 5: "RO", 6: "BLK_SIZE", 7: "SCSI",
              9: "FLUSH", 10: "TOPOLOGY", 11: "CONFIG_WCE", 12: "MQ", 13: "DISCARD", 14: "WRITE_ZEROES",
              15: "LIFETIME", 16: "SECURE_ERASE", 17: "ZONED"}
PROTOCOL = ["MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "CROSS_ENDIAN",
            "CRYPTO_SESSION", "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD", "HOST_NOTIFIER", "INFLIGHT_SHMFD",
            "RESET_DEVICE", "INBAND_NOTIFICATIONS", "CONFIGURE_MEM_SLOTS", "STATUS", "XEN_MMAP",
            "SHARED_OBJECT", "DEVICE_STATE", "GET_VRING_BASE_INFLIGHT", "GPA_ADDRESSES", "SHMEM",
            "GET_VRING_BASE_SKIP_DRAIN"]


def vhubctl_path():
    path = os.environ.get("VHUBCTL")
    if not path or not os.access(path, os.X_OK):
        # unset is a failure, not a skip: meson sets it once vhubctl is built
        raise TestFailure("VHUBCTL is not set to the vhubctl binary (got %r)" % path)
    return path


class Ctl:
    def __init__(self, socket_path):
        self.exe = vhubctl_path()
        self.socket = socket_path

    def run(self, *args, expect=0, socket=True, env=None, timeout=30):
        argv = [self.exe] + (["--socket", self.socket] if socket else []) + list(args)
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           env=env, stdin=subprocess.DEVNULL)
        out, err = p.stdout.decode(), p.stderr.decode()
        if p.returncode != expect:
            log("$ %s\n--- stdout\n%s--- stderr\n%s" % (" ".join(argv), out, err))
            raise TestFailure("FAILED: vhubctl %s exited %d, expected %d"
                              % (" ".join(args), p.returncode, expect))
        log("ok: vhubctl %s -> %d" % (" ".join(args), expect))
        return out, err

    def json(self, *args):
        out, _ = self.run("--json", *args)
        lines = out.strip().splitlines()
        check_eq(len(lines), 1, "vhubctl --json %s prints one line" % " ".join(args))
        return json.loads(lines[0])

    def spawn(self, *args, log_path=None):
        argv = [self.exe, "--socket", self.socket] + list(args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)


def table(out):
    """Rows of a vhubctl table (header first), split on runs of 2+ blanks."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.strip()]


def kv(out):
    """'key   value' lines of daemon info / device add."""
    d = {}
    for line in out.splitlines():
        k, _, v = line.partition("  ")
        d[k.strip()] = v.strip()
    return d


def names(mask, table):
    """'0x1f (A,B,bit5)' as vhubctl prints a mask."""
    bits = [b for b in range(64) if mask >> b & 1]
    return "%#x (%s)" % (mask, ",".join(table.get(b, "bit%d" % b) for b in bits) or "-")


def man_options():
    """{command words: its options} from the entries of docs/vhubctl.1: the
    header lines of each entry (.TP and its .TQ), not the prose."""
    def plain(line):
        line = re.sub(r"\\f[BIRP]", "", line).replace("\\-", "-").replace('"', " ")
        return " ".join(line.split()[1:])
    with open(os.path.join(SRC, "docs", "vhubctl.1")) as f:
        lines = f.read().splitlines()
    heads = []
    for i, line in enumerate(lines):
        if line in (".TP", ".TQ") and i + 1 < len(lines) and lines[i + 1].startswith((".B ", ".BI ", ".BR ")):
            heads.append(plain(lines[i + 1]))
    return heads


def wait_for_event(ctl, proc, trigger, timeout=10.0):
    """Repeat trigger() until proc (vhubctl events --count 1) exits: the
    subscription is only in place some time after the process starts."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise TestFailure("FAILED: vhubctl events saw no event within %.0fs" % timeout)
        trigger()
        time.sleep(0.1)
    out, err = proc.communicate()
    check_eq(proc.returncode, 0, "vhubctl events --count 1 exit code")
    return out.decode(), err.decode()


def check_help(ctl):
    """Every command's help, from `vhubctl --help`'s list: the same text
    both ways, usage first, a description, each synopsis option explained,
    the same options as vhubctl(1), and an example of the command itself."""
    out, _ = ctl.run("--help")
    commands = [m.group(1) for m in re.finditer(r"^  ([a-z][a-z -]*?[a-z])  +\S", out, re.M)]
    check(len(commands) >= 30 and "device add" in commands and "events" in commands,
          "vhubctl --help lists the commands (%d)" % len(commands))
    man = man_options()
    for words in commands:
        text, _ = ctl.run("help", *words.split())
        again, _ = ctl.run(*(words.split() + ["--help"]))
        check_eq(again, text, "'%s --help' is 'help %s'" % (words, words))
        lines = text.splitlines()
        if not lines[0].startswith("Usage: vhubctl %s" % words) or lines[1] != "" or not lines[2].strip():
            raise TestFailure("FAILED: help %s: usage line, then a description: %r" % (words, lines[:3]))
        synopsis = set(re.findall(r"--([a-z][a-z-]*)", lines[0]))
        section = text.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0] if "\nOptions:\n" in text else ""
        described = {}
        for m in re.finditer(r"^  --([a-z][a-z-]*)(?: (\S+))?\s*(.*)$", section, re.M):
            described[m.group(1)] = m.group(3) or "(on the next line)"
        if set(described) != synopsis or not all(described.values()):
            raise TestFailure("FAILED: help %s: options %s described, synopsis has %s"
                              % (words, sorted(described), sorted(synopsis)))
        entries = [h for h in man if h == words or h.startswith(words + " ")
                   and not any(c != words and c.startswith(words + " ") and (h == c or h.startswith(c + " "))
                               for c in commands)]
        if not entries:
            raise TestFailure("FAILED: vhubctl(1) has no entry for %s" % words)
        in_man = set(re.findall(r"--([a-z][a-z-]*)", " ".join(entries))) - GLOBAL_OPTIONS
        if in_man != synopsis:
            raise TestFailure("FAILED: %s: vhubctl(1) names options %s, vhubctl help %s"
                              % (words, sorted(in_man), sorted(synopsis)))
        example = text.split("\nExample:\n", 1)[1] if "\nExample:\n" in text else ""
        if not re.search(r"^  vhubctl (--\S+ (\S+ )?)*%s( |$)" % re.escape(words), example, re.M):
            raise TestFailure("FAILED: help %s: no example of the command: %r" % (words, example))
    log("ok: help of %d commands: usage, description, every option explained (as in vhubctl(1)), "
        "an example" % len(commands))
    out, _ = ctl.run("help", "vm", "memory")
    check_eq(out.splitlines(), ["Commands:", "  vhubctl vm memory add VM GPA (FILE | --memfd SIZE) [--size N] "
                                "[--offset N] [--uaddr N]", "  vhubctl vm memory remove VM GPA",
                                "  vhubctl vm memory list VM"], "help of a group: its commands")
    ctl.run("help", "no-such-command", expect=2)
    check_eq(ctl.run("help")[0], ctl.run("--help")[0], "'help' alone is --help")


def setup(t):
    """vhubd, a control connection of the test's own, and vhubctl pointed at it."""
    d = t.tmpdir()
    daemon = t.enter(Daemon(d))
    c = daemon.client()
    ctl = Ctl(daemon.control)
    uid = os.getuid()
    return types.SimpleNamespace(c=c, ctl=ctl, d=d, daemon=daemon, uid=uid)


def part_daemon_info(t, w):
    """Daemon info."""
    ctl, daemon, c = w.ctl, w.daemon, w.c
    out, _ = ctl.run("daemon", "info")
    info = kv(out)
    check_eq(info.get("pid"), str(daemon.pid), "daemon info table: pid")
    check_eq(info.get("vms"), "0", "daemon info table: vms")
    check("version" in info and "protocol features" in info, "daemon info table: version, protocol features")
    j = ctl.json("daemon", "info")
    check_eq(j["pid"], daemon.pid, "daemon info --json: pid")
    check_eq(u64(j["protocol_features"]), u64(c.call("daemon.info")["protocol_features"]),
             "daemon info --json: protocol_features as the daemon says")
    check(info["protocol features"].startswith("%#x " % u64(j["protocol_features"])),
          "daemon info table: protocol features in hex, then by name")


def part_usage_errors(t, w):
    """Usage errors (2) and connection errors (3), before anything exists."""
    ctl, d, daemon = w.ctl, w.d, w.daemon
    ctl.run(expect=2)
    ctl.run("bogus", expect=2)
    ctl.run("vm", expect=2)
    ctl.run("vm", "memory", expect=2)
    ctl.run("vm", "create", expect=2)
    ctl.run("vm", "create", "a", "b", expect=2)
    ctl.run("vm", "create", "vm0", "--linger-ms", "soon", expect=2)
    ctl.run("vm", "create", "vm0", "--no-such-option", expect=2)
    ctl.run("--uid", "abc", "vm", "list", expect=2)
    ctl.run("vm", "memory", "add", "vm0", "0", expect=2)       # neither FILE nor --memfd
    ctl.run("device", "config", "get", "vm0", "blk0", "x", "4", expect=2)
    out, _ = ctl.run("--help")
    check("vm memory add" in out and "Exit status" in out, "--help lists commands and exit codes")
    out, _ = ctl.run("vm", "memory", "add", "--help")
    check(out.startswith("Usage: vhubctl vm memory add VM GPA"), "COMMAND --help prints its usage")
    check_help(ctl)
    _, err = ctl.run("--socket", os.path.join(d, "no-such.sock"), "daemon", "info", socket=False, expect=3)
    check("cannot connect" in err, "no socket: 'cannot connect' on stderr")
    env = dict(os.environ, VHUB_SOCKET=daemon.control)
    out, _ = ctl.run("daemon", "info", socket=False, env=env)
    check_eq(kv(out).get("pid"), str(daemon.pid), "$VHUB_SOCKET names the socket")
    env = dict(os.environ, VHUB_SOCKET=os.path.join(d, "nothing-here.sock"))
    ctl.run("daemon", "info", socket=False, env=env, expect=3)


def part_vms(t, w):
    """VMs."""
    ctl, c, uid = w.ctl, w.c, w.uid
    _, err = ctl.run("vm", "create", "vm0", "--linger-ms", str(LINGER_MS))
    vms = c.call("vm.list")["vms"]
    check_eq([(v["vm"], v["uid"]) for v in vms], [("vm0", uid)],
             "vm create --linger-ms: the VM outlives vhubctl")
    _, err = ctl.run("vm", "create", "vm0", expect=1)
    check("-32003" in err and "already exists" in err, "vm create twice: -32003 and the message on stderr",
          err.strip())
    _, err = ctl.run("vm", "attach", "nope", expect=1)
    check("-32001" in err and "no such VM" in err and "nope" in err,
          "vm attach of an unknown VM: code, message, detail", err.strip())
    out, _ = ctl.run("--json", "vm", "attach", "nope", expect=1)
    e = json.loads(out)["error"]
    check_eq((e["code"], e["message"]), (-32001, "no such VM"), "--json error object on stdout")
    check("nope" in e["data"]["detail"], "--json error: detail")
    ctl.run("vm", "attach", "vm0")      # lingering: attach works, then lingers again

    rows = table(ctl.run("vm", "list")[0])
    check_eq(rows[0], ["VM", "UID", "REGIONS", "LINGER", "DEVICES"], "vm list header")
    check_eq(len(rows), 2, "vm list: one VM")
    check_eq(rows[1][:3] + rows[1][4:], ["vm0", str(uid), "0", "-"], "vm list row")
    m = re.fullmatch(r"(\d+)\.(\d) s left", rows[1][3])
    check(m is not None and 0 < int(m.group(1)) * 1000 + int(m.group(2)) * 100 <= LINGER_MS,
          "vm list: LINGER is the time left (%s)" % rows[1][3])
    left1 = ctl.json("vm", "list")["vms"][0]["linger_remaining_ms"]
    time.sleep(0.3)
    left2 = c.call("vm.list")["vms"][0]["linger_remaining_ms"]
    check(0 < left2 < left1 <= LINGER_MS, "linger_remaining_ms counts down (%d, then %d)" % (left1, left2))
    # owned: no time left to show
    p = ctl.spawn("vm", "attach", "vm0", "--hold")
    deadline = time.monotonic() + 10
    while "linger_remaining_ms" in c.call("vm.list")["vms"][0]:
        check(time.monotonic() < deadline and p.poll() is None, "vm attach --hold takes the VM")
        time.sleep(0.05)
    check_eq(table(ctl.run("vm", "list")[0])[1][3], "-", "vm list: LINGER - while a connection owns it")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    check_eq(p.returncode, 0, "vm attach --hold ends with 0 on SIGTERM")
    deadline = time.monotonic() + 10
    while "linger_remaining_ms" not in c.call("vm.list")["vms"][0]:
        check(time.monotonic() < deadline, "the VM lingers again once its holder exits")
        time.sleep(0.05)
    c.call("vm.create", {"vm": "owned"})
    owned = [v for v in c.call("vm.list")["vms"] if v["vm"] == "owned"][0]
    check("linger_remaining_ms" not in owned, "vm.list: an owned VM has no linger_remaining_ms")
    c.call("vm.destroy", {"vm": "owned"})


def part_memory(t, w):
    """Memory: a memfd and a file."""
    ctl, d, c = w.ctl, w.d, w.c
    ctl.run("vm", "memory", "add", "vm0", "0", "--memfd", "32M")
    ram = scenarios.sparse_image(os.path.join(d, "ram.bin"), 2 << 20)
    ctl.run("vm", "memory", "add", "vm0", "0x10000000", ram, "--offset", "1M", "--uaddr", "0x7f0000000000")
    regs = ctl.json("vm", "memory", "list", "vm0")["regions"]
    want = [{"gpa": 0, "size": 32 << 20, "offset": 0, "uaddr": 0},
            {"gpa": 0x10000000, "size": 1 << 20, "offset": 1 << 20, "uaddr": 0x7f0000000000}]
    got = sorted(({k: u64(v) for k, v in r.items()} for r in regs), key=lambda r: r["gpa"])
    check_eq(got, want, "vm memory list --json after a --memfd and a file region")
    check_eq(c.call("vm.memory.list", {"vm": "vm0"})["regions"], regs, "--json is the daemon's own result")
    rows = table(ctl.run("vm", "memory", "list", "vm0")[0])
    check_eq(rows, [["GPA", "SIZE", "OFFSET", "UADDR"], ["0x0", "32 MiB", "0x0", "0x0"],
                    ["0x10000000", "1 MiB", "0x100000", "0x7f0000000000"]], "vm memory list table")
    _, err = ctl.run("vm", "memory", "add", "vm0", "0x1000", "--memfd", "4K", expect=1)
    check("-32009" in err, "overlapping region: -32009", err.strip())
    ctl.run("vm", "memory", "remove", "vm0", "0x10000000")
    check_eq(len(c.call("vm.memory.list", {"vm": "vm0"})["regions"]), 1, "vm memory remove")
    ctl.run("vm", "memory", "remove", "vm0", "0x10000000", expect=1)
    vars(w).update(ram=ram)


def part_qsd_device(t, w):
    """A device on a real qemu-storage-daemon."""
    d, daemon, ctl, uid = w.d, w.daemon, w.ctl, w.uid
    img = os.path.join(d, "disk.img")
    scenarios.make_image(img, IMAGE_SIZE)
    sock = daemon.backend_socket("blk0.sock")
    t.enter(QsdBackend(img, sock, num_queues=2, log_dir=d))
    out, _ = ctl.run("device", "add", "vm0", "blk0", sock, "--type", "blk")
    added = kv(out)
    check_eq(added.get("queues"), "2", "device add table: queues")
    devs = ctl.json("device", "list", "vm0")["devices"]
    check_eq([(x["device"], x["state"], x["queues"], x["type"]) for x in devs], [("blk0", "ready", 2, "blk")],
             "device list --json, with the type (an extension)")
    feats, proto = u64(devs[0]["features"]), u64(devs[0]["protocol_features"])
    check_eq(added["features"], names(feats, {**VIRTIO_BLK, **VIRTIO_GENERIC}),
             "device add --type blk: the features in hex, then by name (generic and virtio-blk's)")
    check("VERSION_1" in added["features"] and "SEG_MAX" in added["features"] and "bit" not in added["features"],
          "qemu-storage-daemon's blk features all have names", added["features"])
    check_eq(added["protocol features"], names(proto, dict(enumerate(PROTOCOL))),
             "device add: the protocol features in hex, then by name")
    check("REPLY_ACK" in added["protocol features"], "REPLY_ACK among them", added["protocol features"])
    j = ctl.json("device", "list", "vm0", "blk0")
    check_eq(j, {"devices": devs}, "device list VM DEVICE --json: the daemon's entry, numbers unchanged")
    one = kv(ctl.run("device", "list", "vm0", "blk0")[0])
    check_eq((one["device"], one["type"], one["state"], one["socket"]), ("blk0", "blk", "ready", sock),
             "device list VM DEVICE: one field a line")
    check_eq(one["features"], added["features"], "device list VM DEVICE: features by name")
    check_eq(one["acked features"], "0x0 (-)", "device list VM DEVICE: nothing acked yet")
    check_eq(one["protocol features"], added["protocol features"], "device list VM DEVICE: protocol features")
    _, err = ctl.run("device", "list", "vm0", "nodev", expect=1)
    check("-32002" in err and "nodev" in err, "device list VM DEVICE of a device the VM lacks: -32002", err.strip())
    rows = table(ctl.run("device", "list", "vm0")[0])
    check_eq(rows[0], ["DEVICE", "TYPE", "STATE", "VMM", "QUEUES", "RECONNECTS", "FEATURES", "ACKED",
                       "PROTOCOL", "SOCKET"], "device list header")
    check_eq(rows[1][:6], ["blk0", "blk", "ready", "-", "2", "0"], "device list row, with the type")
    check_eq(rows[1][6:9], ["%#x" % u64(devs[0][k]) for k in ("features", "acked_features", "protocol_features")],
             "device list: features, acked, protocol features in hex")
    check_eq(rows[1][-1], sock, "device list: socket")
    vm_row = table(ctl.run("vm", "list")[0])[1]
    check_eq(vm_row[:3] + vm_row[4:], ["vm0", str(uid), "1", "blk0"], "vm list names the device")
    _, err = ctl.run("device", "add", "vm0", "blk0", sock, expect=1)
    check("-32003" in err, "device add twice: -32003")

    # -32010: outside the back-end directories the same words, there or not;
    # inside, a missing socket is named as such
    _, err = ctl.run("device", "add", "vm0", "blk1", "/etc/passwd", expect=1)
    check("-32010" in err and "/etc/passwd is outside the back-end directories" in err,
          "a socket outside the back-end directories: -32010", err.strip())
    missing_out = os.path.join(d, "no-such-dir", "x.sock")
    _, err = ctl.run("device", "add", "vm0", "blk1", missing_out, expect=1)
    check("-32010" in err and "%s is outside the back-end directories" % missing_out in err
          and "no such" not in err, "a missing path outside: the same answer as an existing one", err.strip())
    missing_in = daemon.backend_socket("not-there.sock")
    _, err = ctl.run("device", "add", "vm0", "blk1", missing_in, expect=1)
    check("-32010" in err and "no such socket: %s" % missing_in in err,
          "a missing socket inside the back-end directory: 'no such socket'", err.strip())
    _, err = ctl.run("device", "add", "vm0", "blk1", daemon.backend_socket("no-dir/s.sock"), "--mode", "server",
                     expect=1)
    check("-32010" in err and "no such directory: %s" % daemon.backend_socket("no-dir") in err,
          "server mode in a missing directory inside: 'no such directory'", err.strip())

    # config space: capacity (le64 sectors) at offset 0
    out, _ = ctl.run("device", "config", "get", "vm0", "blk0", "0", "8")
    want_bytes = struct.pack("<Q", IMAGE_SIZE // 512)
    check_eq(out.strip(), "0000  " + " ".join("%02x" % b for b in want_bytes), "config get: hex dump")
    out, _ = ctl.run("device", "config", "get", "vm0", "blk0", "0", "8", "--base64")
    check_eq(base64.b64decode(out.strip()), want_bytes, "config get --base64")
    j = ctl.json("device", "config", "get", "vm0", "blk0", "0", "8")
    check_eq(base64.b64decode(j["data"]), want_bytes, "config get --json")
    out, _ = ctl.run("device", "config", "get", "vm0", "blk0", "0", "20")
    check_eq(len(out.splitlines()), 2, "config get of 20 bytes: two hex-dump lines")
    check(out.splitlines()[1].startswith("0010 "), "hex dump offsets")
    _, err = ctl.run("device", "config", "get", "vm0", "nodev", "0", "8", expect=1)
    check("-32002" in err, "config get of an unknown device: -32002")

    ctl.run("device", "config", "set", "vm0", "blk0", "32", "01")     # writeback: SET_CONFIG answered
    ctl.run("device", "config", "set", "vm0", "blk0", "32", "zz", expect=2)


def part_start_stop(t, w):
    """Start (vhubctl makes the eventfds), dirty log, stop, reset."""
    d, ctl, c = w.d, w.ctl, w.c
    vrings = [{"index": 0, "size": 64, "desc": "0x100000", "avail": "0x101000", "used": "0x102000"},
              {"index": 1, "size": 64, "desc": "0x110000", "avail": "0x111000", "used": "0x112000"}]
    vrings_file = os.path.join(d, "vrings.json")
    with open(vrings_file, "w") as f:
        json.dump({"vrings": vrings}, f)
    ctl.run("device", "start", "vm0", "blk0", "--features", "0x100000000", "--vrings", "@" + vrings_file)
    dev = c.call("device.list", {"vm": "vm0"})["devices"][0]
    check_eq((dev["state"], u64(dev["acked_features"]) & (1 << 32)), ("running", 1 << 32),
             "device start --vrings @FILE: running, VERSION_1 acked")
    ctl.run("device", "start", "vm0", "blk0", "--features", "0x100000000", "--vrings", json.dumps(vrings),
            expect=1)
    ctl.run("device", "start", "vm0", "blk0", "--vrings", "[]", expect=2)
    log_file = os.path.join(d, "dirty.log")
    out, _ = ctl.run("vm", "dirty-log", "start", "vm0", "--save", log_file)
    check(out.startswith("dirty log: ") and os.path.getsize(log_file) > 0,
          "vm dirty-log start --save writes the bitmap", out.strip())
    ctl.run("vm", "dirty-log", "start", "vm0", expect=1)
    ctl.run("vm", "dirty-log", "stop", "vm0")
    ctl.run("vm", "dirty-log", "stop", "vm0", expect=1)
    # device stats: the daemon's counters, the same both ways
    st = c.call("device.stats", {"vm": "vm0", "device": "blk0"})
    j = ctl.json("device", "stats", "vm0", "blk0")
    check_eq({k: v for k, v in j.items() if k != "since_ms"}, {k: v for k, v in st.items() if k != "since_ms"},
             "device stats --json: device.stats' result")
    one = kv(ctl.run("device", "stats", "vm0", "blk0")[0])
    check(one["state"].startswith("running (for ") and one["requests"] == str(st["requests"]) and
          one["replies"] == str(st["replies"]) and one["losses"] == "0" and one["last loss"] == "-" and
          one["restore"] == "-" and re.fullmatch(r"\d+(\.\d{3})? (us|ms|s)", one["handshake"]) is not None,
          "device stats: one line per counter", one)
    check(st["requests"] > 0 and st["replies"] > 0 and st["handshake_us"] > 0, "device stats: counted", st)
    _, err = ctl.run("device", "stats", "vm0", "nodev", expect=1)
    check("-32002" in err, "device stats of an unknown device: -32002")

    # qemu-storage-daemon has neither GET_VRING_BASE_SKIP_DRAIN nor INBAND_NOTIFICATIONS
    _, err = ctl.run("device", "stop", "vm0", "blk0", "--no-drain", expect=1)
    check("-32005" in err and "GET_VRING_BASE_SKIP_DRAIN" in err, "device stop --no-drain: -32005")
    _, err = ctl.run("device", "kick", "vm0", "blk0", "0", expect=1)
    check("-32005" in err and "INBAND_NOTIFICATIONS" in err, "device kick: -32005")
    ctl.run("device", "kick", "vm0", "blk0", "x", expect=2)
    rows = table(ctl.run("device", "stop", "vm0", "blk0")[0])
    check_eq(rows, [["INDEX", "BASE"], ["0", "0"], ["1", "0"]], "device stop: every ring's base")
    ctl.run("device", "stop", "vm0", "blk0", expect=1)
    ctl.run("device", "reset", "vm0", "blk0")
    check_eq(c.call("device.list", {"vm": "vm0"})["devices"][0]["state"], "ready", "device reset: ready")
    # qemu-storage-daemon has neither NET_MTU nor DEVICE_STATE: -32005
    _, err = ctl.run("device", "net", "mtu", "vm0", "blk0", "1500", expect=1)
    check("-32005" in err, "device net mtu on a blk back-end: -32005")
    state = os.path.join(d, "blk0.state")
    _, err = ctl.run("device", "state", "save", "vm0", "blk0", state, expect=1)
    check("-32005" in err and not os.path.exists(state), "device state save unsupported: -32005, no file left")
    vars(w).update(state=state, vrings=vrings)


def part_device_state(t, w):
    """Device state through vhub-test-backend (DEVICE_STATE): a pipe each way."""
    daemon, d, ctl, c = w.daemon, w.d, w.ctl, w.c
    vrings, state = w.vrings, w.state
    if os.environ.get("VHUB_TEST_BACKEND"):
        s1, s2 = daemon.backend_socket("tb1.sock"), daemon.backend_socket("tb2.sock")
        tb = t.enter(TestBackend(sockets=[s1, s2], args=["--queues", "1"], log_dir=d))
        feats = u64(ctl.json("device", "add", "vm0", "tb1", s1)["features"]) & ~(1 << 30)
        ctl.run("device", "add", "vm0", "tb2", s2)
        # no --type: the generic bits by name, the device's own as bitN
        one = kv(ctl.run("device", "list", "vm0", "tb1")[0])
        check_eq((one["type"], one["features"]), ("-", names(feats | 1 << 30, VIRTIO_GENERIC)),
                 "device list of an untyped device: generic names, bitN for the rest")
        check_eq(table(ctl.run("device", "list", "vm0")[0])[2][:2], ["tb1", "-"], "device list: TYPE - if untyped")
        check("type" not in c.call("device.list", {"vm": "vm0"})["devices"][1], "device.list: no type if none")
        one_ring = json.dumps(vrings[:1])
        ctl.run("device", "start", "vm0", "tb1", "--features", "%#x" % feats, "--vrings", one_ring)
        ctl.run("device", "state", "save", "vm0", "tb1", state, expect=1)    # running: -32004
        ctl.run("device", "stop", "vm0", "tb1")
        out, _ = ctl.run("device", "state", "save", "vm0", "tb1", state)
        with open(state, "rb") as f:
            blob = f.read()
        check(blob[:4] == b"VTBS" and out.strip() == "saved %d bytes of device state" % len(blob),
              "device state save: the back-end's blob in the file, its size printed", out.strip())
        out, _ = ctl.run("device", "state", "load", "vm0", "tb2", state)
        check_eq(out.strip(), "loaded %d bytes of device state" % len(blob), "device state load")
        check_eq(ctl.json("device", "state", "load", "vm0", "tb2", state, "--no-check"), {},
                 "device state load --no-check --json")
        ctl.run("device", "state", "check", "vm0", "tb2")     # the check of that transfer
        ctl.run("device", "state", "load", "vm0", "tb2", os.path.join(d, "missing"), expect=4)
        ctl.run("device", "remove", "vm0", "tb1")
        ctl.run("device", "remove", "vm0", "tb2")
        tb.stop()
    else:
        log("VHUB_TEST_BACKEND not set: device state save/load through vhubctl not exercised")


def part_shared_objects(t, w):
    """Shared objects."""
    ctl, ram = w.ctl, w.ram
    uuid = "12345678-1234-1234-1234-123456789abc"
    ctl.run("shared-object", "add", "vm0", uuid, "--memfd", "4K")
    check_eq(table(ctl.run("shared-object", "list", "vm0")[0]), [["UUID", "OWNER"], [uuid, "vmm"]],
             "shared-object list table")
    ctl.run("shared-object", "add", "vm0", uuid, ram, expect=1)
    ctl.run("shared-object", "remove", "vm0", uuid)
    check_eq(ctl.json("shared-object", "list", "vm0"), {"objects": []}, "shared-object list --json")


def part_events(t, w):
    """Events: --vm in JSON lines, all VMs as a table."""
    ctl, c = w.ctl, w.c
    def linger_once():
        ctl.run("vm", "attach", "vm0")  # its connection closes: vm.lingering

    p = ctl.spawn("--json", "events", "--vm", "vm0", "--count", "1")
    out, _ = wait_for_event(ctl, p, linger_once)
    ev = json.loads(out.strip().splitlines()[0])
    check_eq((ev["event"], ev["vm"], ev["linger_ms"]), ("vm.lingering", "vm0", LINGER_MS),
             "events --vm --json: one JSON object per line")
    p = ctl.spawn("events", "--count", "1")
    out, _ = wait_for_event(ctl, p, linger_once)
    check(re.match(r"^\d\d:\d\d:\d\d\.\d{3} vm\.lingering vm0 uid=0 linger_ms=%d$" % LINGER_MS,
                   out.strip()) is not None, "events table line", out.strip())
    ctl.run("events", "--vm", "nope", "--count", "1", expect=1)
    # --all as root: every uid's VMs, here one root makes for uid 4242 (this
    # test's connection owns it, not vhubctl's)
    def other_uid():
        c.call("vm.create", {"vm": "theirs", "uid": 4242})
        c.call("vm.destroy", {"vm": "theirs", "uid": 4242})

    before = time.time()
    p = ctl.spawn("events", "--all", "--count", "2")
    out, _ = wait_for_event(ctl, p, other_uid)
    lines = out.strip().splitlines()
    # (the subscription may start between a create and its destroy)
    kinds = sorted(re.sub(r"^\d\d:\d\d:\d\d\.\d{3} ", "", x) for x in lines)
    check(len(lines) == 2 and kinds == ["vm.created theirs uid=4242",
                                        "vm.destroyed theirs uid=4242 reason=\"destroy\""],
          "events --all as root: another uid's VM comes and goes, one line each", out)
    stamped = datetime.datetime.strptime(lines[0][:12], "%H:%M:%S.%f").time()
    lo, hi = (datetime.datetime.fromtimestamp(x).time() for x in (before - 1, time.time()))
    check(lo <= stamped <= hi or lo > hi, "events: the line's time is the event's (local time)",
          (lo, stamped, hi))
    ctl.run("events", "--all", "--vm", "vm0", expect=2)
    # interrupted: exit 0
    p = ctl.spawn("events")
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=10)
    check_eq(p.returncode, 0, "events ends with 0 on SIGINT")


def part_device_remove(t, w):
    """Device remove."""
    ctl = w.ctl
    ctl.run("device", "remove", "vm0", "blk0")
    check_eq(table(ctl.run("device", "list", "vm0")[0])[1:], [], "device list empty after device remove")
    ctl.run("device", "remove", "vm0", "blk0", expect=1)


def part_call(t, w):
    """Call: the raw escape hatch."""
    ctl, daemon, c = w.ctl, w.daemon, w.c
    out, _ = ctl.run("call", "daemon.info")
    check_eq(json.loads(out)["pid"], daemon.pid, "call daemon.info: pretty JSON result")
    ctl.run("call", "vm.memory.add", '{"vm":"vm0","gpa":"0x40000000","size":4096,"fd":0}', "--memfd", "4096")
    check_eq(len(c.call("vm.memory.list", {"vm": "vm0"})["regions"]), 2, "call with --memfd passes the fd")
    _, err = ctl.run("call", "no.such.method", expect=1)
    check("-32601" in err, "call of an unknown method: -32601")
    ctl.run("call", "vm.list", "{not json", expect=2)


def part_hold(t, w):
    """--hold: the VM lives as long as vhubctl."""
    ctl, c = w.ctl, w.c
    p = ctl.spawn("vm", "create", "held", "--hold")
    deadline = time.monotonic() + 10
    while "held" not in [v["vm"] for v in c.call("vm.list")["vms"]]:
        check(time.monotonic() < deadline and p.poll() is None, "vm create --hold creates the VM")
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=10)
    check_eq(p.returncode, 0, "vm create --hold ends with 0 on SIGTERM")
    deadline = time.monotonic() + 10
    while "held" in [v["vm"] for v in c.call("vm.list")["vms"]]:
        check(time.monotonic() < deadline, "the held VM goes with its vhubctl")
        time.sleep(0.05)


def part_uid(t, w):
    """--uid: root names another uid's VM."""
    uid, ctl = w.uid, w.ctl
    if uid == 0:
        other = 4242
        ctl.run("--uid", str(other), "vm", "create", "vm0", "--linger-ms", "10000")
        rows = table(ctl.run("vm", "list")[0])
        check_eq(sorted(r[:2] for r in rows[1:]), [["vm0", "0"], ["vm0", str(other)]],
                 "two uids, each with a vm0")
        rows = table(ctl.run("vm", "list", "--uid", str(other))[0])
        check_eq([r[:2] for r in rows[1:]], [["vm0", str(other)]], "vm list --uid narrows the list")
        ctl.run("--uid", str(other), "vm", "memory", "add", "vm0", "0", "--memfd", "1M")
        check_eq(table(ctl.run("--uid", str(other), "vm", "memory", "list", "vm0")[0])[1][1], "1 MiB",
                 "--uid reaches the other uid's VM")
        ctl.run("--uid", str(other), "vm", "destroy", "vm0")
        ctl.run("--uid", str(other), "vm", "destroy", "vm0", expect=1)
    else:
        log("not root: --uid cases skipped")


def part_destroy(t, w):
    """Destroy."""
    ctl, c = w.ctl, w.c
    ctl.run("vm", "destroy", "vm0")
    check_eq(c.call("vm.list")["vms"], [], "vm destroy: no VM left")
    check_eq(table(ctl.run("vm", "list")[0]), [["VM", "UID", "REGIONS", "LINGER", "DEVICES"]],
             "vm list: header only")
    ctl.run("vm", "destroy", "vm0", expect=1)
    check_eq(ctl.json("daemon", "info")["vms"], 0, "daemon info --json: vms back to 0")


def main(t):
    w = setup(t)
    part_daemon_info(t, w)
    part_usage_errors(t, w)
    part_vms(t, w)
    part_memory(t, w)
    part_qsd_device(t, w)
    part_start_stop(t, w)
    part_device_state(t, w)
    part_shared_objects(t, w)
    part_events(t, w)
    part_device_remove(t, w)
    part_call(t, w)
    part_hold(t, w)
    part_uid(t, w)
    part_destroy(t, w)


run(main)

#!/usr/bin/env python3
"""Scale: one vhubd holding thousands of devices (issue 14, "10,000 devices").

Not a pass/fail test: it prints figures (docs/performance.md, "Scale").

What it builds, in one vhubd (--log-level warning):
  VMs of PER_VM devices each (default 4), each VM one 1 MiB memfd region;
  every device a qemu-storage-daemon null-co export, PER_QSD exports per qsd
  process (default 200), added and started with 2 rings of 128 on eventfds
  (the bench closes its own copies: the daemon holds its dups);
  until DEVICES devices (default 10,000) or until the daemon answers -32008
  (resource limit): what comes first on a machine is its fd limit (the
  daemon raises its soft RLIMIT_NOFILE to the hard one; a started device
  holds 6 fds: its socket, its back-end channel, 2 kick and 2 call eventfds).

What it measures, at 1 VM (PER_VM devices), at each CHECKPOINTS count and
at the most it reached:
  - vhubd's memory from /proc/PID/status: VmRSS, RssAnon, RssFile, RssShmem.
    vhubd never maps guest memory (it reads ring indexes with pread), so
    RssShmem stays ~0 and RssAnon is the daemon's own memory; per device:
    (RssAnon(N) - RssAnon(0)) / N, 0 being the daemon before any VM;
  - control latency, each call timed on its own over a plain socket client
    (send the line, read the answer line; no client library in the way):
    daemon.info, device.list of the first VM, vm.memory.add + vm.memory.remove
    of a 2 MiB memfd on the first VM (4 devices: the change fans out to
    them); CALLS calls each, median and p90;
  - the time to attach each next 1,000 devices (add + start, one after the
    other from one client): flat if nothing per call grows with the count.
At the most it reached:
  - the -32008 itself: code, detail (it must name the fd limit), that the
    daemon still answers and holds no more fds after a refused call;
  - vm.list of every VM: the size of its one answer line and its time;
  - one qsd process with PER_QSD exports SIGKILLed and started again: time
    from its start to every one of its devices' device.reconnected, its own
    start (spawn -> every socket listening), and against that, the same
    devices removed and attached fresh (all device.add at once, then all
    device.start at once, on one connection); meanwhile another client times
    device.list of the first VM (its devices are in another qsd process).

    VHUBD=build/daemon/vhubd PYTHONPATH=tests/integration python3 tests/bench/bench_scale.py
    meson test -C build --benchmark --suite bench -v scale

Knobs (environment): BENCH_SCALE_DEVICES (10000), BENCH_SCALE_PER_VM (4),
BENCH_SCALE_PER_QSD (200), BENCH_SCALE_CHECKPOINTS ("1000,2000,5000"),
BENCH_SCALE_CALLS (200), BENCH_SCALE_START (1; 0 adds devices without
starting them: 2 fds each, so more of them fit), BENCH_SCALE_FDSTORE (0;
1 runs both vhubds under the tests' played service manager with an fd store,
as the systemd unit does: every change is committed to the restart
snapshots and the fd store; and at the end a planned restart -- SIGTERM to
exit, the start to READY=1, every device still there),
BENCH_SCALE_IDLE_CONNS (1000; 0: skipped): with the first VM, daemon.info and
vm.memory.add with that many more connections open (the fd budget counts
each connection's fds per check; with an fd store the daemon's snapshot
holds every connection).  The played service
manager is Python: its same_fd() check (as systemd's, one kcmp() per stored
fd per push) makes building slow past a few thousand devices.
"""

import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest.backends import QsdNullBackend              # noqa: E402
from vhubtest.client import RpcError, u64_json            # noqa: E402
from vhubtest.client import Client                        # noqa: E402
from vhubtest.daemon import Daemon, vhubd_path            # noqa: E402
from vhubtest.scenarios import idle_blk_start              # noqa: E402
from vhubtest.servicemanager import ServiceManager         # noqa: E402
from vhubtest.testing import Skip, log, run               # noqa: E402

DEVICES = int(os.environ.get("BENCH_SCALE_DEVICES", "10000"))
PER_VM = int(os.environ.get("BENCH_SCALE_PER_VM", "4"))
PER_QSD = int(os.environ.get("BENCH_SCALE_PER_QSD", "200"))
CHECKPOINTS = [int(x) for x in os.environ.get("BENCH_SCALE_CHECKPOINTS", "1000,2000,5000").split(",") if x]
CALLS = int(os.environ.get("BENCH_SCALE_CALLS", "200"))
START = os.environ.get("BENCH_SCALE_START", "1") != "0"
FDSTORE = os.environ.get("BENCH_SCALE_FDSTORE", "0") == "1"
IDLE_CONNS = int(os.environ.get("BENCH_SCALE_IDLE_CONNS", "1000"))

MiB = 1 << 20
REGION_GPA = MiB               # the VM's region: [1 MiB, 2 MiB)
HOT_GPA = 0x100000000          # the probe's memory change: 2 MiB at 4 GiB
RING = 128
LIMIT_REACHED = -32008


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


def status_kib(pid):
    """VmRSS, RssAnon, RssFile, RssShmem (KiB) of pid."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0])
    return out


def cpu_s(pid):
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0]) / 1e9


def fd_count(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def nofile_limit(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return None


def listening_paths():
    """Every listening unix socket path, from one read of /proc/net/unix."""
    paths = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode Path; St 01 = listening
            if len(parts) >= 8 and parts[5] == "01":
                paths.add(parts[7])
    return paths


class RawClient:
    """A blocking control client of the smallest cost: one line out, one in."""

    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.s.connect(path)
        self.buf = b""
        self.id = 0

    def call_line(self, method, params=None, fds=()):
        self.id += 1
        msg = {"jsonrpc": "2.0", "id": self.id, "method": method}
        if params is not None:
            msg["params"] = params
        if fds:
            msg["fds"] = len(fds)
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        if fds:
            socket.send_fds(self.s, [data], list(fds))
        else:
            self.s.sendall(data)
        while b"\n" not in self.buf:
            chunk = self.s.recv(1 << 20)
            if not chunk:
                raise RuntimeError("daemon closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def call(self, method, params=None, fds=()):
        msg = json.loads(self.call_line(method, params, fds))
        if "error" in msg:
            e = msg["error"]
            raise RpcError(e["code"], e["message"], e.get("data"))
        return msg["result"]

    def timed(self, method, params=None, fds=()):
        t0 = time.perf_counter()
        self.call_line(method, params, fds)
        return (time.perf_counter() - t0) * 1e3

    def close(self):
        self.s.close()


class FastQsd(QsdNullBackend):
    """QsdNullBackend whose readiness check reads /proc/net/unix once per
    poll (with thousands of sockets, once per socket takes seconds)."""

    def wait_for_socket(self, timeout=60.0):
        want = set(self.sockets)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.print_log()
                raise RuntimeError("qsd exited with %s" % self.proc.returncode)
            if want <= listening_paths():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("qsd did not listen on its %d sockets" % len(want))
            time.sleep(0.005)


class Fleet:
    """The qsd processes, PER_QSD exports each, started as devices need them.
    The first VM's devices (the latency probe's) get a qsd of their own with
    just those exports: a qsd's main loop polls every fd it has, so its
    answers slow down as its other exports connect, and the probe is to
    time vhubd, not that."""

    def __init__(self, t, daemon, log_dir):
        self.t, self.daemon, self.log_dir = t, daemon, log_dir
        self.groups = []
        socks = [daemon.backend_socket("probe_%d.sock" % i) for i in range(PER_VM)]
        self.probe = t.enter(FastQsd(socks, num_queues=2, log_dir=log_dir))

    def socket(self, index):
        if index < PER_VM:
            return self.probe.sockets[index]
        index -= PER_VM
        g = index // PER_QSD
        while len(self.groups) <= g:
            k = len(self.groups)
            socks = [self.daemon.backend_socket("q%03d_%03d.sock" % (k, i)) for i in range(PER_QSD)]
            self.groups.append(self.t.enter(FastQsd(socks, num_queues=2, log_dir=self.log_dir)))
        return self.groups[g].sockets[index % PER_QSD]


class Bench:
    def __init__(self, t, daemon, owner, probe):
        self.t, self.daemon, self.c, self.probe = t, daemon, owner, probe
        self.fleet = Fleet(t, daemon, daemon.workdir)
        self.devices = []          # (vm, device, socket index)
        self.vms = []
        self.base = status_kib(daemon.pid)
        self.rows = []
        self.limit_error = None
        self.batch_ms = []         # (devices before, ms for the next 1,000)
        hot = os.memfd_create("bench-scale-hot", os.MFD_CLOEXEC)
        os.ftruncate(hot, 2 * MiB)
        self.hot = hot
        t.defer(os.close, hot)

    def start_params(self, vm, dev, slot, fds):
        return idle_blk_start(vm, dev, slot, REGION_GPA, size=RING)

    def new_vm(self):
        vm = "vm%05d" % len(self.vms)
        self.c.call("vm.create", {"vm": vm})
        fd = os.memfd_create("bench-scale-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, MiB)
            self.c.call("vm.memory.add", {"vm": vm, "gpa": REGION_GPA, "size": MiB, "fd": 0}, fds=[fd])
        finally:
            os.close(fd)
        self.vms.append(vm)
        return vm

    def attach(self, vm, slot):
        """device.add (+ start): True, or False at -32008 (recorded)."""
        index = len(self.devices)
        sock = self.fleet.socket(index)
        dev = "d%d" % slot
        try:
            self.c.call("device.add", {"vm": vm, "device": dev, "socket": sock, "type": "blk"},
                        timeout=60)
        except RpcError as e:
            if e.code != LIMIT_REACHED:
                raise
            self.limit_error = ("device.add", e)
            return False
        if START:
            fds = []
            for _ in range(2):
                fds += [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                        os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
            try:
                self.c.call("device.start", self.start_params(vm, dev, slot, fds), fds=fds, timeout=60)
            except RpcError as e:
                if e.code != LIMIT_REACHED:
                    raise
                self.limit_error = ("device.start", e)
                self.c.call("device.remove", {"vm": vm, "device": dev})
                return False
            finally:
                for fd in fds:
                    os.close(fd)
        self.devices.append((vm, dev, index))
        return True

    def build_to(self, target):
        """Attach VMs of PER_VM devices until target devices; False at the limit."""
        t_batch, n_batch, c_batch = time.perf_counter(), len(self.devices), cpu_s(self.daemon.pid)
        while len(self.devices) < target:
            vm = self.new_vm()
            for slot in range(PER_VM):
                if not self.attach(vm, slot):
                    return False
                if len(self.devices) % 1000 == 0:
                    now, cpu = time.perf_counter(), cpu_s(self.daemon.pid)
                    k = max(1, len(self.devices) - n_batch)
                    self.batch_ms.append((n_batch, (now - t_batch) * 1e3 / k, (cpu - c_batch) * 1e6 / k))
                    t_batch, n_batch, c_batch = now, len(self.devices), cpu
        return True

    def latencies(self):
        """The probe calls on the first VM, here and on the baseline daemon
        (one VM), alternately: both see the machine's load alike."""
        vm0 = self.vms[0]
        here = {"info": [], "list": [], "add": [], "rem": [], "cpu": {}}
        base = {"info": [], "list": [], "add": [], "rem": [], "cpu": {}}
        both = ((self.probe, here, self.daemon.pid), (self.base_probe, base, self.base_pid))
        mem_add = {"vm": vm0, "gpa": u64_json(HOT_GPA), "size": 2 * MiB, "fd": 0}
        mem_rem = {"vm": vm0, "gpa": u64_json(HOT_GPA)}

        def phase(key, n, one):
            cpu0 = [cpu_s(pid) for _, _, pid in both]
            for _ in range(n):
                for raw, out, _ in both:
                    one(raw, out)
            for (_, out, pid), c0 in zip(both, cpu0):
                out["cpu"][key] = (cpu_s(pid) - c0) * 1e6 / n   # vhubd us per call (or pair)

        phase("info", CALLS, lambda raw, out: out["info"].append(raw.timed("daemon.info")))
        phase("list", CALLS, lambda raw, out: out["list"].append(raw.timed("device.list", {"vm": vm0})))

        def pair(raw, out):
            out["add"].append(raw.timed("vm.memory.add", mem_add, fds=[self.hot]))
            out["rem"].append(raw.timed("vm.memory.remove", mem_rem))
        phase("mem", CALLS // 2, pair)
        return here, base

    def checkpoint(self, label):
        st = status_kib(self.daemon.pid)
        lat, base = self.latencies()
        n = len(self.devices)
        row = {"label": label, "devices": n, "vms": len(self.vms), "fds": fd_count(self.daemon.pid),
               "status": st, "lat": lat, "base": base,
               "anon_per_dev": (st["RssAnon"] - self.base["RssAnon"]) * 1024.0 / n if n else 0}
        self.rows.append(row)
        log("%-8s %6d devices %5d VMs %6d fds  VmRSS %7d KiB RssAnon %7d KiB RssFile %6d KiB "
            "RssShmem %5d KiB  (%.0f B anon/device)  daemon.info %.3f ms  device.list %.3f ms  "
            "memory add %.3f / remove %.3f ms  (1-VM daemon: %.3f %.3f %.3f %.3f)"
            % (label, n, len(self.vms), row["fds"], st["VmRSS"], st["RssAnon"], st["RssFile"],
               st["RssShmem"], row["anon_per_dev"], statistics.median(lat["info"]),
               statistics.median(lat["list"]), statistics.median(lat["add"]),
               statistics.median(lat["rem"]), statistics.median(base["info"]),
               statistics.median(base["list"]), statistics.median(base["add"]),
               statistics.median(base["rem"])))
        return row


def check_limit(b, daemon):
    """The refusal names the limit; the daemon serves on and holds no more fds."""
    what, e = b.limit_error
    detail = (e.data or {}).get("detail", "")
    limit = nofile_limit(daemon.pid)
    log("refused at %d devices: %s answered %d: %s" % (len(b.devices), what, e.code, detail))
    named = ("fd limit %d" % limit) in detail
    log("  the detail names the fd limit (%d): %s" % (limit, "yes" if named else "NO"))
    before = fd_count(daemon.pid)
    vm = b.vms[-1]
    refused_again = False
    try:
        b.c.call("device.add", {"vm": vm, "device": "over", "socket": b.fleet.socket(len(b.devices)),
                                "type": "blk"})
        b.c.call("device.remove", {"vm": vm, "device": "over"})
    except RpcError as e2:
        refused_again = e2.code == LIMIT_REACHED
    after = fd_count(daemon.pid)
    alive = b.probe.call("daemon.info")["pid"] == daemon.pid
    log("  another device.add: %s; daemon fds %d before, %d after; daemon.info answers: %s"
        % ("-32008 again" if refused_again else "accepted (and removed)", before, after, alive))
    return {"what": what, "detail": detail, "limit": limit, "named": named,
            "fds_same": before == after, "alive": alive}


def measure_vm_list(daemon):
    raw = RawClient(daemon.control)
    times, size = [], 0
    for _ in range(20):
        t0 = time.perf_counter()
        line = raw.call_line("vm.list")
        times.append((time.perf_counter() - t0) * 1e3)
        size = len(line) + 1
    n = len(json.loads(line)["result"]["vms"])
    raw.close()
    log("vm.list: %d VMs in one line of %d bytes (%.1f KiB); %.2f ms median, %.2f ms max of 20"
        % (n, size, size / 1024.0, statistics.median(times), max(times)))
    return {"vms": n, "bytes": size, "ms": statistics.median(times), "max": max(times)}


def _probe_main(control, vm, stop, out):
    raw = RawClient(control)
    samples = []
    while not stop.is_set():
        samples.append(raw.timed("device.list", {"vm": vm}))
        time.sleep(0.001)
    raw.close()
    out.send(samples)
    out.close()


class LatencyProbe:
    """device.list of the first VM, over and over, on a connection of its own
    and in a process of its own: a thread would wait for the interpreter
    lock behind the bench's own work (parsing /proc/net/unix with thousands
    of sockets takes tens of ms), and count that as the daemon's latency."""

    def __init__(self, daemon, vm):
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.rx, tx = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_probe_main, args=(daemon.control, vm, self.stop, tx), daemon=True)
        self.tx = tx

    def start(self):
        self.proc.start()
        self.tx.close()

    def finish(self):
        self.stop.set()
        samples = self.rx.recv()
        self.proc.join()
        self.rx.close()
        return samples


def sched_ms(pid):
    """vhubd's time on a CPU and time runnable but waiting for one (ms)."""
    with open("/proc/%d/schedstat" % pid) as f:
        run, wait = f.read().split()[:2]
    return int(run) / 1e6, int(wait) / 1e6


def restore_one_qsd(b, daemon):
    """SIGKILL the last full qsd process, start it again, time the restore;
    then the same devices removed and attached fresh."""
    full = (len(b.devices) - PER_VM) // PER_QSD
    if full < 1:
        log("restore: no full qsd process; skipped")
        return None
    g = full - 1
    qsd = b.fleet.groups[g]
    mine = [(vm, dev, i) for (vm, dev, i) in b.devices if i >= PER_VM and (i - PER_VM) // PER_QSD == g]
    names = {(vm, dev) for vm, dev, _ in mine}
    b.c.events()   # nothing old in the way

    idle = LatencyProbe(daemon, b.vms[0])
    idle.start()
    time.sleep(1.0)
    idle_samples = idle.finish()

    probe = LatencyProbe(daemon, b.vms[0])
    probe.start()
    sched0 = sched_ms(daemon.pid)
    qsd.kill()
    lost = 0
    while lost < len(mine):
        b.c.wait_event(lambda ev: ev.get("event") == "device.disconnected"
                       and (ev.get("vm"), ev.get("device")) in names, timeout=60)
        lost += 1
    t_spawn = time.perf_counter()
    qsd.start(wait=False)
    t_listen = None
    back = 0
    while back < len(mine):
        if t_listen is None and set(qsd.sockets) <= listening_paths():
            t_listen = time.perf_counter()
        try:
            b.c.wait_event(lambda ev: ev.get("event") == "device.reconnected"
                           and (ev.get("vm"), ev.get("device")) in names, timeout=0.005)
            back += 1
        except Exception:  # noqa: BLE001 - the client's timeout: poll the sockets again
            pass
    t_done = time.perf_counter()
    sched1 = sched_ms(daemon.pid)
    if t_listen is None:
        t_listen = t_done
    during = probe.finish()

    # fresh: remove them, then add all at once and start all at once
    pend = [b.c.request("device.remove", {"vm": vm, "device": dev}) for vm, dev, _ in mine]
    for p in pend:
        p.result(60)
    time.sleep(0.2)
    t0 = time.perf_counter()
    pend = [b.c.request("device.add", {"vm": vm, "device": dev, "socket": qsd.sockets[(i - PER_VM) % PER_QSD],
                                       "type": "blk"}) for vm, dev, i in mine]
    for p in pend:
        p.result(60)
    t_added = time.perf_counter()
    if START:
        allfds, pend = [], []
        for vm, dev, _ in mine:
            fds = []
            for _ in range(2):
                fds += [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                        os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)]
            allfds += fds
            slot = int(dev[1:])
            pend.append(b.c.request("device.start", b.start_params(vm, dev, slot, fds), fds=fds))
        for p in pend:
            p.result(60)
        for fd in allfds:
            os.close(fd)
    t1 = time.perf_counter()
    r = {"n": len(mine), "restore_ms": (t_done - t_spawn) * 1e3, "qsd_start_ms": (t_listen - t_spawn) * 1e3,
         "after_listen_ms": (t_done - t_listen) * 1e3, "fresh_ms": (t1 - t0) * 1e3,
         "fresh_add_ms": (t_added - t0) * 1e3, "idle": idle_samples, "during": during,
         "cpu_ms": sched1[0] - sched0[0], "wait_ms": sched1[1] - sched0[1],
         "window_ms": (t_done - t_spawn) * 1e3}
    log("restore of %d devices (one qsd SIGKILLed, started again): %.0f ms from its start to the last "
        "device.reconnected; qsd itself: %.0f ms to listen on all %d sockets; after that %.0f ms"
        % (r["n"], r["restore_ms"], r["qsd_start_ms"], r["n"], r["after_listen_ms"]))
    log("fresh attach of the same %d (all device.add at once, then all device.start): %.0f ms "
        "(adds %.0f ms); restore / fresh: %.2fx (from qsd listening: %.2fx)"
        % (r["n"], r["fresh_ms"], r["fresh_add_ms"], r["restore_ms"] / r["fresh_ms"],
           r["after_listen_ms"] / r["fresh_ms"]))
    log("device.list of %s meanwhile: median %.3f ms, p99 %.3f ms, max %.3f ms over %d calls; "
        "idle just before: median %.3f ms, p99 %.3f ms, max %.3f ms over %d"
        % (b.vms[0], statistics.median(during), pct(during, 99), max(during), len(during),
           statistics.median(idle_samples), pct(idle_samples, 99), max(idle_samples), len(idle_samples)))
    log("vhubd from the SIGKILL to the last device.reconnected: %.0f ms on a CPU, %.0f ms runnable but "
        "waiting for one (the machine's other work)" % (r["cpu_ms"], r["wait_ms"]))
    return r


class ManagedDaemon:
    """vhubd as the systemd unit runs it: under the tests' played service
    manager, with an fd store (what Daemon offers the bench, and restart())."""

    def __init__(self, t, d, extra_args=()):
        self.workdir = d
        self.control = os.path.join(d, "control.sock")
        self.backend_dir = os.path.join(d, "backends")
        os.makedirs(self.backend_dir, exist_ok=True)
        self.sm = t.enter(ServiceManager(d, fd_store_max=16384))
        t.add_log("vhubd under the service manager", self.sm.log_path)
        self.argv = [vhubd_path(), "--control", self.control, "--backend-dir", self.backend_dir,
                     "--log-level", "warning"] + list(extra_args)
        self.sm.start(self.argv)
        self.sm.wait_ready(timeout=30)

    @property
    def pid(self):
        return self.sm.pid

    def backend_socket(self, name):
        return os.path.join(self.backend_dir, name)

    def client(self, timeout=10.0):
        return Client(self.control, timeout=timeout)

    def restart(self):
        """A planned restart (`systemctl restart`): ms from SIGTERM to the
        exit, and from the start to READY=1."""
        with open(self.sm.log_path, "rb") as f:
            self.log_mark = len(f.read())
        t0 = time.perf_counter()
        self.sm.send_signal(15)
        self.sm.wait_exit(timeout=120)
        t1 = time.perf_counter()
        self.sm.start(self.argv)
        while not self.sm.ready:
            if self.sm.proc.poll() is not None:
                raise RuntimeError("vhubd exited (%s) instead of starting" % self.sm.proc.returncode)
            time.sleep(0.001)
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, len(self.sm.names())


def new_daemon(t, d, extra_args=()):
    if FDSTORE:
        return ManagedDaemon(t, d, extra_args)
    return t.enter(Daemon(d, log_level="warning", extra_args=list(extra_args)))


def idle_connections(b, daemon):
    """Control latency with IDLE_CONNS more connections open: the fd budget
    counts every connection's fds per check, and with an fd store the
    daemon's snapshot holds every connection."""
    vm0 = b.vms[0]
    mem_add = {"vm": vm0, "gpa": u64_json(HOT_GPA), "size": 2 * MiB, "fd": 0}
    mem_rem = {"vm": vm0, "gpa": u64_json(HOT_GPA)}

    def sample():
        # answered, not refused (a refusal is quick: it would time nothing)
        b.probe.call("vm.memory.add", mem_add, fds=[b.hot])
        b.probe.call("vm.memory.remove", mem_rem)
        info, add, cpu0 = [], [], cpu_s(daemon.pid)
        for _ in range(CALLS):
            info.append(b.probe.timed("daemon.info"))
            add.append(b.probe.timed("vm.memory.add", mem_add, fds=[b.hot]))
            b.probe.timed("vm.memory.remove", mem_rem)
        return info, add, (cpu_s(daemon.pid) - cpu0) * 1e6 / CALLS

    before = sample()
    idle = [RawClient(daemon.control) for _ in range(IDLE_CONNS)]
    time.sleep(0.5)
    during = sample()
    for c in idle:
        c.close()
    log("at %d devices, with %d more connections open%s: daemon.info median %.3f ms (%.3f with 2 connections), "
        "vm.memory.add %.3f ms (%.3f); vhubd CPU per daemon.info + add + remove %.0f us (%.0f)"
        % (len(b.devices), IDLE_CONNS, " (fd store)" if FDSTORE else "", statistics.median(during[0]),
           statistics.median(before[0]), statistics.median(during[1]), statistics.median(before[1]),
           during[2], before[2]))


def restart_with_store(b, daemon):
    """A planned restart with every device."""
    vm0 = b.vms[0]
    info = b.probe.call("daemon.info")
    fds_before = fd_count(daemon.pid)
    # the played service manager (Python, one kcmp() per stored fd per
    # push) falls behind the daemon's pushes: let it catch up first, else
    # the restart measures its backlog (the daemon waits a bounded time for
    # the store, then what is missing is restored as lost)
    t0, last, since = time.perf_counter(), None, time.perf_counter()
    while time.perf_counter() - since < 2.0 and time.perf_counter() - t0 < 120:
        n = len(daemon.sm.names())
        if n != last:
            last, since = n, time.perf_counter()
        time.sleep(0.1)
    log("the service manager's store settled at %d names %.1f s after the last change"
        % (last, time.perf_counter() - t0 - 2.0))
    exit_ms, ready_ms, stored = daemon.restart()
    fds_ready = fd_count(daemon.pid)
    t0 = time.perf_counter()
    probe = RawClient(daemon.control)
    after = probe.call("daemon.info")
    first_ms = (time.perf_counter() - t0) * 1e3
    devs = probe.call("device.list", {"vm": vm0})
    time.sleep(1.0)
    kinds = {}
    for fd in os.listdir("/proc/%d/fd" % daemon.pid):
        try:
            k = os.readlink("/proc/%d/fd/%s" % (daemon.pid, fd)).split(":")[0].split("[")[0]
        except OSError:
            continue
        kinds[k] = kinds.get(k, 0) + 1
    log("vhubd's fds: %d before the restart, %d a second after it (%s)"
        % (fds_before, sum(kinds.values()), ", ".join("%s %d" % kv for kv in sorted(kinds.items()))))
    states = sorted({d.get("state") for d in devs.get("devices", [])})
    probe.close()
    with open(daemon.sm.log_path, "rb") as f:
        lines = f.read()[daemon.log_mark:].decode(errors="replace").splitlines()
    bad = [x for x in lines if " warning: " in x or " error: " in x]
    for x in bad[:10]:
        log("  vhubd around the restart: %s" % x[:300])
    if len(bad) > 10:
        log("  ... %d warnings and errors in all" % len(bad))
    log("planned restart with %d devices in %d VMs (vhubd held %d fds at READY=1; the store %d names): SIGTERM to exit "
        "%.0f ms, start to READY=1 %.0f ms (the played service manager's Python exec included); "
        "first daemon.info after %.1f ms: %d VMs, %d devices (before: %d, %d), %s's devices %s"
        % (len(b.devices), len(b.vms), fds_ready, stored, exit_ms, ready_ms, first_ms,
           after["vms"], after["devices"], info["vms"], info["devices"], vm0, "/".join(states)))
    return {"exit_ms": exit_ms, "ready_ms": ready_ms}


def baseline_daemon(t):
    """A second vhubd with one VM like the first VM here (4 devices on a qsd
    of their own, started): the 1-VM figure, measured at the same moments."""
    d = t.tmpdir()
    daemon = new_daemon(t, d)
    c = daemon.client(timeout=60)
    b = Bench(t, daemon, c, None)   # its fleet: just the probe qsd
    vm = b.new_vm()
    for slot in range(PER_VM):
        b.attach(vm, slot)
    raw = RawClient(daemon.control)
    t.defer(raw.close)
    return raw, daemon.pid


def main(t):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        # qsd processes inherit it (200 exports hold ~1,400 fds); vhubd raises its own
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    d = t.tmpdir()
    daemon = new_daemon(t, d, ["--max-vms-per-uid", str(DEVICES // PER_VM + 10),
                               "--max-connections", str(IDLE_CONNS + 64)])
    owner = daemon.client(timeout=60)
    probe = RawClient(daemon.control)
    t.defer(probe.close)
    log("vhubd pid %d, fd limit %d (hard %d); target %d devices, %d per VM, %d exports per qsd, %s%s"
        % (daemon.pid, nofile_limit(daemon.pid), hard, DEVICES, PER_VM, PER_QSD,
           "started with 2 rings" if START else "added, not started",
           "; under a service manager with an fd store" if FDSTORE else ""))
    with open("/proc/loadavg") as f:
        log("load average at the start: %s" % f.read().strip())
    try:
        FastQsd([daemon.backend_socket("none.sock")], log_dir=d)   # only whether qsd is installed
    except Skip as e:
        log("SKIP: %s" % e)
        return
    b = Bench(t, daemon, owner, probe)
    b.base_probe, b.base_pid = baseline_daemon(t)
    log("before any VM: VmRSS %d KiB, RssAnon %d KiB" % (b.base["VmRSS"], b.base["RssAnon"]))

    cpu0, t0 = cpu_s(daemon.pid), time.perf_counter()
    ok = b.build_to(PER_VM)
    b.checkpoint("1 VM")
    if IDLE_CONNS:
        # here, not at the end: there the daemon is at its fd limit, and
        # each connection is an fd
        idle_connections(b, daemon)
    for cp in CHECKPOINTS:
        if not ok or cp >= DEVICES:
            break
        ok = b.build_to(cp)
        if ok:
            b.checkpoint("%d" % cp)
    if ok:
        ok = b.build_to(DEVICES)
    build_s, build_cpu = time.perf_counter() - t0, cpu_s(daemon.pid) - cpu0
    b.checkpoint("max")
    log("built %d devices in %d VMs on %d qsd processes in %.1f s (vhubd CPU %.1f s, %.0f us per device)"
        % (len(b.devices), len(b.vms), len(b.fleet.groups), build_s, build_cpu,
           build_cpu * 1e6 / max(1, len(b.devices))))
    log("attach (add + start, the bench's Python client) per device, by 1,000: %s"
        % ", ".join("%d+: %.2f ms wall, vhubd CPU %.0f us" % x for x in b.batch_ms))
    limit = check_limit(b, daemon) if b.limit_error else None
    vml = measure_vm_list(daemon)
    restore = restore_one_qsd(b, daemon)
    if FDSTORE:
        restart_with_store(b, daemon)

    log("")
    log("| devices | VMs | vhubd fds | VmRSS KiB | RssAnon KiB | RssShmem KiB | anon B/device | "
        "daemon.info ms p50 (p90) | device.list ms p50 (p90) | memory add ms p50 (p90) | "
        "memory remove ms p50 (p90) |")
    log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    log("| 0 | 0 | - | %d | %d | - | - | - | - | - | - |" % (b.base["VmRSS"], b.base["RssAnon"]))
    for r in b.rows:
        L = r["lat"]
        log("| %d | %d | %d | %d | %d | %d | %.0f | %.3f (%.3f) | %.3f (%.3f) | %.3f (%.3f) | %.3f (%.3f) |"
            % (r["devices"], r["vms"], r["fds"], r["status"]["VmRSS"], r["status"]["RssAnon"],
               r["status"]["RssShmem"], r["anon_per_dev"], statistics.median(L["info"]), pct(L["info"], 90),
               statistics.median(L["list"]), pct(L["list"], 90), statistics.median(L["add"]), pct(L["add"], 90),
               statistics.median(L["rem"]), pct(L["rem"], 90)))
    log("")
    log("against a second vhubd holding 1 VM (4 devices, a qsd of its own), the calls alternating"
        " (median latency ratio; vhubd CPU per call here / there, us):")
    log("| devices | daemon.info | device.list | vm.memory.add | vm.memory.remove | CPU daemon.info | "
        "CPU device.list | CPU add+remove |")
    log("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in b.rows:
        cells = []
        for key in ("info", "list", "add", "rem"):
            cells.append("%.2fx" % (statistics.median(r["lat"][key]) / statistics.median(r["base"][key])))
        for key in ("info", "list", "mem"):
            cells.append("%.0f / %.0f" % (r["lat"]["cpu"][key], r["base"]["cpu"][key]))
        log("| %d | %s |" % (r["devices"], " | ".join(cells)))
    last = b.rows[-1]
    for key, name in (("info", "daemon.info"), ("list", "device.list"), ("add", "vm.memory.add"),
                      ("rem", "vm.memory.remove")):
        ratio = statistics.median(last["lat"][key]) / statistics.median(last["base"][key])
        log("%s at %d devices vs 1 VM: %.2fx (goal <= 1.2x)" % (name, last["devices"], ratio))
    per_dev = last["anon_per_dev"]
    log("RssAnon per device at %d: %.0f bytes (%.1f KiB; goal <= 16 KiB); 10,000 devices: ~%.0f MiB"
        % (last["devices"], per_dev, per_dev / 1024, per_dev * 10000 / MiB))
    if limit:
        log("limit: %s refused with -32008 naming the fd limit: %s; no fd kept: %s; still serving: %s"
            % (limit["what"], limit["named"], limit["fds_same"], limit["alive"]))
    if vml and len(b.vms):
        per_vm = vml["bytes"] / float(vml["vms"])
        log("vm.list: %.0f bytes per VM; 2,500 VMs: ~%.0f KiB in one line" % (per_vm, per_vm * 2500 / 1024))


if __name__ == "__main__":
    run(main)

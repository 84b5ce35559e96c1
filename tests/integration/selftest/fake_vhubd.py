#!/usr/bin/env python3
"""A stand-in for vhubd that checks the harness, not the daemon.

It serves the subset of docs/control-api.md the through-vhubd tests
use (daemon.info, vm.create/destroy/list, vm.memory.add/list, device.add/
list/remove, device.config.get, device.start/stop), driving back-ends with
vhubtest.direct.  Point VHUBD at it to check that test_blk_qsd.py & co.
are written correctly before vhubd exists:

    VHUBD=tests/integration/selftest/fake_vhubd.py \\
        PYTHONPATH=tests/integration python3 tests/integration/test_blk_qsd.py

meson never uses it.  One thread per connection, requests handled in order.
"""

import base64
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from vhubtest import direct                      # noqa: E402
from vhubtest.client import u64, u64_json        # noqa: E402


class Err(Exception):
    def __init__(self, code, msg):
        super().__init__(msg)
        self.code = code


class Region:
    def __init__(self, gpa, size, fd, offset, uaddr):
        self.gpa, self.size, self.fd, self.offset, self.uaddr = gpa, size, fd, offset, uaddr


class Device:
    def __init__(self, name, socket_path):
        self.name = name
        self.socket = socket_path
        self.fe = None
        self.state = "connecting"
        self.acked = 0
        self.queues = 1
        self.fds = []
        self.rings = []


class Vm:
    def __init__(self, name, uid, conn):
        self.name, self.uid, self.conn = name, uid, conn
        self.regions = []
        self.devices = {}


class Daemon:
    def __init__(self, backend_dirs):
        self.backend_dirs = [os.path.realpath(d) for d in backend_dirs]
        self.vms = {}
        self.lock = threading.Lock()
        self.start = time.monotonic()

    # ---- helpers ----
    def vm(self, p, uid):
        v = self.vms.get((uid, p.get("vm")))
        if v is None:
            raise Err(-32001, "no such VM")
        return v

    def dev(self, p, uid):
        v = self.vm(p, uid)
        d = v.devices.get(p.get("device"))
        if d is None:
            raise Err(-32002, "no such device")
        return v, d

    def translate(self, v, gpa):
        for r in v.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                return r.uaddr + gpa - r.gpa
        raise Err(-32602, "gpa %#x not in guest memory" % gpa)

    def send_mem(self, v, d):
        fe = d.fe
        if fe.protocol_features & (1 << direct.PF_CONFIGURE_MEM_SLOTS):
            for r in v.regions:
                fe.command(direct.ADD_MEM_REG, struct.pack("<QQQQQ", 0, r.gpa, r.size, r.uaddr,
                                                           r.offset), [r.fd])
        elif v.regions:
            payload = struct.pack("<II", len(v.regions), 0)
            for r in v.regions:
                payload += struct.pack("<QQQQ", r.gpa, r.size, r.uaddr, r.offset)
            fe.command(direct.SET_MEM_TABLE, payload, [r.fd for r in v.regions])

    def drop_device(self, d):
        if d.fe is not None:
            d.fe.close()
        for fd in d.fds:
            os.close(fd)
        d.fds = []

    def drop_vm(self, v):
        for d in v.devices.values():
            self.drop_device(d)
        for r in v.regions:
            os.close(r.fd)
        self.vms.pop((v.uid, v.name), None)

    # ---- methods ----
    def handle(self, conn, uid, method, p, fds):
        if method == "daemon.info":
            return {"version": "fake", "pid": os.getpid(),
                    "uptime_ms": int((time.monotonic() - self.start) * 1000),
                    "vms": len(self.vms), "devices": sum(len(v.devices) for v in self.vms.values()),
                    "protocol_features": direct.SUPPORTED_PROTOCOL_FEATURES}
        if method == "vm.create":
            key = (uid, p["vm"])
            if key in self.vms:
                raise Err(-32003, "already exists")
            self.vms[key] = Vm(p["vm"], uid, conn)
            return {}
        if method == "vm.destroy":
            self.drop_vm(self.vm(p, uid))
            return {}
        if method == "vm.list":
            return {"vms": [{"vm": v.name, "uid": v.uid, "devices": sorted(v.devices),
                             "regions": len(v.regions)} for v in self.vms.values()
                            if v.uid == uid or uid == 0]}
        if method == "vm.memory.add":
            v = self.vm(p, uid)
            idx = p["fd"]
            if not 0 <= idx < len(fds):
                raise Err(-32602, "fd index out of range")
            fd = os.dup(fds[idx])
            gpa = u64(p["gpa"])
            v.regions.append(Region(gpa, u64(p["size"]), fd, u64(p.get("offset", 0)),
                                    u64(p.get("uaddr", gpa))))
            for d in v.devices.values():
                r = v.regions[-1]
                d.fe.command(direct.ADD_MEM_REG, struct.pack("<QQQQQ", 0, r.gpa, r.size, r.uaddr,
                                                             r.offset), [r.fd])
            return {}
        if method == "vm.memory.list":
            v = self.vm(p, uid)
            return {"regions": [{"gpa": u64_json(r.gpa), "size": u64_json(r.size),
                                 "offset": u64_json(r.offset), "uaddr": u64_json(r.uaddr)}
                                for r in v.regions]}
        if method == "device.add":
            v = self.vm(p, uid)
            if p["device"] in v.devices:
                raise Err(-32003, "already exists")
            path = os.path.realpath(p["socket"])
            if not any(path.startswith(b + "/") for b in self.backend_dirs):
                raise Err(-32010, "back-end not allowed")
            d = Device(p["device"], p["socket"])
            try:
                d.fe = direct.DirectFrontend.connect(path, timeout=5.0, retry_for=0)
                d.fe.handshake()
            except OSError as e:
                if d.fe:
                    d.fe.close()
                raise Err(-32006, "back-end: %s" % e)
            d.queues = p.get("queues") or d.fe.queue_num or 1
            self.send_mem(v, d)
            d.state = "ready"
            v.devices[d.name] = d
            return {"features": u64_json(d.fe.features),
                    "protocol_features": u64_json(d.fe.protocol_features),
                    "queues": d.queues, "max_mem_slots": d.fe.max_mem_slots or 8}
        if method == "device.list":
            v = self.vm(p, uid)
            return {"devices": [{"device": d.name, "state": d.state, "socket": d.socket,
                                 "features": u64_json(d.fe.features),
                                 "acked_features": u64_json(d.acked),
                                 "protocol_features": u64_json(d.fe.protocol_features),
                                 "queues": d.queues, "reconnects": 0}
                                for d in v.devices.values()]}
        if method == "device.config.get":
            v, d = self.dev(p, uid)
            if not d.fe.protocol_features & (1 << direct.PF_CONFIG):
                raise Err(-32005, "back-end has no CONFIG")
            return {"data": base64.b64encode(d.fe.get_config(p["offset"], p["size"])).decode()}
        if method == "device.start":
            v, d = self.dev(p, uid)
            if d.state not in ("ready", "stopped"):
                raise Err(-32004, "wrong state")
            fe = d.fe
            acked = u64(p["features"]) & ~(1 << 30)
            if fe.features & (1 << 30):
                acked |= 1 << 30
            fe.set_features(acked)
            d.acked = acked
            for fd in d.fds:
                os.close(fd)
            d.fds, d.rings = [], []
            for r in p["vrings"]:
                i = r["index"]
                kick, call = os.dup(fds[r["kick"]]), os.dup(fds[r["call"]])
                d.fds += [kick, call]
                fe.set_vring_num(i, r["size"])
                fe.set_vring_base(i, r.get("base", 0))
                fe.set_vring_addr(i, self.translate(v, u64(r["desc"])),
                                  self.translate(v, u64(r["used"])),
                                  self.translate(v, u64(r["avail"])))
                fe.set_vring_call(i, call)
                fe.set_vring_kick(i, kick)
                d.rings.append((i, kick))
            if fe.features & (1 << 30):
                for i, _ in d.rings:
                    fe.set_vring_enable(i, True)
            if fe.protocol_features & (1 << direct.PF_STATUS):
                fe.set_status(direct.STATUS_ALL_OK)
            for _, kick in d.rings:
                os.eventfd_write(kick, 1)
            d.state = "running"
            return {}
        if method == "device.stop":
            v, d = self.dev(p, uid)
            if d.state != "running":
                raise Err(-32004, "wrong state")
            out = [{"index": i, "base": d.fe.get_vring_base(i)} for i, _ in d.rings]
            for fd in d.fds:
                os.close(fd)
            d.fds = []
            d.state = "stopped"
            return {"vrings": out}
        if method == "device.remove":
            v, d = self.dev(p, uid)
            self.drop_device(d)
            del v.devices[d.name]
            return {}
        raise Err(-32601, "method not found")


def serve_conn(daemon, conn):
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    buf, fdq = b"", []
    try:
        while True:
            data, fds, _, _ = socket.recv_fds(conn, 65536, 253)
            fdq += fds
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    conn.sendall(b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}\n')
                    continue
                n = msg.get("fds", 0)
                mine, fdq = fdq[:n], fdq[n:]
                resp = {"jsonrpc": "2.0", "id": msg.get("id")}
                try:
                    with daemon.lock:
                        resp["result"] = daemon.handle(conn, uid, msg["method"],
                                                       msg.get("params") or {}, mine)
                except Err as e:
                    resp["error"] = {"code": e.code, "message": str(e), "data": {"detail": str(e)}}
                except (KeyError, TypeError, ValueError) as e:
                    resp["error"] = {"code": -32602, "message": "invalid params: %s" % e}
                except (OSError, direct.VhostUserError) as e:
                    resp["error"] = {"code": -32006, "message": "back-end error: %s" % e}
                finally:
                    for fd in mine:
                        os.close(fd)
                conn.sendall(json.dumps(resp, separators=(",", ":")).encode() + b"\n")
    except OSError:
        pass
    finally:
        with daemon.lock:
            for v in [v for v in daemon.vms.values() if v.conn is conn]:
                daemon.drop_vm(v)
        for fd in fdq:
            os.close(fd)
        conn.close()


def main():
    args = sys.argv[1:]
    control, backend_dirs = None, []
    while args:
        a = args.pop(0)
        if a == "--control":
            control = args.pop(0)
        elif a == "--backend-dir":
            backend_dirs.append(args.pop(0))
        elif a in ("--log-level", "--backend-timeout-ms", "--control-mode", "--control-group"):
            args.pop(0)
    daemon = Daemon(backend_dirs or ["/run/vhost-user"])
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    ls.bind(control)
    ls.listen(16)

    def term(*_):
        with daemon.lock:
            for v in list(daemon.vms.values()):
                daemon.drop_vm(v)
        os.unlink(control)
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, term)
    while True:
        conn, _ = ls.accept()
        threading.Thread(target=serve_conn, args=(daemon, conn), daemon=True).start()


if __name__ == "__main__":
    main()

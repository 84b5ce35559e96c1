#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the hand-made seeds of fuzz-control into tests/fuzz/corpus-control/.

Run from the top of the tree.  Input layout: see tests/fuzz/fuzz-control.c
(first byte: fds, back-end flavour, chunk size; "@/" the back-end directory;
\\f + byte a pause, \\v / \\a + length + bytes raw back-end bytes).  The
fuzzer's own findings are merged into the same directory (docs/fuzzing.md).
"""
import json,os
d='tests/fuzz/corpus-control'
_id=[0]
def req(method, params=None, fds=0):
    _id[0]+=1
    r={"jsonrpc":"2.0","id":_id[0],"method":method}
    if fds: r["fds"]=fds
    if params is not None: r["params"]=params
    return json.dumps(r,separators=(',',':'))+"\n"
V={"vm":"v"}
def dev(**k):
    x={"vm":"v","device":"b"}; x.update(k); return x
def ring(i,k,c,**kw):
    r={"index":i,"size":256,"desc":0,"avail":4096,"used":8192,"kick":k,"call":c}; r.update(kw); return r
def seed(flags, *steps):
    """steps: (fds, text) pairs; a pause between steps."""
    out=bytes([flags | steps[0][0]]) + steps[0][1].encode()
    for fds,text in steps[1:]:
        out+=b"\f"+bytes([fds])+text.encode()
    return out
def setup(): return [(1, req("vm.create",V)+req("vm.memory.add",{"vm":"v","gpa":0,"size":65536,"fd":0},fds=1)+
                          req("device.add",dev(socket="@/blk.sock",type="blk")))]
def start(): return (2, req("device.start",dev(features="0x100000000",vrings=[ring(0,0,1)]),fds=2))
# fds per step come from make_fd(i): memfd, eventfd, eventfd, pipe, memfd, ...
seeds={
 'blk-lifecycle': seed(0, *setup(), (0, req("device.list",V)+req("device.config.get",dev(offset=0,size=60))+
        req("device.config.set",dev(offset=0,data="AAAA"))), (3, req("device.start",{"vm":"v","device":"b","features":"0x100000000","vrings":[ring(0,1,2)]},fds=3)),
        (0, req("device.stop",dev())), (0, req("device.reset",dev())+req("device.list",V)), (0, req("device.remove",dev())+req("vm.destroy",V))),
 'blk-no-reply-ack': seed(1<<3, *setup(), (3, req("device.start",dev(features="0x100000000",vrings=[ring(0,1,2)]),fds=3)), (0, req("device.stop",dev(drain=False)))),
 'blk-mem-table': seed(2<<3, *setup(), (1, req("vm.memory.add",{"vm":"v","gpa":1<<20,"size":65536,"fd":0},fds=1)),
        (0, req("vm.memory.remove",{"vm":"v","gpa":0})+req("vm.memory.list",V))),
 'blk-legacy': seed(3<<3, *setup(), (3, req("device.start",dev(features="0x100000000",vrings=[ring(0,1,2)]),fds=3)), (0, req("device.stop",dev()))),
 'net-and-dirty-log': seed(0, *setup(), (0, req("device.net.rarp",dev(mac="52:54:00:12:34:56"))+req("device.net.mtu",dev(mtu=1500))),
        (0, req("vm.dirty_log.start",V)), (3, req("device.start",dev(features="0x104000000",vrings=[ring(0,1,2)]),fds=3)), (0, req("vm.dirty_log.stop",V))),
 'device-state': seed(0, *setup(), (4, req("device.state.save",dev(fd=3),fds=4)), (0, req("device.state.check",dev())),
        (4, req("device.state.load",dev(fd=3),fds=4))),
 'shared-objects-events': seed(0, *setup(), (0, req("events.subscribe",V)),
        (1, req("shared_object.add",{"vm":"v","uuid":"00112233-4455-6677-8899-aabbccddeeff","fd":0},fds=1)),
        (0, req("shared_object.list",V)+req("shared_object.remove",{"vm":"v","uuid":"00112233-4455-6677-8899-aabbccddeeff"})+
            req("device.backend_reply",dev(token=1,result=0)))),
 'linger-attach': seed(0, (0, req("vm.create",{"vm":"l","linger_ms":60000})+req("vm.attach",{"vm":"l"})+req("vm.list")+req("daemon.info"))),
 'batch-device': seed(0, (1, '['+",".join([json.dumps({"jsonrpc":"2.0","id":1,"method":"vm.create","params":V}),
        json.dumps({"jsonrpc":"2.0","id":2,"method":"vm.memory.add","fds":1,"params":{"vm":"v","gpa":0,"size":65536,"fd":0}}),
        json.dumps({"jsonrpc":"2.0","id":3,"method":"device.add","params":dev(socket="@/blk.sock")})])+']\n'),
        (3, '['+json.dumps({"jsonrpc":"2.0","id":4,"fds":3,"method":"device.start","params":dev(features="0x100000000",vrings=[ring(0,1,2)])})+
            ','+json.dumps({"jsonrpc":"2.0","id":5,"method":"device.list","params":V})+']\n'), (0, '[{"jsonrpc":"2.0","id":6,"method":"device.stop","params":{"vm":"v","device":"b"}},{"jsonrpc":"2.0","id":7,"method":"vm.destroy","params":{"vm":"v"}}]\n')),
 'small-chunks': seed(0x20, *setup(), (3, req("device.start",dev(features="0x100000000",vrings=[ring(0,1,2)]),fds=3)), (0, req("device.stop",dev()))),
 'two-devices': seed(0, *setup(), (0, req("device.add",dev(device="c",socket="@/blk.sock",queues=2))),
        (7, req("device.start",dev(features="0x100000000",vrings=[ring(0,1,2),ring(1,5,6,base=3)]),fds=7)),
        (1, req("vm.memory.add",{"vm":"v","gpa":1<<20,"size":4096,"fd":0},fds=1)), (0, req("vm.destroy",V))),
 'server-mode': seed(1, (1, req("vm.create",V)+req("vm.memory.add",{"vm":"v","gpa":0,"size":65536,"fd":0},fds=1)+
        req("device.add",dev(socket="@/srv.sock",mode="server",reconnect_ms=100))), (8, req("device.list",V)),
        (3, req("device.start",dev(features="0x100000000",vrings=[ring(0,1,2)]),fds=3)), (0, req("device.stop",dev())+req("device.list",V))),
}
for n,b in seeds.items():
    open(os.path.join(d,n),'wb').write(b)
print(len(seeds))

import struct
VERSION, REPLY, NEED_REPLY = 0x1, 0x4, 0x8
def vmsg(request, flags, payload=b""):
    return struct.pack("<III", request, flags, len(payload)) + payload
def inject(channel, raw):
    assert len(raw) < 256
    return (b"\a" if channel else b"\v") + bytes([len(raw)]) + raw
UUID = bytes(range(0x10, 0x20))
def seed_raw(flags, parts):
    out = bytes([flags])
    for p in parts:
        out += p if isinstance(p, bytes) else p.encode()
    return out
hostile = {
 'channel-requests': seed_raw(1, [setup()[0][1], b"\f\x00", req("events.subscribe", V),
        inject(True, vmsg(2, VERSION | NEED_REPLY)),                      # CONFIG_CHANGE_MSG
        inject(True, vmsg(6, VERSION | NEED_REPLY, UUID)),                # SHARED_OBJECT_ADD
        inject(True, vmsg(8, VERSION | NEED_REPLY, UUID)),                # SHARED_OBJECT_LOOKUP
        inject(True, vmsg(7, VERSION | NEED_REPLY, UUID)),                # SHARED_OBJECT_REMOVE
        inject(True, vmsg(1, VERSION | NEED_REPLY, struct.pack("<QQQBB6x", 0x1000, 0x1000, 0, 1, 1))),  # IOTLB miss
        b"\f\x00", req("shared_object.list", V),
        inject(True, vmsg(3, VERSION | NEED_REPLY, struct.pack("<QQQ", 0x100, 4096, 0))),  # HOST_NOTIFIER, no fd
        b"\f\x00", req("device.list", V)]),
 'hostile-replies': seed_raw(1, [setup()[0][1], b"\f\x03",
        req("device.start", dev(features="0x100000000", vrings=[ring(0, 1, 2)]), fds=3), b"\f\x00",
        inject(False, vmsg(11, VERSION | REPLY, struct.pack("<II", 0, 0xffffffff))),   # a reply nobody asked for
        b"\f\x00", req("device.stop", dev()), b"\f\x00", req("device.list", V)]),
 'channel-garbage': seed_raw(1, [setup()[0][1], b"\f\x00", inject(True, b"\x02\x00\x00\x00\x01\x00\x00\x00\xff\xff\x00\x00"),
        b"\f\x00", req("device.list", V)]),
}
for n, b in hostile.items():
    open(os.path.join(d, n), 'wb').write(b)
print(len(hostile))

# device.stats and the lifecycle events (built last: earlier seeds keep their ids)
events = {
 'stats-lifecycle-events': seed(0, (0, req("events.subscribe", {})), *setup(),
        (0, req("device.stats", dev())), (3, req("device.start", dev(features="0x100000000", vrings=[ring(0, 1, 2)]), fds=3)),
        (0, req("device.stats", dev()) + req("device.stop", dev()) + req("device.stats", dev(uid=0))),
        (0, req("device.remove", dev()) + req("device.stats", dev()) + req("vm.destroy", V))),
}
for n, b in events.items():
    open(os.path.join(d, n), 'wb').write(b)
print(len(events))

"""I/O scenarios shared by the direct (no vhubd) and the through-vhubd tests.

The data plane is the same either way: rings in memfd guest memory, kick and
call eventfds between the harness and the back-end.  Only who sends the
vhost-user messages differs, so the checks live here once.
"""

import os
import stat

from . import blk, fs, net
from .client import u64_json
from .testing import check, check_eq, log

# Features the harness acks (each must be in the back-end's offer).
BLK_FEATURES = ((1 << 32) | (1 << blk.VIRTIO_BLK_F_FLUSH) | (1 << blk.VIRTIO_BLK_F_MQ))
NET_FEATURES = (1 << 32) | (1 << net.VIRTIO_NET_F_MQ)
FS_FEATURES = 1 << 32


def idle_blk_start(vm, device, slot, region_gpa, queues=2, size=128):
    """device.start's params for a blk device whose rings nobody drives:
    `queues` rings of `size` in the VM's region, 16 KiB each from region_gpa
    on (slot picks the device's place), kick and call the call's fds 2i and
    2i+1 -- for tests and benchmarks that need many started devices."""
    vrings = []
    for i in range(queues):
        gpa = region_gpa + (slot * queues + i) * 0x4000
        vrings.append({"index": i, "size": size, "desc": gpa, "avail": gpa + 0x800,
                       "used": gpa + 0x1000, "kick": 2 * i, "call": 2 * i + 1})
    return {"vm": vm, "device": device, "features": u64_json(BLK_FEATURES), "vrings": vrings}


def sparse_image(path, size):
    """A raw image of size zero bytes (sparse: nothing written); returns path."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_image(path, size, seed=b"vhub"):
    """A raw image of pseudo-random bytes; returns its initial content."""
    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
    return data


def blk_io(queues, image_path, initial, nreq=256, seed=7):
    """Concurrent writes, then reads, on every queue; the rings' data and the
    whole image file must match a model of what was written.  Returns the
    number of chains made available per ring (what GET_VRING_BASE must say)."""
    def read_image(off, n):
        with open(image_path, "rb") as f:
            f.seek(off)
            return f.read(n)

    written = {}
    orig_pattern = blk.pattern

    def recording_pattern(sector, length, salt=0):
        d = orig_pattern(sector, length, salt)
        written[sector] = d
        return d
    blk.pattern = recording_pattern
    try:
        blk.run_random_io(queues, len(initial), read_image, nreq=nreq, seed=seed, log=log)
    finally:
        blk.pattern = orig_pattern
    model = bytearray(initial)
    for sector, d in written.items():
        model[sector * blk.SECTOR_SIZE:sector * blk.SECTOR_SIZE + len(d)] = d
    with open(image_path, "rb") as f:
        on_disk = f.read()
    check(on_disk == bytes(model),
          "whole image file equals initial content + %d written extents (nothing else touched)"
          % len(written))
    per_ring = {q.index: q.vq.submitted for q in queues}
    for q in queues:
        check(q.vq.submitted > 0, "queue %d carried requests (%d)" % (q.index, q.vq.submitted))
        check_eq(q.vq.outstanding, 0, "queue %d outstanding after reaping" % q.index)
    return per_ring


def blk_first_sectors(q, initial):
    data = q.read_sectors(0, 8)
    check(data == initial[:4096], "read of sectors 0-7 equals the image's first 4 KiB")


def blk_index_wrap(fe, q):
    """Restart blk queue q (stopped) at avail/used index 65530 and do 20 writes
    and one read across the 16-bit wrap; the ring's base after is 65551."""
    q.vq.reset(65530)
    fe.start_ring(q.vq)
    q.vq.kick()
    for i in range(20):
        q.write_sectors(100 + i, bytes([i]) * 512)
    check(q.read_sectors(100, 20) == b"".join(bytes([i]) * 512 for i in range(20)),
          "20 writes + 1 read across the avail/used index wrap (base 65530)")
    check_eq(fe.stop_rings()[q.index], (65530 + 21) & 0xFFFF, "GET_VRING_BASE after the wrap")


def net_loopback(pairs, nframes=300, timeout=5.0):
    """Frames of many sizes on every TX ring come back intact on the paired RX."""
    for p in pairs:
        p.post_rx()
        p.rx.kick()
    for p in pairs:
        frames = [net.build_frame(i, 60 + (i * 97) % 1440, tag=p.pair) for i in range(nframes)]
        got = []
        step = 64   # never more in flight than the RX ring holds
        for i in range(0, nframes, step):
            p.send(frames[i:i + step])
            got += p.recv_until(min(step, nframes - i), timeout)
        extra = p.recv()
        check(not extra, "pair %d: no unexpected extra frames" % p.pair, "%d extra" % len(extra))
        ids = [net.parse_frame(g) for g in got]
        check(all(x is not None for x in ids),
              "pair %d: every received frame is a harness frame with a valid crc" % p.pair)
        check_eq(sorted(ids), [(p.pair, i) for i in range(nframes)],
                 "pair %d: frames received (tag, seq)" % p.pair)
        check(all(g == frames[s] for g, (_, s) in zip(got, ids)),
              "pair %d: %d frames (60..1499 bytes) came back byte for byte" % (p.pair, nframes))
        check_eq(p.tx_completed(), nframes, "pair %d: TX chains used" % p.pair)


def fs_checks(dev, share_dir, fname, content):
    """FUSE_INIT, GETATTR of the root, LOOKUP/OPEN/READ of a real file."""
    r = dev.init()
    check(r["major"] == 7 and r["minor"] >= 27,
          "FUSE_INIT answered protocol %d.%d (max_write %d)" % (r["major"], r["minor"], r["max_write"]))
    attr = dev.getattr(fs.FUSE_ROOT_ID)
    st = os.stat(share_dir)
    check(stat.S_ISDIR(attr["mode"]), "GETATTR of the root: a directory (mode %o)" % attr["mode"])
    check_eq(attr["ino"], st.st_ino, "root inode number (the shared dir's st_ino)")
    nodeid, fattr, data = dev.read_file(fname, len(content) + 4096)
    check(fs.is_reg(fattr) and fattr["size"] == len(content),
          "LOOKUP %s: regular file of %d bytes" % (fname, len(content)))
    check(data == content, "OPEN+READ of %s returned the file's %d bytes exactly"
          % (fname, len(content)))
    try:
        dev.lookup("no-such-file")
    except fs.FuseError as e:
        check_eq(e.errno, 2, "LOOKUP of a missing name fails with errno")
    else:
        check(False, "LOOKUP of a missing name fails")
    dev.forget(nodeid)
    log("ok: FORGET on the hiprio queue was used by the device")

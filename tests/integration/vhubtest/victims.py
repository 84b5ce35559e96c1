"""What an attack must not change: snapshots of files and directories
(victims) taken before and compared after."""

import hashlib
import os
import stat

from .testing import check


def snapshot(*paths):
    """Each path's device, inode, owner, mode, size, mtime and link count, a
    regular file's content and a directory's entries (recursively); None for
    a path that is not there."""
    snap = {}

    def one(p):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            snap[p] = None
            return
        entry = (st.st_dev, st.st_ino, st.st_uid, st.st_gid, st.st_mode, st.st_size,
                 st.st_mtime_ns, st.st_nlink)
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                entry += (hashlib.sha256(f.read()).hexdigest(),)
        snap[p] = entry
        if stat.S_ISDIR(st.st_mode):
            names = sorted(os.listdir(p))
            snap[p + "/"] = names
            for n in names:
                one(os.path.join(p, n))
    for p in paths:
        one(p)
    return snap


def check_unchanged(before, after, what):
    changed = sorted(set(before) ^ set(after)) + \
        sorted(k for k in set(before) & set(after) if before[k] != after[k])
    check(not changed, "%s: exactly as before" % what,
          "; ".join("%s: %s -> %s" % (k, before.get(k), after.get(k)) for k in changed[:6]))

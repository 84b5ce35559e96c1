#!/usr/bin/env python3
"""Red team: the control socket in a directory another uid can write.

control-server.c create_socket() takes --control's directory as it finds
it (mkdir, EEXIST is fine, nobody asks whose it is), then unlink()s the
name, bind()s and calls chmod(path) and chown(path) -- by name, and
following a symlink in the last component.  A uid that can write the
directory (an operator's --control /srv/vms/ctl/control.sock in a
directory handed to the VM users, or one an attacker created in a shared
place before the daemon did) keeps renaming a symlink to a victim file
onto that name; when it lands between bind() and chmod(), root applies
--control-mode to the victim and hands it to --control-group.  systemd's
Restart=on-failure restarts the daemon each time the attacker's rename
lands before bind() (EADDRINUSE), so the attacker gets many tries.  (The
same uid could also just put its own listener there and receive every
VMM's memory fds: the daemon should not accept such a directory at all,
as vhub_vmm_dir_open() refuses one for --vmm-dir.)

The test: ctl/ belongs to uid 65534; it renames a fresh symlink to root's
0600 file onto ctl/control.sock in a loop while vhubd is started with
--control ctl/control.sock --control-group 4242 again and again (up to
400 times; on an idle machine it wins within about 50).  Root's file must
keep its owner, group and mode.  A daemon that refuses the directory
passes at once.
"""

import os
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from redteam import USER, mkdir, workdir, write_file     # noqa: E402
from vhubtest.agent import drop_to, python_for           # noqa: E402
from vhubtest import procs                               # noqa: E402
from vhubtest.daemon import vhubd_path                   # noqa: E402
from vhubtest.testing import check, log, run             # noqa: E402

GROUP = 4242
ATTEMPTS = 400

RENAMER = r'''
import os, sys
path, victim = sys.argv[1], sys.argv[2]
tmp = path + ".new"
print("ready", flush=True)
while True:
    try:
        os.symlink(victim, tmp)
    except FileExistsError:
        pass
    try:
        os.rename(tmp, path)
    except OSError:
        pass
'''


def main(t):
    d = workdir(t)
    ctl = mkdir(os.path.join(d, "ctl"), USER, 0o755)
    bdir = mkdir(os.path.join(d, "backends"), 0, 0o755)
    victim = write_file(os.path.join(d, "shadow"), "root:secret\n")
    before = os.stat(victim)
    path = os.path.join(ctl, "control.sock")
    log_path = os.path.join(d, "vhubd.log")
    t.add_log("vhubd", log_path)

    renamer = subprocess.Popen([python_for(USER), "-c", RENAMER, path, victim], stdout=subprocess.PIPE,
                               cwd="/", preexec_fn=drop_to(USER), close_fds=True)
    t.defer(lambda: (renamer.kill(), renamer.wait()))
    check(renamer.stdout.readline().strip() == b"ready", "uid %d renames symlinks onto %s" % (USER, path))

    started = refused = 0
    changed = None
    for k in range(ATTEMPTS):
        p = procs.spawn([vhubd_path(), "--control", path, "--control-group", str(GROUP),
                         "--backend-dir", bdir, "--log-level", "warning"], log_path=log_path)
        time.sleep(0.03)
        if p.poll() is None:
            started += 1
            p.terminate()
        else:
            refused += 1
        p.wait(10)
        st = os.stat(victim)
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != \
                (before.st_uid, before.st_gid, stat.S_IMODE(before.st_mode)):
            changed = (k + 1, st.st_uid, st.st_gid, oct(stat.S_IMODE(st.st_mode)))
            break
    log("vhubd started %d times, exited at once %d times" % (started, refused))
    check(changed is None, "root's 0600 file keeps its owner, group and mode while uid %d races "
          "the control socket's name" % USER,
          changed and "after %d starts it is uid %d, gid %d, mode %s" % changed)


run(main)

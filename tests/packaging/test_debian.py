#!/usr/bin/env python3
"""The Debian packaging (debian/) builds packages that install and start.

`dpkg-buildpackage -b -us -uc` in a copy of the source tree (build
dependencies checked by dpkg-checkbuilddeps, as a buildd would; the unit
tests are the suite's business: nocheck).  Then, without installing
anything on this machine (the test machine is the CI machine; `dpkg -i`
would create a group, enable and start a service):

- each package's contents (`dpkg-deb -c`) and dependencies (`dpkg-deb -f`);
- the maintainer scripts: sysusers and tmpfiles run at configure, the
  units are enabled and started on installation, and an upgrade restarts
  vhubd after unpacking the new one (dh_installsystemd's default: a restart
  job keeps the fd store, so the guests keep running: docs/restart.md) and
  never stops it before (prerm stops it only on removal);
- what those scripts run, against the unpacked tree instead of /
  (systemd-sysusers --root, systemd-tmpfiles --root): the group vhub and
  the directories /run/vhost-user and /run/vhub;
- the packaged programs, unpacked with `dpkg -x`: vhubd --help, then vhubd
  started and stopped (SIGTERM, exit 0) with the packaged vhubctl and the
  packaged Python package talking to it.
"""

import argparse
import glob
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest.testing import Skip, check, check_eq, log, run   # noqa: E402

PACKAGES = ["vhub", "libvhub-client0", "libvhub-client-dev", "python3-vhub"]


def sh(argv, what, timeout=120, **kw):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    out = p.stdout.decode(errors="replace")
    check(p.returncode == 0, what, "exit %d: %s" % (p.returncode, out[-4000:]))
    return out


def copy_tree(src, dst):
    """The source tree without build directories, VCS data or bytecode."""
    def ignore(d, names):
        top = os.path.abspath(d) == os.path.abspath(src)
        return [n for n in names
                if n in (".git", "__pycache__") or n.endswith(".pyc")
                or (top and (n.startswith("build") or n.startswith("obj-")))]
    shutil.copytree(src, dst, ignore=ignore, symlinks=True)


def contents(deb):
    out = sh(["dpkg-deb", "-c", deb], "dpkg-deb -c %s" % os.path.basename(deb))
    files = set()
    for line in out.splitlines():
        f = line.split(None, 5)[5]
        if not f.endswith("/"):
            files.add(f.split(" -> ")[0].lstrip("."))
    return files


def main(t):
    ap = argparse.ArgumentParser()
    ap.add_argument("--source-root", required=True)
    args = ap.parse_args()
    for tool, pkg in (("dpkg-buildpackage", "dpkg-dev"), ("dh", "debhelper")):
        if not shutil.which(tool):
            raise Skip("%s not found (Debian: apt-get install %s)" % (tool, pkg))

    tmp = t.tmpdir()
    src = os.path.join(tmp, "vhub")
    copy_tree(args.source_root, src)
    # a build as a buildd does it: the system's tools, not a user's PATH
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": tmp, "LC_ALL": "C.UTF-8",
           "DEB_BUILD_OPTIONS": "nocheck parallel=%d" % max(1, min(os.cpu_count() or 1, 2))}
    t0 = time.monotonic()
    log_path = os.path.join(tmp, "dpkg-buildpackage.log")
    with open(log_path, "wb") as f:
        p = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, env=env, stdout=f,
                           stderr=subprocess.STDOUT, timeout=840)
    if p.returncode != 0:
        t.add_log("dpkg-buildpackage", log_path)
    check_eq(p.returncode, 0, "dpkg-buildpackage -b -us -uc (%.0f s)" % (time.monotonic() - t0))

    debs = {}
    for deb in glob.glob(os.path.join(tmp, "*.deb")):
        name = os.path.basename(deb).split("_")[0]
        debs[name] = deb
    check(set(PACKAGES) <= set(debs), "packages built: %s" % ", ".join(PACKAGES), sorted(debs))

    files = {name: contents(debs[name]) for name in PACKAGES}
    arch_lib = [f for f in files["libvhub-client0"] if f.endswith("libvhub-client.so.0")]
    check_eq(len(arch_lib), 1, "libvhub-client0 ships libvhub-client.so.0")
    libdir = os.path.dirname(arch_lib[0])
    want = {
        "vhub": ["/usr/sbin/vhubd", "/usr/bin/vhubctl", "/lib/systemd/system/vhubd.service",
                 "/lib/systemd/system/vhubd.socket", "/usr/lib/tmpfiles.d/vhub.conf",
                 "/usr/lib/sysusers.d/vhub.conf", "/usr/share/bash-completion/completions/vhubctl",
                 "/usr/share/man/man8/vhubd.8.gz", "/usr/share/man/man1/vhubctl.1.gz",
                 "/usr/share/doc/vhub/control-api.md.gz", "/usr/share/doc/vhub/client-library.md.gz",
                 "/usr/share/doc/vhub/security.md.gz", "/usr/share/doc/vhub/copyright"],
        "libvhub-client0": [libdir + "/libvhub-client.so.0"],
        "libvhub-client-dev": ["/usr/include/vhub/vhub-client.h", "/usr/include/vhub/vhub-contract.h",
                               "/usr/include/vhub/vhub-json.h",
                               libdir + "/libvhub-client.so", libdir + "/pkgconfig/vhub-client.pc"],
        "python3-vhub": ["/usr/lib/python3/dist-packages/vhub/%s.py" % m
                         for m in ("__init__", "aio", "client", "errors", "framing")],
    }
    for name, paths in want.items():
        check_eq(sorted(set(paths) - files[name]), [], "%s contains what it should" % name)
    check(not any(re.search(r"\.so(\.\d+)*$", f) for f in files["vhub"]),
          "vhub ships no library of its own")

    depends = sh(["dpkg-deb", "-f", debs["vhub"], "Depends"], "vhub's Depends")
    check("libvhub-client0" in depends and "libjansson" in depends and "libsystemd0" in depends,
          "vhub depends on libvhub-client0 (vhubctl), libjansson, libsystemd0", depends.strip())
    dev_depends = sh(["dpkg-deb", "-f", debs["libvhub-client-dev"], "Depends"], "-dev's Depends")
    check("libvhub-client0 (= 0.1.0)" in dev_depends and "libjansson-dev" in dev_depends,
          "libvhub-client-dev depends on its library and jansson's headers", dev_depends.strip())

    ctl = os.path.join(tmp, "control")
    sh(["dpkg-deb", "-e", debs["vhub"], ctl], "dpkg-deb -e vhub")
    postinst = open(os.path.join(ctl, "postinst")).read()
    prerm = open(os.path.join(ctl, "prerm")).read()
    check(postinst.index("systemd-sysusers") < postinst.index("systemd-tmpfiles"),
          "postinst: systemd-sysusers (the group), then systemd-tmpfiles (the directories)")
    check(re.search(r"systemd-sysusers .*vhub\.conf", postinst) and
          re.search(r"systemd-tmpfiles .*--create vhub\.conf", postinst),
          "postinst applies sysusers.d/vhub.conf and tmpfiles.d/vhub.conf")
    check("deb-systemd-helper enable 'vhubd.socket'" in postinst and
          "deb-systemd-helper enable 'vhubd.service'" in postinst,
          "postinst enables vhubd.socket and vhubd.service")
    check(re.search(r"deb-systemd-invoke (start|\$_dh_action) .*vhubd", postinst), "postinst starts vhubd")
    # a restart keeps guests running (the fd store): an upgrade restarts
    # into the new daemon, after it is unpacked
    check(re.search(r"_dh_action=restart", postinst), "postinst restarts vhubd on upgrade", postinst)
    lines = prerm.splitlines()
    guards = []     # the `if` around every stop
    for i, ln in enumerate(lines):
        if "deb-systemd-invoke stop" in ln:
            guards.append(next(g for g in reversed(lines[:i]) if g.lstrip().startswith("if ")))
    check(guards and all('"$1" = remove' in g and "upgrade" not in g for g in guards),
          "prerm stops vhubd only on removal, not on upgrade", prerm)

    root = os.path.join(tmp, "root")
    for name in PACKAGES:
        sh(["dpkg", "-x", debs[name], root], "dpkg -x %s" % name)
    # what the postinst runs, aimed at the unpacked tree instead of /
    os.makedirs(os.path.join(root, "etc"), exist_ok=True)
    sh(["systemd-sysusers", "--root=" + root, "vhub.conf"], "systemd-sysusers --root: vhub.conf")
    groups = open(os.path.join(root, "etc", "group")).read()
    check(re.search(r"^vhub:x:\d+:", groups, flags=re.M), "the group vhub exists", groups)
    sh(["systemd-tmpfiles", "--root=" + root, "--create", "vhub.conf"],
       "systemd-tmpfiles --root --create vhub.conf")
    for d in ("run/vhost-user", "run/vhub"):
        st = os.stat(os.path.join(root, d))
        check(stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755,
              "/%s: a directory, mode 0755" % d)
    unit = open(os.path.join(root, "lib/systemd/system/vhubd.socket")).read()
    check("SocketGroup=vhub" in unit, "vhubd.socket gives the control socket to the group vhub")

    vhubd = os.path.join(root, "usr/sbin/vhubd")
    vhubctl = os.path.join(root, "usr/bin/vhubctl")
    out = sh([vhubd, "--help"], "the packaged vhubd --help")
    check("--control" in out, "vhubd --help lists its options")
    env = dict(os.environ, LD_LIBRARY_PATH=root + libdir,
               PYTHONPATH=os.path.join(root, "usr/lib/python3/dist-packages"))
    ldd = sh(["ldd", vhubctl], "ldd vhubctl", env=env)
    check(re.search(r"libvhub-client\.so\.0 => %s/" % re.escape(root + libdir), ldd),
          "the packaged vhubctl loads the packaged libvhub-client.so.0", ldd)

    run_dir = os.path.join(tmp, "run")
    os.makedirs(os.path.join(run_dir, "backends"))
    control = os.path.join(run_dir, "control.sock")
    log_path = os.path.join(tmp, "vhubd.log")
    t.add_log("packaged vhubd", log_path)
    with open(log_path, "wb") as logf:
        d = subprocess.Popen([vhubd, "--control", control, "--backend-dir",
                              os.path.join(run_dir, "backends")], stdout=logf, stderr=subprocess.STDOUT)
    t.defer(lambda: d.poll() is None and (d.kill(), d.wait()))
    for _ in range(200):
        if os.path.exists(control) or d.poll() is not None:
            break
        time.sleep(0.05)
    check(d.poll() is None and os.path.exists(control), "the packaged vhubd starts and listens")
    out = sh([vhubctl, "--socket", control, "--json", "daemon", "info"], "packaged vhubctl daemon info",
             env=env)
    check('"pid":%d' % d.pid in out.replace(" ", ""), "vhubctl reaches the packaged vhubd", out)
    code = ("import sys, vhub; assert '/usr/lib/python3/dist-packages/' in vhub.__file__, vhub.__file__; "
            "print(vhub.Client(sys.argv[1], connect_timeout=0).call('daemon.info', timeout=5)['pid'])")
    out = sh([sys.executable, "-c", code, control], "python3-vhub calls daemon.info", env=env)
    check_eq(out.strip(), str(d.pid), "the packaged Python package reaches the packaged vhubd")
    d.send_signal(signal.SIGTERM)
    check_eq(d.wait(10), 0, "the packaged vhubd exits 0 on SIGTERM")
    check(not os.path.exists(control), "and removes its control socket")


if __name__ == "__main__":
    run(main)

#!/usr/bin/env python3
"""What `meson install` installs, used the way users use it.

1. `meson install --destdir D`: the files under D are exactly
   installed-files.txt (directories from this build's configuration).
2. The library: soname libvhub-client.so.0, exports exactly the symbols of
   its version script, all under LIBVHUB_CLIENT_0.
3. contrib's example VMM is compiled like an outside project: its sources
   and the flags of `pkg-config --cflags --libs vhub-client` with
   PKG_CONFIG_PATH/PKG_CONFIG_SYSROOT_DIR pointing into D, nothing from the
   source tree's headers or the build's library; it runs against the
   installed vhubd and a real qemu-storage-daemon and verifies its data.
4. The installed vhubctl (loading the installed library), the installed
   Python package (imported from D) and the installed bash completion
   (completing commands, options, and the VM names the daemon lists).
5. The contract's vocabulary comes with the library: contract-user.c,
   compiled as strict ISO C from the installed headers alone, finds the
   installed daemon's API version and error code and message in
   <vhub/vhub-contract.h>; the headers also compile as C++ (with a C++
   compiler at hand).  Every Markdown file of docs/ is installed.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

from vhubtest import scenarios                                 # noqa: E402
from vhubtest.backends import QsdBackend                       # noqa: E402
from vhubtest.testing import Skip, check, check_eq, log, run   # noqa: E402

EXAMPLE_SOURCES = ["vhub-vmm-example.c", "vhub-vmm-example-io.c", "virtq/guest-mem.c",
                   "virtq/virtq.c", "virtq/virtio-blk.c"]


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--build-root", required=True)
    p.add_argument("--source-root", required=True)
    p.add_argument("--meson", required=True)
    p.add_argument("--sanitize", default="none")
    p.add_argument("--expected", required=True)
    p.add_argument("--cc", required=True)
    p.add_argument("--dir", action="append", default=[])
    return p.parse_args()


def sh(argv, what, env=None, cwd=None, timeout=120):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                       timeout=timeout)
    out = p.stdout.decode(errors="replace")
    check(p.returncode == 0, what, "exit %d: %s" % (p.returncode, out[-3000:]))
    return out


def installed_tree(root):
    """Every file and symlink under root, as absolute paths ("A -> B" for links)."""
    out = set()
    for d, dirs, files in os.walk(root):
        for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, name)
            rel = "/" + os.path.relpath(p, root)
            out.add("%s -> %s" % (rel, os.readlink(p)) if os.path.islink(p) else rel)
    return out


def expected_tree(path, dirs):
    out = set()
    for line in open(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"@(\w+)@", lambda m: dirs[m.group(1)], line)
        out.add(os.path.normpath(line.split(" -> ")[0]) +
                (" -> " + line.split(" -> ")[1] if " -> " in line else ""))
    return out


def check_library(libdir, source_root):
    so = os.path.join(libdir, "libvhub-client.so.0")
    dyn = sh(["readelf", "-d", "-W", so], "readelf -d libvhub-client.so.0")
    check(re.search(r"\(SONAME\)\s+Library soname: \[libvhub-client\.so\.0\]", dyn),
          "the library's soname is libvhub-client.so.0")
    syms = sh(["readelf", "--dyn-syms", "-W", so], "readelf --dyn-syms")
    exported = {}
    for line in syms.splitlines():
        f = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(f) >= 8 and f[4] == "GLOBAL" and f[6] != "UND":
            name, _, version = f[7].partition("@")
            exported[name] = version.lstrip("@")
    script = open(os.path.join(source_root, "control", "client", "libvhub-client.sym")).read()
    script = re.sub(r"/\*.*?\*/", "", script, flags=re.S)
    listed = set(re.findall(r"^\s*(vhub_\w+);", script, flags=re.M))
    exported.pop("LIBVHUB_CLIENT_0", None)
    check_eq(sorted(exported), sorted(listed), "exported symbols == the version script's list")
    check_eq(set(exported.values()), {"LIBVHUB_CLIENT_0"}, "every symbol is versioned LIBVHUB_CLIENT_0")
    header = open(os.path.join(source_root, "control", "client", "include", "vhub",
                               "vhub-client.h")).read() + \
        open(os.path.join(source_root, "control", "vhub-json.h")).read()
    declared = set(re.findall(r"\b(vhub_(?:client|json|base64)_\w+)\s*\(", header))
    check_eq(sorted(declared - listed), [], "every function the headers declare is exported")


def build_example(args, destdir, dirs, out):
    env = dict(os.environ)
    env["PKG_CONFIG_PATH"] = destdir + os.path.join(dirs["libdir"], "pkgconfig")
    env["PKG_CONFIG_SYSROOT_DIR"] = destdir
    env.pop("PKG_CONFIG_LIBDIR", None)
    flags = sh(["pkg-config", "--cflags", "--libs", "vhub-client"], "pkg-config --cflags --libs "
               "vhub-client (the installed .pc)", env=env).split()
    log("pkg-config: %s" % " ".join(flags))
    check(any(f == "-I" + destdir + dirs["includedir"] for f in flags),
          "the headers come from the installed include directory")
    check(any(f == "-L" + destdir + dirs["libdir"] for f in flags) and "-lvhub-client" in flags,
          "the library comes from the installed libdir")
    check(not any(args.source_root in f or args.build_root in f for f in flags),
          "nothing points into the source or build tree")
    contrib = os.path.join(args.source_root, "contrib")
    argv = shlex.split(args.cc) + ["-std=gnu11", "-D_GNU_SOURCE", "-O1", "-Wall", "-Werror", "-o", out,
                                   "-I" + os.path.join(contrib, "virtq")]
    if args.sanitize != "none":
        argv.append("-fsanitize=" + args.sanitize)   # the installed library is instrumented
    argv += [os.path.join(contrib, s) for s in EXAMPLE_SOURCES] + flags
    sh(argv, "contrib's example VMM compiles against the installed library", env=env)
    return flags


def build_contract_user(args, flags, out):
    """tests/packaging/contract-user.c, strict ISO C, from the installed headers only."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "contract-user.c")
    argv = shlex.split(args.cc) + ["-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-O1",
                                   "-o", out, src]
    if args.sanitize != "none":
        argv.append("-fsanitize=" + args.sanitize)
    sh(argv + flags, "contract-user.c compiles (-std=c11 -pedantic -Werror) against the installed "
       "headers")
    cxx = shutil.which("c++")
    if not cxx:
        log("no C++ compiler: the headers' C++ check is not run")
        return
    probe = os.path.join(os.path.dirname(out), "headers.cc")
    with open(probe, "w") as f:
        f.write("#include <vhub/vhub-client.h>\n"
                "int main() { return vhub_contract_error_message(VHUB_ERR_NO_VM) &&\n"
                "    vhub_contract_event_name(VHUB_EV_FAILED) ? 0 : 1; }\n")
    sh([cxx, "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fsyntax-only", probe]
       + [f for f in flags if f.startswith("-I")], "the installed headers compile as C++17")


def main(t):
    args = parse_args()
    dirs = dict(d.split("=", 1) for d in args.dir)
    tmp = t.tmpdir()
    destdir = os.path.join(tmp, "root")

    sh([args.meson, "install", "-C", args.build_root, "--no-rebuild", "--quiet", "--destdir",
        destdir], "meson install --destdir")
    got, want = installed_tree(destdir), expected_tree(args.expected, dirs)
    check_eq(sorted(got - want), [], "installed but not in installed-files.txt")
    check_eq(sorted(want - got), [], "in installed-files.txt but not installed")
    docs = {os.path.normpath(dirs["docdir"] + "/" + name)
            for name in os.listdir(os.path.join(args.source_root, "docs")) if name.endswith(".md")}
    check_eq(sorted(docs - got), [], "every Markdown file of docs/ is installed")

    libdir = destdir + dirs["libdir"]
    check_library(libdir, args.source_root)

    unit = open(destdir + os.path.join(dirs["unitdir"], "vhubd.service")).read()
    check("ExecStart=%s " % os.path.join(dirs["sbindir"], "vhubd") in unit,
          "the installed unit starts the installed vhubd")
    for page in ("man8/vhubd.8", "man1/vhubctl.1"):
        text = open(destdir + os.path.join(dirs["mandir"], page)).read()
        refs = set(re.findall(r"(/\S*/doc/vhub)/\S+\.md", text.replace("\\-", "-")))
        check_eq(refs, {dirs["docdir"]}, "%s points at the installed documentation" % page)
        for md in re.findall(r"/doc/vhub/(\S+?\.md)", text.replace("\\-", "-")):
            check(os.path.exists(destdir + os.path.join(dirs["docdir"], md)),
                  "%s: %s is installed" % (page, md))

    example = os.path.join(tmp, "vhub-vmm-example")
    flags = build_example(args, destdir, dirs, example)
    contract_user = os.path.join(tmp, "contract-user")
    build_contract_user(args, flags, contract_user)
    env = dict(os.environ, LD_LIBRARY_PATH=libdir)
    env.pop("PYTHONPATH", None)
    ldd = sh(["ldd", example], "ldd of the example", env=env)
    check(re.search(r"libvhub-client\.so\.0 => %s/" % re.escape(libdir), ldd),
          "the example loads the installed libvhub-client.so.0", ldd)

    if not shutil.which(os.environ.get("QSD", "qemu-storage-daemon")):
        raise Skip("qemu-storage-daemon not found (Debian: qemu-system-common)")
    img = os.path.join(tmp, "disk.img")
    scenarios.make_image(img, 64 << 20)
    backends = os.path.join(tmp, "backends")
    os.mkdir(backends)
    control = os.path.join(tmp, "control.sock")
    qsd = t.enter(QsdBackend(img, os.path.join(backends, "disk0.sock"), num_queues=2, log_dir=tmp))
    vhubd_log = open(os.path.join(tmp, "vhubd.log"), "wb")
    t.defer(vhubd_log.close)
    t.add_log("installed vhubd", os.path.join(tmp, "vhubd.log"))
    daemon = subprocess.Popen([destdir + os.path.join(dirs["sbindir"], "vhubd"), "--control", control,
                               "--backend-dir", backends], stdout=vhubd_log, stderr=subprocess.STDOUT,
                              env=env)
    t.defer(lambda: daemon.poll() is None and (daemon.kill(), daemon.wait()))
    vhubctl = destdir + os.path.join(dirs["bindir"], "vhubctl")
    for _ in range(200):
        if os.path.exists(control):
            break
        check(daemon.poll() is None, "the installed vhubd is running")
        subprocess.run(["sleep", "0.05"])
    out = sh([vhubctl, "--socket", control, "daemon", "info"], "installed vhubctl: daemon info",
             env=env)
    check(str(daemon.pid) in out, "installed vhubctl talks to the installed vhubd", out)

    out = sh([example, "--socket", control, "--blk-socket", qsd.socket, "--queues", "2",
              "--requests", "16"], "the example VMM built against the installed library runs",
             env=env, timeout=60)
    check("verification: OK" in out and "all steps OK" in out,
          "the example verified every byte it wrote and read", out[-2000:])
    out = sh([contract_user, control], "contract-user against the installed vhubd", env=env)
    check("contract: OK" in out, "the installed headers' API version, error code and message "
          "are the installed daemon's", out)

    pydir = destdir + dirs["pythondir"]
    code = ("import sys, vhub, vhub.aio; assert vhub.__file__.startswith(sys.argv[1]), vhub.__file__; "
            "c = vhub.Client(sys.argv[2]); print(c.call('daemon.info')['pid']); "
            "c.call('vm.create', {'vm': 'completion-vm'}, timeout=5); print('ok')")
    keeper = subprocess.Popen([sys.executable, "-c", code + "; sys.stdin.read()", pydir, control],
                              stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                              env=dict(env, PYTHONPATH=pydir))
    t.defer(lambda: keeper.poll() is None and (keeper.kill(), keeper.wait()))
    first = keeper.stdout.readline().decode().strip()
    check_eq(first, str(daemon.pid), "the installed Python package calls daemon.info")
    check_eq(keeper.stdout.readline().decode().strip(), "ok", "and creates a VM (held open)")

    completion = destdir + os.path.join(dirs["completionsdir"], "vhubctl")
    script = ('source "$1"; shift\n'
              't() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _vhubctl; '
              'echo "${COMPREPLY[*]}"; }\n'
              't vhubctl vm me\n'
              't vhubctl --so\n'
              't vhubctl device add --\n'
              't vhubctl device add vm0 d0 sock --mode ""\n'
              't vhubctl --socket "$1" vm destroy ""\n'
              't vhubctl help device st\n'
              't vhubctl device stop vm0 d0 --no\n')
    out = sh(["bash", "-c", script, "bash", completion, control], "the installed bash completion",
             env=dict(env, PATH=os.path.dirname(vhubctl) + ":" + env["PATH"])).splitlines()
    check_eq(out[0], "memory", "completion: vhubctl vm me<TAB>")
    check_eq(out[1], "--socket", "completion: vhubctl --so<TAB>")
    check({"--type", "--mode", "--queues", "--reconnect-ms"} <= set(out[2].split()),
          "completion: device add's options", out[2])
    check_eq(out[3], "client server", "completion: device add --mode <TAB>")
    check_eq(out[4], "completion-vm", "completion: VM names the daemon lists")
    check_eq(out[5], "start state stats stop", "completion: vhubctl help device st<TAB>")
    check_eq(out[6], "--no-drain", "completion: device stop's options")

    keeper.stdin.close()
    keeper.wait(10)
    daemon.send_signal(signal.SIGTERM)
    check_eq(daemon.wait(10), 0, "the installed vhubd exits 0 on SIGTERM")


if __name__ == "__main__":
    run(main)

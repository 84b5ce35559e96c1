"""The test guest's kernel and initramfs, prepared once and cached.

    img = guest_image.prepare()     # GuestImage: kernel, initrd, release
    # qemu ... -kernel img.kernel -initrd img.initrd

The kernel is Debian's cloud kernel: `apt-get download` of
linux-image-cloud-amd64 and of the linux-image-*-cloud-amd64 package it
depends on, unpacked with `dpkg -x` into the cache (never installed).  Its
virtio drivers are modules: the ones in MODULES and everything they depend
on (the "depends=" of each module's .modinfo section, what `modinfo -F
depends` prints) go into the initramfs, decompressed, with a list in load
order that /init insmods.  The initramfs holds busybox-static, /init and
the step scripts from tests/guest/; it is written here as a newc cpio and
cached under a name made of the hash of everything in it, so a changed
script or a new kernel makes a new one and an unchanged one is reused.

The cache is $VHUB_GUEST_CACHE (meson points it into the build dir), else
$XDG_CACHE_HOME/vhub-guest, else ~/.cache/vhub-guest.  One lock file
serializes the preparation between tests running in parallel.  A missing
qemu-system-x86_64 or a dynamic busybox is a Skip (not installed); a
failing download is a failure.
"""

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
import time

from .testing import Skip, log, user_cache_dir

GUEST_DIR = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                          "..", "..", "guest"))
BUSYBOX = os.environ.get("VHUB_BUSYBOX", "/bin/busybox")
KERNEL_PACKAGE = "linux-image-cloud-amd64"
# What the guest scripts need; their dependencies are added from modinfo.
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtiofs")
# Bump when the initramfs layout changes in a way the hashed inputs do not show.
FORMAT = b"vhub-guest-initramfs 1"


class GuestImage:
    def __init__(self, kernel, initrd, release, modules):
        self.kernel = kernel
        self.initrd = initrd
        self.release = release
        self.modules = modules      # load order

    def __repr__(self):
        return "GuestImage(%s, %s, %s)" % (self.kernel, self.initrd, ",".join(self.modules))


def cache_dir():
    return user_cache_dir("VHUB_GUEST_CACHE", "vhub-guest")


def prepare(cache=None):
    """The kernel and initramfs, built (once, under a lock) or from the cache."""
    cache = cache or cache_dir()
    busybox = _static_busybox()
    with open(os.path.join(cache, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel_root, release = _kernel(cache)
        mod_root = os.path.join(kernel_root, "lib", "modules", release)
        modules = module_load_order(mod_root, MODULES)
        initrd = _initramfs(cache, busybox, mod_root, modules)
    return GuestImage(os.path.join(kernel_root, "boot", "vmlinuz-" + release), initrd,
                      release, [m for m, _ in modules])


# ---- the kernel -----------------------------------------------------------

def _kernel(cache):
    """(root of the unpacked kernel package, its release), downloading once."""
    stamp = os.path.join(cache, "kernel.json")
    try:
        with open(stamp) as f:
            k = json.load(f)
        if os.path.isfile(os.path.join(k["root"], "boot", "vmlinuz-" + k["release"])):
            return k["root"], k["release"]
    except (OSError, ValueError, KeyError):
        pass
    for tool in ("apt-get", "dpkg-deb", "dpkg"):
        if not shutil.which(tool):
            raise Skip("%s not found: the guest kernel comes from a Debian package" % tool)
    _remove_stale(cache)
    work = tempfile.mkdtemp(prefix=".work-", dir=cache)
    try:
        meta = _apt_download(KERNEL_PACKAGE, work)
        depends = _run(["dpkg-deb", "-f", meta, "Depends"]).strip()
        # "linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)"
        name, _, ver = depends.split(",")[0].strip().partition(" ")
        if not name.startswith("linux-image-"):
            raise RuntimeError("%s depends on %r: no linux-image package" % (KERNEL_PACKAGE, depends))
        ver = ver.strip("()= ")
        deb = _apt_download("%s=%s" % (name, ver) if ver else name, work)
        root = os.path.join(work, "root")
        _run(["dpkg", "-x", deb, root])
        boot = os.listdir(os.path.join(root, "boot"))
        vmlinuz = [b for b in boot if b.startswith("vmlinuz-")]
        if len(vmlinuz) != 1:
            raise RuntimeError("%s holds %r, not one vmlinuz" % (deb, boot))
        release = vmlinuz[0][len("vmlinuz-"):]
        final = os.path.join(cache, "kernel-" + release)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(root, final)
        tmp = stamp + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"root": final, "release": release, "package": name, "version": ver}, f)
        os.replace(tmp, stamp)
        log("guest kernel: %s %s unpacked in %s" % (name, ver, final))
        return final, release
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale(cache):
    """What an interrupted preparation left (we hold the lock: nobody else
    is preparing), and initramfs files unused for a week (scripts changed)."""
    week_ago = time.time() - 7 * 86400
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.startswith(".work-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(".work-"):
            os.unlink(path)
        elif name.startswith("initramfs-") and os.stat(path).st_mtime < week_ago:
            os.unlink(path)


def _apt_download(spec, cwd):
    before = set(os.listdir(cwd))
    _run(["apt-get", "download", "-q", spec], cwd=cwd)
    new = [f for f in set(os.listdir(cwd)) - before if f.endswith(".deb")]
    if len(new) != 1:
        raise RuntimeError("apt-get download %s left %r" % (spec, new))
    return os.path.join(cwd, new[0])


def _run(argv, cwd=None):
    p = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError("%s failed with %d:\n%s%s" % (" ".join(argv), p.returncode,
                                                         p.stdout, p.stderr))
    return p.stdout


# ---- modules --------------------------------------------------------------

def module_load_order(mod_root, wanted):
    """[(name, path)] of `wanted` and their dependencies, dependencies first."""
    index = {}
    for dirpath, _, files in os.walk(os.path.join(mod_root, "kernel")):
        for f in files:
            name = _module_name(f)
            if name:
                index[name] = os.path.join(dirpath, f)
    order, state = [], {}

    def visit(name, chain):
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise RuntimeError("module dependency cycle: %s" % " -> ".join(chain + [name]))
        if name not in index:
            raise RuntimeError("module %s (needed by %s) not in %s"
                               % (name, " -> ".join(chain) or "the guest", mod_root))
        state[name] = "visiting"
        for dep in module_depends(read_module(index[name])):
            visit(dep, chain + [name])
        state[name] = "done"
        order.append((name, index[name]))
    for m in wanted:
        visit(m, [])
    return order


def _module_name(filename):
    for suffix in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if filename.endswith(suffix):
            return filename[:-len(suffix)].replace("-", "_")
    return None


def read_module(path):
    """A module's ELF bytes; .ko.xz/.ko.gz/.ko.zst decompressed (busybox's
    insmod is not relied on for that)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".gz"):
        return gzip.decompress(data)
    if path.endswith(".zst"):
        if not shutil.which("zstd"):
            raise Skip("zstd not installed: needed to decompress %s" % path)
        return subprocess.run(["zstd", "-dc", path], check=True, stdout=subprocess.PIPE).stdout
    return data


def module_depends(elf):
    """The names in the module's .modinfo "depends=" (modinfo -F depends)."""
    for entry in _elf_section(elf, b".modinfo").split(b"\0"):
        if entry.startswith(b"depends="):
            return [d for d in entry[len(b"depends="):].decode().split(",") if d]
    return []


def _elf_section(elf, wanted):
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise RuntimeError("not a little-endian ELF64 module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3a)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]
    for name_off, _, _, _, off, size, *_ in sections:
        start = names + name_off
        if elf[start:elf.index(b"\0", start)] == wanted:
            return elf[off:off + size]
    return b""


# ---- busybox and the initramfs --------------------------------------------

def _static_busybox():
    try:
        with open(BUSYBOX, "rb") as f:
            elf = f.read()
    except FileNotFoundError:
        raise Skip("busybox-static not installed: %s missing" % BUSYBOX)
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", elf, phoff + i * phentsize)
        if p_type == 3:     # PT_INTERP: needs a dynamic loader the guest does not have
            raise Skip("%s is dynamically linked: install busybox-static" % BUSYBOX)
    return elf


def _guest_files():
    """(path in the initramfs, mode, bytes) of /init and the steps."""
    files = []
    with open(os.path.join(GUEST_DIR, "init"), "rb") as f:
        files.append(("init", 0o755, f.read()))
    steps = os.path.join(GUEST_DIR, "steps")
    for name in sorted(os.listdir(steps)):
        if name.endswith(".sh"):
            with open(os.path.join(steps, name), "rb") as f:
                files.append(("steps/" + name, 0o644, f.read()))
    return files


def _initramfs(cache, busybox, mod_root, modules):
    files = [("bin/busybox", 0o755, busybox)] + _guest_files()
    for name, path in modules:
        files.append(("lib/modules/%s.ko" % name, 0o644, read_module(path)))
    files.append(("lib/modules/order", 0o644, "".join(m + "\n" for m, _ in modules).encode()))
    h = hashlib.sha256(FORMAT)
    for path, mode, data in files:
        h.update(b"%s %o %d\0" % (path.encode(), mode, len(data)))
        h.update(data)
    out = os.path.join(cache, "initramfs-%s.cpio" % h.hexdigest()[:16])
    if os.path.exists(out):
        os.utime(out)   # in use: not stale
        return out
    _remove_stale(cache)
    dirs = ["bin", "dev", "lib", "lib/modules", "steps", "proc", "sys", "run", "tmp", "mnt"]
    cpio = _Cpio()
    for d in dirs:
        cpio.add(d, 0o040755)
    # The kernel opens /dev/console for /init before devtmpfs is mounted.
    cpio.add("dev/console", 0o020600, rdev=(5, 1))
    for path, mode, data in files:
        cpio.add(path, 0o100000 | mode, data)
    fd, tmp = tempfile.mkstemp(prefix=".work-", dir=cache)
    with os.fdopen(fd, "wb") as f:
        f.write(cpio.finish())
    os.replace(tmp, out)
    log("guest initramfs: %s (%d files, %d modules)" % (out, len(files), len(modules)))
    return out


class _Cpio:
    """A newc ("070701") archive, the format the kernel unpacks."""

    def __init__(self):
        self.parts = []
        self.ino = 1

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.parts += [hdr, name_b, _pad4(len(hdr) + len(name_b)), data, _pad4(len(data))]

    def finish(self):
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def _pad4(n):
    return b"\0" * (-n % 4)

"""Real back-ends that Debian ships as source or outside the suite's install
line, set up at test time (nothing fetched is committed):

- CryptoBackend: DPDK's vhost_crypto example (Debian `dpdk-doc`), built with
  make against libdpdk (`dpdk-dev`) into the build dir once, then reused.
- GpuBackend: QEMU's vhost-user-gpu (Debian `qemu-system-gui`, which pulls in
  a desktop: `apt-get download` + `dpkg -x` into the build dir instead; it
  needs `libvirglrenderer1` installed).

A missing package is a genuine skip (exit 77) naming what to install.
"""

import fcntl
import glob
import os
import shutil
import subprocess
import tempfile

from .backends import Backend, _serial
from .testing import Skip, log

DPDK_EXAMPLES = os.environ.get("VHUB_DPDK_EXAMPLES", "/usr/share/dpdk/examples")
GPU_PATHS = [os.environ.get("VHUB_GPU", ""), "/usr/lib/qemu/vhost-user-gpu"]


def cache_dir(what):
    """A directory under the build dir (kept between runs), else a temp dir."""
    root = os.environ.get("VHUB_BUILD_DIR") or os.path.join(tempfile.gettempdir(), "vhubtest-cache")
    d = os.path.join(root, "real-peers", what)
    os.makedirs(d, exist_ok=True)
    return d


class _Lock:
    """One builder at a time per cache dir (tests may run in parallel)."""
    def __init__(self, d):
        self.path = os.path.join(d, ".lock")

    def __enter__(self):
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()
        return False


def build_dpdk_example(name, binary):
    """build/<binary> of DPDK example `name`, built once and cached."""
    src = os.path.join(DPDK_EXAMPLES, name)
    if not os.path.isfile(os.path.join(src, "Makefile")):
        raise Skip("DPDK example %s not found in %s (install dpdk-doc)" % (name, DPDK_EXAMPLES))
    if subprocess.run(["pkg-config", "--exists", "libdpdk"]).returncode != 0:
        raise Skip("libdpdk not found by pkg-config (install dpdk-dev)")
    d = cache_dir("dpdk-" + name)
    out = os.path.join(d, name, "build", binary)
    with _Lock(d):
        newest_src = max(os.path.getmtime(p) for p in glob.glob(os.path.join(src, "*")))
        if os.path.exists(out) and os.path.getmtime(out) >= newest_src:
            return out
        shutil.rmtree(os.path.join(d, name), ignore_errors=True)
        shutil.copytree(src, os.path.join(d, name))
        log("building DPDK example %s in %s" % (name, d))
        p = subprocess.run(["make", "-C", os.path.join(d, name)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=300)
        if p.returncode != 0 or not os.path.exists(out):
            raise RuntimeError("building DPDK example %s failed:\n%s"
                               % (name, p.stdout.decode(errors="replace")[-4000:]))
    return out


class CryptoBackend(Backend):
    """DPDK's vhost_crypto example: one vhost-user crypto socket, a software
    crypto device (crypto_aesni_mb) and one worker lcore polling it."""
    name = "vhost-crypto"

    def __init__(self, socket, log_dir=None, vdev="crypto_aesni_mb"):
        self.binary = build_dpdk_example("vhost_crypto", "vhost-crypto")
        super().__init__([socket], log_dir)
        self.vdev = vdev
        self.runtime_dir = tempfile.mkdtemp(prefix="crypto-rt-", dir=self.log_dir)
        self.file_prefix = "vhubcrypto%d_%d" % (os.getpid(), next(_serial))

    def env(self):
        env = dict(os.environ)
        env["RUNTIME_DIRECTORY"] = self.runtime_dir
        return env

    def argv(self):
        # lcore 0 runs rte_vhost, lcore 1 the worker of "(lcore 1, cdev 0, queue 0)"
        return [self.binary, "-l", "0-1", "--vdev", self.vdev, "--no-huge", "-m", "256", "--no-pci",
                "--no-shconf", "--no-telemetry", "--file-prefix=%s" % self.file_prefix, "--",
                "--socket-file", "1,%s" % self.socket, "--config", "(1,0,0)"]


def find_vhost_user_gpu():
    """The vhost-user-gpu binary: installed, named by $VHUB_GPU, or unpacked
    from qemu-system-gui into the cache (apt-get download, no install)."""
    for p in GPU_PATHS:
        if p and os.access(p, os.X_OK):
            return p
    d = cache_dir("qemu-system-gui")
    unpacked = os.path.join(d, "root", "usr", "lib", "qemu", "vhost-user-gpu")
    with _Lock(d):
        if not os.access(unpacked, os.X_OK):
            if not shutil.which("apt-get") or not shutil.which("dpkg"):
                raise Skip("vhost-user-gpu not installed and no apt-get to fetch qemu-system-gui")
            for old in glob.glob(os.path.join(d, "*.deb")):
                os.unlink(old)
            p = subprocess.run(["apt-get", "download", "qemu-system-gui"], cwd=d, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=300)
            debs = glob.glob(os.path.join(d, "qemu-system-gui_*.deb"))
            if p.returncode != 0 or not debs:
                raise Skip("vhost-user-gpu not installed and `apt-get download qemu-system-gui` failed: %s"
                           % p.stdout.decode(errors="replace")[-500:])
            subprocess.run(["dpkg", "-x", debs[0], os.path.join(d, "root")], check=True, timeout=120)
    missing = subprocess.run(["ldd", unpacked], stdout=subprocess.PIPE).stdout.decode(errors="replace")
    missing = [line.split()[0] for line in missing.splitlines() if "not found" in line]
    if missing:
        raise Skip("vhost-user-gpu needs %s (install libvirglrenderer1)" % ", ".join(missing))
    return unpacked


class GpuBackend(Backend):
    """QEMU's vhost-user-gpu; it exits when its front-end disconnects."""
    name = "vhost-user-gpu"

    def __init__(self, socket, log_dir=None):
        self.binary = find_vhost_user_gpu()
        super().__init__([socket], log_dir)

    def argv(self):
        return [self.binary, "--socket-path=%s" % self.socket]

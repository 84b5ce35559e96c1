"""vhub integration-test harness (stdlib only).

memory   memfd-backed guest RAM and a gpa allocator
virtq    split-virtqueue driver
blk/net/fs  virtio-blk, virtio-net, virtio-fs drivers over virtqueues
direct   a synchronous vhost-user front-end (no vhubd)
client   JSON-RPC client for vhubd's control socket (fds via SCM_RIGHTS)
daemon   start/stop vhubd in a temp dir
backends qemu-storage-daemon, virtiofsd, dpdk-testpmd launchers
guest    a real Linux guest under QEMU (TCG): devices, console steps, checks
guest_image  its kernel (Debian's, downloaded) and initramfs, cached
qmp      QMP client with deadlines
testing  exit codes (0/1/77), checks, temp dirs
"""

#!/bin/bash
# SPDX-License-Identifier: MIT
#
# contrib/demo.sh [BUILD_DIR]
#
# vhub end to end, with a real back-end: qemu-storage-daemon exports a raw
# image as vhost-user-blk, vhubd runs with a private control socket, and
# vhub-vmm-example (a tiny VMM) writes a pattern through real virtqueues,
# reads it back, flushes and tears down.  Then the image file itself is
# checked: the pattern must be at exactly the sectors the example wrote.
#
# BUILD_DIR defaults to ./build (meson setup build && meson compile -C build).
# Environment: VHUBD (daemon command, default BUILD_DIR/daemon/vhubd),
# QSD (default qemu-storage-daemon), DEMO_QUEUES (2), DEMO_REQUESTS (8),
# DEMO_KEEP=1 keeps the temp dir for inspection.
#
# Exit status: 0 and a final "demo OK" line on success, 77 if
# qemu-storage-daemon is not installed, 1 on any failure.

set -euo pipefail

build=${1:-./build}
queues=${DEMO_QUEUES:-2}
requests=${DEMO_REQUESTS:-8}
socket_timeout_s=10
run_timeout_s=120

log() { printf 'demo: %s\n' "$*"; }
die() { printf 'demo: FAILED: %s\n' "$*" >&2; exit 1; }
skip() { printf 'demo: SKIP: %s\n' "$*" >&2; exit 77; }

[[ -d $build ]] || die "build directory '$build' does not exist (meson setup build && meson compile -C build)"
build=$(cd "$build" && pwd)
vmm=$build/contrib/vhub-vmm-example
read -r -a vhubd_cmd <<<"${VHUBD:-$build/daemon/vhubd}"
qsd=${QSD:-qemu-storage-daemon}

command -v "$qsd" >/dev/null || skip "$qsd not found (Debian: apt-get install qemu-system-common)"
command -v "${vhubd_cmd[0]}" >/dev/null || die "${vhubd_cmd[0]} not built (meson compile -C $build)"
[[ -x $vmm ]] || die "$vmm not built (meson compile -C $build)"
for tool in truncate dd cmp timeout; do
        command -v "$tool" >/dev/null || die "$tool not found"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vhub-demo.XXXXXX")
img=$tmp/disk.img
backends=$tmp/backends
blk_sock=$backends/disk0.sock
control=$tmp/control.sock
qsd_pid=
vhubd_pid=

# Stop one child: SIGTERM, up to 5 s, then SIGKILL.  Its exit status goes
# to $child_status (not via $(...): a subshell can not wait for our child).
child_status=0
stop_child() {
        local pid=$1 i
        child_status=0
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 100; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.05
        done
        if kill -0 "$pid" 2>/dev/null; then
                kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || child_status=$?
}

cleanup() {
        local rc=$?
        trap - EXIT INT TERM
        [[ -n $vhubd_pid ]] && stop_child "$vhubd_pid"
        [[ -n $qsd_pid ]] && stop_child "$qsd_pid"
        if ((rc != 0 && rc != 77)); then
                for f in "$tmp/vhubd.log" "$tmp/qsd.log"; do
                        [[ -s $f ]] || continue
                        printf 'demo: --- last lines of %s ---\n' "${f##*/}" >&2
                        tail -n 30 "$f" >&2
                done
        fi
        if [[ ${DEMO_KEEP:-0} == 1 ]]; then
                log "kept $tmp"
        else
                rm -rf "$tmp"
        fi
        exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for_socket PATH PID NAME
wait_for_socket() {
        local path=$1 pid=$2 name=$3 i
        for ((i = 0; i < socket_timeout_s * 20; i++)); do
                [[ -S $path ]] && return 0
                kill -0 "$pid" 2>/dev/null || die "$name exited before creating $path (see its log below)"
                sleep 0.05
        done
        die "$name did not create $path within ${socket_timeout_s}s"
}

log "temp dir $tmp"
mkdir -m 0700 "$backends"
truncate -s 64M "$img"
log "image $img: 64 MiB raw, all zeroes"

"$qsd" \
        --blockdev "driver=file,node-name=file0,filename=$img" \
        --blockdev driver=raw,node-name=disk0,file=file0 \
        --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$blk_sock,writable=on,num-queues=2" \
        </dev/null >"$tmp/qsd.log" 2>&1 &
qsd_pid=$!
wait_for_socket "$blk_sock" "$qsd_pid" qemu-storage-daemon
log "qemu-storage-daemon (pid $qsd_pid) exports the image on $blk_sock"

"${vhubd_cmd[@]}" --control "$control" --backend-dir "$backends" \
        </dev/null >"$tmp/vhubd.log" 2>&1 &
vhubd_pid=$!
wait_for_socket "$control" "$vhubd_pid" vhubd
log "vhubd (pid $vhubd_pid) listens on $control"

log "running vhub-vmm-example --queues $queues --requests $requests"
if ! timeout "$run_timeout_s" "$vmm" --socket "$control" --blk-socket "$blk_sock" \
        --queues "$queues" --requests "$requests" 2>&1 | tee "$tmp/vmm.log"; then
        die "vhub-vmm-example failed"
fi

# Stop both daemons before looking at the image: vhubd must exit 0 on
# SIGTERM, and qemu-storage-daemon has then written everything to the file.
stop_child "$vhubd_pid"
vhubd_pid=
((child_status == 0)) || die "vhubd exited with status $child_status on SIGTERM (expected 0)"
log "vhubd stopped (exit 0)"
stop_child "$qsd_pid"
qsd_pid=
log "qemu-storage-daemon stopped (exit $child_status)"

# The example logs every write as "ring R: OUT lba L (S sectors): OK".
extents=$(sed -n 's/^ *ring [0-9]*: OUT lba \([0-9]*\) (\([0-9]*\) sectors): OK$/\1 \2/p' "$tmp/vmm.log")
n=0
while read -r lba count; do
        [[ -n $lba ]] || continue
        if ! cmp -s <(dd if="$img" bs=512 skip="$lba" count="$count" status=none) \
                    <("$vmm" --dump-pattern "$lba" "$count"); then
                die "image: sectors $lba..$((lba + count - 1)) do not hold the pattern the example wrote"
        fi
        n=$((n + 1))
done <<<"$extents"
((n == queues * requests)) || die "image: found $n written extents in the example's log, expected $((queues * requests))"
# and nothing landed where nothing was written
cmp -s <(dd if="$img" bs=512 count=8 status=none) <(head -c 4096 /dev/zero) ||
        die "image: sectors 0..7 were never written but are not zero"
log "image: all $n extents hold the expected pattern, byte for byte; untouched sectors still zero"

log "demo OK"

# blk-basic DEV A B C NBLOCKS SHA256  (block numbers in 4 KiB units)
# The host filled blocks A..A+NBLOCKS with a random pattern whose sha256 it
# passes.  Read it with O_DIRECT and check the hash; write it at B with
# O_DIRECT and read it back with O_DIRECT; write it at C buffered + fsync,
# drop the page cache, read it back with O_DIRECT.  The host then checks B
# and C in the image file.
. /steps/lib.sh
STEP=blk-basic
dev=$1 a=$2 b=$3 c=$4 n=$5 sha=$6
[ -b "$dev" ] || step_fail "no block device $dev"
size=$(blockdev --getsize64 "$dev") || step_fail "blockdev --getsize64 $dev"
queues=$(ls "/sys/block/${dev#/dev/}/mq" | wc -l)
rm -f /tmp/pat /tmp/back
dd if="$dev" of=/tmp/pat bs=4096 skip="$a" count="$n" iflag=direct 2>/tmp/dd.err ||
	step_fail "O_DIRECT read of the host pattern: $(cat /tmp/dd.err)"
got=$(sha256sum /tmp/pat | cut -d' ' -f1)
[ "$got" = "$sha" ] || step_fail "host pattern read back with sha256 $got, want $sha"

dd if=/tmp/pat of="$dev" bs=4096 seek="$b" count="$n" oflag=direct conv=notrunc 2>/tmp/dd.err ||
	step_fail "O_DIRECT write: $(cat /tmp/dd.err)"
dd if="$dev" of=/tmp/back bs=4096 skip="$b" count="$n" iflag=direct 2>/tmp/dd.err ||
	step_fail "O_DIRECT read back: $(cat /tmp/dd.err)"
cmp -s /tmp/pat /tmp/back || step_fail "O_DIRECT write then read: data differs"

rm -f /tmp/back
dd if=/tmp/pat of="$dev" bs=4096 seek="$c" count="$n" conv=fsync,notrunc 2>/tmp/dd.err ||
	step_fail "buffered write + fsync: $(cat /tmp/dd.err)"
echo 3 >/proc/sys/vm/drop_caches
dd if="$dev" of=/tmp/back bs=4096 skip="$c" count="$n" iflag=direct 2>/tmp/dd.err ||
	step_fail "O_DIRECT read after buffered write: $(cat /tmp/dd.err)"
cmp -s /tmp/pat /tmp/back || step_fail "buffered+fsync write then O_DIRECT read: data differs"

errors=$(kmsg_error_count)
[ "$errors" -eq 0 ] && step_ok "size=$size queues=$queues blocks=$n queue_irqs=$(blk_queue_irqs "$dev") kmsg_errors=0"
kmsg_error_log
step_fail "kernel log has $errors error lines"

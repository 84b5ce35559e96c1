# blk-write DEV WRITERS FIRST AREA COUNT
# WRITERS processes in parallel; writer W owns blocks FIRST + W*AREA ..
# + AREA - 1 (4 KiB blocks) and writes its numbered blocks N = 0, 1, ... one
# at a time with O_DIRECT into slot N % AREA, reads each back with O_DIRECT
# and compares.  COUNT blocks per writer, or with COUNT 0 until the host
# says "stop".  The result gives each writer's count; the host recomputes
# the last block written to every slot and checks the image file.
. /steps/lib.sh
STEP=blk-write
dev=$1 writers=$2 first=$3 area=$4 count=$5
[ -b "$dev" ] || step_fail "no block device $dev"

writer() {
	w=$1 n=0 base=$((first + $1 * area))
	while :; do
		if [ "$count" -eq 0 ]; then
			stop_requested && break
		elif [ "$n" -ge "$count" ]; then
			break
		fi
		slot=$((base + n % area))
		blk_block "$w" "$n"
		printf '%s' "$BLK" >"/tmp/w$w.blk"
		if ! dd if="/tmp/w$w.blk" of="$dev" bs=4096 seek="$slot" count=1 \
			oflag=direct conv=notrunc 2>"/tmp/w$w.err"; then
			echo "write of block $n: $(cat /tmp/w$w.err)" >"/tmp/w$w.fail"
			break
		fi
		if ! dd if="$dev" of="/tmp/w$w.rd" bs=4096 skip="$slot" count=1 \
			iflag=direct 2>"/tmp/w$w.err"; then
			echo "read of block $n: $(cat /tmp/w$w.err)" >"/tmp/w$w.fail"
			break
		fi
		if ! cmp -s "/tmp/w$w.blk" "/tmp/w$w.rd"; then
			echo "block $n read back differs" >"/tmp/w$w.fail"
			break
		fi
		n=$((n + 1))
		[ $((n % 32)) -eq 0 ] && guest_say "GUEST-PROGRESS $STEP w=$w n=$n"
	done
	echo "$n" >"/tmp/w$w.count"
}

rm -f /tmp/w*.count /tmp/w*.fail
w=0
while [ "$w" -lt "$writers" ]; do
	writer "$w" &
	w=$((w + 1))
done
guest_say "GUEST-PROGRESS $STEP started writers=$writers"
wait

counts= failed=
w=0
while [ "$w" -lt "$writers" ]; do
	counts="$counts${counts:+,}$(cat /tmp/w$w.count 2>/dev/null || echo none)"
	[ -f "/tmp/w$w.fail" ] && failed="$failed writer $w: $(cat /tmp/w$w.fail);"
	w=$((w + 1))
done
[ -z "$failed" ] || step_fail "counts=$counts$failed"
errors=$(kmsg_error_count)
[ "$errors" -eq 0 ] &&
	step_ok "writers=$writers counts=$counts queue_irqs=$(blk_queue_irqs "$dev") kmsg_errors=0"
kmsg_error_log
step_fail "counts=$counts kernel log has $errors error lines"

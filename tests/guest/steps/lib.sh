# Shared by /init and every step (sourced).  The console protocol, one line
# each, parsed by tests/integration/vhubtest/guest.py:
#   GUEST-READY k=v...             booted, modules loaded, commands accepted
#   GUEST-FIRST-IO dev=vda         first O_DIRECT read of the disk done
#   GUEST-PROGRESS STEP k=v...     a long step is alive
#   GUEST-RESULT STEP ok k=v...    a step passed (its figures as k=v)
#   GUEST-RESULT STEP fail WHY     a step failed
#   GUEST-LOG STEP text            detail (kernel messages on failure)
#   GUEST-ERROR text               the guest's own plumbing failed

guest_say() {
	# One echo is one write() to the tty: lines from parallel writers
	# are never cut into each other.
	echo "$*"
}

step_ok() {
	guest_say "GUEST-RESULT $STEP ok $*"
	exit 0
}

step_fail() {
	guest_say "GUEST-RESULT $STEP fail $*"
	dmesg | tail -n 20 | while read -r l; do guest_say "GUEST-LOG $STEP $l"; done
	exit 1
}

# Kernel log lines that mean a device or the guest itself is in trouble.
KMSG_ERRORS='I/O error|blk_update_request|Buffer I/O|critical (medium|target)|virtio.*(error|broken|timeout)|hung_task|BUG:|WARNING:|Oops|Call Trace'

kmsg_error_count() {
	dmesg | grep -cE "$KMSG_ERRORS"
}

kmsg_error_log() {
	dmesg | grep -E "$KMSG_ERRORS" | tail -n 20 | while read -r l; do
		guest_say "GUEST-LOG $STEP $l"
	done
}

# blk_queue_irqs DEV: "N0,N1,...", the interrupts each of the disk's request
# virtqueues raised so far (/proc/interrupts "virtioK-req.Q", all CPUs):
# a queue that completed requests has raised some.
blk_queue_irqs() {
	vdev=$(basename "$(readlink "/sys/block/${1#/dev/}/device")")
	awk -v name="$vdev-req." 'NR == 1 { ncpu = NF; next }
		index($NF, name) == 1 { s = 0; for (i = 2; i <= ncpu + 1; i++) s += $i
			out = out (out == "" ? "" : ",") s }
		END { print out }' /proc/interrupts
}

stop_requested() {
	[ -e /run/stop ]
}

# blk_block W N: BLK = the 4096-byte content of writer W's block number N,
# 128 copies of a 32-byte record.  Same format as guest.py's blk_block():
#   "vhubtest-blk w%03d n%011d \n" % (100 + W, 10000000000 + N)
# Built with shell arithmetic and string doubling: no fork per block.
blk_block() {
	BLK="vhubtest-blk w$((100 + $1)) n$((10000000000 + $2)) 
"
	BLK=$BLK$BLK; BLK=$BLK$BLK; BLK=$BLK$BLK; BLK=$BLK$BLK
	BLK=$BLK$BLK; BLK=$BLK$BLK; BLK=$BLK$BLK
}

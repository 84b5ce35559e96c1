# blk-throughput DEV FIRST MIB BS
# Sequential O_DIRECT write, then read, of MIB MiB at block FIRST (4 KiB
# units) in requests of BS bytes, one dd each.  The host times the
# GUEST-PROGRESS markers around them (busybox has no clock finer than
# /proc/uptime's 10 ms).  Outside the timed parts: random data prepared in
# tmpfs first (at most half the guest's RAM), and read back once more
# afterwards and compared by sha256 (in the result: the host can check the
# image file).
. /steps/lib.sh
STEP=blk-throughput
dev=$1 first=$2 mib=$3 bs=$4
bytes=$((mib * 1048576)) off=$((first * 4096))
[ -b "$dev" ] || step_fail "no block device $dev"
dd if=/dev/urandom of=/tmp/tp.data bs=1048576 count="$mib" 2>/dev/null || step_fail "preparing data"
guest_say "GUEST-PROGRESS $STEP write-start"
dd if=/tmp/tp.data of="$dev" bs="$bs" seek="$off" oflag=direct,seek_bytes conv=notrunc 2>/tmp/dd.err ||
	step_fail "O_DIRECT write: $(cat /tmp/dd.err)"
guest_say "GUEST-PROGRESS $STEP write-done"
dd if="$dev" of=/dev/null bs="$bs" skip="$off" count="$bytes" iflag=direct,skip_bytes,count_bytes 2>/tmp/dd.err ||
	step_fail "O_DIRECT read: $(cat /tmp/dd.err)"
guest_say "GUEST-PROGRESS $STEP read-done"
want=$(sha256sum </tmp/tp.data | cut -d' ' -f1)
rm -f /tmp/tp.data
got=$(dd if="$dev" bs=1048576 skip="$off" count="$bytes" iflag=direct,skip_bytes,count_bytes 2>/dev/null |
	sha256sum | cut -d' ' -f1)
[ "$got" = "$want" ] || step_fail "data read back (sha256 $got) differs from data written ($want)"
step_ok "bytes=$bytes bs=$bs sha256=$want"

# fs TAG HOSTFILE SHA256 GUESTFILE
# Mount the virtio-fs TAG, check the host's file by its sha256, write
# GUESTFILE = the host file's bytes + "vhubtest guest wrote this\n" and
# unmount (the host checks the file).
. /steps/lib.sh
STEP=fs
tag=$1 host=$2 sha=$3 guest=$4
mkdir -p /mnt/fs
mount -t virtiofs "$tag" /mnt/fs 2>/tmp/mount.err || step_fail "mount -t virtiofs $tag: $(cat /tmp/mount.err)"
got=$(sha256sum "/mnt/fs/$host" | cut -d' ' -f1)
[ "$got" = "$sha" ] || { umount /mnt/fs; step_fail "host file read with sha256 '$got', want $sha"; }
size=$(stat -c %s "/mnt/fs/$host")
{ cat "/mnt/fs/$host" && echo "vhubtest guest wrote this"; } >"/mnt/fs/$guest" ||
	{ umount /mnt/fs; step_fail "writing $guest"; }
sync
entries=$(ls /mnt/fs | wc -l)
umount /mnt/fs || step_fail "umount"
errors=$(kmsg_error_count)
[ "$errors" -eq 0 ] && step_ok "size=$size entries=$entries kmsg_errors=0"
kmsg_error_log
step_fail "kernel log has $errors error lines"

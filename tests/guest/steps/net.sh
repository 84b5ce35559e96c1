# net IFACE COUNT
# Bring IFACE up with IPv6 only (no DAD, no router solicitations, no IPv4
# address), send COUNT ICMPv6 echo requests to the link-local all-nodes
# address ff02::1 (never any other address), and report how far the
# interface's tx and rx counters moved.  Behind dpdk-testpmd's io
# forwarding every frame sent comes back, so the guest receives its own
# echo requests: Icmp6InEchos counts them (parsed, checksum verified).
. /steps/lib.sh
STEP=net
ifc=$1 count=$2
[ -d "/sys/class/net/$ifc" ] || step_fail "no interface $ifc"
for k in accept_dad router_solicitations; do
	echo 0 >"/proc/sys/net/ipv6/conf/$ifc/$k"
done
ip link set "$ifc" up || step_fail "ip link set $ifc up"
i=0
until [ "$(cat /sys/class/net/$ifc/carrier 2>/dev/null)" = 1 ] &&
	ip -6 addr show dev "$ifc" scope link | grep -q inet6; do
	i=$((i + 1))
	[ "$i" -lt 100 ] || step_fail "no carrier or no link-local address on $ifc after 10 s"
	sleep 0.1
done
# the virtio features the driver acked: a string of 0/1, bit N at N+1
feat=$(cat "/sys/class/net/$ifc/device/features" 2>/dev/null)
packed=$(printf '%s' "$feat" | cut -c35)
stats=/sys/class/net/$ifc/statistics
snmp6() { grep "^$1 " /proc/net/snmp6 | tr -s ' ' | cut -d' ' -f2; }
tx0=$(cat $stats/tx_packets) rx0=$(cat $stats/rx_packets) echos0=$(snmp6 Icmp6InEchos)
# The looped-back requests are not replies: ping itself sees none (its exit
# status is reported, not judged); the kernel counts them as echo requests in.
ping6 -c "$count" -i 0.2 -W 1 -I "$ifc" ff02::1 >/tmp/ping.out 2>&1
ping_rc=$?
tx1=$(cat $stats/tx_packets) rx1=$(cat $stats/rx_packets) echos1=$(snmp6 Icmp6InEchos)
while read -r l; do guest_say "GUEST-LOG $STEP $l"; done </tmp/ping.out
ip link set "$ifc" down
errors=$(kmsg_error_count)
[ "$errors" -eq 0 ] || { kmsg_error_log; step_fail "kernel log has $errors error lines"; }
step_ok "packed=${packed:-?} tx=$((tx1 - tx0)) rx=$((rx1 - rx0)) in_echos=$((echos1 - echos0)) ping_rc=$ping_rc rx_errors=$(cat $stats/rx_errors) tx_errors=$(cat $stats/tx_errors)"

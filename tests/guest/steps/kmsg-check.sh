# kmsg-check: the kernel log has no device or kernel error.
. /steps/lib.sh
STEP=kmsg-check
errors=$(kmsg_error_count)
[ "$errors" -eq 0 ] && step_ok "kmsg_errors=0"
kmsg_error_log
step_fail "kernel log has $errors error lines"

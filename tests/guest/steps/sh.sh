# sh COMMAND...: run a shell command line in the guest (diagnostics from a
# test or by hand); its output as GUEST-LOG lines, its exit status as rc=.
. /steps/lib.sh
STEP=sh
eval "$*" >/tmp/sh.out 2>&1
rc=$?
while read -r l; do guest_say "GUEST-LOG $STEP $l"; done </tmp/sh.out
step_ok "rc=$rc"

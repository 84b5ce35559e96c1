#!/bin/bash
# SPDX-License-Identifier: MIT
# Run every libFuzzer target in turn (one process at a time, niced), then
# merge what each found into its committed corpus directory (-merge=1 keeps
# only inputs that add coverage).  See docs/fuzzing.md.
#
#   tests/fuzz/fuzz-campaign.sh BUILD_DIR [TARGET=SECONDS ...]
#
# BUILD_DIR is a clang build with -Dfuzzing=true (docs/fuzzing.md has the
# setup line).  Without TARGET=SECONDS every target runs 60 s.  Logs,
# working corpora and crash artifacts go to a temporary directory that is
# printed and kept.
set -euo pipefail

src=$(cd "$(dirname "$0")/../.." && pwd)
build=$(cd "${1:?usage: $0 BUILD_DIR [TARGET=SECONDS ...]}" && pwd)
shift

# name  binary  committed corpus  extra flags
targets=(
  "vhu-message|protocol/tests/fuzz-vhu-message|protocol/tests/corpus|"
  "vhu-frontend-requests|protocol/tests/fuzz-vhu-frontend-requests|protocol/tests/corpus-frontend-requests|"
  "rpc-conn|control/tests/fuzz-rpc-conn-libfuzzer|control/tests/corpus-rpc-conn|"
  "control|tests/fuzz/fuzz-control-libfuzzer|tests/fuzz/corpus-control|-dict=$src/tests/fuzz/control.dict"
  "vmm-conn|frontdoor/tests/fuzz-vmm-conn|frontdoor/tests/corpus-vmm-conn|"
  "snapshot|tests/fuzz/fuzz-snapshot-libfuzzer|tests/fuzz/corpus-snapshot|"
)

declare -A seconds
for arg in "$@"; do
  seconds[${arg%%=*}]=${arg#*=}
done

out=$(mktemp -d /tmp/vhub-fuzz-campaign.XXXXXX)
echo "logs, working corpora and artifacts: $out"

for t in "${targets[@]}"; do
  IFS='|' read -r name bin corpus extra <<<"$t"
  if [ $# -gt 0 ] && [ -z "${seconds[$name]:-}" ]; then
    continue
  fi
  secs=${seconds[$name]:-60}
  work=$out/$name
  mkdir -p "$work/corpus" "$work/artifacts"
  cp "$src/$corpus"/* "$work/corpus/"
  echo "== $name: ${secs}s"
  # shellcheck disable=SC2086
  nice -n 10 "$build/$bin" -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
    -artifact_prefix="$work/artifacts/" $extra "$work/corpus" >"$work/fuzz.log" 2>&1 || {
    echo "$name: the fuzzer stopped with an error (see $work/fuzz.log and $work/artifacts)"
    tail -30 "$work/fuzz.log"
    exit 1
  }
  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)' "$work/fuzz.log"
  nice -n 10 "$build/$bin" -merge=1 $extra "$src/$corpus" "$work/corpus" >"$work/merge.log" 2>&1
  grep -E 'MERGE-OUTER: [0-9]+ new files' "$work/merge.log" || tail -5 "$work/merge.log"
done

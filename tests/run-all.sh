#!/bin/sh
# The whole test suite, as CI runs it (README, command 2): a -Werror build
# with every test, then the same suite again built with AddressSanitizer and
# UndefinedBehaviorSanitizer.  Ends with one line "N passed, N failed" taken
# from meson's testlog.json files, and exits non-zero on any failure.
# Usage: tests/run-all.sh [BUILD_DIR_PREFIX]   (default: build)
set -u
cd "$(dirname "$0")/.."
prefix=${1:-build}
plain="$prefix"
asan="$prefix-asan"
status=0

run_suite() {
        dir=$1
        shift
        if [ ! -f "$dir/build.ninja" ]; then
                meson setup "$dir" --werror "$@" || return 1
        else
                meson setup --reconfigure "$dir" --werror "$@" >/dev/null || return 1
        fi
        meson compile -C "$dir" || return 1
        # --print-errorlogs: a failing test's output lands in the CI log
        meson test -C "$dir" --print-errorlogs --num-processes 2 || return 1
        return 0
}

echo "==> build and test ($plain)"
run_suite "$plain" || status=1
echo "==> build and test under ASan+UBSan ($asan)"
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
        run_suite "$asan" -Db_sanitize=address,undefined -Db_lundef=false || status=1

# restart-upgrade builds the format-1 vhubd from this tree's git history:
# a checkout without that history (an exported tree, a shallow clone) cannot
# run it.  Only then is its skip accepted, and said so; any other skip fails.
format1=$(PYTHONPATH=tests/integration python3 -c 'from vhubtest.previous import FORMAT_1_COMMIT; print(FORMAT_1_COMMIT)')
no_history=""
if ! git -C . cat-file -e "$format1^{commit}" 2>/dev/null; then
        no_history="restart-upgrade"
        echo "NOTE: no git history of $format1 here: restart-upgrade cannot build the format-1 vhubd; its skip is accepted"
fi

python3 - "$no_history" "$plain/meson-logs/testlog.json" "$asan/meson-logs/testlog.json" <<'PY' || status=1
import json, sys
passed = failed = skipped = 0
skips, fails, accepted = [], [], []
may_skip = set(sys.argv[1].split()) if sys.argv[1] else set()
for path in sys.argv[2:]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        print(f"missing {path}: that build did not get as far as running tests")
        failed += 1
        continue
    for line in lines:
        if not line.strip():
            continue
        t = json.loads(line)
        name = f"{path.split('/')[0]}:{t['name']}"
        res = t.get("result")
        if res in ("OK", "EXPECTEDFAIL"):
            passed += 1
        elif res == "SKIP" and t["name"].split(" / ")[-1] in may_skip:
            accepted.append(name)
        elif res == "SKIP":
            skipped += 1
            skips.append(name)
        else:
            failed += 1
            fails.append(f"{name} ({res})")
if accepted:
    print(f"SKIPPED, accepted (no git history to build from) ({len(accepted)}): " + ", ".join(accepted))
if skips:
    print(f"SKIPPED ({len(skips)}): " + ", ".join(skips))
if fails:
    print(f"FAILED ({len(fails)}): " + ", ".join(fails))
# a skip is not a pass: it counts as a failure here so it cannot hide one
failed += skipped
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
PY
exit $status

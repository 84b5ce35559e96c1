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

python3 - "$plain/meson-logs/testlog.json" "$asan/meson-logs/testlog.json" <<'PY' || status=1
import json, sys
passed = failed = skipped = 0
skips, fails = [], []
for path in sys.argv[1:]:
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
        elif res == "SKIP":
            skipped += 1
            skips.append(name)
        else:
            failed += 1
            fails.append(f"{name} ({res})")
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

#!/bin/sh
# Build the libFuzzer targets (SMTP protocol core, DKIM, submission
# session, DSN builder, feedback parsers, DNS messages, shaping rules,
# MTA-STS, the config reader, the redis:// URL parser, the stats
# listener's HTTP answers) with clang and run each for a bounded time
# over a copy of its seed corpus (the tree's corpus is never written). Exits non-zero when a target finds a crash; the input
# that crashed is kept and its path printed.
#
# usage: tests/fuzz/run-fuzzers.sh [build-dir]
#   build-dir  configured with CC=clang -DSLUICE_FUZZ=ON, or new (default:
#              $TMPDIR/sluice-fuzz); only the fuzz targets are built.
# env: FUZZ_SECONDS   per target (default 20)
#      FUZZ_TARGETS   names to run (default: all sixteen)
#      FUZZ_ARGS      extra libFuzzer flags
set -eu

if ! command -v clang >/dev/null 2>&1; then
    echo "clang not found, skipping fuzz"
    exit 0
fi

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
build=${1:-${TMPDIR:-/tmp}/sluice-fuzz}
# Absolute: the targets run from their own work directories.
mkdir -p "$build"
build=$(cd "$build" && pwd)
seconds=${FUZZ_SECONDS:-20}
targets=${FUZZ_TARGETS:-"smtp_cmd smtp_reply smtp_unstuff smtp_stuff smtp_client session dkim dsn feedback_dsn feedback_arf dns_wire shaping mta_sts config redis_url stats_http"}

if [ -f "$build/CMakeCache.txt" ]; then
    if ! grep -q '^SLUICE_FUZZ:BOOL=ON' "$build/CMakeCache.txt"; then
        echo "$build was not configured with -DSLUICE_FUZZ=ON (and CC=clang)" >&2
        exit 2
    fi
else
    CC=clang cmake -S "$root" -B "$build" -DSLUICE_FUZZ=ON -DSLUICE_BENCH=OFF \
        -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
fi
for t in $targets; do
    cmake --build "$build" --target "fuzz_$t" >/dev/null
done

failed=""
for t in $targets; do
    bin=$(find "$build" -type f -name "fuzz_$t" -perm -u+x | head -n 1)
    if [ -z "$bin" ]; then
        echo "fuzz_$t: not built" >&2
        exit 2
    fi
    work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-fuzz-$t.XXXXXX")
    mkdir "$work/corpus" "$work/artifacts"
    cp "$here/corpus/$t"/* "$work/corpus/" 2>/dev/null || true
    echo "== fuzz_$t: ${seconds}s over $(ls "$work/corpus" | wc -l) seeds"
    # shellcheck disable=SC2086 # FUZZ_ARGS holds several flags
    if (cd "$work" && "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
            -print_final_stats=1 -artifact_prefix="$work/artifacts/" ${FUZZ_ARGS:-} \
            corpus >"$work/log" 2>&1); then
        grep -E '^stat::number_of_executed_units|^Done' "$work/log" || true
        rm -rf "$work"
    else
        tail -n 40 "$work/log"
        echo "fuzz_$t FAILED: crash input and log kept in $work" >&2
        failed="$failed $t"
    fi
done

if [ -n "$failed" ]; then
    echo "fuzzers that failed:$failed" >&2
    exit 1
fi
echo "all fuzzers ran clean"

#!/usr/bin/env bash
# Usage: scripts/multi-target-time.sh [PATCH [REPS [DYNAMOS-BUILD OPTIONS...]]]
# Wall time of one fix (PATCH, default patches/proc-version-banner.diff)
# built for three kernels in one dynamos-build run, REPS times (default 3)
# each: without a compiler wrapper (one build at a time, then the default
# --jobs), and through ccache with an empty cache (cold) and again with
# that cache filled (warm), both with the default --jobs. ccache must be
# installed on the host and in the Debian 13 compiler root
# (docs/user-guide.md, "Compiler wrapper"); a first, uncounted run warms
# the targets' trees.
set -euo pipefail
cd "$(dirname "$0")/.."

PATCH=${1:-patches/proc-version-banner.diff}
REPS=${2:-3}
shift $(( $# < 2 ? $# : 2 ))
OPTIONS=("$@") # further dynamos-build options, e.g. --fuzz 3
TARGETS=(--target 6.1.0-57-amd64 --target 6.1.0-54-amd64 --target 6.12.117+deb13-amd64)
cargo build --quiet --release --bins
BIN=${CARGO_TARGET_DIR:-target}/release
# Under /tmp: the Debian 13 root sees it at the same path (CCACHE_DIR).
work=$(mktemp -d /tmp/dynamos-multi-target.XXXXXX)
trap 'rm -rf "$work"' EXIT
export DYNAMOS_CONFIG=$work/keys
"$BIN/dynamos" keygen >/dev/null

declare -A times
labels=()
# run LABEL [VAR=VALUE...] -- [dynamos-build options]: one timed run.
run() {
    local label=$1 vars=()
    shift
    while [ "$1" != "--" ]; do vars+=("$1"); shift; done
    shift
    rm -rf "$work/out" && mkdir "$work/out"
    local start end
    start=$(date +%s.%N)
    if ! env "${vars[@]}" "$BIN/dynamos-build" "$PATCH" "${TARGETS[@]}" "${OPTIONS[@]}" -o "$work/out" "$@" \
        >"$work/log" 2>&1; then
        cat "$work/log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    [ "$label" = warm-up ] && return
    [ -n "${times[$label]:-}" ] || labels+=("$label")
    times[$label]+="$(echo "$end - $start" | bc) "
}

# Every variant without a wrapper, then every one with it: kbuild reads
# the config again in each tree when CC changes, which the first run after
# the switch pays (shown apart, as one run).
run warm-up --
for round in $(seq "$REPS"); do
    run "no wrapper, --jobs 1" -- --jobs 1
    run "no wrapper, default --jobs ($(nproc))" --
done
run "ccache, cold, first run after switching it on" \
    DYNAMOS_CC_WRAPPER=ccache CCACHE_DIR="$work/ccache-0" --
for round in $(seq "$REPS"); do
    ccache=(DYNAMOS_CC_WRAPPER=ccache CCACHE_DIR="$work/ccache-$round")
    run "ccache, cold (empty CCACHE_DIR)" "${ccache[@]}" --
    run "ccache, warm (the same CCACHE_DIR again)" "${ccache[@]}" --
done

printf '%-48s %8s %8s %8s\n' "$REPS runs of 3 targets" median min max
for label in "${labels[@]}"; do
    read -r -a sorted <<<"$(tr ' ' '\n' <<<"${times[$label]}" | sed '/^$/d' | sort -n | tr '\n' ' ')"
    printf '%-48s %7.1fs %7.1fs %7.1fs\n' "$label" \
        "${sorted[$(( ${#sorted[@]} / 2 ))]}" "${sorted[0]}" "${sorted[-1]}"
done
stats=$(CCACHE_DIR=$work/ccache-1 ccache --print-stats)
echo "ccache (round 1, host and root): $(grep -E '^(direct_cache_hit|preprocessed_cache_hit|cache_miss)' <<<"$stats" | tr '\t\n' '= ')"

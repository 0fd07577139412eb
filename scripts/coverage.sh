#!/usr/bin/env bash
# Coverage of real fixes: run dynamos-build on a sample of per-file patches
# (one `diff -u` per changed file, applying with -p1 to the target's source)
# and count what becomes a package, what is refused and why.
#
# usage: scripts/coverage.sh PATCH_DIR [SAMPLE_SIZE [TARGET [SEED]]]
#   PATCH_DIR    folder of *.diff files
#   SAMPLE_SIZE  how many .c patches to try (default 40); small fixes first
#   TARGET       Debian kernel build (default 6.1.0-54-amd64)
#   SEED         for the random sample (default 1)
# Prints one line per patch (exit code, first line of the message) and a
# summary; packages go to a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:?usage: scripts/coverage.sh PATCH_DIR [SAMPLE_SIZE [TARGET [SEED]]]}
size=${2:-40}
target=${3:-6.1.0-54-amd64}
seed=${4:-1}

cargo build --release --quiet --bins
build=${CARGO_TARGET_DIR:-target}/release/dynamos-build
out=$(mktemp -d)

# .c patches of at most 40 changed lines, sampled reproducibly.
mapfile -t sample < <(
  for p in "$dir"/*.diff; do
    grep -q '^+++ b/.*\.c$' "$p" || continue
    changed=$(grep -cE '^[+-][^+-]' "$p" || true)
    [ "$changed" -le 40 ] && echo "$p"
  done | awk -v seed="$seed" 'BEGIN{srand(seed)} {print rand() "\t" $0}' | sort | head -n "$size" | cut -f2
)

declare -A outcome
for p in "${sample[@]}"; do
  name=$(basename "$p" .diff)
  set +e
  msg=$("$build" --target "$target" "$p" -o "$out/$name.dynpkg" 2>&1 >/dev/null)
  code=$?
  set -e
  first=$(printf '%s\n' "$msg" | head -n 1 | cut -c1-160)
  printf '%s\t%s\t%s\n' "$code" "$name" "$first"
  outcome[$code]=$(( ${outcome[$code]:-0} + 1 ))
done

echo
echo "sample: ${#sample[@]} patches for $target"
for code in 0 1 2 3; do
  case $code in
    0) what="package written" ;;
    1) what="error" ;;
    2) what="refused" ;;
    3) what="no binary change" ;;
  esac
  printf '  %-18s %s\n' "$what" "${outcome[$code]:-0}"
done
rm -rf "$out"

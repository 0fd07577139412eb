#!/usr/bin/env bash
# Coverage of real fixes: run dynamos-build on a sample of per-file patches
# (one `diff -u` per changed file, applying with -p1 to the target's source),
# count what becomes a package, what is refused and why; then boot the
# target kernel and apply every package in turn with its modules loaded,
# run a smoke workload, revert, and count what went live and survived.
#
# usage: scripts/coverage.sh PATCH_DIR [SAMPLE_SIZE [TARGET [SEED]]]
#   PATCH_DIR    folder of *.diff files (e.g. from real-fix-corpus.sh)
#   SAMPLE_SIZE  how many .c/.h patches to try (default 40)
#   TARGET       Debian kernel build (default 6.1.0-54-amd64)
#   SEED         for the random sample (default 1)
#   COVERAGE_VM=0 skips the VM part.
# Prints one line per patch (exit code, first line of the message), one per
# package applied in the VM, and a summary; packages go to a temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:?usage: scripts/coverage.sh PATCH_DIR [SAMPLE_SIZE [TARGET [SEED]]]}
size=${2:-40}
target=${3:-6.1.0-54-amd64}
seed=${4:-1}

cargo build --quiet --bins
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# A copy, so that rebuilding during a long run changes nothing here.
bin=$out/bin
mkdir "$bin"
cp "${CARGO_TARGET_DIR:-target}/debug/dynamos" "${CARGO_TARGET_DIR:-target}/debug/dynamos-build" "$bin/"

# .c and .h patches of at most 40 changed lines, sampled reproducibly.
mapfile -t sample < <(
  for p in "$dir"/*.diff; do
    grep -qE '^\+\+\+ b/.*\.[ch]$' "$p" || continue
    changed=$(grep -cE '^[+-][^+-]' "$p" || true)
    [ "$changed" -le 40 ] && echo "$p"
  done | awk -v seed="$seed" 'BEGIN{srand(seed)} {print rand() "\t" $0}' | sort | head -n "$size" | cut -f2
)

declare -A outcome
packages=()
for p in "${sample[@]}"; do
  name=$(basename "$p" .diff | tr -c 'A-Za-z0-9_\n-' '_')
  name=${name:0:40}
  set +e
  msg=$("$bin/dynamos-build" --target "$target" --name "$name" "$p" -o "$out/$name.dynpkg" 2>&1 >/dev/null)
  code=$?
  set -e
  first=$(printf '%s\n' "$msg" | head -n 1 | cut -c1-200)
  printf 'build\t%s\t%s\t%s\n' "$code" "$name" "$first"
  outcome[$code]=$(( ${outcome[$code]:-0} + 1 ))
  [ "$code" -eq 0 ] && packages+=("$out/$name.dynpkg")
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

[ "${COVERAGE_VM:-1}" = 0 ] && exit 0
[ "${#packages[@]}" -eq 0 ] && exit 0

# The modules each package patches, loaded before it is applied.
modules_of() {
  "$bin/dynamos" inspect --json "$1" | python3 -c '
import json, sys
m = json.load(sys.stdin)["manifest"]
print(" ".join(o["object"] for o in m["objects"] if o["object"] != "vmlinux"))'
}

# Guest: apply, smoke, revert each package; a line per package.
guest_script='
smoke() {
  mkdir -p /tmp/smoke && i=0
  while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/tmp/smoke/f$i bs=4k count=8 2>/dev/null
    cat /tmp/smoke/f$i > /dev/null; i=$((i+1))
  done
  rm -rf /tmp/smoke
  ls -R /proc/sys > /dev/null 2>&1; cat /proc/[0-9]*/stat > /dev/null 2>&1
  for j in 1 2 3 4 5 6 7 8; do (sleep 0.1; echo $j) > /dev/null & done; wait
  ip link set lo up; ping -c 2 -W 1 127.0.0.1 > /dev/null 2>&1
  sync; echo 3 > /proc/sys/vm/drop_caches
}
for pkg in /packages/*.dynpkg; do
  name=$(basename $pkg .dynpkg)
  for m in $(cat /packages/$name.modules); do modprobe $m 2>/dev/null; done
  before=$(dmesg | grep -cE "Oops|BUG:|WARNING:")
  if dynamos apply --timeout 60 $pkg > /tmp/apply.log 2>&1; then
    state=live; grep -q "^pending" /tmp/apply.log && state=pending
    grep -q "^live" /tmp/apply.log && grep -q "^pending" /tmp/apply.log && state=live+pending
    smoke
    dynamos revert --all > /dev/null 2>&1 || state="$state revert-failed"
    after=$(dmesg | grep -cE "Oops|BUG:|WARNING:")
    [ "$after" -gt "$before" ] && state="$state kernel-complained"
    echo "@@ $name applied $state @@"
  else
    echo "@@ $name apply-failed $(head -n 1 /tmp/apply.log | cut -c1-160) @@"
  fi
done
echo "@@ done @@"
'
remaining=("${packages[@]}")
declare -A vm_outcome
while [ "${#remaining[@]}" -gt 0 ]; do
  args=()
  for pkg in "${remaining[@]}"; do
    name=$(basename "$pkg" .dynpkg)
    modules_of "$pkg" > "$out/$name.modules"
    args+=(--package "$pkg" --package "$out/$name.modules")
    for m in $(cat "$out/$name.modules"); do args+=(--module "$m"); done
  done
  set +e
  log=$("$bin/dynamos" vm --kernel "$target" --timeout 1800 "${args[@]}" -- "$guest_script" 2>&1)
  set -e
  next=()
  stopped=""
  for pkg in "${remaining[@]}"; do
    name=$(basename "$pkg" .dynpkg)
    line=$(printf '%s\n' "$log" | grep -m1 "^@@ $name " || true)
    if [ -n "$line" ]; then
      printf 'vm\t%s\n' "$line"
      word=$(printf '%s\n' "$line" | awk '{print $3}')
      vm_outcome[$word]=$(( ${vm_outcome[$word]:-0} + 1 ))
    elif [ -z "$stopped" ]; then
      # The machine died during this one: count it, go on without it.
      stopped=$name
      printf 'vm\t@@ %s machine-stopped @@\n' "$name"
      printf '%s\n' "$log" | grep -E 'Oops|BUG:|panic|RIP:' | head -n 5 | sed 's/^/    /'
      vm_outcome[machine-stopped]=$(( ${vm_outcome[machine-stopped]:-0} + 1 ))
    else
      next+=("$pkg")
    fi
  done
  remaining=("${next[@]+"${next[@]}"}")
done

echo
echo "in the VM ($target): ${#packages[@]} packages"
for word in applied apply-failed machine-stopped; do
  printf '  %-18s %s\n' "$word" "${vm_outcome[$word]:-0}"
done

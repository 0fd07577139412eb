#!/usr/bin/env bash
# The main job on the default target (Debian 12's 6.1.0-57-amd64): build a
# signed package from a patch in patches/, then boot that kernel in a
# throwaway VM and show the fix going live and being reverted.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release

[ -f "${DYNAMOS_CONFIG:-$HOME/.config/dynamos}/signing.key" ] || "$bin/dynamos" keygen

patch=${1:-patches/proc-version-banner.diff}
pkg=$(mktemp -d)/$(basename "${patch%.diff}").dynpkg
"$bin/dynamos-build" --timings "$patch" -o "$pkg"
"$bin/dynamos" inspect "$pkg"

name=$(basename "${patch%.diff}")
"$bin/dynamos" vm --package "$pkg" -- "
  set -e
  echo '--- before'; cat /proc/version
  dynamos apply /packages/$name.dynpkg
  echo '--- live'; cat /proc/version
  dynamos list
  dynamos revert $name
  echo '--- reverted'; cat /proc/version
"

#!/usr/bin/env bash
# Installs the host packages dynamos needs to build kernel objects and
# modules. Everything else (kernel source, headers, QEMU, busybox) the tool
# fetches into its own cache on first use.
set -euo pipefail

# What dynamos-build runs (dist/build-dependencies, which dynamos's .deb
# recommends), and for the tests: e2fsprogs, the ext4 test makes its
# filesystem image on the host; clang, the diff tests compile their
# fixtures with both compilers kernels use.
mapfile -t packages < <(grep -v '^#' "$(dirname "$0")/../dist/build-dependencies" | grep .)
packages+=(e2fsprogs clang)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

# The tool downloads QEMU and busybox with `apt-get download`, which needs
# current package lists (kernels come from its own index of the archive).
"${sudo_cmd[@]}" apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# cargo-fuzz runs the fuzz targets (scripts/fuzz.sh, tests/fuzz_smoke.rs);
# building it takes about 9 minutes on two busy cores.
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing: cargo-fuzz"
  cargo install --locked --quiet cargo-fuzz
fi

#!/usr/bin/env bash
# Build dynamos's own Debian package from a release build:
#
#   scripts/deb.sh [OUTPUT.deb]     (default: target/debian/dynamos_VERSION_amd64.deb)
#
# It holds both binaries, the systemd units of dist/systemd (enabled on
# install), man pages and bash/zsh/fish completions made from the clap
# definitions, and the user documents. Needs dpkg-deb.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
output=${1:-target/debian/dynamos_${version}_amd64.deb}
mkdir -p "$(dirname "$output")"
cargo build --release --locked --bins
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
"$target_dir/release/dynamos" package-tool --binaries "$target_dir/release" -o "$output" \
    --maintainer "${DEB_MAINTAINER:-dynamos <root@localhost>}"

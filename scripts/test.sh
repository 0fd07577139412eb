#!/usr/bin/env bash
# The whole test suite: unit tests, real kernel builds of the example
# patches, and end-to-end runs in QEMU. The first run fetches the default
# target (~230 MB of Debian packages) into the cache.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --quiet --bins
cargo test -- --test-threads=2 "$@"

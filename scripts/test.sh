#!/usr/bin/env bash
# The whole test suite: unit tests, real kernel builds of the example
# patches, and end-to-end runs in QEMU. The first run fetches the default
# target and 6.1.0-50 (~230 MB of Debian packages each) into the cache.
#
# Each VM test runs one single-threaded QEMU; two at a time fill two cores.
# cargo-nextest runs tests of different files side by side (the 200-cycle
# stress test beside the rest); plain `cargo test` runs files one after
# another, so it is the fallback.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --quiet --bins --tests
# The fuzz targets' smoke test runs them for seconds; build them first, with
# scripts/fuzz.sh's flags, so no test spends minutes compiling.
RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer none --debug-assertions
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --test-threads 2 --no-fail-fast --failure-output final "$@"
else
    cargo test --no-fail-fast -- --test-threads=2 "$@"
fi

#!/usr/bin/env bash
# The long soak: CYCLES (default 200) apply/revert cycles of the pipe_read/
# pipe_write update under checksummed pipe traffic in the VM; prints the
# cycles per minute and the bytes checked. The test suite runs a short
# version of the same test (tests/stress.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
DYNAMOS_STRESS_CYCLES=${1:-200} cargo test --test stress -- --nocapture

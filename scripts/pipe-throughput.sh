#!/usr/bin/env bash
# Pipe throughput with the synchronized pipefs update
# (patches/pipe-adaptive-ring.diff): a 256 MiB bulk transfer and a stream
# of small round trips, timed without and with the update in one VM run.
# PASSES (default 3) sets how many times the two alternate.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
DYNAMOS_PIPE_PASSES=${1:-3} cargo bench --bench pipe_throughput

#!/usr/bin/env bash
# Redirect overhead: fork, brk, execve, open, read, write, a page fault and
# kill timed in one VM run with no update, an identity update of the
# functions behind them, and the same with an adaptation handler returning
# false; prints the table as ratios and each package's module size.
# PASSES (default 3) sets how many times the columns alternate.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
DYNAMOS_OVERHEAD_PASSES=${1:-3} cargo bench --bench overhead

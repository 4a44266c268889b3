#!/usr/bin/env bash
# The test command (README, CI): makes Postgres and RabbitMQ available, then runs
# every test of the workspace with plain `cargo test`, whose closing lines CI
# reads. Extra arguments go to cargo test, e.g.
#   scripts/test.sh auth::          (only tests whose name contains auth::)
#   scripts/test.sh -- --nocapture
# (`-p` does not narrow it: --workspace wins; run cargo test -p ... directly.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh

# --no-fail-fast: every test binary runs even after one failed, so a run shows
# all that is broken, not the first of it.
# cargo test ends with the doc tests of the last crate ("0 passed"); the line
# printed last here sums every test binary, so a reader of the closing line
# sees what really ran.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") passed += $(i - 1)
            if ($i == "failed;") failed += $(i - 1)
        }
     }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
exit "$status"

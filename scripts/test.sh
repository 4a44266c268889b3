#!/usr/bin/env bash
# The test command (README, CI): makes Postgres and RabbitMQ available, and
# Chromium, chromedriver and axe-core for the page tests, runs every test of
# the workspace with plain `cargo test`, then holds the OpenAPI
# document to the API with schemathesis (scripts/schemathesis.sh). The closing
# lines sum up both. Extra arguments go to cargo test, e.g.
#   scripts/test.sh auth::          (only tests whose name contains auth::)
#   scripts/test.sh -- --nocapture
# (`-p` does not narrow it: --workspace wins; run cargo test -p ... directly.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/services.sh
scripts/browser.sh

# --no-fail-fast: every test binary runs even after one failed, so a run shows
# all that is broken, not the first of it.
# cargo test ends with the doc tests of the last crate ("0 passed"); the
# `tests:` line printed at the end sums every test binary, and the lines
# around it say how schemathesis did, so a reader of the closing lines sees
# what really ran.
log=$(mktemp)
st_log=$(mktemp)
trap 'rm -f "$log" "$st_log"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# Then the OpenAPI document against the running API, for each role
# (scripts/schemathesis.sh; its last lines are one summary per role).
scripts/schemathesis.sh 2>&1 | tee "$st_log"
st_status=${PIPESTATUS[0]}
set -e
echo
grep '^schemathesis ' "$st_log" || echo "schemathesis: no summary (exit $st_status)"
awk '/^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") passed += $(i - 1)
            if ($i == "failed;") failed += $(i - 1)
        }
     }
     END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
if [[ $st_status -ne 0 ]]; then
	echo "schemathesis: FAILED (see above)"
else
	echo "schemathesis: 0 failures for every role"
fi
[[ $status -eq 0 ]] || exit "$status"
exit "$st_status"

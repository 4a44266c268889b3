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
exec cargo test --workspace "$@"

#!/usr/bin/env bash
# Garage (the S3 server of docker-compose.yml) on this machine, for measuring
# Dossier against a real S3 server:
#
#   scripts/garage.sh target/release/dossier bench --scenario upload
#       starts Garage, runs the command with the DOSSIER_BENCH_S3_* variables
#       set (so `dossier bench` stores on Garage), stops Garage again
#   scripts/garage.sh
#       starts Garage and keeps it running until Ctrl-C, printing the variables
#
# One node, the configuration of deploy/garage.toml on ports of 127.0.0.1
# (S3 on $DOSSIER_GARAGE_PORT, default 3900, RPC and admin on the next ports),
# and its data in a temporary directory removed on exit. Garage is taken from
# PATH, or from .tools/garage; where it is neither, it is built there with
# `cargo install garage --version 2.5.0 --locked` (about 9 minutes on 2 cores,
# once). The test suite does not use any of this.
set -euo pipefail

readonly GARAGE_VERSION=2.5.0
readonly S3_PORT=${DOSSIER_GARAGE_PORT:-3900}
readonly WAIT_SECS=60
# The development key and bucket of docker-compose.yml (public, for local use).
readonly ACCESS_KEY=GKe4f829577ed60de5c022ce60
readonly SECRET_KEY=d513480716e1c3d7ee46533832ffb890f48c92ecb64e714781f7694ccd90293d
readonly BUCKET=dossier

# say, die
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

garage=$(command -v garage || true)
if [[ -z $garage ]]; then
	garage=$root/.tools/garage/bin/garage
	if [[ ! -x $garage ]]; then
		command -v cargo >/dev/null || die "garage is not installed, and there is no cargo to build it with"
		say "building garage $GARAGE_VERSION into .tools/garage (cargo install; about 9 minutes on 2 cores, once)"
		CARGO_TARGET_DIR=$root/.tools/garage/build cargo install garage \
			--version "$GARAGE_VERSION" --locked --root "$root/.tools/garage" >&2 ||
			die "cargo install garage failed"
		rm -rf "$root/.tools/garage/build"
	fi
fi
version=$("$garage" --version 2>/dev/null | head -1 || true)
[[ $version == *"$GARAGE_VERSION"* ]] || say "using $garage ($version); the README's figures are for $GARAGE_VERSION"

state=$(mktemp -d -t dossier-garage.XXXXXX)
sed -e "s#/var/lib/garage#$state#" \
	-e "s#\"\[::\]:3900\"#\"127.0.0.1:$S3_PORT\"#" \
	-e "s#\"\[::\]:3901\"#\"127.0.0.1:$((S3_PORT + 1))\"#" \
	-e "s#\"127.0.0.1:3901\"#\"127.0.0.1:$((S3_PORT + 1))\"#" \
	-e "s#\"\[::\]:3903\"#\"127.0.0.1:$((S3_PORT + 3))\"#" \
	"$root/deploy/garage.toml" >"$state/garage.toml"

GARAGE_DEFAULT_ACCESS_KEY=$ACCESS_KEY GARAGE_DEFAULT_SECRET_KEY=$SECRET_KEY \
	GARAGE_DEFAULT_BUCKET=$BUCKET \
	"$garage" -c "$state/garage.toml" server --single-node --default-bucket \
	>"$state/garage.log" 2>&1 &
pid=$!
stop() {
	kill "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
	rm -rf "$state"
}
trap stop EXIT

# Up means: the default bucket exists (the node answers a moment earlier).
deadline=$((SECONDS + WAIT_SECS))
until "$garage" -c "$state/garage.toml" bucket info "$BUCKET" >/dev/null 2>&1; do
	if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
		tail -n 20 "$state/garage.log" >&2
		die "Garage did not come up on 127.0.0.1:$S3_PORT within $WAIT_SECS s"
	fi
	sleep 0.5
done
say "Garage $version is up on http://127.0.0.1:$S3_PORT, bucket $BUCKET"

export DOSSIER_BENCH_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export DOSSIER_BENCH_S3_BUCKET=$BUCKET
export DOSSIER_BENCH_S3_REGION=garage
export DOSSIER_BENCH_S3_ACCESS_KEY=$ACCESS_KEY
export DOSSIER_BENCH_S3_SECRET_KEY=$SECRET_KEY

if (($# > 0)); then
	"$@"
else
	env | grep '^DOSSIER_BENCH_S3_' | sed 's/^/export /'
	say "running until Ctrl-C"
	wait "$pid"
fi

#!/usr/bin/env bash
# Holds the OpenAPI document to the API it describes: runs schemathesis with
# every check on against a freshly built `dossier serve` (fresh database, own
# RabbitMQ vhost, own blob directory), once with a staff, a customer and an
# auditor token. Prints a summary line per role and exits non-zero when any
# role has a failure (a 5xx, an undocumented status, a body or header that
# does not match its schema, ...). Part of scripts/test.sh.
#
#   scripts/schemathesis.sh              (SCHEMATHESIS_EXAMPLES=25 by default)
#   SCHEMATHESIS_EXAMPLES=100 scripts/schemathesis.sh
#
# schemathesis comes from PyPI, pinned, into a virtual environment of its own
# (.tools/schemathesis, gitignored), created on first use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly ST_VERSION=4.32.5
readonly VENV=.tools/schemathesis
readonly EXAMPLES=${SCHEMATHESIS_EXAMPLES:-25}
readonly PG_ADMIN_URL=${SCHEMATHESIS_PG_ADMIN:-postgres://postgres@127.0.0.1:5432/postgres}
readonly RABBIT_API=${SCHEMATHESIS_RABBIT_API:-http://guest:guest@127.0.0.1:15672/api}
readonly TENANT=acme
readonly CUSTOMER=cust-st

# say, die, apt_install: a fresh Debian machine may lack the tools this script
# calls.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source scripts/lib.sh
need() { command -v "$1" >/dev/null || apt_install "$2"; }
need curl curl
need jq jq
need flock util-linux
python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv

if [[ ! -x $VENV/bin/st ]] || ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$ST_VERSION"; then
	say "installing schemathesis $ST_VERSION into $VENV"
	python3 -m venv "$VENV"
	"$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$ST_VERSION"
fi

cargo build --quiet --bin dossier
target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
readonly DOSSIER=$target_dir/debug/dossier

run_id=$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')
readonly DB=dossier_st_$run_id
readonly VHOST=dossier-st-$run_id
work=$(mktemp -d -t dossier-st-XXXXXX)
server_pid=

# Vhosts are created and deleted one at a time across every test process on the
# machine, under the lock tests/src/rabbit.rs takes (RabbitMQ 3.10 was seen to
# wedge on concurrent ones).
vhost_lock() {
	flock "${TMPDIR:-/tmp}/dossier-test-vhosts.lock" "$@"
}

# shellcheck disable=SC2317 # run by the EXIT trap below, which shellcheck 0.9 does not see
cleanup() {
	if [[ -n $server_pid ]]; then
		kill "$server_pid" 2>/dev/null || true
		wait "$server_pid" 2>/dev/null || true
	fi
	psql "$PG_ADMIN_URL" -qtAc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
	vhost_lock curl -s -o /dev/null -X DELETE "$RABBIT_API/vhosts/$VHOST" || true
	rm -rf "$work"
}
trap cleanup EXIT

vhost_lock curl -sf -o /dev/null -X PUT "$RABBIT_API/vhosts/$VHOST"
curl -sf -o /dev/null -X PUT -H 'content-type: application/json' \
	-d '{"configure":".*","write":".*","read":".*"}' "$RABBIT_API/permissions/$VHOST/guest"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DOSSIER_HTTP_ADDR=127.0.0.1:$port
export DOSSIER_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$DB
export DOSSIER_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/$VHOST
export DOSSIER_BLOB_STORE=file://$work/blobs
export DOSSIER_JWT_SECRET=schemathesis-$run_id-secret-of-enough-length
# Small files keep the generated uploads quick; the limit is still checked.
export DOSSIER_MAX_FILE_BYTES=65536
readonly BASE=http://127.0.0.1:$port

"$DOSSIER" serve >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
	curl -sf -o /dev/null "$BASE/readyz" && break
	kill -0 "$server_pid" 2>/dev/null || {
		say "dossier serve exited; its log:"
		cat "$work/serve.log" >&2
		exit 1
	}
	sleep 0.5
done
curl -sf -o /dev/null "$BASE/readyz" || {
	say "dossier serve did not become ready; its log:"
	tail -50 "$work/serve.log" >&2
	exit 1
}

token() { "$DOSSIER" token --tenant "$TENANT" --ttl 2h "$@"; }
staff_token=$(token --role staff --sub st-staff)
customer_token=$(token --role customer --sub st-customer --customer "$CUSTOMER")
auditor_token=$(token --role auditor --sub st-auditor)

# Some data, so that lists answer items whose schema gets checked too, and
# the customer's operations reach more than 404: a published and an internal
# file, a task with a message that carries a file, one portal download.
printf 'seeded content' >"$work/seed.txt"
published=$(curl -sf -H "Authorization: Bearer $staff_token" -F name="Published" -F visibility=portal \
	-F "file=@$work/seed.txt;type=text/plain" "$BASE/v1/customers/$CUSTOMER/files" | jq -r .id)
curl -sf -o /dev/null -H "Authorization: Bearer $staff_token" -F name="Internal note" \
	-F "file=@$work/seed.txt;type=text/plain" "$BASE/v1/customers/$CUSTOMER/files"
task=$(curl -sf -H "Authorization: Bearer $staff_token" -H 'content-type: application/json' \
	-d '{"title": "Send your bank statements"}' "$BASE/v1/customers/$CUSTOMER/tasks" | jq -r .id)
curl -sf -o /dev/null -H "Authorization: Bearer $customer_token" -F text="Here they are" \
	-F "file=@$work/seed.txt;type=text/plain" "$BASE/v1/portal/tasks/$task/messages"
curl -sf -o /dev/null -H "Authorization: Bearer $customer_token" "$BASE/v1/portal/files/$published/content"

# Each role's run pins the path parameters that name the seeded data, so its
# requests reach the handlers' logic instead of a 404 (the others are drawn).
#
# One check is off for the three multipart forms with text fields, and only
# there: negative_data_rejection. To tell a truly invalid form from one that
# only looked invalid before it was sent (every multipart part is text on the
# wire, so a "number" is a text), schemathesis 4.32.5 reads the sent parts back
# and validates them (checks.py, _form_body_is_valid_as_sent); it cannot
# validate a binary file part, so any form with a file counts as invalid, and
# a valid text next to a file is reported as "schema-violating request
# accepted". The two message forms also take a file without text (the portal
# guide's paperclip), which their schema keeps outside so that a form of
# neither stays invalid. Every other check runs on these forms; their
# refusals are tested in tests/tests/portal.rs, sessions.rs and staff_files.rs.
# Every check runs (each built-in check is on unless a config turns it off);
# the command line does not say `--checks all` because that would override
# this one per-operation exclusion.
forms_config() {
	for operation in upload_file post_message post_staff_message; do
		cat <<TOML
[[operations]]
include-operation-id = "$operation"
checks.negative_data_rejection.enabled = false

TOML
	done
}
# The token goes through the schema's own security scheme (named "bearer"),
# not a fixed --header: then a case schemathesis sends without credentials on
# purpose (its missing-header check) really goes without them.
auth_config() {
	printf '[auth.openapi.bearer]\nbearer = "%s"\n\n' "$1"
}
{
	auth_config "$staff_token"
	printf '[parameters]\n"path.customer_id" = "%s"\n\n' "$CUSTOMER"
	forms_config
} >"$work/staff.toml"
{
	auth_config "$customer_token"
	printf '[parameters]\n"path.task_id" = "%s"\n\n' "$task"
	forms_config
} >"$work/customer.toml"
{
	auth_config "$auditor_token"
	forms_config
} >"$work/auditor.toml"

summary=()
status=0
for role in staff customer auditor; do
	say "role $role: $EXAMPLES examples per operation, all checks"
	set +e
	PYTHONPATH=scripts SCHEMATHESIS_HOOKS=schemathesis_hooks \
		"$VENV/bin/st" --no-color --config-file "$work/$role.toml" run "$BASE/openapi.json" \
		--max-examples "$EXAMPLES" \
		--seed 1 \
		--workers 1 \
		--generation-database none \
		--request-timeout 30 \
		2>&1 | tee "$work/$role.txt"
	role_status=${PIPESTATUS[0]}
	set -e
	# schemathesis's closing line, e.g. "=== 3 failures, 120 passed in 40.1s ===".
	closing=$(grep -E '^=+ .* in [0-9.]+s =+$' "$work/$role.txt" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
	summary+=("$role: ${closing:-no summary} (exit $role_status)")
	[[ $role_status -eq 0 ]] || status=1
done

if grep -qE 'panicked|answered 500' "$work/serve.log"; then
	say "the server logged a panic or a 500:"
	grep -E 'panicked|answered 500' "$work/serve.log" | head -20 >&2
	status=1
fi

echo
for line in "${summary[@]}"; do
	echo "schemathesis $line"
done
exit "$status"

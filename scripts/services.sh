#!/usr/bin/env bash
# Makes the services the test suite talks to available on this machine:
#
#   PostgreSQL  127.0.0.1:5432, user postgres, no password (trust from 127.0.0.1)
#   RabbitMQ    127.0.0.1:5672, guest/guest, with the management plugin's HTTP
#               API on 127.0.0.1:15672 (tests create a vhost per test with it and
#               force-close connections to test reconnects)
#
# The S3 server needs nothing here: the tests start one in-process
# (tests/src/s3.rs). There is no Docker engine on our machines; docker-compose.yml
# is for people who have one.
#
# Works on a fresh Debian machine as root (installs the Debian packages that are
# missing), and on one where the services are installed but stopped. Idempotent:
# silent when everything is already up; says what it does when it has to act;
# exits non-zero with the reason when it cannot make a service available.
set -euo pipefail

readonly PG_HOST=127.0.0.1
readonly PG_PORT=5432
readonly AMQP_PORT=5672
readonly MGMT_PORT=15672
readonly PG_WAIT_SECS=60
readonly RABBIT_WAIT_SECS=120

# say, die, apt_install
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# True when something accepts TCP connections on 127.0.0.1:$1. Uses bash's
# /dev/tcp, so it works before any client package is installed.
port_open() {
	timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# ---------------------------------------------------------------- PostgreSQL

# Up means: answers on 127.0.0.1:5432 and lets user postgres in without a
# password (-w: never prompt, fail instead).
pg_ready() {
	command -v psql >/dev/null &&
		psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres -w -qtAc 'select 1' >/dev/null 2>&1
}

# "<version> <cluster> <status>" of the Debian cluster on port 5432, if any.
pg_cluster() {
	command -v pg_lsclusters >/dev/null || return 0
	pg_lsclusters --no-header 2>/dev/null | awk -v port="$PG_PORT" '$3 == port { print $1, $2, $4; exit }'
}

# pg_hba.conf is read top-down and the first matching line wins, so the trust
# line goes first; Debian's default may otherwise ask for a password.
pg_ensure_trust() {
	local hba=$1
	[[ -f $hba ]] || die "cannot find $hba to allow user postgres from 127.0.0.1"
	if grep -Eq '^[[:space:]]*host[[:space:]]+all[[:space:]]+(all|postgres)[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust([[:space:]]|$)' "$hba"; then
		return 1
	fi
	say "allowing user postgres from 127.0.0.1 without a password (trust) in $hba"
	local tmp
	tmp=$(mktemp)
	{
		echo "# Added by scripts/services.sh: the test suite connects as postgres from 127.0.0.1."
		echo "host    all             postgres        127.0.0.1/32            trust"
		cat "$hba"
	} >"$tmp"
	cat "$tmp" >"$hba" # keeps the file's owner and mode
	rm -f "$tmp"
}

pg_wait() {
	local waited=0
	until pg_ready; do
		((waited < PG_WAIT_SECS)) || return 1
		sleep 1
		waited=$((waited + 1))
	done
}

ensure_postgres() {
	pg_ready && return 0

	if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
		say "PostgreSQL is not installed"
		apt_install postgresql
	fi

	local cluster version name status
	cluster=$(pg_cluster)
	if [[ -z $cluster ]]; then
		# The package normally creates a cluster; it may have been dropped.
		version=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
		[[ -n $version ]] || die "PostgreSQL seems installed but /usr/lib/postgresql has no version"
		say "creating PostgreSQL cluster $version/main on port $PG_PORT"
		pg_createcluster "$version" main --port "$PG_PORT" >/dev/null ||
			die "pg_createcluster $version main failed"
		cluster=$(pg_cluster)
		[[ -n $cluster ]] || die "no PostgreSQL cluster on port $PG_PORT after pg_createcluster"
	fi
	read -r version name status <<<"$cluster"

	local hba_changed=false
	if pg_ensure_trust "/etc/postgresql/$version/$name/pg_hba.conf"; then
		hba_changed=true
	fi

	if [[ $status == online* ]]; then
		if $hba_changed; then
			say "reloading PostgreSQL $version/$name to apply pg_hba.conf"
			pg_ctlcluster --skip-systemctl-redirect "$version" "$name" reload ||
				die "pg_ctlcluster $version $name reload failed"
		fi
	else
		say "starting PostgreSQL $version/$name (it was $status)"
		pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start ||
			die "pg_ctlcluster $version $name start failed; see /var/log/postgresql/postgresql-$version-$name.log"
	fi

	pg_wait || die "PostgreSQL $version/$name does not let user postgres in on $PG_HOST:$PG_PORT after ${PG_WAIT_SECS}s; see /var/log/postgresql/postgresql-$version-$name.log and /etc/postgresql/$version/$name/pg_hba.conf"
	say "PostgreSQL is up on $PG_HOST:$PG_PORT"
}

# ------------------------------------------------------------------ RabbitMQ

# HTTP status of GET /api/whoami as guest/guest on the management API, in plain
# bash (curl may not be installed). Empty when nothing answers.
rabbit_whoami_status() {
	# shellcheck disable=SC2016 # $1 and $status belong to the inner bash
	timeout 5 bash -c '
		exec 3<>/dev/tcp/127.0.0.1/"$1" || exit 1
		# "Z3Vlc3Q6Z3Vlc3Q=" is base64 of guest:guest.
		printf "GET /api/whoami HTTP/1.0\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n" >&3
		read -r _ status _ <&3 && echo "$status"
	' _ "$MGMT_PORT" 2>/dev/null || true
}

rabbit_ready() {
	port_open "$AMQP_PORT" && [[ $(rabbit_whoami_status) == 200 ]]
}

rabbit_wait_port() {
	local port=$1 waited=0
	until port_open "$port"; do
		((waited < RABBIT_WAIT_SECS)) || return 1
		sleep 1
		waited=$((waited + 1))
	done
}

ensure_rabbitmq() {
	rabbit_ready && return 0

	if ! command -v rabbitmq-server >/dev/null && [[ ! -x /usr/sbin/rabbitmq-server ]]; then
		say "RabbitMQ is not installed"
		apt_install rabbitmq-server
	fi
	export PATH="$PATH:/usr/sbin"

	if ! rabbitmqctl -q ping >/dev/null 2>&1; then
		say "starting RabbitMQ (rabbitmq-server -detached)"
		rabbitmq-server -detached >/dev/null 2>&1 || die "rabbitmq-server -detached failed; see /var/log/rabbitmq/"
	fi

	# Right after -detached the node may not answer yet, and await_startup then
	# fails at once; so retry it until our own deadline.
	local deadline=$((SECONDS + RABBIT_WAIT_SECS))
	until rabbitmqctl -q --timeout 10 await_startup >/dev/null 2>&1; do
		((SECONDS < deadline)) || die "RabbitMQ did not finish starting within ${RABBIT_WAIT_SECS}s; see /var/log/rabbitmq/"
		sleep 2
	done

	if ! rabbitmq-plugins -q is_enabled rabbitmq_management >/dev/null 2>&1; then
		say "enabling the RabbitMQ management plugin (HTTP API on port $MGMT_PORT)"
		rabbitmq-plugins -q enable rabbitmq_management >/dev/null ||
			die "rabbitmq-plugins enable rabbitmq_management failed"
	fi

	rabbit_wait_port "$AMQP_PORT" || die "RabbitMQ runs but does not listen on 127.0.0.1:$AMQP_PORT"
	rabbit_wait_port "$MGMT_PORT" || die "the RabbitMQ management API does not listen on 127.0.0.1:$MGMT_PORT"

	local status
	status=$(rabbit_whoami_status)
	case $status in
	200) ;;
	401)
		die "RabbitMQ refuses guest/guest; the tests need it. To restore it: rabbitmqctl add_user guest guest (or change_password guest guest); rabbitmqctl set_user_tags guest administrator; rabbitmqctl set_permissions -p / guest '.*' '.*' '.*'"
		;;
	*) die "the RabbitMQ management API on port $MGMT_PORT answered '${status:-nothing}' to guest/guest" ;;
	esac
	say "RabbitMQ is up on 127.0.0.1:$AMQP_PORT (management API on $MGMT_PORT)"
}

# Sourcing the file (to try one function) runs nothing.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
	ensure_postgres
	ensure_rabbitmq
fi

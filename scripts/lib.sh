# shellcheck shell=bash
# What the scripts share, sourced by each (sourcing it runs nothing):
#
#   say MESSAGE...       a line on standard error, named after the script
#   die MESSAGE...       the same as an ERROR, then exit 1
#   apt_install PKG...   installs Debian packages (as root, apt-get update once)
#
# A fresh Debian machine has none of what the tests need; every script installs
# what it needs itself, and tells what it does, so it lives here once.

# $0 is the script that was run (services.sh run on its own, or the script that
# sourced it), so a message names what the reader started.
say() { echo "${0##*/}: $*" >&2; }
die() {
	echo "${0##*/}: ERROR: $*" >&2
	exit 1
}

apt_updated=false
apt_install() {
	[[ $(id -u) -eq 0 ]] || die "$* is not installed and installing it needs root (run as root, or install it yourself)"
	command -v apt-get >/dev/null || die "$* is not installed and there is no apt-get to install it with"
	export DEBIAN_FRONTEND=noninteractive
	if ! $apt_updated; then
		say "updating the Debian package lists (apt-get update)"
		apt-get update -qq >/dev/null || die "apt-get update failed"
		apt_updated=true
	fi
	say "installing $* (apt-get install)"
	apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

#!/usr/bin/env bash
# Makes what the browser tests (tests/src/browser.rs) need available:
#
#   /usr/bin/chromium, /usr/bin/chromedriver   Debian's chromium and chromium-driver
#   .tools/axe/node_modules/axe-core/axe.min.js
#                                              axe-core, pinned, from npm (Debian's
#                                              nodejs and npm if npm is missing)
#
# Debian's build rather than a test tool's own browser download: such downloads
# come from hosts our machines cannot reach, and the driver has to match the
# browser, which the two Debian packages of one source do.
#
# Works on a fresh Debian machine as root. Idempotent: silent when everything is
# there; says what it does when it has to act; exits non-zero with the reason
# when it cannot. Part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# say, die, apt_install
# shellcheck source-path=SCRIPTDIR source=lib.sh
source scripts/lib.sh

readonly CHROMIUM=/usr/bin/chromium
readonly CHROMEDRIVER=/usr/bin/chromedriver
# tests/src/browser.rs reads axe.min.js from here.
readonly AXE_VERSION=4.14.1
readonly AXE_PREFIX=.tools/axe
readonly AXE_PACKAGE=$AXE_PREFIX/node_modules/axe-core

if [[ ! -x $CHROMIUM || ! -x $CHROMEDRIVER ]]; then
	say "Chromium or its WebDriver is missing"
	apt_install chromium chromium-driver
fi
# An installed binary can still fail to start (a missing library after a
# partial upgrade); better said here than as a failed WebDriver session.
"$CHROMEDRIVER" --version >/dev/null 2>&1 || die "$CHROMEDRIVER is there but does not run ($CHROMEDRIVER --version failed)"
"$CHROMIUM" --version >/dev/null 2>&1 || die "$CHROMIUM is there but does not run ($CHROMIUM --version failed)"

# The version npm installed, read from its package.json (no Node.js needed to
# find that nothing is to be done).
axe_installed() {
	[[ -f $AXE_PACKAGE/axe.min.js && -f $AXE_PACKAGE/package.json ]] &&
		sed -n 's/^[[:space:]]*"version":[[:space:]]*"\([^"]*\)".*/\1/p' "$AXE_PACKAGE/package.json" | head -n 1
}

if [[ $(axe_installed || true) != "$AXE_VERSION" ]]; then
	command -v npm >/dev/null || apt_install nodejs npm
	say "installing axe-core $AXE_VERSION into $AXE_PREFIX (npm)"
	mkdir -p "$AXE_PREFIX"
	npm install --prefix "$AXE_PREFIX" --no-audit --no-fund --save-exact --loglevel=error \
		"axe-core@$AXE_VERSION" >/dev/null || die "npm install axe-core@$AXE_VERSION failed"
	[[ $(axe_installed || true) == "$AXE_VERSION" ]] ||
		die "npm ran but $AXE_PACKAGE is not axe-core $AXE_VERSION"
fi

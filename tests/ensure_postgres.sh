#!/usr/bin/env bash
# Debian's PostgreSQL server for the audit's PostgreSQL tests (tests/helpers/postgres.py): installs the
# `postgresql` package only when no /usr/lib/postgresql/*/bin/initdb exists. Idempotent; CI runs as root.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_postgres: no PostgreSQL server and this is not root on Debian: the PostgreSQL tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The package's scripts would start its default cluster (port 5432), a server that outlives the tests: the tests
# start their own. Docker images forbid starting services already (/usr/sbin/policy-rc.d exits 101); elsewhere
# the same refusal is in place for the install only.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null

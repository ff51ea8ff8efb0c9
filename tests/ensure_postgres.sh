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
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null

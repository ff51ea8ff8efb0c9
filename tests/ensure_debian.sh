#!/usr/bin/env bash
# tests/ensure_debian.sh PACKAGE CHECK_COMMAND: installs Debian's PACKAGE (apt-get, no recommends) only when
# CHECK_COMMAND (run with bash -c) fails, then requires it to pass. Idempotent; CI runs as root on a fresh
# machine. Not root or no apt-get: says so and exits 0 (the tests that need it skip or fail with a hint).
#   tests/ensure_debian.sh chromium 'test -x /usr/bin/chromium'          the report screenshots (make test)
#   tests/ensure_debian.sh nginx 'test -x /usr/sbin/nginx'               the front-door tests, make deploy-check
#   tests/ensure_debian.sh postgresql 'compgen -G "/usr/lib/postgresql/*/bin/initdb"'   the PostgreSQL audit sink
#   tests/ensure_debian.sh prometheus 'command -v promtool'              the alert-rule tests (promtool)
set -euo pipefail
if [ $# -ne 2 ]; then
    echo "usage: $0 PACKAGE CHECK_COMMAND" >&2
    exit 2
fi
package=$1 check=$2
if bash -c "$check" >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_debian: $package is missing ($check fails) and this is not root on Debian: install it" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A package's scripts may start its daemon (nginx on 80, PostgreSQL's default cluster on 5432, prometheus on
# 9090), a server that outlives the tests: the tests start their own. Docker images forbid starting services
# already (/usr/sbin/policy-rc.d exits 101); elsewhere the same refusal is in place for the install only.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$package" >/dev/null
bash -c "$check" >/dev/null

#!/usr/bin/env bash
# Debian's prometheus (for promtool and the server) for the audit's alert-rule tests (tests/test_audit_drift.py):
# installs it only when promtool is absent. Idempotent; CI runs as root.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_prometheus: promtool is missing and this is not root on Debian: the alert-rule tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The package's scripts would start a prometheus daemon (port 9090) that outlives the tests: the tests start
# their own. Docker images forbid starting services already (/usr/sbin/policy-rc.d exits 101); elsewhere the same
# refusal is in place for the install only.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null

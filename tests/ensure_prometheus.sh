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
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool >/dev/null

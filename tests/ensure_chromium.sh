#!/usr/bin/env bash
# Headless Chromium for the audit report test (tests/test_audit.py): installs Debian's chromium only when
# /usr/bin/chromium is absent. Idempotent; CI runs as root on a fresh machine.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: /usr/bin/chromium is missing and this is not root on Debian: the report test will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
test -x /usr/bin/chromium

#!/usr/bin/env bash
# Kept for its callers: tests/ensure_debian.sh does the work (the audit report and docs screenshots).
exec "$(dirname "$0")/ensure_debian.sh" chromium 'test -x /usr/bin/chromium'

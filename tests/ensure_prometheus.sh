#!/usr/bin/env bash
# Kept for its callers: tests/ensure_debian.sh does the work (the alert-rule tests).
exec "$(dirname "$0")/ensure_debian.sh" prometheus 'command -v promtool'

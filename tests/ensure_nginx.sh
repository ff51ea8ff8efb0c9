#!/usr/bin/env bash
# Kept for its callers: tests/ensure_debian.sh does the work (the front-door tests and make deploy-check).
exec "$(dirname "$0")/ensure_debian.sh" nginx 'test -x /usr/sbin/nginx'

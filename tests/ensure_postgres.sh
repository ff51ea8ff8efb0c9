#!/usr/bin/env bash
# Kept for its callers: tests/ensure_debian.sh does the work (the PostgreSQL audit tests).
exec "$(dirname "$0")/ensure_debian.sh" postgresql 'compgen -G "/usr/lib/postgresql/*/bin/initdb"'

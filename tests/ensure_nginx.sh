#!/usr/bin/env bash
# nginx for the front-door tests (tests/test_nginx.py) and `make deploy-check` (nginx -t on the rendered config):
# installs Debian's nginx only when it is missing. Idempotent; CI runs as root on a fresh machine.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_nginx: nginx is missing and this is not root on Debian: install nginx (the front tests fail without it)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx >/dev/null
test -x /usr/sbin/nginx

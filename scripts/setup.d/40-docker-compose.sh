#!/usr/bin/env bash
# docker-compose (Debian package): the suite checks the compose files with `docker-compose config`
# (tests/integration/test_deploy_files.py); no container is started.
set -euo pipefail
command -v docker-compose >/dev/null && exit 0
echo "setup: installing docker-compose from Debian packages" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
command -v docker-compose >/dev/null

#!/usr/bin/env bash
# The FHIR JS clients the test suite drives (issue 22): fhir-kit-client and SMART's fhirclient, and the OIDC
# issuer the viewer's sign-in test runs (oidc-provider, tests/js/oidc_idp.mjs), pinned in
# tests/js/package.json + package-lock.json, installed into tests/js/node_modules (ignored). Needs node >= 20
# and npm (Debian: nodejs npm).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v npm >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q nodejs npm >/dev/null
  else
    echo "setup: npm is missing: install nodejs and npm (Debian: apt-get install nodejs npm)" >&2
    exit 1
  fi
fi
stamp=tests/js/node_modules/.fedgate-installed
want=$(sha256sum tests/js/package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the FHIR JS test clients into tests/js/node_modules" >&2
  (cd tests/js && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
  echo "$want" > "$stamp"
fi

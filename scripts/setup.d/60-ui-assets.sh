#!/usr/bin/env bash
# The web console's browser assets (issue 28, docs/ui.md): htmx, Vega, Vega-Lite, vega-embed (served by the
# gateway at /ui/static) and axe-core (the accessibility test), pinned in gateway/ui/assets/package.json +
# package-lock.json and installed into gateway/ui/assets/node_modules (ignored, never committed). Nothing is
# fetched at run time. Needs node >= 18 and npm (Debian: nodejs npm).
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
dir=gateway/ui/assets
stamp=$dir/node_modules/.fedgate-installed
want=$(sha256sum $dir/package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing the console assets (htmx, vega, vega-lite, vega-embed, axe-core) into $dir/node_modules" >&2
  (cd $dir && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
  echo "$want" > "$stamp"
fi
test -f $dir/node_modules/htmx.org/dist/htmx.min.js && test -f $dir/node_modules/vega-embed/build/vega-embed.min.js

#!/usr/bin/env bash
# The OHIF viewer served by fedgate at /viewer (docs/viewer.md): the prebuilt app of the npm package
# @ohif/app at a pinned version, unpacked into viewer/ohif/ (git-ignored, never committed), and Debian's
# chromium for the real-browser test (tests/integration/test_viewer_browser.py, Playwright from PyPI).
set -euo pipefail
cd "$(dirname "$0")/../.."
OHIF_VERSION=3.13.2
# npm's integrity of @ohif/app@3.13.2 (npm view @ohif/app@3.13.2 dist.integrity); npm pack checks it too
OHIF_INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
dest=viewer/ohif
if [ ! -f "$dest/.version" ] || [ "$(cat "$dest/.version")" != "$OHIF_VERSION" ]; then
  command -v npm >/dev/null || { echo "setup: npm is needed for the OHIF viewer (apt-get install npm)" >&2; exit 1; }
  echo "setup: installing @ohif/app@$OHIF_VERSION from the npm registry into $dest" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  tgz=$(ls "$tmp"/ohif-app-*.tgz)
  got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
  if [ "$got" != "$OHIF_INTEGRITY" ]; then echo "setup: @ohif/app tarball integrity mismatch" >&2; exit 1; fi
  tar -xzf "$tgz" -C "$tmp"
  rm -rf "$dest"
  mkdir -p viewer
  mv "$tmp/package/dist" "$dest"
  cp "$tmp/package/LICENSE" "$dest/LICENSE.ohif"
  echo "$OHIF_VERSION" > "$dest/.version"
fi
if ! command -v chromium >/dev/null; then
  echo "setup: installing chromium from Debian packages (browser test)" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
command -v chromium >/dev/null && [ -f "$dest/index.html" ]

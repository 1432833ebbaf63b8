#!/usr/bin/env bash
# dicom3tools (Debian package) for dciodvfy: the de-identification tests (issue #24) check that a
# de-identified instance has no IOD conformance error its source did not have. Installed once.
set -euo pipefail
if command -v dciodvfy >/dev/null; then exit 0; fi
echo "setup: installing dicom3tools (dciodvfy) from Debian packages" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends dicom3tools >/dev/null
command -v dciodvfy >/dev/null

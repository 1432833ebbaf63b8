#!/usr/bin/env bash
# Orthanc (Debian packages orthanc + orthanc-dicomweb) as a real PACS peer for the DICOMweb tests and
# the side-by-side benchmark. Installed once; never left running: tests start their own instance on
# free loopback ports (tests/peers/orthanc.py).
set -euo pipefail
if command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then exit 0; fi
echo "setup: installing Orthanc + DICOMweb plugin from Debian packages" >&2
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
# A policy-rc.d that denies service starts keeps the package's init script from starting a system-wide
# Orthanc on :8042/:4242. Debian container images ship their own policy-rc.d: it is kept as found (moved
# aside and put back byte for byte); only a file this script added is removed.
POLICY=/usr/sbin/policy-rc.d
SAVED=""
if [ -e "$POLICY" ] || [ -L "$POLICY" ]; then
  SAVED=$($SUDO mktemp /usr/sbin/.policy-rc.d.fedgate.XXXXXX)
  $SUDO cp -a "$POLICY" "$SAVED"
fi
restore_policy() {
  if [ -n "$SAVED" ]; then $SUDO mv -f "$SAVED" "$POLICY"; else $SUDO rm -f "$POLICY"; fi
}
trap restore_policy EXIT
printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
$SUDO chmod +x "$POLICY"
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]

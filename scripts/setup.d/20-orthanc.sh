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
# policy-rc.d keeps the package's init script from starting a system-wide Orthanc on :8042/:4242
printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
$SUDO chmod +x /usr/sbin/policy-rc.d
$SUDO apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null
$SUDO rm -f /usr/sbin/policy-rc.d
command -v Orthanc >/dev/null && [ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]

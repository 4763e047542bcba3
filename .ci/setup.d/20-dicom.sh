#!/usr/bin/env bash
# DICOM test components: Orthanc with its DICOMweb plugin (the PACS the tests start on
# free ports) and dicom3tools (dciodvfy, the validator). Installed when absent; the
# package's own Orthanc service is never started: the tests run their own.
set -euo pipefail
missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
[ -n "$(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* 2>/dev/null)" ] || missing+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null 2>&1 || missing+=(dicom3tools)
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# policy-rc.d exit 101 tells invoke-rc.d not to start services while packages install.
policy=/usr/sbin/policy-rc.d
placed=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    placed=1
fi
trap '[ "$placed" -eq 1 ] && $sudo rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get -qq -o DPkg::Lock::Timeout=600 update
$sudo apt-get -qq -y -o DPkg::Lock::Timeout=600 install --no-install-recommends "${missing[@]}" >/dev/null
# Should a service manager have started it anyway, stop the packaged instance.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet orthanc 2>/dev/null; then
    $sudo systemctl stop orthanc && $sudo systemctl disable --quiet orthanc
elif [ -x /etc/init.d/orthanc ] && /etc/init.d/orthanc status >/dev/null 2>&1; then
    $sudo /etc/init.d/orthanc stop >/dev/null
fi

#!/usr/bin/env bash
# Headless Chromium for the viewer's browser tests (tests/viewer), from Debian's packages.
# Playwright drives it at /usr/bin/chromium; `playwright install` is never needed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null

#!/usr/bin/env bash
# Installs what tests/eval/human/test_app_in_browser.py needs: Debian's Chromium (and a font to render its pages).
# It comes from the Debian archive (no browser downloads from elsewhere); Playwright, which drives it over its own
# pipe (no chromedriver), is a pip dev dependency.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || true)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version

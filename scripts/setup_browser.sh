#!/usr/bin/env bash
# Installs what the browser tests drive: Debian's chromium and chromium-driver (with apt-get, as root), and nothing
# when they are already there. Elsewhere it says how to get them; the browser tests are then skipped.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver for the browser tests..."
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
    echo "setup: chromium and chromium-driver are missing, and installing them needs root and apt-get;" \
         "the browser tests (pytest -m browser) will be skipped"
fi

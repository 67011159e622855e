#!/usr/bin/env bash
# The browser the dashboard's tests drive: Debian's chromium, driven by Playwright (a test dependency in
# pyproject.toml), which downloads no browser of its own. Quick when it is there.
set -euo pipefail

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tests/dashboard/install.sh: chromium is missing; install it as root: apt-get install -y chromium" >&2
        exit 1
    fi
    # A fresh CI machine may have no package lists yet.
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y --no-install-recommends chromium >/dev/null; }
fi

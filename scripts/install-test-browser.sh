#!/usr/bin/env bash
# Install the browser the HTML-report tests drive: Debian's chromium package (headless, via Playwright).
#
# Called by tests/report/conftest.py when the browser is missing; safe to run by hand. Needs root and
# apt-get (Debian/Ubuntu); prints why and exits non-zero when it cannot install, so the tests fail with
# that message instead of being skipped.
#
# Environment: GRADWISE_TEST_BROWSER  the executable the tests use (default /usr/bin/chromium).
set -euo pipefail

browser="${GRADWISE_TEST_BROWSER:-/usr/bin/chromium}"

if [[ -x "$browser" ]]; then
    echo "install-test-browser: $browser is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-browser: cannot install chromium: apt-get not found (install a Chromium build and set GRADWISE_TEST_BROWSER to it)" >&2
    exit 1
fi
if [[ "$EUID" -ne 0 ]]; then
    echo "install-test-browser: cannot install chromium: apt-get needs root (run: sudo $0)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q; then
    echo "install-test-browser: cannot install chromium: apt-get update failed (no network or no package mirror?)" >&2
    exit 1
fi
if ! apt-get install -y -q --no-install-recommends chromium; then
    echo "install-test-browser: cannot install chromium: apt-get install chromium failed" >&2
    exit 1
fi
if [[ ! -x "$browser" ]]; then
    echo "install-test-browser: chromium installed but $browser is still missing" >&2
    exit 1
fi
echo "install-test-browser: installed $browser"

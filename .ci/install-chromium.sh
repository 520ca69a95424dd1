#!/usr/bin/env bash
# Make sure a headless Chromium is here for the HTML report's test (tests/test_report_html.py):
# installs Debian's `chromium` package when it is missing. Any failure -> exit 1 (the test then skips).
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null; then exit 0; fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then exit 1; fi
timeout 300 apt-get update -qq >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq chromium >/dev/null 2>&1 || exit 1
command -v chromium >/dev/null

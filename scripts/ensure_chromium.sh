#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/test_page.py) when /usr/bin/chromium is missing.
# CI runs as root with Debian's package archive reachable; elsewhere sudo is used when available.
# Playwright drives this binary through executable_path: `playwright install` is never used.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: $CHROMIUM is missing and apt-get is not available; install Debian's 'chromium' package" >&2
  exit 1
fi
if [ "$(id -u)" = "0" ]; then
  AS_ROOT=()
elif command -v sudo >/dev/null 2>&1; then
  AS_ROOT=(sudo)
else
  echo "ensure_chromium: $CHROMIUM is missing; run as root or install sudo (apt-get install chromium)" >&2
  exit 1
fi

echo "ensure_chromium: installing Debian's chromium for the browser tests" >&2
"${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
# fonts-liberation: a slim image may have no fonts at all, and screenshots should show text
"${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null

if [ ! -x "$CHROMIUM" ]; then
  echo "ensure_chromium: apt-get finished but $CHROMIUM is still missing" >&2
  exit 1
fi
"$CHROMIUM" --version >&2 || true

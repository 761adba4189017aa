#!/usr/bin/env bash
# Make sure a headless Chromium is there for the fleet page's browser tests (docs/dashboard.md):
# Debian's chromium-headless-shell, installed with apt-get as root when no Chromium is found. The
# page itself needs no browser on the server. Never fails the build: without one the browser tests
# fail saying what is missing.
set -u
for name in "${SFLAM_CHROMIUM:-}" chromium-headless-shell chromium chromium-browser google-chrome; do
  if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
    echo "==> browser: $name found"
    exit 0
  fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> browser: installing chromium-headless-shell with apt-get"
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium-headless-shell >/dev/null 2>&1 \
     || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium-headless-shell >/dev/null 2>&1; }; then
    echo "==> browser: chromium-headless-shell installed"
    exit 0
  fi
fi
echo "==> browser: no headless Chromium; the fleet page's browser tests will fail (set SFLAM_CHROMIUM to one)"
exit 0

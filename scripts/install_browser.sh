#!/usr/bin/env bash
# Debian's chromium for the results-page browser test (tests/test_e2e_scripts.py), installed when it is
# missing and this machine can (root + apt-get); otherwise that one test is skipped with a message.
# AVG_NO_BROWSER_INSTALL=1 skips the install.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "${AVG_NO_BROWSER_INSTALL:-}" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[install_browser] chromium is missing and cannot be installed here (needs root and apt-get): the browser test will be skipped" >&2
  exit 0
fi
log=$(mktemp)
echo "[install_browser] installing Debian's chromium for the browser test (log: $log) ..." >&2
if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >"$log" 2>&1; then
  echo "[install_browser] $(chromium --version 2>/dev/null)" >&2
else
  echo "[install_browser] install failed (see $log): the browser test will be skipped" >&2
fi
exit 0

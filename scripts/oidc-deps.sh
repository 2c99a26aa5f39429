#!/usr/bin/env bash
# Installs the OpenID provider the OIDC tests start (npm `oidc-provider`, pinned by
# tests/oidc/package-lock.json) when it is missing. Needs Node.js 20 or newer and npm.
set -euo pipefail
cd "$(dirname "$0")/../tests/oidc"
[ -d node_modules/oidc-provider ] && exit 0
if ! command -v npm >/dev/null 2>&1; then
  echo "npm is missing: run \`make system-deps\` (Debian: apt-get install nodejs npm)" >&2
  exit 1
fi
echo "installing oidc-provider for the OIDC tests (npm ci in tests/oidc) ..."
npm ci --no-audit --no-fund --loglevel=error

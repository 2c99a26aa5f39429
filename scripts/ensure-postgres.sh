#!/usr/bin/env bash
# Starts the local PostgreSQL cluster when it is installed but not running.
set -uo pipefail
command -v pg_ctlcluster >/dev/null 2>&1 || { echo "PostgreSQL is not installed: PostgreSQL tests will skip (they fail under CI=true)"; exit 0; }
version=$(ls /etc/postgresql 2>/dev/null | head -n 1)
[ -n "$version" ] || exit 0
if ! pg_lsclusters -h 2>/dev/null | awk '{print $4}' | grep -q online; then
  echo "starting PostgreSQL $version ..."
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
fi

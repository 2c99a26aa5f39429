#!/usr/bin/env bash
# Makes sure `opsgate demo` finds a Prometheus binary: installs Debian's `prometheus`
# package when run as root on Debian, otherwise says exactly how to get one.
set -euo pipefail
if [ -n "${OPSGATE_PROMETHEUS_BIN:-}" ]; then
  [ -x "$OPSGATE_PROMETHEUS_BIN" ] && exit 0
  echo "OPSGATE_PROMETHEUS_BIN=$OPSGATE_PROMETHEUS_BIN is not an executable file" >&2
  exit 1
fi
if [ -x /usr/bin/prometheus ] || command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing prometheus (Debian package) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  exit 0
fi
cat >&2 <<'HINT'
opsgate demo needs a Prometheus binary and none was found. Get one, then run `make demo` again:
  Debian/Ubuntu:  sudo apt-get install prometheus
  macOS:          brew install prometheus
  anywhere else:  download a release from https://prometheus.io/download/ and put
                  `prometheus` on PATH, or run: OPSGATE_PROMETHEUS_BIN=/path/to/prometheus make demo
HINT
exit 1

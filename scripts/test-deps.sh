#!/usr/bin/env bash
# What the tests need beside .venv, from Debian's packages: PostgreSQL's server (the team tests
# start their own cluster on loopback behind an MLflow tracking server) and Chromium (they open
# the MLflow UI headless). Installs only what is missing; needs root or sudo for that.
set -euo pipefail
need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || need+=(postgresql)
command -v chromium > /dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  echo "test-deps: installing ${need[*]} (Debian packages)"
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" > /dev/null
fi
echo "test-deps: PostgreSQL $(ls /usr/lib/postgresql/), $(chromium --version 2>/dev/null | head -1)"

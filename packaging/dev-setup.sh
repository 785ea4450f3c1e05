#!/usr/bin/env bash
# Prepares a fresh Debian machine to run Flux from this checkout: system packages
# (PostgreSQL server and client, systemd's tools, Caddy, Docker, debootstrap, Chromium for the
# dashboard's browser tests) and a virtualenv in .venv with the
# project installed. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v pg_dump >/dev/null 2>&1 || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v caddy >/dev/null 2>&1 || need+=(caddy)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v runuser >/dev/null 2>&1 || need+=(util-linux)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "dev-setup: missing packages (${need[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "dev-setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "dev-setup: ready (.venv/bin/flux, .venv/bin/flux-controller, .venv/bin/flux-agent)" >&2

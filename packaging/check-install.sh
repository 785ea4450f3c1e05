#!/usr/bin/env bash
# Builds the Debian packages, installs them on a container with systemd as PID 1 as the README's
# production steps say, and checks the services, then an upgrade (see packaging/check_install.py).
# Needs a running Docker engine, debootstrap and dpkg-deb; the last line of output is one JSON object.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" packaging/check_install.py "$@"

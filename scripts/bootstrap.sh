#!/usr/bin/env bash
# Set up a fresh machine: the project's virtualenv, and (with --system) the Debian packages
# the test suite needs (promtool, prometheus, amtool, alertmanager, docker-compose, chromium).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_system=0
[ "${1:-}" = "--system" ] && want_system=1

if [ "$want_system" = 1 ]; then
    missing=()
    command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
    command -v amtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 \
        || missing+=(prometheus-alertmanager)
    command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
    # Tests replay curl commands, generate TLS certificates and inject read-only files.
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v chattr >/dev/null 2>&1 || missing+=(e2fsprogs)
    # Tests open the HTML reports in headless Chromium (DOM, screenshot, network log).
    command -v chromium >/dev/null 2>&1 || missing+=(chromium)
    if [ "${#missing[@]}" -gt 0 ]; then
        if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "bootstrap: need root or sudo to apt-get install ${missing[*]}" >&2
            exit 1
        fi
        echo "bootstrap: installing Debian packages: ${missing[*]}"
        $sudo apt-get update -qq
        # The packages ship services; in containers there is no init to start them, and the
        # tests start their own processes anyway.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: Python >= 3.11 is required ($("$python" --version 2>&1) found)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi

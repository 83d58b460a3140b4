#!/usr/bin/env bash
# Downloads the Debian packages the GPU machine lacks (it has no package registry) into .deps/, which
# the device call carries; tools/device_check.sh unpacks them and points CMake at them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .deps && cd .deps
apt-get download libpcre2-dev libpcre2-8-0 libcli11-dev 2>/dev/null
ls -1 *.deb

#!/usr/bin/env bash
# Install everything gradrewrite's tests need on a bare Debian machine: the system
# packages (arm-none-eabi toolchain and QEMU for the mcu backend, graphviz for
# `inspect -f svg`, chromium for the HTML inspector tests) and the Python package
# with its cpu, test and openvino extras. Used by the README's test command and by .ci/run.
# Already-installed system packages are left alone, so a rerun takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm graphviz chromium make"
missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing system packages:$missing, and no apt-get here; install them with your package manager" >&2
    exit 2
  fi
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "error: missing system packages:$missing; run this script as root (or install them yourself)" >&2
      exit 2
    fi
  fi
  echo "== installing system packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

echo "== installing gradrewrite with the cpu, test and openvino extras"
python -m pip install -q -e ".[cpu,test,openvino]"

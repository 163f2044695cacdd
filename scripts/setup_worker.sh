#!/usr/bin/env bash
# Prepares one TPU VM worker (scripts/tpu_pod.py setup runs it on every
# worker): `make` (apt-get, where the image lacks it), a Python that the
# pinned JAX supports (3.11 or newer), then
# `make install REQUIREMENTS=requirements-tpu.txt` with it.
#
# TPU VM runtime images (tpu-ubuntu2204-base) ship Python 3.10. Then uv
# (from PyPI, installed into ~/.local) downloads a stand-alone CPython 3.11
# build (python-build-standalone, about 30 MB) into ~/.local/share/uv/python;
# nothing outside the home folder changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=3.11

if ! command -v make > /dev/null; then
  echo "setup: no make here; installing it with apt-get"
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make
fi

find_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" > /dev/null \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2> /dev/null; then
      command -v "$candidate"
      return 0
    fi
  done
  return 1
}

if ! PY=$(find_python); then
  echo "setup: no Python 3.11 or newer here ($(python3 --version 2>&1)); fetching CPython $PYTHON_VERSION with uv"
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv > /dev/null || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
  uv python install "$PYTHON_VERSION"
  PY=$(uv python find "$PYTHON_VERSION")
fi
echo "setup: $("$PY" --version) at $PY"
make install PYTHON="$PY" REQUIREMENTS=requirements-tpu.txt

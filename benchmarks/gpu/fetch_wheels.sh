#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu/requirements-gpu.txt (Python 3.12, x86-64 Linux) into .whl/ at the repo root
# (or $COORDEXP_WHEELS), where pip reaches PyPI; carry that folder to the GPU machine, where run.sh installs it offline.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WHEELS="${COORDEXP_WHEELS:-$ROOT/.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
mkdir -p "$WHEELS"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$WHEELS" -r "$HERE/requirements-gpu.txt"
ls -1 "$WHEELS"

#!/usr/bin/env bash
# The GPU check in one command (docs/scaling.md, "GPU check"): installs the carried wheels (.whl/ at the repo root or
# $COORDEXP_WHEELS, made by fetch_wheels.sh) offline, then runs benchmarks/gpu_check.py with the given flags
# (--smoke, --only parity,decode,mfu,attention, --train_batch, --train_seq, --json PATH).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHEELS="${COORDEXP_WHEELS:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/coordexp_site \
    "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/coordexp_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  echo "error: ml_collections is not installed: run benchmarks/gpu/fetch_wheels.sh where pip reaches PyPI and carry $WHEELS" >&2
  exit 2
fi
"$PY" -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())"
exec "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"

#!/usr/bin/env bash
# On a GPU box with Python 3.12 and PyTorch and no network (bench/gpu_pipeline.py says what runs):
#   here first:   python bench/gpu_wheels.py            # .whl/: what the box lacks, <= 64 MiB
#   on the box:   bash bench/gpu_pipeline.sh            # results in $OUT (default gpu-out/)
#   here after:   python bench/gpu_pipeline.py --score <fetched>/gpu_pipeline.json
# GPU_WHEELS= (empty) installs nothing: for a machine that has the requirements (this project's venv).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${GPU_WHEELS-.whl}"
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_pipeline.py --device "${DEVICE:-cuda}" --out "${OUT:-gpu-out}" "$@"

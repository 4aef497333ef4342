#!/usr/bin/env bash
# The whole method at demo size on a CPU: dataset -> offline CQL ensemble -> online fine-tuning.
# Demo data and checkpoints live under demo/ so they never mix with full-size ones.
set -euo pipefail
export MINARI_DATASETS_PATH="$PWD/demo/minari"
python make_dataset.py --env hopper --kinds medium-replay --sac-steps 30000 --medium-fraction 0.08 \
    --eval-every 5000 --work-dir demo/make_dataset

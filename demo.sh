#!/usr/bin/env bash
# Off2On end to end at demo size, on a CPU: (1) a small hopper medium-replay dataset made with D4RL's
# recipe by SAC, (2) a 5-member CQL ensemble trained offline on it, (3) online fine-tuning with balanced
# replay, then the fine-tuning curve as a PNG. Everything goes under demo/ (data, checkpoints, runs), so
# it never mixes with full-size datasets or checkpoints. The full-size commands are in README.md.
set -euo pipefail
cd "$(dirname "$0")"
export MINARI_DATASETS_PATH="$PWD/demo/minari"
# one torch thread unless told otherwise: on a machine busy with other jobs torch's threads wait for each other
# (small updates measured 10-50x slower with two threads on a busy 2-core CPU)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# (1) SAC until its policy reaches 6% of D4RL's expert return (full size: 1/3), everything it saw so far
python make_dataset.py --env hopper --kinds medium-replay --medium-fraction 0.06 --sac-steps 60000 \
    --work-dir demo/make_dataset
# (2) five CQL agents as one vectorized run (full size: 1M updates, batch 256, 40k BC warm-start steps)
python off2on_cql_ensemble.py --env hopper --dataset medium-replay --offline-updates 1000 --batch-size 64 \
    --bc-steps 200 --eval-every 500 --run-dir demo/runs/hopper__medium-replay__cql_ensemble__seed1 --export-path demo/hopper_ensemble.pt
# (3) the paper's fine-tuning (full size: 250k online steps)
python off2on_finetune.py --env hopper --dataset medium-replay --checkpoint demo/hopper_ensemble.pt \
    --online-steps 8000 --first-epoch-multiplier 2 --run-dir demo/runs/hopper__medium-replay__off2on_finetune__seed1
python plot.py --runs demo/runs/hopper__medium-replay__off2on_finetune__seed1 --include-unfinished --out demo/finetune_curve \
    --title "off2on demo: hopper medium-replay (demo size)"
echo "fine-tuning curve: demo/finetune_curve.png; scores: demo/runs/hopper__medium-replay__off2on_finetune__seed1/evals.csv"

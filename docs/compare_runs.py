"""The README's evidence figures: normalized score vs online env steps of a few runs (one line each,
one seed each) and a markdown table of their start / common-step / last / best scores.

usage: python docs/compare_runs.py OUT.png MAX_ENV_STEPS "Label=run_dir" ...
(plot.py draws mean +- s.e. over seeds from benchmark.py's grid; this draws single named runs.)"""

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, max_steps, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
rows = []
for spec in specs:
    label, run = spec.split("=", 1)
    path = os.path.join(run, "evals.csv")
    if not os.path.exists(path):
        print(f"(no evals.csv in {run})", file=sys.stderr)
        continue
    ev = [
        r
        for r in csv.DictReader(open(path))
        if r["phase"] == "online" and r["policy"] in ("policy", "ensemble") and int(r["env_steps"]) <= max_steps
    ]
    if not ev:
        continue
    x = [int(r["env_steps"]) for r in ev]
    y = [float(r["normalized_score"]) for r in ev]
    ax.plot(x, y, marker="o", markersize=2.5, linewidth=1.4, label=label)
    off = [r for r in csv.DictReader(open(path)) if r["phase"] == "offline"]
    rows.append(
        (
            label,
            x[0],
            y[0],
            x[-1],
            y[-1],
            max(y),
            off[-1]["updates"] if off else "0",
            os.path.basename(run.rstrip("/")),
            dict(zip(x, y)),
        )
    )
ax.set_xlabel("online environment steps")
ax.set_ylabel("D4RL normalized score")
ax.set_title("halfcheetah medium (HalfCheetah-v5, local dataset); one run each", fontsize=10)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out)
common = min(r[3] for r in rows)
print(f"| method | offline updates | start (env steps) | at {common:,} env steps | last (env steps) | best | run dir |")
print("|---|---|---|---|---|---|---|")
for label, x0, y0, x1, y1, best, off, run, by_step in rows:
    at = max(k for k in by_step if k <= common)
    print(f"| {label} | {off} | {y0:.1f} ({x0:,}) | {by_step[at]:.1f} | {y1:.1f} ({x1:,}) | {best:.1f} | `{run}` |")

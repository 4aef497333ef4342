"""Plot tool: the paper's figure and aggregate scores from benchmark.py's results.

Figure (PNG): D4RL normalized score against online env steps, mean ± standard error over seeds,
one panel per task (env, dataset), one line per method, as in Lee et al. (2021), Figure 3.
Table (markdown): the final normalized score of every run (mean of its last `--last` online
evaluations) aggregated across tasks and seeds with rliable (Agarwal et al. 2021): interquartile
mean (IQM) and mean with 95% stratified bootstrap confidence intervals, then per task mean ± s.e.

    python plot.py --results benchmark/results.csv --out docs/results
    python plot.py --runs runs/ --out docs/my_runs        # straight from run directories
    python plot.py --ablation docs/results/released_agents --out docs/results/released_agents

Ablation mode (`--ablation`): fine-tuning runs of one task that differ in replay scheme and ensemble size, in
folders named <replay>-N<members>__seed<S> (e.g. balanced-N5__seed0) holding evals.csv. Writes <out>.csv (one
row per evaluation: config,replay,members,seed,env_steps,updates,return_mean,normalized_score), two figures,
<out>_replay.png (the replay schemes with N = 5) and <out>_ensemble.png (N = 1, 2, 5 with balanced replay), mean
± standard error over seeds, and <out>.md with a table per figure. `--ablation` may also name such a CSV.

Input: the CSV of benchmark.py (env,dataset,method,seed,finished + evals.csv columns), or run
directories named <env>__<dataset>__<script>__seed<S>[__<time>] holding evals.csv. The curve of
a run is its online evaluations of policy `ensemble` (Off2On) or `policy`; a run whose online
evaluations do not start at 0 env steps starts at its last offline evaluation; runs with no
online evaluation (offline pretraining) are not shown.
"""

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import tyro

METHOD_ORDER = ("off2on", "sac", "sac_ft", "awac", "bcq_ft")
LABELS = {
    "off2on": "Off2On (ours)",
    "sac": "SAC",
    "sac_ft": "SAC-ft",
    "awac": "AWAC",
    "bcq_ft": "BCQ-ft",
    "off2on_finetune": "Off2On (ours)",
}
ENV_ORDER = ("halfcheetah", "hopper", "walker2d")
DATASET_ORDER = ("random", "medium", "medium-replay", "medium-expert", "expert")
POLICY_PREFERENCE = ("ensemble", "policy")


@dataclass
class Args:
    results: tuple[str, ...] = ()
    """results CSV(s) written by benchmark.py"""
    runs: tuple[str, ...] = ()
    """run directories, or folders of run directories (instead of / besides --results)"""
    out: str = "docs/results"
    """output prefix: writes <out>.png and <out>.md"""
    methods: tuple[str, ...] = ()
    """methods to show, in this order (empty: all found)"""
    last: int = 1
    """final score of a run = mean of its last N online evaluations"""
    reps: int = 50_000
    """bootstrap resamples for the confidence intervals"""
    seed: int = 0
    """seed of the bootstrap"""
    include_unfinished: bool = False
    """count runs without a DONE marker in the aggregate table (they are always plotted)"""
    title: str = ""
    """figure title"""
    ablation: str = ""
    """folder of <replay>-N<members>__seed<S> run folders, or the CSV collected from them (see above)"""
    collapse_window: int = 5_000
    """ablation tables: the worst score over evaluations at 1..this many online env steps (initial collapse)"""
    table_steps: tuple[int, ...] = (10_000, 25_000)
    """ablation tables: the scores at these online env steps"""


def load_results(paths) -> pd.DataFrame:
    return pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)


def find_run_dirs(path: str) -> list:
    if os.path.exists(os.path.join(path, "evals.csv")):
        return [path]
    return sorted(os.path.join(path, d) for d in os.listdir(path) if os.path.exists(os.path.join(path, d, "evals.csv")))


def load_runs(paths) -> pd.DataFrame:
    """evals.csv of run dirs named <env>__<dataset>__<script>__seed<S>[__<time>]; a run whose
    dataset part is `none` (SAC from scratch) is shown in every dataset panel of its env."""
    frames = []
    for d in [r for p in paths for r in find_run_dirs(p)]:
        parts = os.path.basename(os.path.normpath(d)).split("__")
        if len(parts) < 4 or not parts[3].startswith("seed"):
            raise ValueError(f"{d}: expected a run dir named <env>__<dataset>__<script>__seed<S>")
        df = pd.read_csv(os.path.join(d, "evals.csv"))
        method = "off2on" if parts[2] == "off2on_finetune" else parts[2]
        # benchmark.py's run dirs (no time suffix) are finished once they hold DONE
        df.insert(0, "finished", int(len(parts) > 4 or os.path.exists(os.path.join(d, "DONE"))))
        for i, (k, v) in enumerate(
            zip(("env", "dataset", "method", "seed"), (parts[0], parts[1], method, int(parts[3][4:])))
        ):
            df.insert(i, k, v)
        frames.append(df)
    if not frames:
        raise ValueError(f"no run directories with evals.csv in {', '.join(paths)}")
    df = pd.concat(frames, ignore_index=True)
    free = df[df.dataset == "none"]
    copies = [
        free[free.env == env].assign(dataset=ds)
        for env in free.env.unique()
        for ds in df[(df.env == env) & (df.dataset != "none")].dataset.unique()
    ]
    return pd.concat([df[df.dataset != "none"], *copies], ignore_index=True)


def curves_of_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One curve per run: columns env,dataset,method,seed,finished,env_steps,normalized_score."""
    keys = ["env", "dataset", "method", "seed"]
    out = []
    for key, run in df.groupby(keys, sort=False):
        online = run[run.phase == "online"]
        if online.empty:  # offline pretraining, or a run that has not started fine-tuning
            continue
        policies = list(online.policy.unique())
        policy = next((p for p in POLICY_PREFERENCE if p in policies), policies[0])
        curve = online[online.policy == policy][["env_steps", "normalized_score"]]
        offline = run[(run.phase == "offline") & (run.policy == policy)]
        if len(offline) and curve.env_steps.min() > 0:
            start = offline.iloc[[-1]][["normalized_score"]].assign(env_steps=0)
            curve = pd.concat([start, curve], ignore_index=True)
        finished = int(run["finished"].min()) if "finished" in run else 1
        out.append(curve.assign(**dict(zip(keys, key)), finished=finished))
    cols = keys + ["finished", "env_steps", "normalized_score"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def mean_se(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over seeds at each (task, method, env_steps)."""
    g = curves.groupby(["env", "dataset", "method", "env_steps"]).normalized_score
    s = g.agg(mean="mean", std="std", n="count").reset_index()
    s["se"] = (s["std"] / np.sqrt(s["n"])).fillna(0.0)
    return s


def final_scores(curves: pd.DataFrame, last: int = 1) -> pd.DataFrame:
    """Final score of each run: mean of its last `last` evaluations."""
    c = curves.sort_values("env_steps")
    return (
        c.groupby(["env", "dataset", "method", "seed"])
        .agg(
            score=("normalized_score", lambda s: s.iloc[-last:].mean()),
            env_steps=("env_steps", "max"),
            finished=("finished", "min"),
        )
        .reset_index()
    )


def ordered(values, order) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def tasks_of(df: pd.DataFrame) -> list:
    pairs = set(zip(df.env, df.dataset))
    return [
        (e, d)
        for e in ordered([p[0] for p in pairs], ENV_ORDER)
        for d in ordered([p[1] for p in pairs], DATASET_ORDER)
        if (e, d) in pairs
    ]


def score_matrices(finals: pd.DataFrame, methods) -> tuple:
    """method -> array [seeds, tasks] for rliable; a seed missing any task is dropped (noted)."""
    tasks, mats, notes = tasks_of(finals), {}, []
    for m in methods:
        t = finals[finals.method == m].pivot_table(index="seed", columns=["env", "dataset"], values="score")
        t = t.reindex(columns=pd.MultiIndex.from_tuples(tasks, names=["env", "dataset"]))
        full = t.dropna()
        if len(full) < len(t):
            notes.append(
                f"{m}: seeds {sorted(set(t.index) - set(full.index))} lack some tasks and are left out of the aggregate"
            )
        if len(full):
            mats[m] = full.to_numpy()
    return mats, tasks, notes


def aggregate(mats: dict, reps: int = 50_000, seed: int = 0) -> dict:
    """rliable: IQM and mean with 95% stratified bootstrap CIs -> method -> (point[2], ci[2, 2])."""
    from rliable import library as rly
    from rliable import metrics

    fn = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])  # noqa: E731
    with warnings.catch_warnings():  # rliable passes arch the random_state it deprecates
        warnings.simplefilter("ignore", FutureWarning)
        points, cis = rly.get_interval_estimates(mats, fn, reps=reps, random_state=np.random.RandomState(seed))
    return {m: (points[m], cis[m]) for m in mats}


def markdown(finals: pd.DataFrame, agg: dict, mats: dict, tasks: list, methods, notes) -> str:
    steps = sorted(finals.env_steps.unique())
    when = f"{steps[0]:,}" if len(steps) == 1 else f"{steps[0]:,}–{steps[-1]:,}"
    lines = [
        f"Final D4RL normalized score after {when} online env steps; aggregate over "
        f"{len(tasks)} task(s): IQM and mean with 95% stratified bootstrap CIs (rliable).",
        "",
        "| Method | Runs | IQM | 95% CI | Mean | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for m in methods:
        if m in agg:
            (iqm, mean), ci = agg[m]
            lines.append(
                f"| {LABELS.get(m, m)} | {mats[m].size} | {iqm:.1f} | "
                f"[{ci[0, 0]:.1f}, {ci[1, 0]:.1f}] | {mean:.1f} | "
                f"[{ci[0, 1]:.1f}, {ci[1, 1]:.1f}] |"
            )
    lines += [
        "",
        "Per task: final normalized score, mean ± standard error over seeds (number of seeds).",
        "",
        "| Task | " + " | ".join(LABELS.get(m, m) for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for env, ds in tasks:
        cells = []
        for m in methods:
            s = finals[(finals.env == env) & (finals.dataset == ds) & (finals.method == m)].score
            se = s.std() / np.sqrt(len(s)) if len(s) > 1 else 0.0
            cells.append(f"{s.mean():.1f} ± {se:.1f} ({len(s)})" if len(s) else "–")
        lines.append(f"| {env} {ds} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"Note: {n}" for n in notes]).rstrip() + "\n"


def figure(stats: pd.DataFrame, tasks: list, methods, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(tasks))
    nrows = -(-len(tasks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(ordered(methods, METHOD_ORDER))}
    for ax, (env, ds) in zip(axes.flat, tasks):
        for m in methods:
            s = stats[(stats.env == env) & (stats.dataset == ds) & (stats.method == m)]
            if s.empty:
                continue
            ax.plot(s.env_steps, s["mean"], color=colors[m], label=LABELS.get(m, m), lw=1.5, marker="o", ms=3)
            ax.fill_between(s.env_steps, s["mean"] - s.se, s["mean"] + s.se, color=colors[m], alpha=0.2, lw=0)
        ax.set_title(f"{env} {ds}")
        ax.set_xlabel("online env steps")
        ax.set_ylabel("normalized score")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat[1 : len(tasks)]:  # methods missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 if nrows == 1 else 0.04, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Ablations of one task: replay schemes and ensemble sizes
# ---------------------------------------------------------------------------------------------
ABLATION_COLUMNS = ("config", "replay", "members", "seed", "env_steps", "updates", "return_mean", "normalized_score")
REPLAY_ORDER = ("balanced", "uniform", "online-only")
REPLAY_LABELS = {"balanced": "balanced replay", "uniform": "uniform replay", "online-only": "online only"}


def collect_ablation(folder: str) -> pd.DataFrame:
    """Online evaluations of the run folders <replay>-N<members>__seed<S>/evals.csv under `folder`."""
    frames = []
    for run_dir in find_run_dirs(folder):
        name = os.path.basename(os.path.normpath(run_dir))
        config, _, seed = name.partition("__seed")
        replay, _, members = config.rpartition("-N")
        if not (seed.isdigit() and members.isdigit() and replay):
            raise ValueError(
                f"{run_dir}: expected a folder named <replay>-N<members>__seed<S>, e.g. balanced-N5__seed0"
            )
        evals = pd.read_csv(os.path.join(run_dir, "evals.csv"))
        evals = evals[(evals.phase == "online") & (evals.policy == "ensemble")]
        frames.append(evals.assign(config=config, replay=replay, members=int(members), seed=int(seed)))
    if not frames:
        raise ValueError(f"no run folders with evals.csv in {folder}")
    df = pd.concat(frames, ignore_index=True)[list(ABLATION_COLUMNS)]
    return df.sort_values(["members", "replay", "seed", "env_steps"], ignore_index=True)


def seed_stats(values: pd.Series) -> tuple:
    """mean, standard error (0 for one seed) and number of seeds."""
    n = len(values)
    se = values.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0
    return values.mean(), se, n


def ablation_table(df: pd.DataFrame, configs: list, window: int, steps) -> str:
    """Per config: start, worst in (0, window], the score at each of `steps`: mean ± s.e. over seeds."""
    head = ["config", "seeds", "start (0 steps)", f"worst in 1–{window // 1000}k"] + [f"at {s // 1000}k" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for config in configs:
        runs = df[df.config == config]
        per_seed = {
            "start": runs[runs.env_steps == 0].groupby("seed").normalized_score.first(),
            "worst": runs[(runs.env_steps > 0) & (runs.env_steps <= window)].groupby("seed").normalized_score.min(),
        }
        for step in steps:
            per_seed[step] = runs[runs.env_steps == step].groupby("seed").normalized_score.first()
        cells = []
        for key in ["start", "worst", *steps]:
            if per_seed[key].empty:
                cells.append("–")
                continue
            mean, se, n = seed_stats(per_seed[key])
            spread = f" ± {se:.1f}" if n > 1 else ""  # no standard error from one seed
            cells.append(f"{mean:.1f}{spread}" + ("" if n == runs.seed.nunique() else f" ({n} seeds)"))
        lines.append(f"| {config} | {runs.seed.nunique()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_figure(df: pd.DataFrame, configs: list, labels: dict, path: str, title: str) -> None:
    """Mean ± s.e. over seeds against online env steps; a dotted line at each config's start score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for i, config in enumerate(configs):
        runs = df[df.config == config]
        stats = runs.groupby("env_steps").normalized_score.agg(["mean", "std", "count"]).reset_index()
        se = (stats["std"] / np.sqrt(stats["count"])).fillna(0.0)
        color = plt.cm.tab10(i)
        label = f"{labels[config]} ({runs.seed.nunique()} seeds)"
        ax.plot(stats.env_steps, stats["mean"], color=color, lw=1.5, marker="o", ms=2.5, label=label)
        ax.fill_between(stats.env_steps, stats["mean"] - se, stats["mean"] + se, color=color, alpha=0.2, lw=0)
        start = stats[stats.env_steps == 0]["mean"]
        if len(start):
            ax.axhline(float(start.iloc[0]), color=color, ls=":", lw=1)
    ax.set_xlabel("online env steps")
    ax.set_ylabel("D4RL normalized score")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation(args: Args) -> str:
    if args.ablation.endswith(".csv"):
        df = pd.read_csv(args.ablation)
    else:
        df = collect_ablation(args.ablation)
        df.to_csv(args.out + ".csv", index=False)
    replay_configs = [f"{r}-N5" for r in REPLAY_ORDER if f"{r}-N5" in set(df.config)]
    sizes = sorted(df[df.replay == "balanced"].members.unique())
    ensemble_configs = [f"balanced-N{n}" for n in sizes]
    panels = [
        ("replay", replay_configs, {c: REPLAY_LABELS[c[:-3]] for c in replay_configs}, "replay schemes, N = 5"),
        (
            "ensemble",
            ensemble_configs,
            {c: f"N = {c.rpartition('-N')[2]}" for c in ensemble_configs},
            "ensemble size, balanced replay",
        ),
    ]
    lines = []
    for name, configs, labels, what in panels:
        if not configs:
            continue
        title = f"{args.title}: {what}" if args.title else what
        ablation_figure(df, configs, labels, f"{args.out}_{name}.png", title)
        lines += [f"{what[0].upper()}{what[1:]}: D4RL normalized score, mean ± standard error over seeds.", ""]
        lines += [ablation_table(df, configs, args.collapse_window, args.table_steps), ""]
    table = "\n".join(lines)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table + f"\nwrote {args.out}.md and the figures {args.out}_*.png")
    return table


def main(args: Args) -> str:
    if args.ablation:
        if not os.path.exists(args.ablation):
            raise ValueError(f"no such file or folder: {args.ablation}")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        return ablation(args)
    if not args.results and not args.runs:
        raise ValueError("give --results CSV(s) from benchmark.py and/or --runs run directories")
    for p in args.results + args.runs:
        if not os.path.exists(p):
            raise ValueError(f"no such file or folder: {p}")
    frames = ([load_results(args.results)] if args.results else []) + ([load_runs(args.runs)] if args.runs else [])
    df = pd.concat(frames, ignore_index=True)
    methods = list(args.methods) or ordered(df.method.unique(), METHOD_ORDER)
    df = df[df.method.isin(methods)]
    if df.empty:
        raise ValueError(f"no rows for methods {', '.join(methods)}")
    curves = curves_of_runs(df)
    tasks = tasks_of(curves)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    figure(mean_se(curves), tasks, methods, args.out + ".png", args.title)
    finals = final_scores(curves, args.last)
    notes = []
    if not args.include_unfinished and (finals.finished == 0).any():
        notes.append(
            f"{int((finals.finished == 0).sum())} unfinished run(s) left out (--include-unfinished counts them)"
        )
        finals = finals[finals.finished == 1]
    mats, tasks, more = score_matrices(finals, methods)
    table = markdown(
        finals,
        aggregate(mats, args.reps, args.seed),
        mats,
        tasks,
        [m for m in methods if m in set(finals.method)],
        notes + more,
    )
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table + f"\nwrote {args.out}.png and {args.out}.md")
    return table


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""plot.py on a small synthetic results table: PNG, curves (mean ± s.e.), aggregate values."""

import os

import numpy as np
import pandas as pd
import pytest

import plot

# final normalized scores [seed][task] for two methods on two tasks, four seeds
FINAL = {
    "off2on": [[1, 5], [2, 6], [3, 7], [4, 8]],  # 1..8: IQM = mean(3,4,5,6) = 4.5 = mean
    "awac": [[0, 10], [10, 10], [10, 10], [10, 1000]],  # IQM = 10 (outliers trimmed), mean = 132.5
}
TASKS = [("hopper", "medium-replay"), ("walker2d", "medium-replay")]


def synthetic() -> pd.DataFrame:
    """benchmark.py's results.csv layout: an offline start, then online evals at 1000 and 2000
    (the final one = FINAL); SAC (no dataset) only has online rows."""
    rows = []
    for method, table in FINAL.items():
        for seed, scores in enumerate(table):
            for (env, ds), final in zip(TASKS, scores):
                base = dict(
                    env=env,
                    dataset=ds,
                    method=method,
                    seed=seed,
                    finished=1,
                    updates=0,
                    return_mean=0.0,
                    return_std=0.0,
                    wall_time_s=1.0,
                )
                policy = "ensemble" if method == "off2on" else "policy"
                rows.append({**base, "phase": "offline", "env_steps": 0, "policy": policy, "normalized_score": -1.0})
                if method == "off2on":  # a member's evaluation must not be mixed in
                    rows.append(
                        {**base, "phase": "online", "env_steps": 1000, "policy": "member0", "normalized_score": 999.0}
                    )
                rows.append(
                    {**base, "phase": "online", "env_steps": 1000, "policy": policy, "normalized_score": float(seed)}
                )
                rows.append(
                    {**base, "phase": "online", "env_steps": 2000, "policy": policy, "normalized_score": float(final)}
                )
    return pd.DataFrame(rows)


def test_curves_mean_and_standard_error():
    curves = plot.curves_of_runs(synthetic())
    assert len(curves) == 2 * 4 * 2 * 3  # methods x seeds x tasks x (start, 1000, 2000)
    s = plot.mean_se(curves).set_index(["env", "dataset", "method", "env_steps"])
    start = s.loc[("hopper", "medium-replay", "off2on", 0)]
    assert start["mean"] == -1.0 and start["se"] == 0.0  # the offline start point
    mid = s.loc[("hopper", "medium-replay", "off2on", 1000)]  # seeds 0..3, members excluded
    assert mid["mean"] == pytest.approx(1.5)
    assert mid["se"] == pytest.approx(np.std([0, 1, 2, 3], ddof=1) / 2)
    end = s.loc[("walker2d", "medium-replay", "awac", 2000)]
    assert end["mean"] == pytest.approx(257.5)  # (10 + 10 + 10 + 1000) / 4


def test_final_scores_and_aggregate():
    curves = plot.curves_of_runs(synthetic())
    finals = plot.final_scores(curves)
    mats, tasks, notes = plot.score_matrices(finals, ["off2on", "awac"])
    assert tasks == TASKS and not notes
    np.testing.assert_array_equal(mats["off2on"], np.array(FINAL["off2on"]))
    agg = plot.aggregate(mats, reps=2000, seed=0)
    (iqm, mean), ci = agg["off2on"]
    assert iqm == pytest.approx(4.5) and mean == pytest.approx(4.5)
    (iqm, mean), ci_awac = agg["awac"]
    assert iqm == pytest.approx(10.0) and mean == pytest.approx(132.5)
    for point, ci_ in agg.values():  # CIs bracket the point estimates, ordered low <= high
        assert np.all(ci_[0] <= point + 1e-9) and np.all(point <= ci_[1] + 1e-9)
    assert ci[0, 0] >= 1 and ci[1, 0] <= 8  # within the range of the scores
    assert ci_awac[1, 1] > 132.5 > ci_awac[0, 1]  # the outlier makes the mean's CI wide
    # last=2: mean of the last two evaluations (seed and final)
    two = plot.final_scores(curves, last=2).set_index(["env", "dataset", "method", "seed"])
    assert two.loc[("walker2d", "medium-replay", "awac", 3), "score"] == pytest.approx(501.5)


def test_main_writes_png_and_table(tmp_path):
    csv = tmp_path / "results.csv"
    df = synthetic()
    df.loc[(df.method == "awac") & (df.seed == 3), "finished"] = 0  # an unfinished run
    df.to_csv(csv, index=False)
    out = str(tmp_path / "fig" / "results")
    table = plot.main(plot.Args(results=(str(csv),), out=out, reps=500))
    with open(out + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out + ".png") < 300_000
    assert open(out + ".md").read() == table
    lines = table.splitlines()
    off2on = next(line for line in lines if line.startswith("| Off2On (ours) | 8 |"))
    assert "| 4.5 |" in off2on
    # awac seed 3 is unfinished: left out; IQM of [0, 10, 10, 10, 10, 10] = mean(10, 10, 10) = 10
    awac = next(line for line in lines if line.startswith("| AWAC | 6 |"))
    assert "| 10.0 |" in awac and "| 8.3 |" in awac  # mean = 50 / 6
    assert "unfinished" in table and "hopper medium-replay" in table
    # per task: off2on on hopper has finals 1..4 -> 2.5 ± std/2
    row = next(line for line in lines if line.startswith("| hopper medium-replay |"))
    assert f"2.5 ± {np.std([1, 2, 3, 4], ddof=1) / 2:.1f} (4)" in row


def test_run_dirs_as_input(tmp_path):
    """Run directories (benchmark.py's or the scripts' own) load with env/dataset/method/seed;
    SAC from scratch (dataset `none`) appears in each dataset of its env."""
    cols = "phase,updates,env_steps,policy,return_mean,return_std,normalized_score,wall_time_s\n"
    runs = {
        "hopper__medium__off2on_finetune__seed3__1700000000": "online,0,0,ensemble,0,0,5.0,1\n"
        "online,1,1000,ensemble,0,0,7.0,1\n",
        "hopper__medium-replay__awac__seed0": "online,1,1000,policy,0,0,3.0,1\n",
        "hopper__none__sac__seed0": "online,1,1000,policy,0,0,2.0,1\n",
        "hopper__medium__cql_ensemble__seed0": "offline,10,0,ensemble,0,0,9.0,1\n",
        "halfcheetah__none__sac__seed0": "online,1,1000,policy,0,0,1.0,1\n",
        "halfcheetah__medium__awac__seed0": "online,1,1000,policy,0,0,4.0,1\n",
    }
    for name, body in runs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "evals.csv").write_text(cols + body)
    (tmp_path / "hopper__medium-replay__awac__seed0" / "DONE").write_text("")
    df = plot.load_runs([str(tmp_path)])
    ft = df[df.method == "off2on"]
    assert set(ft.seed) == {3} and set(ft.dataset) == {"medium"} and set(ft.finished) == {1}
    sac = df[df.method == "sac"]  # each env's SAC runs go to that env's datasets only
    assert sorted(sac[sac.env == "hopper"].dataset) == ["medium", "medium-replay"]
    assert list(sac[sac.env == "halfcheetah"].dataset) == ["medium"]
    assert set(df[df.method == "sac"].finished) == {0}  # no DONE: interrupted or running
    curves = plot.curves_of_runs(df)
    assert "cql_ensemble" not in set(curves.method)  # offline-only runs are not curves
    assert (
        len(plot.main(plot.Args(runs=(str(tmp_path),), out=str(tmp_path / "r"), reps=100, include_unfinished=True))) > 0
    )
    with pytest.raises(ValueError, match="no such file"):
        plot.main(plot.Args(results=(str(tmp_path / "missing.csv"),), out=str(tmp_path / "x")))


# ----------------------------------------------------------------------------- ablation mode
ABLATION_BASE = {
    "balanced-N5": 40.0,
    "uniform-N5": 30.0,
    "online-only-N5": 20.0,
    "balanced-N1": 10.0,
    "balanced-N2": 25.0,
}


def ablation_score(config: str, seed: int, step: int) -> float:
    """Known curves: a dip of 8 at 2k steps, then +1 per 1k steps; seeds 0, 1, 2 add 0, 3, 6 (s.e. = 3/sqrt(3))."""
    dip = -8.0 if step == 2000 else 0.0
    return ABLATION_BASE[config] + 3.0 * seed + dip + step / 1000


def write_ablation_runs(root, steps=range(0, 26_000, 1_000)):
    for config in ABLATION_BASE:
        for seed in range(3):
            run = root / f"{config}__seed{seed}"
            run.mkdir(parents=True)
            rows = ["phase,updates,env_steps,policy,return_mean,return_std,normalized_score,wall_time_s"]
            for step in steps:
                score = ablation_score(config, seed, step)
                rows.append(f"online,{2 * step},{step},ensemble,{score * 10:.3f},1.0,{score:.3f},1.0")
            (run / "evals.csv").write_text("\n".join(rows) + "\n")


def test_ablation_collects_runs_and_tabulates_known_means(tmp_path):
    write_ablation_runs(tmp_path / "runs")
    out = str(tmp_path / "out" / "ablation")
    table = plot.main(plot.Args(ablation=str(tmp_path / "runs"), out=out))
    df = pd.read_csv(out + ".csv")
    assert list(df.columns) == list(plot.ABLATION_COLUMNS)
    assert len(df) == 5 * 3 * 26 and set(df.members) == {1, 2, 5}
    row = df[(df.config == "online-only-N5") & (df.seed == 2) & (df.env_steps == 7000)].iloc[0]
    assert (row.replay, row.members, row.updates) == ("online-only", 5, 14000)
    assert row.normalized_score == pytest.approx(20 + 6 + 7)
    se = f"{3 / np.sqrt(3):.1f}"  # seeds differ by 0, 3, 6: s.e. = std / sqrt(3) = 3 / sqrt(3)
    # balanced-N5: start 40 + 3 = 43; worst in 1..5k = the dip at 2k: 43 - 8 + 2 = 37; at 10k: 53; at 25k: 68
    assert f"| balanced-N5 | 3 | 43.0 ± {se} | 37.0 ± {se} | 53.0 ± {se} | 68.0 ± {se} |" in table
    assert f"| balanced-N1 | 3 | 13.0 ± {se} | 7.0 ± {se} | 23.0 ± {se} | 38.0 ± {se} |" in table
    for name in ("replay", "ensemble"):
        assert os.path.getsize(f"{out}_{name}.png") > 10_000
    # the same table drawn again from the collected CSV
    again = plot.main(plot.Args(ablation=out + ".csv", out=str(tmp_path / "again")))
    assert again == table


def test_ablation_table_of_one_seed_has_no_standard_error(tmp_path):
    write_ablation_runs(tmp_path / "runs")
    df = plot.collect_ablation(str(tmp_path / "runs"))
    table = plot.ablation_table(df[df.seed == 0], ["balanced-N5"], 5000, [10_000, 25_000])
    # seed 0 alone: start 40, worst in 1..5k 40 - 8 + 2 = 34, at 10k 50, at 25k 65; one seed has no s.e.
    assert "| balanced-N5 | 1 | 40.0 | 34.0 | 50.0 | 65.0 |" in table


def test_ablation_rejects_badly_named_run_folders(tmp_path):
    (tmp_path / "runs" / "balanced_seed0").mkdir(parents=True)
    (tmp_path / "runs" / "balanced_seed0" / "evals.csv").write_text("phase\n")
    with pytest.raises(ValueError, match="<replay>-N<members>__seed<S>"):
        plot.main(plot.Args(ablation=str(tmp_path / "runs"), out=str(tmp_path / "x")))

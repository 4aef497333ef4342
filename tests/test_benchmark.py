"""benchmark.py: grid expansion, skip/resume, result collection, one small Ray run (fake scripts)."""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

import benchmark as bm

# A stand-in for every script: makes datasets, ensemble files and runs with evals.csv, one
# checkpoint per evaluation; FAKE_CRASH=<run dir name>:<step> exits 1 there (an interrupted run).
FAKE = r"""
import json, os, sys, time
a = sys.argv[1:]
def opt(name, default=None):
    return a[a.index(name) + 1] if name in a else default
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(a) + "\n")
if "--kinds" in a:
    for k in a[a.index("--kinds") + 1:]:
        d = os.path.join(os.environ["MINARI_DATASETS_PATH"], "off2on", opt("--env"), k + "-v0")
        os.makedirs(d)
        open(os.path.join(d, "behaviour_policy.pt"), "w").write("policy")
    sys.exit(0)
run_dir = opt("--run-dir")
os.makedirs(run_dir, exist_ok=True)
if os.environ.get("FAKE_SLEEP"):  # a long run: says its pid, then sleeps
    open(os.path.join(run_dir, "pid"), "w").write(str(os.getpid()))
    time.sleep(float(os.environ["FAKE_SLEEP"]))
ckpt, csv_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "evals.csv")
if "--checkpoint" in a and not os.path.exists(opt("--checkpoint")):
    sys.exit(2)
start = 0
if "--resume" in a:
    start = json.load(open(ckpt))["step"]
else:
    open(csv_path, "w").write("phase,updates,env_steps,policy,return_mean,return_std,normalized_score,wall_time_s\n")
crash = os.environ.get("FAKE_CRASH", ":").split(":")
total, every = int(opt("--online-steps", 4)), int(opt("--eval-every", 1))
for step in range(start + every, total + 1, every):
    score = 10 * int(opt("--seed")) + step
    open(csv_path, "a").write(f"online,{step},{step},policy,{score},0.0,{score},0.1\n")
    json.dump({"step": step}, open(ckpt, "w"))
    if os.path.basename(run_dir) == crash[0] and step == int(crash[1]):
        sys.exit(1)
if opt("--export-path"):
    os.makedirs(os.path.dirname(opt("--export-path")), exist_ok=True)
    open(opt("--export-path"), "w").write("ensemble")
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Every method/stage mapped to the fake script; returns a reader of its invocations."""
    path = tmp_path / "fake.py"
    path.write_text(FAKE)
    calls = tmp_path / "calls.jsonl"
    calls.write_text("")
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    scripts = {name: str(path) for name in bm.SCRIPTS}

    def invocations():
        return [line for line in calls.read_text().splitlines() if line]

    return scripts, invocations


def make_args(tmp_path, **kw):
    base = dict(
        methods=("off2on", "sac", "awac"),
        envs=("hopper",),
        datasets=("medium-replay", "medium"),
        seeds=(0, 1),
        out=str(tmp_path / "out"),
        online_steps=4,
        eval_every=2,
        minari_dir=str(tmp_path / "minari"),
    )
    base.update(kw)
    return bm.Args(**base)


def run_serially(jobs, lock=""):
    """Run jobs in list order, handing each its dependencies' results as Ray would."""
    results = {}
    for job in jobs:
        results[job.name] = bm.run_job(job, *[results[d] for d in job.deps], lock=lock)
    return results


def test_grid_expansion(tmp_path, fake):
    scripts, _ = fake
    jobs = bm.expand(
        make_args(
            tmp_path,
            extra=("off2on=--replay uniform", "all=--device cpu", "make_dataset=--steps 100"),
            pretrain_eval_every=500,
        ),
        scripts,
    )
    names = [j.name for j in jobs]
    # 1 dataset job + 2 datasets x 2 seeds pretraining + (off2on, awac) x 2 x 2 + sac x 2 seeds
    assert len(jobs) == 1 + 4 + 8 + 2
    assert names[0] == "hopper__make_dataset" and len(set(names)) == len(names)
    assert [j.stage for j in jobs].count("pretrain") == 4
    by = {j.name: j for j in jobs}
    # every dependency comes before its dependant
    for i, j in enumerate(jobs):
        assert all(names.index(d) < i for d in j.deps)
    ds = by["hopper__make_dataset"]
    assert ds.cmd[-3:] == ["--kinds", "medium-replay", "medium"] and "--steps" in ds.cmd
    assert ds.cmd[ds.cmd.index("--work-dir") + 1] == str(tmp_path / "out" / "make_dataset" / "hopper")
    assert "--device" not in ds.cmd  # "all" is for the algorithm scripts only
    ft = by["hopper__medium__off2on__seed1"]
    assert ft.deps == ["hopper__make_dataset", "hopper__medium__cql_ensemble__seed1"]
    ckpt = ft.cmd[ft.cmd.index("--checkpoint") + 1]
    assert ckpt == by["hopper__medium__cql_ensemble__seed1"].done_paths[0]
    assert ckpt.endswith("checkpoints/hopper__medium__cql_ensemble__seed1.pt")
    assert ft.cmd[-4:] == ["--device", "cpu", "--replay", "uniform"]
    assert ft.run_dir.endswith(os.path.join("runs", "hopper__medium__off2on__seed1"))
    # size flags go only where the script takes them
    pre = by["hopper__medium__cql_ensemble__seed0"]
    assert "--online-steps" not in pre.cmd and "--export-path" in pre.cmd
    assert pre.cmd[pre.cmd.index("--eval-every") + 1] == "500" and pre.cmd.count("--eval-every") == 1
    assert ft.cmd[ft.cmd.index("--online-steps") + 1] == "4" and "--offline-updates" not in ft.cmd
    # SAC from scratch: one run per env/seed, no dataset, no dependency
    sac = [j for j in jobs if j.meta.get("method") == "sac"]
    assert [j.name for j in sac] == ["hopper__none__sac__seed0", "hopper__none__sac__seed1"]
    assert all("--dataset" not in j.cmd and not j.deps for j in sac)
    assert all(j.env == {"MINARI_DATASETS_PATH": str(tmp_path / "minari")} for j in jobs)


def test_grid_options(tmp_path, fake):
    scripts, _ = fake
    jobs = bm.expand(make_args(tmp_path, shared_pretrain=True), scripts)
    pre = [j for j in jobs if j.stage == "pretrain"]
    assert [j.meta["seed"] for j in pre] == [0, 0]
    ft = [j for j in jobs if j.meta.get("method") == "off2on" and j.meta["seed"] == 1]
    assert all(j.deps[-1].endswith("cql_ensemble__seed0") for j in ft)
    # only dataset-free methods, or datasets that are not local kinds: no dataset stage
    assert all(j.stage != "dataset" for j in bm.expand(make_args(tmp_path, methods=("sac",)), scripts))
    jobs = bm.expand(make_args(tmp_path, methods=("awac",), datasets=("/data/hopper-x.hdf5",)), scripts)
    assert [j.name for j in jobs] == ["hopper__hopper-x__awac__seed0", "hopper__hopper-x__awac__seed1"]
    # explicit tasks instead of the envs x datasets product; SAC once per env
    jobs = bm.expand(
        make_args(tmp_path, envs=(), datasets=(), tasks=("hopper:medium-replay", "walker2d:medium", "walker2d:random")),
        scripts,
    )
    assert [j.name for j in jobs if j.stage == "dataset"] == ["hopper__make_dataset", "walker2d__make_dataset"]
    assert next(j for j in jobs if j.name == "walker2d__make_dataset").cmd[-3:] == ["--kinds", "medium", "random"]
    runs = {j.name.rsplit("__seed", 1)[0] for j in jobs if j.stage == "run"}
    assert runs == {
        "hopper__medium-replay__off2on",
        "hopper__medium-replay__awac",
        "hopper__none__sac",
        "walker2d__medium__off2on",
        "walker2d__medium__awac",
        "walker2d__random__off2on",
        "walker2d__random__awac",
        "walker2d__none__sac",
    }
    # --prepare-only: datasets and ensembles only
    jobs = bm.expand(make_args(tmp_path, prepare_only=True), scripts)
    assert {j.stage for j in jobs} == {"dataset", "pretrain"} and len(jobs) == 5
    with pytest.raises(ValueError, match="ENV:DATASET"):
        bm.expand(make_args(tmp_path, tasks=("hopper",)), scripts)
    with pytest.raises(ValueError, match="unknown method"):
        bm.expand(make_args(tmp_path, methods=("cql",)), scripts)
    with pytest.raises(ValueError, match="NAME=ARGS"):
        bm.expand(make_args(tmp_path, extra=("--replay uniform",)), scripts)


def test_skip_resume_and_collect(tmp_path, fake, monkeypatch):
    scripts, invocations = fake
    args = make_args(tmp_path)
    jobs = bm.expand(args, scripts)
    # first pass: one run is interrupted after its first evaluation
    monkeypatch.setenv("FAKE_CRASH", "hopper__medium__awac__seed1:2")
    res = run_serially(jobs)
    assert res["hopper__medium__awac__seed1"]["status"] == "failed"
    assert sum(r["status"] == "done" for r in res.values()) == len(jobs) - 1
    assert len(invocations()) == len(jobs)
    crashed = next(j for j in jobs if j.name == "hopper__medium__awac__seed1")
    assert bm.state(crashed) == "resume" and not os.path.exists(os.path.join(crashed.run_dir, "DONE"))
    assert "exit code 1" in open(crashed.log).read()
    # the dry run shows it, with --resume
    monkeypatch.setattr(sys, "argv", ["benchmark.py"])
    assert bm.main(bm.Args(**{**vars(args), "dry_run": True}), scripts=scripts) == 0
    # second pass: everything else is skipped, the interrupted run resumes from its checkpoint
    monkeypatch.delenv("FAKE_CRASH")
    jobs = bm.expand(args, scripts)  # the same grid again, from a fresh planner
    res = run_serially(jobs, lock=str(tmp_path / "heavy.lock"))
    again = invocations()[len(jobs) :]
    assert len(again) == 1 and "--resume" in again[0] and "awac__seed1" in again[0]
    assert res["hopper__medium__awac__seed1"]["status"] == "done"
    assert res["hopper__medium__awac__seed1"]["resumed"]
    assert "waiting for" in open(crashed.log).read()  # it went through the lock
    assert sum(r["status"] == "skipped" for r in res.values()) == len(jobs) - 1
    with open(os.path.join(crashed.run_dir, "evals.csv")) as f:
        assert [r["env_steps"] for r in csv.DictReader(f)] == ["2", "4"]  # no step lost or doubled
    # a failed dependency stops its dependants without running them
    bad = bm.Job("x", "run", ["false"], str(tmp_path / "x.log"), [str(tmp_path / "never")])
    r = bm.run_job(bad, {"name": "dep", "status": "failed"})
    assert r["status"] == "dep-failed" and not os.path.exists(tmp_path / "x.log")
    # collection: env,dataset,method,seed + evals.csv columns; SAC copied into every dataset
    out = tmp_path / "results.csv"
    n = bm.collect(jobs, str(out), bm.task_pairs(args))
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n == (2 * 2 * 2 + 2 * 2) * 2  # (off2on, awac) x 2 ds x 2 seeds + sac x 2 ds x 2
    assert list(rows[0])[:5] == ["env", "dataset", "method", "seed", "finished"]
    assert list(rows[0])[5:] == [
        "phase",
        "updates",
        "env_steps",
        "policy",
        "return_mean",
        "return_std",
        "normalized_score",
        "wall_time_s",
    ]
    sac = [r for r in rows if r["method"] == "sac" and r["seed"] == "1"]
    assert sorted(r["dataset"] for r in sac) == ["medium", "medium", "medium-replay", "medium-replay"]
    assert {r["normalized_score"] for r in sac} == {"12", "14"}  # 10 * seed + step
    assert all(r["finished"] == "1" for r in rows)


def test_ray_local_two_jobs(tmp_path, fake):
    pytest.importorskip("ray")
    scripts, invocations = fake
    args = make_args(tmp_path, methods=("sac",), workers=2)
    assert bm.main(args, scripts=scripts) == 0
    assert len(invocations()) == 2
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["seed"] for r in rows} == {"0", "1"}
    # a second call finds both finished and runs nothing
    assert bm.main(args, scripts=scripts) == 0
    assert len(invocations()) == 2


DRIVER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import benchmark as bm
args = bm.Args(methods=("sac",), envs=("hopper",), datasets=("medium",), seeds=(0,), out=sys.argv[2],
               online_steps=4, eval_every=2, minari_dir=sys.argv[3], workers=1)
sys.exit(bm.main(args, scripts={name: sys.argv[4] for name in bm.SCRIPTS}))
"""


def _gone(pid: int) -> bool:
    """True once pid has exited (a zombie left for a non-reaping init counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_sweep_and_its_runs(tmp_path, fake, sig):
    """A driver started in the background (SIGINT ignored, as `cmd &` does) stops on kill -INT or
    kill -TERM with exit code 130, and takes its running scripts with it."""
    pytest.importorskip("ray")
    scripts, _ = fake
    (tmp_path / "driver.py").write_text(DRIVER)
    out = tmp_path / "out"
    env = {**os.environ, "FAKE_SLEEP": "300"}
    proc = subprocess.Popen(
        [sys.executable, str(tmp_path / "driver.py"), ROOT, str(out), str(tmp_path / "minari"), scripts["sac"]],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    pid_file = out / "runs" / "hopper__none__sac__seed0" / "pid"
    try:
        deadline = time.time() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None and time.time() < deadline, "the fake run never started"
            time.sleep(0.2)
        run_pid = int(pid_file.read_text())
        proc.send_signal(getattr(signal, sig))
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    assert "run the same command again to resume" in output
    deadline = time.time() + 30
    while not _gone(run_pid):
        assert time.time() < deadline, "the running script outlived the sweep"
        time.sleep(0.2)


@pytest.mark.parametrize("name", sorted(bm.SIZE_FLAGS))
def test_size_flags_exist_in_scripts(name):
    """Every flag the runner passes is a field of that script's Args (read from its source)."""
    path = os.path.join(ROOT, bm.SCRIPTS[name])
    if not os.path.exists(path):
        pytest.skip(f"{bm.SCRIPTS[name]} not written yet")
    src = open(path).read()
    fields = set(re.findall(r"^    (\w+): ", src, re.M))
    needed = set(bm.SIZE_FLAGS[name]) | {"env"}
    needed |= {"kinds", "work_dir"} if name == "make_dataset" else {"seed", "run_dir", "resume"}
    needed |= {"dataset"} if name not in bm.DATASET_FREE + ("make_dataset",) else set()
    needed |= {"export_path", "eval_every"} if name == "cql_ensemble" else set()
    needed |= {"checkpoint"} if name == "off2on" else set()
    assert needed <= fields, f"{bm.SCRIPTS[name]} lacks {sorted(needed - fields)}"

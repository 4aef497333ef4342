"""Sweep runner: every method x env x dataset x seed of the paper's comparison, run with Ray.

The grid's runs are subprocesses of the algorithm scripts (one per run), scheduled by Ray: on this
machine by default (`--workers` at a time, `--gpus-per-run` a fraction of a GPU each so several runs
share one), or on a Ray cluster with `--ray-address` (every node needs the repository at the same
path and `--out` / the Minari folder on a shared filesystem). Prerequisite stages run first, once,
and are reused by every run that needs them (Ray passes each stage's result to its dependants):

    make_dataset.py --env E --kinds K...        once per env, for the kinds not found locally
    off2on_cql_ensemble.py --env E --dataset D  once per env/dataset/seed, before the off2on runs
    off2on_finetune.py | baselines/*.py         one per grid cell, in <out>/runs/<cell>/

SAC from scratch uses no dataset: it runs once per env/seed and appears in every dataset's panel.

Layout of `--out`:
    runs/<env>__<dataset>__<method>__seed<S>/   a run's run dir (evals.csv, checkpoint.pt, ...),
                                                plus DONE once its script exited with code 0
    checkpoints/<env>__<dataset>__cql_ensemble__seed<S>.pt   the offline ensembles
    logs/<job>.log                              stdout+stderr of every subprocess (appended)
    results.csv                                 every run's evals.csv, with env,dataset,method,seed

    make_dataset/<env>/                         make_dataset.py's work dir (SAC checkpoints)

Re-running the same command skips what is finished (DONE, the ensemble file, a local dataset that
make_dataset.py completed) and resumes what was interrupted (`--run-dir D --resume` when
D/checkpoint.pt exists).

    python benchmark.py --envs hopper --datasets medium-replay --seeds 0 1 2 --workers 2
    python benchmark.py --tasks hopper:medium-replay walker2d:medium ...   # pairs, not a product
    python benchmark.py --dry-run ...          # print the jobs and their commands, run nothing
    python plot.py --results benchmark/results.csv --out docs/results
"""

import csv
import ctypes
import fcntl
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import tyro

ROOT = os.path.dirname(os.path.abspath(__file__))
METHODS = ("off2on", "sac", "sac_ft", "awac", "bcq_ft")
# method or stage -> script, relative to the repository root
SCRIPTS = {
    "make_dataset": "make_dataset.py",
    "cql_ensemble": "off2on_cql_ensemble.py",
    "off2on": "off2on_finetune.py",
    "sac": "baselines/sac.py",
    "sac_ft": "baselines/sac_ft.py",
    "awac": "baselines/awac.py",
    "bcq_ft": "baselines/bcq_ft.py",
}
# which of the runner's size flags each script takes (tests/test_benchmark.py checks the scripts)
SIZE_FLAGS = {
    "make_dataset": (),
    "cql_ensemble": ("offline_updates", "eval_episodes"),  # its --eval-every: --pretrain-eval-every
    "off2on": ("online_steps", "eval_every", "eval_episodes"),
    "sac": ("online_steps", "eval_every", "eval_episodes"),
    "sac_ft": ("offline_updates", "online_steps", "eval_every", "eval_episodes"),
    "awac": ("offline_updates", "online_steps", "eval_every", "eval_episodes"),
    "bcq_ft": ("offline_updates", "online_steps", "eval_every", "eval_episodes"),
}
DATASET_FREE = ("sac",)  # methods that never read the offline dataset
KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
RESULT_COLUMNS = ("env", "dataset", "method", "seed", "finished")


@dataclass
class Args:
    methods: tuple[str, ...] = METHODS
    """methods to run: off2on, sac, sac_ft, awac, bcq_ft"""
    envs: tuple[str, ...] = ("hopper", "halfcheetah", "walker2d")
    """environments (hopper, halfcheetah, walker2d)"""
    datasets: tuple[str, ...] = ("random", "medium", "medium-replay", "medium-expert")
    """dataset kinds (made locally by make_dataset.py when missing), Minari ids or .hdf5 paths"""
    tasks: tuple[str, ...] = ()
    """ENV:DATASET pairs to run instead of every env x dataset, e.g. hopper:medium-replay"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """seeds; each off2on seed fine-tunes the ensemble pretrained with the same seed"""
    out: str = "benchmark"
    """output folder: runs/, checkpoints/, logs/, results.csv"""
    online_steps: int | None = None
    """--online-steps passed to every method (None: each script's default)"""
    offline_updates: int | None = None
    """--offline-updates of the ensemble pretraining and the offline phases (None: default)"""
    eval_every: int | None = None
    """--eval-every passed to every script that takes it (None: default)"""
    eval_episodes: int | None = None
    """--eval-episodes passed to every script that takes it (None: default)"""
    pretrain_eval_every: int | None = None
    """--eval-every of the ensemble pretraining, in updates (None: its default)"""
    extra: tuple[str, ...] = ()
    """more arguments for one script, as NAME=ARGS with NAME a method, make_dataset, cql_ensemble
    or all (every algorithm script), e.g. --extra "make_dataset=--n-steps 100000"
    "off2on=--replay uniform" "all=--device cpu\""""
    shared_pretrain: bool = False
    """pretrain one ensemble per env/dataset (with the first seed) for all off2on seeds"""
    workers: int = 0
    """runs at a time on the local machine (0: one per CPU core); ignored with --ray-address"""
    cpus_per_run: float = 1.0
    """CPU cores Ray reserves for each run (also its OMP_NUM_THREADS, rounded up)"""
    gpus_per_run: float = 0.0
    """GPU share Ray reserves for each run, e.g. 0.25 runs four at a time on each GPU"""
    ray_address: str = ""
    """address of a running Ray cluster (e.g. ray://head:10001 or auto); empty: start one locally"""
    minari_dir: str = ""
    """Minari datasets folder for every job (sets MINARI_DATASETS_PATH; empty: inherit)"""
    lock: str = ""
    """run every subprocess under `flock LOCK` (serializes jobs with other users of a machine)"""
    python: str = sys.executable
    """python interpreter for the scripts"""
    prepare_only: bool = False
    """run only the prerequisite stages (datasets, offline ensembles)"""
    dry_run: bool = False
    """print the jobs (with their state: todo, resume, done) and commands; run nothing"""


@dataclass
class Job:
    """One subprocess. `done_paths` all existing means finished; `deps` are other jobs' names."""

    name: str
    stage: str  # "dataset", "pretrain" or "run"
    cmd: list
    log: str
    done_paths: list
    run_dir: str = ""
    deps: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


def slug(dataset: str) -> str:
    """The file-name-safe dataset name the algorithm scripts use (their `dataset_slug`)."""
    if dataset.endswith(".hdf5"):
        return os.path.splitext(os.path.basename(dataset))[0]
    return dataset.replace("/", "-")


def minari_root(minari_dir: str = "") -> str:
    return (
        minari_dir
        or os.environ.get("MINARI_DATASETS_PATH")
        or os.path.join(os.path.expanduser("~"), ".minari", "datasets")
    )


def made_marker(env: str, kind: str, minari_dir: str = "") -> str:
    """The file make_dataset.py writes last into off2on/<env>/<kind>-v0 (so: a complete dataset)."""
    return os.path.join(minari_root(minari_dir), "off2on", env, f"{kind}-v0", "behaviour_policy.pt")


def parse_extra(extra) -> dict:
    names = set(SCRIPTS) | {"all"}
    out = {}
    for item in extra:
        name, sep, rest = item.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--extra {item!r}: expected NAME=ARGS with NAME one of {', '.join(sorted(names))}")
        out[name] = out.get(name, []) + shlex.split(rest)
    return out


def script_cmd(args: Args, name: str, scripts: dict = SCRIPTS, **fields) -> list:
    """`python <script> --field value ...` + size flags the script takes + --extra args."""
    cmd = [args.python, scripts[name]]
    for k, v in fields.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    for k in SIZE_FLAGS[name]:
        if getattr(args, k) is not None:
            cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    extra = parse_extra(args.extra)
    if name != "make_dataset":  # "all" means the algorithm scripts
        cmd += extra.get("all", [])
    return cmd + extra.get(name, [])


def task_pairs(args: Args) -> list:
    """(env, dataset) pairs of the grid: --tasks, or every env x dataset."""
    if not args.tasks:
        return [(e, d) for e in args.envs for d in args.datasets]
    pairs = [tuple(t.split(":", 1)) for t in args.tasks]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise ValueError(f"--tasks takes ENV:DATASET pairs, got {' '.join(args.tasks)}")
    return pairs


def expand(args: Args, scripts: dict = SCRIPTS) -> list:
    """The grid as a list of Jobs in dependency order (stages before the runs that need them).
    `scripts` maps each method/stage to its script (tests substitute fake scripts)."""
    for m in args.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    pairs = task_pairs(args)
    envs = list(dict.fromkeys(e for e, _ in pairs))
    out = os.path.abspath(args.out)
    env_vars = {"MINARI_DATASETS_PATH": os.path.abspath(args.minari_dir)} if args.minari_dir else {}

    def job(name, stage, cmd, done_paths, run_dir="", deps=(), meta=None):
        return Job(
            name,
            stage,
            cmd,
            os.path.join(out, "logs", f"{name}.log"),
            list(done_paths),
            run_dir,
            list(deps),
            meta or {},
            env_vars,
        )

    jobs, data_job, pretrain = [], {}, {}  # data_job: env -> job name; pretrain: see below
    for env in envs:
        kinds = [d for e, d in pairs if e == env and d in KINDS]
        if kinds and any(m not in DATASET_FREE for m in args.methods):
            made = [made_marker(env, k, args.minari_dir) for k in kinds]
            todo = [k for k, path in zip(kinds, made) if not os.path.exists(path)]
            work = os.path.join(out, "make_dataset", env)  # its SAC checkpoints, for resuming
            cmd = script_cmd(args, "make_dataset", scripts, env=env, work_dir=work)
            data_job[env] = f"{env}__make_dataset"
            jobs.append(job(data_job[env], "dataset", cmd + ["--kinds", *(todo or kinds)], made, meta={"env": env}))
    if "off2on" in args.methods:  # (env, dataset, seed) -> (job name, ensemble file)
        for env, ds in pairs:
            for seed in args.seeds[:1] if args.shared_pretrain else args.seeds:
                name = f"{env}__{slug(ds)}__cql_ensemble__seed{seed}"
                path = os.path.join(out, "checkpoints", f"{name}.pt")
                run_dir = os.path.join(out, "runs", name)
                every = {"eval_every": args.pretrain_eval_every} if args.pretrain_eval_every else {}
                cmd = script_cmd(
                    args,
                    "cql_ensemble",
                    scripts,
                    env=env,
                    dataset=ds,
                    seed=seed,
                    run_dir=run_dir,
                    export_path=path,
                    **every,
                )
                deps = [data_job[env]] if env in data_job else []
                jobs.append(
                    job(name, "pretrain", cmd, [path], run_dir, deps, {"env": env, "dataset": ds, "seed": seed})
                )
                pretrain[env, ds, seed] = (name, path)
    if args.prepare_only:
        return jobs
    for env, ds in pairs:
        for method in args.methods:
            free = method in DATASET_FREE
            if free and (env, ds) != next(p for p in pairs if p[0] == env):
                continue  # one run per env/seed, shown in every dataset panel of the env
            for seed in args.seeds:
                name = f"{env}__{'none' if free else slug(ds)}__{method}__seed{seed}"
                run_dir = os.path.join(out, "runs", name)
                fields, deps = {"env": env, "seed": seed, "run_dir": run_dir}, []
                if not free:
                    fields["dataset"] = ds
                    deps = [data_job[env]] if env in data_job else []
                if method == "off2on":
                    pseed = args.seeds[0] if args.shared_pretrain else seed
                    pname, fields["checkpoint"] = pretrain[env, ds, pseed]
                    deps.append(pname)
                meta = {"env": env, "dataset": None if free else ds, "method": method, "seed": seed}
                jobs.append(
                    job(
                        name,
                        "run",
                        script_cmd(args, method, scripts, **fields),
                        [os.path.join(run_dir, "DONE")],
                        run_dir,
                        deps,
                        meta,
                    )
                )
    return jobs


def state(job: Job) -> str:
    """done (nothing to do), resume (checkpoint.pt of an interrupted run) or todo."""
    if all(os.path.exists(p) for p in job.done_paths):
        return "done"
    if job.run_dir and os.path.exists(os.path.join(job.run_dir, "checkpoint.pt")):
        return "resume"
    return "todo"


def _child_setup(nice: int | None) -> Callable:
    """Runs in the child before exec: get SIGTERM when the Ray worker running it dies (Ctrl-C,
    ray stop), so no orphaned run keeps going (Linux only); and undo the niceness Ray gives its
    workers (15), so a run gets the CPU share of the command that started the sweep."""

    def setup():
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if nice is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError:  # lowering niceness needs privileges; keep Ray's
                pass

    return setup


def run_job(job: Job, *dep_results, lock: str = "", cwd: str = ROOT, threads: int = 1, nice: int | None = None) -> dict:
    """Run one job unless finished (checked here, on the node that runs it) or a dependency failed.
    Appends the subprocess's output to job.log; writes run_dir/DONE after exit code 0."""
    t0 = time.time()
    failed = [r["name"] for r in dep_results if r["status"] not in ("done", "skipped")]
    if failed:
        return {"name": job.name, "status": "dep-failed", "detail": ", ".join(failed), "seconds": 0.0}
    st = state(job)
    if st == "done":
        return {"name": job.name, "status": "skipped", "detail": "already finished", "seconds": 0.0}
    cmd = list(job.cmd) + (["--resume"] if st == "resume" else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **job.env}
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    with open(job.log, "a") as f, open(lock or os.devnull, "a") as lock_file:
        if lock:  # the same lock as `flock LOCK cmd`, held by this process for the run
            f.write(f"\n### {time.strftime('%H:%M:%S')} waiting for {lock}\n")
            f.flush()
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        f.flush()
        t_run = time.time()
        rc = subprocess.run(
            cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_child_setup(nice)
        ).returncode
        f.write(f"### exit code {rc} after {time.time() - t_run:.0f} s\n")
    if rc == 0 and job.run_dir:
        os.makedirs(job.run_dir, exist_ok=True)
        with open(os.path.join(job.run_dir, "DONE"), "w") as f:
            f.write(shlex.join(cmd) + "\n")
    ok = rc == 0 and state(job) == "done"
    detail = f"exit code {rc}{'' if ok or rc else '; expected output missing'}, log {job.log}"
    return {
        "name": job.name,
        "status": "done" if ok else "failed",
        "detail": detail,
        "seconds": time.time() - t_run,
        "waited": t_run - t0,
        "resumed": st == "resume",
    }


def execute_ray(jobs: list, args: Args, run: Callable = run_job) -> list:
    """Submit every job as a Ray task whose arguments are its dependencies' results, so Ray starts
    it once they have finished; print each result as it arrives."""
    import ray
    import ray.cloudpickle

    if __name__ != "__main__":  # ship this module's code by value: workers need not import it
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for attempt in range(3):  # a local Ray can time out starting on a loaded machine: retry
        try:
            if args.ray_address:
                ray.init(address=args.ray_address, log_to_driver=False)
            else:
                ray.init(num_cpus=args.workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:  # noqa: BLE001 (Ray raises plain Exception here)
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"ray.init failed ({str(e).splitlines()[0][:120]}); retrying", flush=True)
    interrupt_on_signals()  # again: ray.init replaces the SIGTERM handler with one that exits
    try:
        task = ray.remote(run).options(num_cpus=args.cpus_per_run, num_gpus=args.gpus_per_run, max_retries=0)
        threads = max(1, math.ceil(args.cpus_per_run))
        nice = os.getpriority(os.PRIO_PROCESS, 0) if not args.ray_address else None
        refs = {}
        for job in jobs:
            refs[job.name] = task.remote(
                job, *[refs[d] for d in job.deps], lock=args.lock, cwd=ROOT, threads=threads, nice=nice
            )
        pending, results = list(refs.values()), []
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            r = ray.get(ready[0])
            results.append(r)
            print(
                f"[{len(results)}/{len(jobs)}] {r['status']:10s} {r['name']} ({r['seconds']:.0f} s) {r['detail']}",
                flush=True,
            )
        return results
    finally:
        ray.shutdown()


def read_evals(run_dir: str) -> list:
    path = os.path.join(run_dir, "evals.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def collect(jobs: list, path: str, pairs=()) -> int:
    """Every grid run's evals.csv in one CSV (env,dataset,method,seed,finished + evals.csv columns).
    A dataset-free run (SAC) gets one copy per dataset of its env in `pairs`. Returns #rows."""
    rows, cols = [], list(RESULT_COLUMNS)
    for job in jobs:
        if job.stage != "run":
            continue
        m = job.meta
        evals = read_evals(job.run_dir)
        finished = int(os.path.exists(os.path.join(job.run_dir, "DONE")))
        datasets = [m["dataset"]] if m["dataset"] is not None else ([d for e, d in pairs if e == m["env"]] or ["none"])
        for ds in datasets:
            for r in evals:
                rows.append(
                    {
                        "env": m["env"],
                        "dataset": ds,
                        "method": m["method"],
                        "seed": m["seed"],
                        "finished": finished,
                        **r,
                    }
                )
                cols += [k for k in r if k not in cols]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def interrupt_on_signals() -> dict:
    """Ctrl-C, `kill -INT` and `kill -TERM` all stop the sweep the same way: a KeyboardInterrupt that
    unwinds through ray.shutdown(), whose workers' deaths stop the scripts (PR_SET_PDEATHSIG).
    Set explicitly: a driver started in the background (`cmd &`) inherits SIGINT ignored.
    Returns the previous handlers."""
    return {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}


def main(args: Args, execute: Callable = execute_ray, scripts: dict = SCRIPTS) -> int:
    try:
        jobs = expand(args, scripts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    missing = sorted(
        {j.cmd[1] for j in jobs if state(j) != "done" and not os.path.exists(os.path.join(ROOT, j.cmd[1]))}
    )
    counts = {}
    for job in jobs:
        counts[state(job)] = counts.get(state(job), 0) + 1
    print(
        f"{len(jobs)} jobs: "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        + f"; output in {os.path.abspath(args.out)}"
    )
    if args.dry_run:
        for job in jobs:
            st = state(job)
            cmd = job.cmd + (["--resume"] if st == "resume" else [])
            env = "".join(f"{k}={v} " for k, v in job.env.items())
            after = f"  (after {', '.join(job.deps)})" if job.deps else ""
            print(f"[{st}] {job.name}{after}\n    {env}{shlex.join(cmd)}")
        return 0
    if missing:
        print(f"error: missing script(s) {', '.join(missing)} in {ROOT}", file=sys.stderr)
        return 2
    handlers = interrupt_on_signals()
    try:
        results = execute(jobs, args)
    except KeyboardInterrupt:
        print("interrupted: running jobs were stopped; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    n = collect(jobs, os.path.join(args.out, "results.csv"), task_pairs(args))
    bad = [r for r in results if r["status"] in ("failed", "dep-failed")]
    print(
        f"{len(results) - len(bad)}/{len(jobs)} jobs done or skipped; {n} evaluation rows in "
        f"{os.path.join(args.out, 'results.csv')}"
    )
    for r in bad:
        print(f"  {r['status']}: {r['name']} ({r['detail']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Args)))

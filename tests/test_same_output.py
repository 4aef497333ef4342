"""Same output before and after a change that should not change behaviour: a fixed-seed tiny run of each
algorithm script, from its command line, must write the evals.csv (and train.csv where the script writes one)
kept in tests/golden/, column by column (only `wall_time_s` is left out), and the sums and norms of the weights
in its checkpoint.pt kept there.

Numbers are compared with a tolerance, |a - b| <= rtol * max(1, |b|), rtol = 1e-3 for the csv files (written
with 3 decimals or 6 digits) and 2e-5 for the weight sums and norms: float round-off from another CPU or matmul
kernel passes, a change of the algorithm, of the order of random draws or of the schedule does not (a 1% change
of --tau or --cql-alpha moves the CQL weights' sums by 1e-4 and 4e-4 in these 20 updates).

To add a script: one entry in CASES (its tiny command and the files it writes). To write the expected
files of a new case, or after a change of behaviour made on purpose:
    UPDATE_GOLDEN=1 python -m pytest -q tests/test_same_output.py
"""

import csv
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import ROOT, write_tiny_dataset

GOLDEN = os.path.join(ROOT, "tests", "golden")
DROP = ("wall_time_s",)
RTOL_CSV = 1e-3
RTOL_WEIGHTS = 2e-5


@dataclass(frozen=True)
class Case:
    script: str
    """path of the script, relative to the repository root"""
    flags: tuple
    """its tiny command line; {tmp} is the test's temp folder, {ensemble} an ensemble file made by TINY_CQL"""
    files: tuple = ("evals.csv",)
    """files of the run directory compared with tests/golden/<case>.csv (the first) and <case>.<name>.csv"""
    weights: tuple = ()
    """top-level keys of <run dir>/checkpoint.pt whose tensors are compared by sum and norm with
    tests/golden/<case>.weights.csv (a check of every weight, where few evaluations are cheap enough)"""


TINY_DATA = ("--env", "hopper", "--dataset", "medium-replay", "--device", "cpu", "--seed", "1")
TINY_CQL = (
    *TINY_DATA,
    *("--members", "2", "--hidden", "16", "--batch-size", "8", "--cql-samples", "2", "--offline-updates", "20"),
    *("--bc-steps", "5", "--eval-every", "10", "--eval-episodes", "2", "--log-every", "5", "--checkpoint-every", "10"),
)
TINY_FINETUNE = (
    *TINY_DATA,
    *("--checkpoint", "{ensemble}", "--online-steps", "60", "--epoch-steps", "20", "--first-epoch-multiplier", "2"),
    *("--eval-every", "20", "--eval-episodes", "2", "--batch-size", "16"),
)
TINY_SAC = (
    *("--env", "hopper", "--device", "cpu", "--seed", "1", "--online-steps", "300", "--learning-starts", "150"),
    *("--epoch-steps", "100", "--eval-every", "100", "--eval-episodes", "2", "--checkpoint-every", "100"),
    *("--batch-size", "16", "--hidden", "16"),
)
TINY_FINE_TUNING = (  # offline updates, then online epochs: the schedule shared by the fine-tuning baselines
    *TINY_DATA,
    *("--offline-updates", "20", "--eval-every", "10", "--log-every", "5", "--online-steps", "60"),
    *("--epoch-steps", "20", "--first-epoch-multiplier", "2", "--eval-episodes", "2", "--batch-size", "16"),
)
CASES = {
    "off2on_cql_ensemble": Case(
        "off2on_cql_ensemble.py",
        (*TINY_CQL, "--export-path", "{tmp}/cql.pt"),
        weights=("actor", "critic", "critic_target", "log_alpha"),
    ),
    "off2on_finetune": Case(
        "off2on_finetune.py",
        TINY_FINETUNE,
        ("evals.csv", "train.csv"),
        weights=("actor", "critic", "critic_target", "log_alpha", "ratio", "online", "priorities"),
    ),
    "off2on_finetune__uniform": Case(
        "off2on_finetune.py",
        (*TINY_FINETUNE, "--replay", "uniform", "--members", "1"),
        ("evals.csv", "train.csv"),
        weights=("actor", "critic", "critic_target", "log_alpha", "online", "priorities"),
    ),
    "sac": Case(
        "baselines/sac.py",
        TINY_SAC,
        ("evals.csv", "train.csv"),
        weights=("actor", "critic", "critic_target", "log_alpha", "buffer"),
    ),
    "sac_ft": Case(
        "baselines/sac_ft.py",
        (*TINY_FINE_TUNING, "--hidden", "16"),
        ("evals.csv", "train.csv"),
        weights=("actor", "critic", "critic_target", "log_alpha", "online"),
    ),
    "awac": Case(
        "baselines/awac.py",
        (*TINY_FINE_TUNING, "--hidden", "16", "--actor-layers", "2", "--offline-batch-size", "8"),
        ("evals.csv", "train.csv"),
        weights=("actor", "critic", "critic_target", "online"),
    ),
    "bcq_ft": Case(
        "baselines/bcq_ft.py",
        (*TINY_FINE_TUNING, "--vae-hidden", "16", "--target-samples", "4", "--select-samples", "6"),
        ("evals.csv", "train.csv"),
        weights=("vae", "actor", "actor_target", "critic", "critic_target", "online"),
    ),
}


RUNS = {}  # case name -> run directory, filled by run_case


def run_case(name: str, tmp, ensemble: str = "") -> str:
    """Run a case's tiny command in `tmp` (once per module) and return its run directory."""
    if name not in RUNS:
        case = CASES[name]
        run_dir = os.path.join(tmp, "run")
        flags = [f.format(tmp=tmp, ensemble=ensemble) for f in case.flags] + ["--run-dir", run_dir]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # one thread: the same sums every run
        p = subprocess.run(
            [sys.executable, os.path.join(ROOT, case.script), *flags], cwd=tmp, env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, f"{case.script} failed:\n{p.stderr[-3000:]}"
        RUNS[name] = run_dir
    return RUNS[name]


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory):
    """The ensemble file of the off2on_cql_ensemble case: the input of the fine-tuning cases. The tiny dataset
    lives in the Minari folder that tests/conftest.py gives every test of the run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(tmp_path_factory.getbasetemp() / "minari"))
        write_tiny_dataset("hopper", "medium-replay")
        tmp = tmp_path_factory.mktemp("off2on_cql_ensemble")
        run_case("off2on_cql_ensemble", tmp)
    return str(tmp / "cql.pt")


def weight_rows(path: str, keys: tuple) -> list:
    """One row per floating-point tensor under `keys` of a checkpoint: its name, sum and norm."""
    ckpt = torch.load(path, weights_only=True)
    rows = []
    for key in keys:
        tensors = ckpt[key] if isinstance(ckpt[key], dict) else {"": ckpt[key]}
        for name, t in tensors.items():
            if not (torch.is_tensor(t) and t.is_floating_point()):  # e.g. a buffer's write position
                continue
            t = t.double()
            rows.append({"tensor": f"{key}.{name}".rstrip("."), "sum": f"{t.sum():.9g}", "norm": f"{t.norm():.9g}"})
    return rows


def read_rows(path: str) -> list:
    rows = list(csv.DictReader(open(path)))
    return [{k: v for k, v in r.items() if k not in DROP} for r in rows]


def write_rows(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def close(got: str, want: str, rtol: float) -> bool:
    try:
        a, b = float(got), float(want)
    except ValueError:
        return got == want
    return abs(a - b) <= rtol * max(1.0, abs(b))


def golden_path(name: str, i: int, file: str) -> str:
    return os.path.join(GOLDEN, f"{name}.csv" if i == 0 else f"{name}.{file.removesuffix('.csv')}.csv")


@pytest.mark.parametrize("name", list(CASES))
def test_tiny_run_writes_the_expected_csv(name, tmp_path, tiny_ensemble):
    case = CASES[name]
    run_dir = run_case(name, tmp_path, tiny_ensemble)
    outputs = [
        (golden_path(name, i, f), f, read_rows(os.path.join(run_dir, f)), RTOL_CSV) for i, f in enumerate(case.files)
    ]
    if case.weights:
        rows = weight_rows(os.path.join(run_dir, "checkpoint.pt"), case.weights)
        outputs.append((os.path.join(GOLDEN, f"{name}.weights.csv"), "checkpoint.pt", rows, RTOL_WEIGHTS))
    for path, file, got, rtol in outputs:
        if os.environ.get("UPDATE_GOLDEN"):
            os.makedirs(GOLDEN, exist_ok=True)
            write_rows(path, got)
            continue
        assert os.path.exists(path), f"no {os.path.relpath(path, ROOT)}; write it with UPDATE_GOLDEN=1 (see docstring)"
        want = read_rows(path)
        assert len(got) == len(want) and list(got[0]) == list(want[0]), f"{file}: other rows or columns than {path}"
        for k, (g, w) in enumerate(zip(got, want)):
            bad = {c: (g[c], w[c]) for c in w if not close(g[c], w[c], rtol)}
            assert not bad, f"{file} row {k + 1} differs from {os.path.relpath(path, ROOT)} (got, expected): {bad}"

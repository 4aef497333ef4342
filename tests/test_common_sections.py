"""Every algorithm script stands alone (CleanRL style: no imports between them), so the code they share is copied.
These tests keep the copies identical.

Every script carries the plumbing block (the banner PLUMBING below, after `main`, at the end of the file). A
top-level definition (function, class or constant) that appears in more than one script has the same source in all
of them, unless DIFFERENT_ON_PURPOSE names it with its reason; SAME_WITHIN then names the groups of scripts in which
such a name is still one identical copy (the fine-tuning baselines' loop, the SAC of sac.py and sac_ft.py, the
ensemble scripts' mlp). This
covers the plumbing block, the ensemble networks that off2on_cql_ensemble.py hands to off2on_finetune.py, the
baselines' uniform replay and their logging helpers. A script may leave out a definition it does not use.
"""

import ast
import glob
import os

import pytest
from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "off2on_*.py")) + glob.glob(os.path.join(ROOT, "baselines", "*.py")))
SCRIPTS = [s for s in SCRIPTS if not s.endswith("__init__.py")]
PLUMBING = "# Plumbing: datasets, run directory, logging, checkpoints, RNG and env state, evaluation, errors."
SEP = "# " + "=" * 85
DIFFERENT_ON_PURPOSE = {
    "Args": "each script's own flags and defaults",
    "main": "each script's own algorithm",
    "SCRIPT": "the script's name in run directories and file names",
    "FORMAT": "the format string of the script's checkpoints",
    "check_args": "each script checks its own flags and resumes its own runs",
    "checkpoint_dict": "each script saves its own training state",
    "restore_checkpoint": "each script restores its own training state",
    "update": "each algorithm's own gradient step",
    "Learner": "each algorithm's own networks and optimizers",
    "act": "each algorithm's own policy",
    "explore": "acts with each algorithm's own policy (sac.py: random actions first, into its own replay)",
    "evaluate_policy": "evaluates each algorithm's own policy (the fine-tuning baselines: in both phases)",
    "TRAIN_COLUMNS": "each algorithm's own training statistics",
    "sac_losses": "one SAC agent's losses (baselines) or the ensemble's (off2on_finetune.py)",
    "Actor": "SAC's tanh-Gaussian policy; AWAC's Gaussian with a state-independent sigma",
    "TwinQ": "AWAC's is initialized as rlkit's Mlp, the others as nn.Linear",
    "log_epoch": "the baselines average a list of the updates' statistics, off2on_finetune.py their sums on the device",
    "mlp": "one MLP of nn.Linear layers (bcq_ft.py) or n independent MLPs of VectorizedLinear (the ensemble scripts)",
}
FINE_TUNING = ("baselines/sac_ft.py", "baselines/awac.py", "baselines/bcq_ft.py")  # offline, then online, one loop
SAC = ("baselines/sac.py", "baselines/sac_ft.py")  # one SAC, from scratch and fine-tuned
ENSEMBLE = ("off2on_cql_ensemble.py", "off2on_finetune.py")  # the ensemble networks, handed from one to the other
SAME_WITHIN = {
    **{name: FINE_TUNING for name in ("main", "check_args", "checkpoint_dict", "restore_checkpoint")},
    **{name: FINE_TUNING for name in ("explore", "evaluate_policy")},
    **{name: SAC for name in ("Actor", "Learner", "sac_losses", "act", "TRAIN_COLUMNS")},
    "TwinQ": (*SAC, "baselines/bcq_ft.py"),
    "log_epoch": ("baselines/sac.py", *FINE_TUNING),
    "mlp": ENSEMBLE,
}
ENSEMBLE_NETWORKS = ("VectorizedLinear", "mlp", "EnsembleActor", "EnsembleCritic", "LOG_STD_MIN", "LOG_STD_MAX")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def has_block(path: str) -> bool:
    return PLUMBING in open(path).read().splitlines()


def definitions(path: str) -> dict:
    """Top-level name -> its source lines (decorators included), from the file's syntax tree."""
    text = open(path).read()
    lines = text.splitlines()
    found = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        for name in names:
            assert name not in found, f"{rel(path)} defines {name} twice"
            found[name] = "\n".join(lines[first - 1 : node.end_lineno])
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_every_script_carries_the_plumbing_block(path):
    assert has_block(path), f"{rel(path)} lacks the banner {PLUMBING!r}"


@pytest.mark.parametrize("path", SCRIPTS, ids=rel)
def test_plumbing_block_comes_last(path):
    """The order of the file: ... main, then the plumbing block, then only the `__main__` guard."""
    lines = open(path).read().splitlines()
    banner = lines.index(PLUMBING)
    assert lines[banner - 1] == SEP, f"{rel(path)}: the banner starts with a {SEP[:10]}... line"
    body = ast.parse("\n".join(lines)).body
    main = next(node for node in body if getattr(node, "name", None) == "main")
    assert main.lineno < banner, f"{rel(path)}: main must come before the plumbing block"
    last = body[-1]
    assert isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'", rel(path)


def test_shared_definitions_are_identical():
    sources = {path: definitions(path) for path in SCRIPTS}
    assert len(sources) >= 2
    shared = {}
    for path, defs in sources.items():
        for name, source in defs.items():
            shared.setdefault(name, {})[path] = source
    differ = []
    for name, copies in sorted(shared.items()):
        if len(copies) > 1 and name not in DIFFERENT_ON_PURPOSE and len(set(copies.values())) > 1:
            differ.append(f"{name}: {', '.join(rel(p) for p in copies)}")
    assert not differ, "copies that differ (make them identical, or list the name with its reason):\n" + "\n".join(
        differ
    )


def test_different_on_purpose_lists_only_shared_names():
    counts = {}
    for path in SCRIPTS:
        for name in definitions(path):
            counts[name] = counts.get(name, 0) + 1
    stale = [name for name in DIFFERENT_ON_PURPOSE if counts.get(name, 0) < 2]
    assert not stale, f"listed but defined in fewer than two scripts: {stale}"


def test_the_plumbing_banner_is_the_same_everywhere():
    def banner(path):
        lines = open(path).read().splitlines()
        start = lines.index(PLUMBING) - 1
        end = lines.index(SEP, start + 1)
        return lines[start : end + 1]

    assert len({tuple(banner(p)) for p in SCRIPTS}) == 1


def test_both_ensemble_scripts_define_the_networks_they_hand_over():
    """The ensemble file's weights are loaded into the same classes on both sides (identical by the test above)."""
    for path in (os.path.join(ROOT, "off2on_cql_ensemble.py"), os.path.join(ROOT, "off2on_finetune.py")):
        missing = set(ENSEMBLE_NETWORKS) - set(definitions(path))
        assert not missing, f"{rel(path)} lacks {missing}"


def test_definitions_are_identical_within_their_group():
    """A name different on purpose across all scripts may still be one copy within a group: the three fine-tuning
    baselines run one loop (main and its helpers), sac.py and sac_ft.py one SAC, and TwinQ is shared beyond them; the
    baselines' log_epoch is one copy, and so is the ensemble scripts' mlp."""
    differ = []
    for name, group in SAME_WITHIN.items():
        assert name in DIFFERENT_ON_PURPOSE, f"{name}: identical everywhere? then the first test covers it"
        copies = {path: definitions(os.path.join(ROOT, path)).get(name) for path in group}
        missing = [path for path, source in copies.items() if source is None]
        assert not missing, f"{name} is not defined in {missing}"
        if len(set(copies.values())) > 1:
            differ.append(f"{name}: {', '.join(group)}")
    assert not differ, "copies that differ within their group:\n" + "\n".join(differ)

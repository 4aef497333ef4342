"""Every algorithm script stands alone (CleanRL style: no imports between them), so the code they share is copied.
These tests keep the copies identical.

Scripts with the plumbing block (the banner PLUMBING below, after `main`, at the end of the file): a top-level
definition (function, class or constant) that appears in more than one of them has the same source in all of them,
unless DIFFERENT_ON_PURPOSE names it with its reason. This covers the plumbing block and the ensemble networks
that off2on_cql_ensemble.py hands to off2on_finetune.py. A script may leave out a definition it does not use.

Scripts without the plumbing block (baselines still on the earlier layout) are checked the earlier way: their
sections "Data: env table..." and "Run directory, logging..." are identical among them. Once every script carries
the block, only the first check remains.
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
}
ENSEMBLE_NETWORKS = ("VectorizedLinear", "mlp", "EnsembleActor", "EnsembleCritic", "LOG_STD_MIN", "LOG_STD_MAX")


def rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def has_block(path: str) -> bool:
    return PLUMBING in open(path).read().splitlines()


NEW = [s for s in SCRIPTS if has_block(s)]
OLD = [s for s in SCRIPTS if not has_block(s)]


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


def test_the_core_scripts_carry_the_plumbing_block():
    assert {rel(s) for s in NEW} >= {"off2on_cql_ensemble.py", "off2on_finetune.py"}


@pytest.mark.parametrize("path", NEW, ids=rel)
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
    sources = {path: definitions(path) for path in NEW}
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
    for path in NEW:
        for name in definitions(path):
            counts[name] = counts.get(name, 0) + 1
    stale = [name for name in DIFFERENT_ON_PURPOSE if counts.get(name, 0) < 2]
    assert not stale, f"listed but defined in fewer than two scripts with the plumbing block: {stale}"


def test_the_plumbing_banner_is_the_same_everywhere():
    def banner(path):
        lines = open(path).read().splitlines()
        start = lines.index(PLUMBING) - 1
        end = lines.index(SEP, start + 1)
        return lines[start : end + 1]

    assert len({tuple(banner(p)) for p in NEW}) == 1


def test_both_ensemble_scripts_define_the_networks_they_hand_over():
    """The ensemble file's weights are loaded into the same classes on both sides (identical by the test above)."""
    for path in (os.path.join(ROOT, "off2on_cql_ensemble.py"), os.path.join(ROOT, "off2on_finetune.py")):
        missing = set(ENSEMBLE_NETWORKS) - set(definitions(path))
        assert not missing, f"{rel(path)} lacks {missing}"


# ----------------------------------------------------------------------------- scripts on the earlier layout
def section(path: str, title: str) -> str:
    lines = open(path).read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"# {title}")]
    assert starts, f"{rel(path)} lacks the section '# {title}'"
    start = starts[0]
    # header: SEP, title, comment, SEP; the section's code runs to the next SEP after that
    header_end = next(i for i in range(start + 1, len(lines)) if lines[i] == SEP)
    end = next(i for i in range(header_end + 1, len(lines)) if lines[i] == SEP)
    assert end - header_end > 10, f"section '# {title}' of {rel(path)} is empty"
    return "\n".join(lines[start:end])


@pytest.mark.skipif(len(OLD) < 2, reason="fewer than two scripts on the earlier layout")
@pytest.mark.parametrize("title", ["Data: env table", "Run directory, logging"])
def test_sections_of_the_earlier_layout_are_identical(title):
    reference = section(OLD[0], title)
    for path in OLD[1:]:
        assert section(path, title) == reference, f"'{title}' section of {rel(path)} differs from {rel(OLD[0])}"


def test_sac_update_identical():
    """baselines/sac.py (from scratch) and baselines/sac_ft.py (fine-tuning) run the same SAC: actor, critics,
    losses, the gradient step and the checkpoint layout are one copied section."""
    paths = [os.path.join(ROOT, "baselines", f) for f in ("sac.py", "sac_ft.py")]
    reference = section(paths[0], "SAC: tanh-Gaussian actor")
    assert "def sac_update(" in reference and "def sac_losses(" in reference
    assert section(paths[1], "SAC: tanh-Gaussian actor") == reference

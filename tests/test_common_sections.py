"""Every algorithm script carries the same data-loading and run-directory sections (CleanRL
style: each file stands alone). These tests catch a fix made in one copy but not the others."""

import glob
import os

import pytest
from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "off2on_*.py")) + glob.glob(os.path.join(ROOT, "baselines", "*.py")))
SCRIPTS = [s for s in SCRIPTS if not s.endswith("__init__.py")]
SEP = "# " + "=" * 85


def section(path: str, title: str) -> str:
    lines = open(path).read().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"# {title}")]
    assert starts, f"{os.path.relpath(path, ROOT)} lacks the section '# {title}'"
    start = starts[0]
    # header: SEP, title, comment, SEP; the section's code runs to the next SEP after that
    header_end = next(i for i in range(start + 1, len(lines)) if lines[i] == SEP)
    end = next(i for i in range(header_end + 1, len(lines)) if lines[i] == SEP)
    assert end - header_end > 10, f"section '# {title}' of {os.path.relpath(path, ROOT)} is empty"
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("title", ["Data: env table", "Run directory, logging"])
def test_sections_identical(title):
    assert len(SCRIPTS) >= 1
    reference = section(SCRIPTS[0], title)
    for path in SCRIPTS[1:]:
        assert section(path, title) == reference, (
            f"'{title}' section of {os.path.relpath(path, ROOT)} differs from {os.path.relpath(SCRIPTS[0], ROOT)}"
        )


def test_ensemble_networks_identical():
    paths = [os.path.join(ROOT, f) for f in ("off2on_cql_ensemble.py", "off2on_finetune.py")]
    paths = [p for p in paths if os.path.exists(p)]
    if len(paths) < 2:
        pytest.skip("needs both ensemble scripts")
    assert section(paths[0], "Networks: an ensemble") == section(paths[1], "Networks: an ensemble")


def test_sac_update_identical():
    """baselines/sac.py (from scratch) and baselines/sac_ft.py (fine-tuning) run the same SAC: actor, critics,
    losses, the gradient step and the checkpoint layout are one copied section."""
    paths = [os.path.join(ROOT, "baselines", f) for f in ("sac.py", "sac_ft.py")]
    reference = section(paths[0], "SAC: tanh-Gaussian actor")
    assert "def sac_update(" in reference and "def sac_losses(" in reference
    assert section(paths[1], "SAC: tanh-Gaussian actor") == reference

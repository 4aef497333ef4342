"""Dataset loading, which every algorithm script that reads a dataset carries in its plumbing block (tested through
the copies of the two core scripts and baselines/sac_ft.py; tests/test_common_sections.py checks the other copies are
identical): local Minari datasets, D4RL-layout hdf5 files, Minari ids that have to be downloaded, and one-line
errors. No test reaches a real hub."""

import http.server
import importlib
import os
import socket
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT

SCRIPTS = ["off2on_cql_ensemble", "off2on_finetune", "baselines.sac_ft"]


@pytest.fixture(params=SCRIPTS)
def script(request):
    return importlib.import_module(request.param)


def write_d4rl(path, n=10, next_obs=True, timeouts=(4,), terminals=(7,)):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n, 11)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["actions"] = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        f["rewards"] = np.arange(n, dtype=np.float32)
        f["terminals"] = np.isin(np.arange(n), terminals)
        f["timeouts"] = np.isin(np.arange(n), timeouts)
        if next_obs:
            f["next_observations"] = obs + 100
    return obs


def test_d4rl_hdf5_with_next_observations(script, tmp_path):
    obs = write_d4rl(tmp_path / "d.hdf5")
    d = script.load_dataset("hopper", str(tmp_path / "d.hdf5"))
    assert set(d) == {"observations", "actions", "rewards", "next_observations", "terminals"}
    assert all(v.dtype == np.float32 and len(v) == 10 for v in d.values())
    assert np.array_equal(d["next_observations"], obs + 100)  # taken from the file, no row dropped
    assert np.array_equal(d["terminals"], np.isin(np.arange(10), [7]))


def test_d4rl_hdf5_without_next_observations_drops_timeouts(script, tmp_path):
    """s' is the next row; the row ending an episode by timeout (4) and the last row (9, no next
    row) are dropped, as D4RL's qlearning_dataset does; the terminal row (7) is kept."""
    obs = write_d4rl(tmp_path / "d.hdf5", next_obs=False)
    d = script.load_dataset("hopper", str(tmp_path / "d.hdf5"))
    keep = [0, 1, 2, 3, 5, 6, 7, 8]
    assert np.array_equal(d["rewards"], keep)
    assert np.array_equal(d["observations"], obs[keep])
    assert np.array_equal(d["next_observations"], obs[[k + 1 for k in keep]])
    assert np.array_equal(d["terminals"], np.isin(keep, [7]))


def test_minari_dataset_to_transitions(script, tiny_dataset):
    tiny_dataset("hopper", "medium-replay")
    d = script.load_dataset("hopper", "medium-replay")
    import minari

    eps = list(minari.load_dataset("off2on/hopper/medium-replay-v0").iterate_episodes())
    assert len(d["rewards"]) == sum(len(ep.rewards) for ep in eps)
    first = eps[0]
    n = len(first.rewards)
    assert np.allclose(d["observations"][:n], first.observations[:-1])
    assert np.allclose(d["next_observations"][:n], first.observations[1:])  # s' within an episode
    assert np.array_equal(d["terminals"][:n], first.terminations)
    assert d["observations"].dtype == np.float32 and d["observations"].shape[1] == 11


def test_missing_local_dataset_names_the_make_command(script):
    with pytest.raises(script.InputError) as e:
        script.load_dataset("walker2d", "medium-expert")
    assert str(e.value) == (
        "no local dataset off2on/walker2d/medium-expert-v0; make it with: "
        "python make_dataset.py --env walker2d --kinds medium-expert"
    )


# Minari ids that have to be downloaded: the one-line error of the plumbing block
HUB_SCRIPTS = SCRIPTS
HUB_ERROR = "could not load Minari dataset {}: "
HUB_FIX = "; check the network or HF_ENDPOINT/HF_HUB_OFFLINE, or use a kind made by make_dataset.py or a .hdf5 file"


@pytest.fixture(params=HUB_SCRIPTS)
def hub_script(request):
    return importlib.import_module(request.param)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def closed_hub(monkeypatch):
    """Minari's remote (Farama's datasets on the Hugging Face hub) pointed at a closed local port, which
    refuses at once, and huggingface_hub's waits between its 5 retries skipped: a refused download fails
    in well under a second. Without huggingface_hub installed a download fails at its import."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    monkeypatch.delenv("MINARI_REMOTE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    return constants


def test_minari_id_without_a_hub_is_one_line(hub_script, closed_hub, capfd):
    """No hub answers (connection refused, or HF_HUB_OFFLINE=1): one line naming the problem and the fixes,
    and none of huggingface_hub's retry messages."""
    pytest.importorskip("huggingface_hub")
    for offline in (False, True):
        closed_hub.HF_HUB_OFFLINE = offline
        with pytest.raises(hub_script.InputError) as e:
            hub_script.load_dataset("hopper", "mujoco/hopper/medium-v0")
        message = str(e.value)
        assert message.startswith(HUB_ERROR.format("mujoco/hopper/medium-v0")) and message.endswith(HUB_FIX)
        assert ("offline mode is enabled" in message) == offline
        assert "\n" not in message
    assert "Retrying" not in capfd.readouterr().err


class EmptyHub(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request with an empty list: it holds no dataset."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args):
        pass


@pytest.fixture
def empty_hub():
    """The address of a local hub that holds no dataset."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EmptyHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_unknown_minari_id_on_a_hub_that_answers(hub_script, closed_hub, empty_hub):
    """The same shape of message as without a hub: what went wrong, then the fixes."""
    pytest.importorskip("huggingface_hub")
    closed_hub.ENDPOINT = empty_hub
    with pytest.raises(hub_script.InputError) as e:
        hub_script.load_dataset("hopper", "nonexistent/dataset-v0")
    assert str(e.value) == (
        HUB_ERROR.format("nonexistent/dataset-v0")
        + "Couldn't find any version for dataset nonexistent/dataset in the remote Farama server"
        + HUB_FIX
    )


def test_minari_id_without_huggingface_hub_names_the_install(hub_script, monkeypatch, closed_hub):
    """Minari imports huggingface_hub (its hf extra) only to download; None in sys.modules makes an import fail."""
    for name in [name for name in sys.modules if name.split(".")[0] == "huggingface_hub"] + ["huggingface_hub"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "minari.storage.remotes.huggingface", raising=False)  # imported again
    with pytest.raises(hub_script.InputError) as e:
        hub_script.load_dataset("hopper", "mujoco/hopper/medium-v0")
    assert str(e.value).startswith(HUB_ERROR.format("mujoco/hopper/medium-v0") + "huggingface_hub is not installed")
    assert str(e.value).endswith(HUB_FIX) and "\n" not in str(e.value)


# the command line: exit code 2 and one line on stderr, with huggingface_hub's waits between retries skipped
CLI = """import runpy, sys, time
time.sleep = lambda seconds: None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize(
    "module,hub",
    [(m, "closed") for m in HUB_SCRIPTS[:1]] + [(m, "empty") for m in HUB_SCRIPTS[1:2]],
)
def test_cli_hub_error_is_one_line_and_exit_2(module, hub, tmp_path, empty_hub):
    pytest.importorskip("huggingface_hub")
    endpoint = f"http://127.0.0.1:{closed_port()}" if hub == "closed" else empty_hub
    env = {k: v for k, v in os.environ.items() if k not in ("MINARI_REMOTE", "HF_HUB_OFFLINE")}
    env.update(HF_ENDPOINT=endpoint, OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, *module.split(".")) + ".py"
    flags = ["--env", "hopper", "--dataset", "someone/hopper/data-v0", "--device", "cpu", "--run-dir", str(tmp_path)]
    p = subprocess.run(
        [sys.executable, "-c", CLI, script, *flags], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: " + HUB_ERROR.format("someone/hopper/data-v0")), p.stderr
    assert p.stderr.endswith(HUB_FIX + "\n") and len(p.stderr.splitlines()) == 1, p.stderr


def test_bad_inputs_are_one_line(script, tmp_path, closed_hub):
    (tmp_path / "corrupt.hdf5").write_bytes(b"\x89HDF\r\n garbage")
    with h5py.File(tmp_path / "partial.hdf5", "w") as f:
        f["observations"] = np.zeros((3, 11))
    cases = [
        ("ant", "medium", "unknown env 'ant'"),
        ("hopper", "mediumm", "unknown dataset 'mediumm'"),
        ("hopper", str(tmp_path / "missing.hdf5"), "no such file"),
        ("hopper", str(tmp_path / "corrupt.hdf5"), "is not a D4RL-layout hdf5 file"),
        ("hopper", str(tmp_path / "partial.hdf5"), "is not a D4RL-layout hdf5 file"),
        ("hopper", "nonexistent/dataset-v0", "Minari dataset nonexistent/dataset-v0"),
    ]
    for env, dataset, message in cases:
        with pytest.raises(script.InputError, match=message) as e:
            script.load_dataset(env, dataset)
        assert "\n" not in str(e.value)

"""The data-loading section every algorithm script carries (tested through baselines/sac.py's copy;
tests/test_common_sections.py checks the copies are identical): local Minari datasets, D4RL-layout
hdf5 files, and one-line errors."""

import h5py
import numpy as np
import pytest

from baselines import sac


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


def test_d4rl_hdf5_with_next_observations(tmp_path):
    obs = write_d4rl(tmp_path / "d.hdf5")
    d = sac.load_dataset("hopper", str(tmp_path / "d.hdf5"))
    assert set(d) == {"observations", "actions", "rewards", "next_observations", "terminals"}
    assert all(v.dtype == np.float32 and len(v) == 10 for v in d.values())
    assert np.array_equal(d["next_observations"], obs + 100)  # taken from the file, no row dropped
    assert np.array_equal(d["terminals"], np.isin(np.arange(10), [7]))


def test_d4rl_hdf5_without_next_observations_drops_timeouts(tmp_path):
    """s' is the next row; the row ending an episode by timeout (4) and the last row (9, no next
    row) are dropped, as D4RL's qlearning_dataset does; the terminal row (7) is kept."""
    obs = write_d4rl(tmp_path / "d.hdf5", next_obs=False)
    d = sac.load_dataset("hopper", str(tmp_path / "d.hdf5"))
    keep = [0, 1, 2, 3, 5, 6, 7, 8]
    assert np.array_equal(d["rewards"], keep)
    assert np.array_equal(d["observations"], obs[keep])
    assert np.array_equal(d["next_observations"], obs[[k + 1 for k in keep]])
    assert np.array_equal(d["terminals"], np.isin(keep, [7]))


def test_minari_dataset_to_transitions(tiny_dataset):
    tiny_dataset("hopper", "medium-replay")
    d = sac.load_dataset("hopper", "medium-replay")
    import minari

    eps = list(minari.load_dataset("off2on/hopper/medium-replay-v0").iterate_episodes())
    assert len(d["rewards"]) == sum(len(ep.rewards) for ep in eps)
    first = eps[0]
    n = len(first.rewards)
    assert np.allclose(d["observations"][:n], first.observations[:-1])
    assert np.allclose(d["next_observations"][:n], first.observations[1:])  # s' within an episode
    assert np.array_equal(d["terminals"][:n], first.terminations)
    assert d["observations"].dtype == np.float32 and d["observations"].shape[1] == 11


def test_missing_local_dataset_names_the_make_command():
    with pytest.raises(sac.InputError) as e:
        sac.load_dataset("walker2d", "medium-expert")
    assert str(e.value) == (
        "no local dataset off2on/walker2d/medium-expert-v0; make it with: "
        "python make_dataset.py --env walker2d --kinds medium-expert"
    )


def test_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "corrupt.hdf5").write_bytes(b"\x89HDF\r\n garbage")
    with h5py.File(tmp_path / "partial.hdf5", "w") as f:
        f["observations"] = np.zeros((3, 11))
    cases = [
        ("ant", "medium", "unknown env 'ant'"),
        ("hopper", "mediumm", "unknown dataset 'mediumm'"),
        ("hopper", str(tmp_path / "missing.hdf5"), "no such file"),
        ("hopper", str(tmp_path / "corrupt.hdf5"), "is not a D4RL-layout hdf5 file"),
        ("hopper", str(tmp_path / "partial.hdf5"), "is not a D4RL-layout hdf5 file"),
        ("hopper", "nonexistent/dataset-v0", "could not load Minari dataset nonexistent/dataset-v0"),
    ]
    for env, dataset, message in cases:
        with pytest.raises(sac.InputError, match=message) as e:
            sac.load_dataset(env, dataset)
        assert "\n" not in str(e.value)

"""Shared test fixtures: every test runs with its own Minari data folder, never the user's."""

import os
import sys

import numpy as np
import pytest
import torch

# The test networks are tiny: one thread is faster than two, and on a busy 2-core machine two OpenMP
# threads that wait on each other make a small update tens of times slower.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A folder of the authors' five released halfcheetah-medium CQL agents (the folder rlkit/data/cql/ of
# github.com/shlee94/Off2OnRL) for the test of `off2on_cql_ensemble.py --import-official`, skipped without it.
OFFICIAL = os.environ.get("OFF2ON_OFFICIAL_AGENTS", "")
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _isolated_minari(tmp_path_factory, monkeypatch):
    """Point Minari at a temp folder of the test run so tests neither read nor write ~/.minari."""
    path = tmp_path_factory.getbasetemp() / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def write_tiny_dataset(env: str, kind: str, episodes: int = 3, steps: int = 50, seed: int = 0):
    """A small random-action Minari dataset off2on/<env>/<kind>-v0 for smoke tests."""
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    ds_id = f"off2on/{env}/{kind}-v0"
    if ds_id in minari.list_local_datasets():
        return ds_id
    env_id = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}[env]
    e = gym.make(env_id, max_episode_steps=steps)
    rng = np.random.default_rng(seed)
    buffers = []
    for i in range(episodes):
        obs, _ = e.reset(seed=seed + i)
        o, a, r, te, tr = [obs], [], [], [], []
        while True:
            act = rng.uniform(-1, 1, e.action_space.shape).astype(np.float32)
            obs, rew, term, trunc, _ = e.step(act)
            o.append(obs), a.append(act), r.append(rew), te.append(term), tr.append(trunc)
            if term or trunc:
                break
        buffers.append(
            EpisodeBuffer(
                id=i,
                observations=np.array(o),
                actions=np.array(a),
                rewards=np.array(r),
                terminations=np.array(te),
                truncations=np.array(tr),
                infos={},
            )
        )
    minari.create_dataset_from_buffers(
        ds_id, buffers, env=env_id, algorithm_name="random", ref_min_score=-20.272305, ref_max_score=3234.3
    )
    return ds_id


@pytest.fixture
def tiny_dataset():
    """Call as tiny_dataset("hopper", "medium-replay") -> dataset id (made once per test run)."""
    return write_tiny_dataset

"""make_dataset.py end to end at tiny size: datasets load back with Minari, scores follow D4RL's
formula, episodes keep terminations and truncations apart, a re-run resumes instead of redoing."""

import os
import subprocess
import sys

import minari
import numpy as np
import pytest
import torch
from conftest import ROOT

import make_dataset as md
from baselines import sac, sac_ft


@pytest.fixture(autouse=True)
def own_minari(tmp_path, monkeypatch):
    """A Minari folder per test: these tests make and remake the off2on ids other tests also use."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))


def tiny_args(tmp_path, **kw):
    base = dict(
        env="hopper",
        n_steps=300,
        sac_steps=600,
        medium_fraction=-1.0,
        work_dir=str(tmp_path / "work"),
        n_envs=4,
        eval_every=200,
        eval_episodes=2,
        learning_starts=200,
        epoch_steps=100,
        checkpoint_every=200,
        hidden=16,
        batch_size=32,
        device="cpu",
    )
    return md.Args(**{**base, **kw})


def test_end_to_end_tiny(tmp_path, capsys):
    md.main(tiny_args(tmp_path))
    out = capsys.readouterr().out
    ids = [f"off2on/hopper/{k}-v0" for k in md.ORDER]
    assert set(ids) <= set(minari.list_local_datasets())
    snap = torch.load(tmp_path / "work" / "medium_snapshot.pt", weights_only=True)
    lo, hi = sac.REF_RETURNS["hopper"]
    sizes = {}
    for kind, ds_id in zip(md.ORDER, ids):
        ds = minari.load_dataset(ds_id)
        eps = list(ds.iterate_episodes())
        sizes[kind] = sum(len(ep.rewards) for ep in eps)
        returns = np.array([ep.rewards.sum() for ep in eps])
        # Minari's score (fraction) equals D4RL's normalized score (percent) / 100
        assert np.allclose(minari.get_normalized_score(ds, returns), (returns - lo) / (hi - lo))
        assert np.allclose(100 * minari.get_normalized_score(ds, returns), sac.normalized_score("hopper", returns))
        for ep in eps:  # only the last step of an episode may end it, and it must end it
            ends = ep.terminations | ep.truncations
            assert ends[-1] and not ends[:-1].any() and len(ep.observations) == len(ep.actions) + 1
        assert ds.env_spec.id == "Hopper-v5" and kind in ds.storage.metadata["description"]
        pol = torch.load(os.path.join(md.dataset_dir(ds_id), "behaviour_policy.pt"), weights_only=True)
        assert pol["env"] == "hopper" and pol["kind"] == kind
    assert sizes["random"] == sizes["medium"] == sizes["expert"] == 300
    assert sizes["medium-expert"] == 600
    assert snap["env_steps"] == 200  # the first evaluation reaching the (here negative) threshold
    assert sizes["medium-replay"] == snap["env_steps"]  # every transition SAC saw until the snapshot
    assert "medium snapshot at" in out and "normalized score" in out
    # the medium-replay dataset is exactly SAC's replay up to the snapshot
    arr = sac_ft.load_dataset("hopper", "medium-replay")
    assert np.allclose(arr["observations"], snap["replay"]["observations"].numpy())
    assert np.array_equal(arr["terminals"], snap["replay"]["terminations"].numpy())
    assert pol["actors"].keys() == {"medium", "expert"}  # medium-expert keeps both behaviour policies

    # re-run: nothing is redone; a dataset whose write was interrupted (no policy file) is remade
    os.remove(os.path.join(md.dataset_dir(ids[0]), "behaviour_policy.pt"))
    md.main(tiny_args(tmp_path))
    out = capsys.readouterr().out
    assert out.count("exists, skipped") == 4 and "making random for Hopper-v5" in out
    assert md.is_made(ids[0])


def test_sac_stage_resumes_from_its_checkpoint(tmp_path, capsys):
    with pytest.raises(sac.InputError, match="raise --sac-steps"):  # threshold not reached in budget
        md.main(tiny_args(tmp_path, env="walker2d", kinds=("medium",), sac_steps=300, medium_fraction=10.0))
    ck = torch.load(tmp_path / "work" / "sac" / "checkpoint.pt", weights_only=True)
    assert ck["env_steps"] == 300
    md.main(tiny_args(tmp_path, env="walker2d", kinds=("medium",), sac_steps=600, medium_fraction=-1.0))
    out = capsys.readouterr().out
    assert "resumed at 300 env steps" in out and "medium snapshot at 400 env steps" in out
    assert "off2on/walker2d/medium-v0" in minari.list_local_datasets()


def test_rollout_counts_and_endings():
    """Exactly n_steps transitions; falls are terminations, budget cuts are truncations."""
    rng = np.random.default_rng(0)
    eps, rets = md.rollout("Hopper-v5", lambda o: rng.uniform(-1, 1, (len(o), 3)).astype(np.float32), 250, 3, 0)
    assert sum(len(ep.rewards) for ep in eps) == 250
    assert sum(ep.terminations[-1] for ep in eps) == len(rets) > 0  # random hopper falls, never times out
    cut = [ep for ep in eps if not ep.terminations[-1]]
    assert 1 <= len(cut) <= 3 and all(ep.truncations[-1] for ep in cut)
    assert np.allclose(sorted(rets), sorted(ep.rewards.sum() for ep in eps if ep.terminations[-1]))


def test_hand_made_episodes_keep_terminations_and_truncations():
    """Replay of three episodes: a fall (termination), a time-limit end (truncation) and one cut by
    the snapshot (stored as a truncation); the shared loader bootstraps all but the fall."""
    n = 3 + 2 + 2
    obs = np.arange(n, dtype=np.float32)[:, None].repeat(11, 1)
    buf = {
        "observations": obs,
        "next_observations": obs + 1,
        "actions": np.zeros((n, 3), np.float32),
        "rewards": np.ones(n, np.float32),
        "terminations": np.zeros(n, np.float32),
        "truncations": np.zeros(n, np.float32),
    }
    buf["terminations"][2] = 1  # episode 0: steps 0-2, falls
    buf["truncations"][4] = 1  # episode 1: steps 3-4, time limit; episode 2: steps 5-6, cut
    eps, rets = md.replay_to_episodes({k: torch.from_numpy(v) for k, v in buf.items()})
    assert [len(ep.rewards) for ep in eps] == [3, 2, 2]
    assert [list(ep.terminations) for ep in eps] == [[0, 0, 1], [0, 0], [0, 0]]
    assert [list(ep.truncations) for ep in eps] == [[0, 0, 0], [0, 1], [0, 1]]
    assert np.array_equal(eps[1].observations[:, 0], [3, 4, 5]) and list(rets) == [3, 2]
    md.write(md.Args(env="hopper"), "medium-replay", eps, {"medium": sac.Actor(11, 3, 8).state_dict()}, {}, "test")
    arr = sac_ft.load_dataset("hopper", "medium-replay")
    assert np.array_equal(arr["terminals"], [0, 0, 1, 0, 0, 0, 0])
    assert np.array_equal(arr["next_observations"][:, 0], np.arange(1, n + 1))


def test_policy_rollouts_come_from_each_member_in_turn(tmp_path):
    """Known answer: member i of a hand-built ensemble acts tanh(c_i) whatever the state (zero weights,
    bias c_i, log_std -20), so each member's share of the buffer carries its own constant action."""
    n, hidden, obs_dim, act_dim = 3, 8, 11, 3
    const = torch.tensor([-0.5, 0.1, 0.7])
    actor = {
        "net.0.weight": torch.zeros(n, obs_dim, hidden),
        "net.0.bias": torch.zeros(n, 1, hidden),
        "net.2.weight": torch.zeros(n, hidden, hidden),
        "net.2.bias": torch.zeros(n, 1, hidden),
        "mu.weight": torch.zeros(n, hidden, act_dim),
        "mu.bias": const.view(n, 1, 1).expand(n, 1, act_dim).clone(),
        "log_std.weight": torch.zeros(n, hidden, act_dim),
        "log_std.bias": torch.full((n, 1, act_dim), -20.0),
    }
    torch.save(
        {
            "format": "off2on-cql-ensemble/1",
            "env": "hopper",
            "dataset": "medium",
            "obs_dim": obs_dim,
            "act_dim": act_dim,
            "members": n,
            "hidden": hidden,
            "actor": actor,
            "updates": 7,
        },
        tmp_path / "ens.pt",
    )
    md.main(tiny_args(tmp_path, kinds=("policy-rollouts",), policy=str(tmp_path / "ens.pt"), n_steps=301, n_envs=2))
    ds = minari.load_dataset("off2on/hopper/policy-rollouts-v0")
    assert ds.total_steps == 301 and "3 members" in ds.storage.metadata["description"]
    actions = np.concatenate([ep.actions for ep in ds.iterate_episodes()])
    per_member = [101, 100, 100]  # 301 steps over 3 members, in member order
    expected = np.repeat(np.tanh(const.numpy()), per_member)[:, None].repeat(act_dim, 1)
    assert np.allclose(actions, expected, atol=1e-6)
    arr = sac_ft.load_dataset("hopper", "policy-rollouts")  # a kind every script accepts as --dataset
    assert len(arr["rewards"]) == 301
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "make_dataset.py"), "--kinds", "policy-rollouts"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "needs --policy" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--env", "hopper", "--kinds", "medium", "expertt"],
            "error: unknown kind 'expertt'; choose from: "
            "random medium medium-replay expert medium-expert policy-rollouts",
        ),
        (["--env", "humanoid"], "error: unknown env 'humanoid'; choose one of: hopper, halfcheetah, walker2d"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(argv, message):
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "make_dataset.py"), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [message]

"""Baselines (issue 5): SAC-ft, AWAC and BCQ-ft. The defining piece of each algorithm on hand-made
inputs, the shared uniform offline+online replay, tiny end-to-end runs, and exact resume."""

import math
import os

import numpy as np
import pytest
import torch

from baselines import awac, bcq_ft, sac_ft

MODULES = [sac_ft, awac, bcq_ft]
IDS = [m.__name__.split(".")[-1] for m in MODULES]
# tiny networks so an end-to-end run takes seconds; the schedule's shape is unchanged
TINY_NETS = {
    "sac_ft": {"hidden": 32},
    "awac": {"hidden": 32, "actor_layers": 2},
    "bcq_ft": {"vae_hidden": 32, "num_samples": 4},
}


# ---------------------------------------------------------------------------- AWAC's weights
def test_awac_weights_known_answer():
    # softmax([0, ln 3]) = [1/4, 3/4]; times the batch size 2 -> [0.5, 1.5] (mean 1)
    w = awac.awac_weights(torch.tensor([0.0, math.log(3.0)]), lam=1.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))
    # lambda divides the advantages: A = [0, 2 ln 3] at lambda 2 is the same batch
    torch.testing.assert_close(awac.awac_weights(torch.tensor([0.0, 2 * math.log(3.0)]), lam=2.0), w)
    # exp(A/lambda) / Z: a constant shift of A cancels, and Q-scale advantages do not overflow
    torch.testing.assert_close(awac.awac_weights(torch.tensor([1000.0, 1000.0 + math.log(3.0)]), 1.0), w)
    # four rows: weights proportional to exp(A), summing to the batch size
    adv = torch.tensor([0.0, 1.0, -1.0, 2.0])
    expected = 4 * torch.exp(adv) / torch.exp(adv).sum()
    torch.testing.assert_close(awac.awac_weights(adv, 1.0), expected)


# ---------------------------------------------------------------------------- BCQ's pieces
def test_bcq_perturbation_stays_within_phi_and_bounds():
    torch.manual_seed(0)
    obs_dim, act_dim, phi = 11, 3, 0.05
    vae = bcq_ft.VAE(obs_dim, act_dim, hidden=32)
    actor = bcq_ft.Perturbation(obs_dim, act_dim, phi)
    with torch.no_grad():  # large weights saturate tanh: the perturbation reaches its bound
        for p in actor.parameters():
            p.mul_(50.0)
    s = torch.randn(4096, obs_dim)
    a_vae = torch.cat([vae.decode(s[:4000]), torch.tensor([[1.0, -1.0, 0.99]]).repeat(96, 1)])
    a = actor(s, a_vae)
    assert (a_vae.abs() <= 1).all()  # the decoder's tanh
    assert (a.abs() <= 1).all()
    gap = (a - a_vae).abs()
    assert gap.max() <= phi + 1e-6
    assert gap.max() > 0.9 * phi  # not vacuous: the bound is reached
    # the policy (best of n perturbed VAE actions) inherits both properties
    critic = bcq_ft.TwinQ(obs_dim, act_dim)
    learner = bcq_ft.Learner(vae, actor, None, critic, None, None, None, None)
    out = bcq_ft.act(learner, s[:64].numpy(), True)
    assert out.shape == (64, act_dim) and np.abs(out).max() <= 1


def test_bcq_vae_reconstructs_a_narrow_action_set():
    torch.manual_seed(0)
    obs_dim, act_dim = 5, 2
    center = torch.tensor([0.5, -0.3])
    vae = bcq_ft.VAE(obs_dim, act_dim, hidden=64)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for _ in range(400):
        s = torch.randn(100, obs_dim)
        a = center + 0.01 * torch.randn(100, act_dim)
        loss = bcq_ft.vae_loss(vae, s, a)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gen = vae.decode(torch.randn(2000, obs_dim))  # generated from the clipped prior, new states
    assert (gen - center).abs().mean() < 0.05
    assert gen.std(0).max() < 0.1  # a narrow set, not the whole action box


def test_bcq_target_soft_clipped_double_q():
    """y = r + gamma (1-d) max_i [lam min_j Q'_j + (1-lam) max_j Q'_j] on hand-set Q values."""

    class FixedQ(torch.nn.Module):  # Q'_1 = first action coordinate, Q'_2 = 2 x first coordinate
        def forward(self, s, a):
            return torch.stack([a[:, 0], 2 * a[:, 0]])

    class FixedVAE(torch.nn.Module):  # n = 3 generated actions per state: first coordinates -0.5, 0.1, 0.4
        def decode(self, s):
            return torch.tensor([[-0.5], [0.1], [0.4]]).repeat(len(s) // 3, 1)

    learner = bcq_ft.Learner(FixedVAE(), None, lambda s, a: a, None, FixedQ(), None, None, None)
    r, d = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    y = bcq_ft.bcq_target(learner, r, torch.zeros(2, 3), d, gamma=0.9, lam=0.75, n=3)
    # best action 0.4: min 0.4, max 0.8 -> 0.75*0.4 + 0.25*0.8 = 0.5; y = 1 + 0.9*0.5, and 2 (terminal)
    torch.testing.assert_close(y, torch.tensor([1.45, 2.0]))


# ---------------------------------------------------------------------------- uniform offline + online replay
@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_replay_samples_both_sources_in_proportion(mod):
    rng = np.random.default_rng(0)
    m, n_on, obs_dim, act_dim = 3000, 1000, 3, 2
    data = {
        "observations": rng.normal(size=(m, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (m, act_dim)).astype(np.float32),
        "rewards": -np.ones(m, np.float32),
        "next_observations": rng.normal(size=(m, obs_dim)).astype(np.float32),
        "terminals": np.zeros(m, np.float32),
    }
    buf = mod.Replay(data, online_capacity=2 * n_on)
    np.random.seed(0)
    assert (buf.sample(1000, torch.device("cpu"))[2] == -1).all()  # offline only before any online row
    online = np.concatenate(
        [
            np.full((n_on, obs_dim), 7.0),
            np.zeros((n_on, act_dim)),
            np.ones((n_on, 1)),
            np.full((n_on, obs_dim), 8.0),
            np.ones((n_on, 1)),
        ],
        1,
    ).astype(np.float32)
    buf.add_online(online)
    draws = 200_000
    s, a, r, s2, d = buf.sample(draws, torch.device("cpu"))
    assert set(np.unique(r.numpy())) == {-1.0, 1.0}  # never an unfilled row
    frac = (r == 1).float().mean().item()
    p = n_on / (m + n_on)
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / draws)  # binomial, 5 sigma
    on = r == 1  # rows come back whole: online rows carry their own s, s', terminal
    assert (s[on] == 7).all() and (s2[on] == 8).all() and (d[on] == 1).all() and (d[~on] == 0).all()


# ---------------------------------------------------------------------------- end to end
def tiny_args(mod, run_dir, env="hopper", **kw):
    name = mod.__name__.split(".")[-1]
    base = dict(
        env=env,
        dataset="medium-replay",
        seed=3,
        device="cpu",
        run_dir=str(run_dir),
        offline_updates=4,
        eval_every=2,
        log_every=2,
        online_steps=40,
        epoch_steps=20,
        first_epoch_multiplier=2,
        eval_episodes=1,
        batch_size=16,
    )
    return mod.Args(**{**base, **TINY_NETS[name], **kw})


def read_evals(run_dir):
    lines = open(os.path.join(run_dir, "evals.csv")).read().splitlines()
    return lines[0].split(","), [ln.split(",") for ln in lines[1:]]


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_tiny_end_to_end_run(mod, tiny_dataset, tmp_path, capsys):
    tiny_dataset("hopper", "medium-replay")
    mod.main(tiny_args(mod, tmp_path / "run"))
    out = capsys.readouterr().out
    assert f"run dir: {tmp_path / 'run'}" in out and "checkpoint: " in out
    header, rows = read_evals(tmp_path / "run")
    assert header == [
        "phase",
        "updates",
        "env_steps",
        "policy",
        "return_mean",
        "return_std",
        "normalized_score",
        "wall_time_s",
    ]
    # offline evals at 2 and 4 updates; the start of fine-tuning; then one per epoch of 20 env steps
    # (the first epoch does 2 x 20 updates, the second 20)
    assert [(r[0], int(r[1]), int(r[2]), r[3]) for r in rows] == [
        ("offline", 2, 0, "policy"),
        ("offline", 4, 0, "policy"),
        ("online", 4, 0, "policy"),
        ("online", 44, 20, "policy"),
        ("online", 64, 40, "policy"),
    ]
    assert all(np.isfinite(float(r[6])) for r in rows)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["format"] == f"off2on-{mod.SCRIPT}/1" and ck["updates"] == 64 and ck["env_steps"] == 40
    assert ck["online"].shape[0] == 40  # every online transition, for an exact resume


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 4], ids=["mid-offline", "mid-online"])
@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_resume_is_exact(mod, stop_after, tiny_dataset, tmp_path, monkeypatch):
    """A run killed after its k-th checkpoint and resumed ends with the same weights, optimizer
    states, buffer and evaluations as an uninterrupted run. (walker2d, resumed without --env: the
    run's own arguments must win over the CLI defaults.)"""
    tiny_dataset("walker2d", "medium-replay")
    mod.main(tiny_args(mod, tmp_path / "straight", env="walker2d"))
    real_save, calls = mod.save_checkpoint, []

    def save_then_die(obj, path):
        real_save(obj, path)
        calls.append(path)
        if len(calls) == stop_after:
            raise Interrupt

    monkeypatch.setattr(mod, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupt):
        mod.main(tiny_args(mod, tmp_path / "resumed", env="walker2d"))
    monkeypatch.setattr(mod, "save_checkpoint", real_save)
    mod.main(mod.Args(run_dir=str(tmp_path / "resumed"), resume=True, online_steps=40, device="cpu"))

    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)

    def assert_same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                assert_same(x[k], y[k], f"{where}/{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (xi, yi) in enumerate(zip(x, y)):
                assert_same(xi, yi, f"{where}[{i}]")
        elif where not in ("/args/run_dir", "/args/resume"):
            assert x == y, where

    assert_same(a, b, "")
    (_, rows_a), (_, rows_b) = read_evals(tmp_path / "straight"), read_evals(tmp_path / "resumed")
    assert [r[:-1] for r in rows_a] == [r[:-1] for r in rows_b]  # all but wall time


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_bad_input_is_one_clear_error(mod, tmp_path):
    with pytest.raises(mod.InputError, match="unknown env"):
        mod.main(mod.Args(env="ant", run_dir=str(tmp_path / "x")))
    with pytest.raises(mod.InputError, match="--resume needs --run-dir"):
        mod.main(mod.Args(resume=True))
    with pytest.raises(mod.InputError, match="make_dataset.py --env walker2d --kinds expert"):
        mod.main(mod.Args(env="walker2d", dataset="expert", run_dir=str(tmp_path / "y")))

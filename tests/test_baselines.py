"""Baselines: SAC-ft, AWAC and BCQ-ft. The defining piece of each algorithm on hand-made inputs, the
shared uniform offline+online replay, the shared evaluation protocol, tiny end-to-end runs, and exact
resume."""

import csv
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT

from baselines import awac, bcq_ft, sac_ft

MODULES = [sac_ft, awac, bcq_ft]
IDS = [m.__name__.split(".")[-1] for m in MODULES]
# tiny networks so an end-to-end run takes seconds; the schedule's shape is unchanged
TINY_NETS = {
    "sac_ft": {"hidden": 32},
    "awac": {"hidden": 32, "actor_layers": 2, "offline_batch_size": 8},
    "bcq_ft": {"vae_hidden": 32, "target_samples": 4, "select_samples": 6},
}


# ---------------------------------------------------------------------------- AWAC's weights
def test_awac_weights_known_answer():
    # softmax([0, ln 3]) = [1/4, 3/4]; times the batch size 2 -> [0.5, 1.5] (mean 1)
    w = awac.awac_weights(torch.tensor([0.0, math.log(3.0)]), beta=1.0)
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))
    # beta divides the advantages: A = [0, 2 ln 3] at beta 2 is the same batch
    torch.testing.assert_close(awac.awac_weights(torch.tensor([0.0, 2 * math.log(3.0)]), beta=2.0), w)
    # exp(A/beta) / mean_batch(exp(A/beta)): a constant shift of A cancels, and Q-scale advantages do not overflow
    torch.testing.assert_close(awac.awac_weights(torch.tensor([1000.0, 1000.0 + math.log(3.0)]), 1.0), w)
    # four rows: weights proportional to exp(A), summing to the batch size
    adv = torch.tensor([0.0, 1.0, -1.0, 2.0])
    expected = 4 * torch.exp(adv) / torch.exp(adv).sum()
    torch.testing.assert_close(awac.awac_weights(adv, 1.0), expected)


class ActionQ(torch.nn.Module):
    """Hand-built twin critic: Q1(s, a) = -|a|^2, Q2 = Q1 + 1, so min_j Q_j = -|a|^2 (largest at a = 0)."""

    def forward(self, s, a):
        q1 = -a.pow(2).sum(-1)
        return torch.stack([q1, q1 + 1.0])


def test_awac_value_from_a_sampled_action():
    """V(s) = min_j Q_j(s, a~) at one a~ ~ pi(.|s), clipped to [-1, 1] (rlkit awr_use_mle_for_vf=False): with the
    mean action 0 and sigma 1, V differs from Q at the mean (0) and is known row by row for a fixed seed."""
    b, act_dim = 50_000, 2
    mean, log_std = torch.zeros(b, act_dim), torch.zeros(b, act_dim)
    torch.manual_seed(0)
    v = awac.state_value(ActionQ(), torch.zeros(b, 3), mean, log_std)
    torch.manual_seed(0)
    expected = -torch.randn(b, act_dim).clamp(-1, 1).pow(2).sum(-1)  # the same draw, by hand
    torch.testing.assert_close(v, expected)
    # E[min(Z^2, 1)] = P(|Z| < 1) - 2 phi(1) + P(|Z| > 1) = 0.516059 per dimension, Z ~ N(0, 1)
    assert v.mean().item() == pytest.approx(-2 * 0.516059, abs=0.01)
    assert (v < 0).float().mean() > 0.99  # V at the mean action would be 0 for every row


def test_awac_losses_take_the_advantage_against_a_sampled_action():
    """awac_losses: A = min_j Q_j(s, a) - V(s) with V from a sampled action (draws: a' at s', then a~),
    weights B softmax(A / beta)."""
    torch.manual_seed(1)
    obs_dim, act_dim, b, beta = 3, 2, 8, 2.0
    actor = awac.Actor(obs_dim, act_dim, hidden=8, layers=1)
    with torch.no_grad():  # sigma ~ 1 (log sigma ~ 0, the top of [-6, 0]): samples far from the mean
        actor.log_std_logit.fill_(20.0)
    learner = SimpleNamespace(actor=actor, critic=ActionQ(), critic_target=ActionQ())
    s, s2 = torch.randn(b, obs_dim), torch.randn(b, obs_dim)
    a = torch.rand(b, act_dim) * 2 - 1
    batch = (s, a, torch.zeros(b), s2, torch.zeros(b))
    torch.manual_seed(5)
    _, _, stats = awac.awac_losses(learner, batch, gamma=0.99, beta=beta)
    torch.manual_seed(5)
    with torch.no_grad():
        actor.sample(s2)  # the target's next action comes first
        mean, log_std = actor(s)
        a_tilde = (mean + log_std.exp() * torch.randn_like(mean)).clamp(-1, 1)
    adv = -a.pow(2).sum(-1) + a_tilde.pow(2).sum(-1)
    torch.testing.assert_close(stats["advantage_mean"], adv.mean())
    torch.testing.assert_close(stats["weight_max"], (b * torch.softmax(adv / beta, 0)).max())
    adv_at_mean = -a.pow(2).sum(-1) + mean.pow(2).sum(-1)  # what V at the mean action would give
    assert (adv - adv_at_mean).abs().mean() > 0.1


def test_awac_help_shows_the_launchers_beta():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "baselines", "awac.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    first = next(i for i, ln in enumerate(lines) if "--beta" in ln)
    last = next(i for i in range(first + 1, len(lines)) if " --" in lines[i])  # the next option
    assert "(default: 2.0)" in " ".join(lines[first:last])
    assert awac.Args().offline_updates == 50_000 and awac.Args().offline_batch_size == 128
    assert awac.Args().batch_size == 1024


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
    critic = bcq_ft.TwinQ(obs_dim, act_dim, (400, 300))
    learner = SimpleNamespace(vae=vae, actor=actor, critic=critic, select_samples=100, device=torch.device("cpu"))
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

    learner = SimpleNamespace(vae=FixedVAE(), actor_target=lambda s, a: a, critic_target=FixedQ())
    r, d = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    y = bcq_ft.bcq_target(learner, r, torch.zeros(2, 3), d, gamma=0.9, lam=0.75, n=3)
    # best action 0.4: min 0.4, max 0.8 -> 0.75*0.4 + 0.25*0.8 = 0.5; y = 1 + 0.9*0.5, and 2 (terminal)
    torch.testing.assert_close(y, torch.tensor([1.45, 2.0]))


def tiny_bcq(obs_dim=5, act_dim=2, seed=0):
    torch.manual_seed(seed)
    args = bcq_ft.Args(vae_hidden=16, lr=1e-3)
    return bcq_ft.Learner(args, obs_dim, act_dim, torch.device("cpu"))


def decoder_batches(learner):
    """Records the batch size of every call of the VAE's decoder."""
    sizes = []
    learner.vae.decoder.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))
    return sizes


def test_bcq_acts_on_100_candidates_and_targets_10():
    learner = tiny_bcq()
    sizes = decoder_batches(learner)
    bcq_ft.act(learner, np.zeros((3, 5), np.float32), False)
    assert sizes == [3 * 100] and learner.select_samples == 100  # BCQ.py select_action: 100 candidates per state
    sizes.clear()
    rows = np.random.default_rng(0).normal(size=(50, 5 + 2 + 1 + 5 + 1)).astype(np.float32)
    data = {
        "observations": rows[:, :5],
        "actions": np.tanh(rows[:, 5:7]),
        "rewards": rows[:, 7],
        "next_observations": rows[:, 8:13],
        "terminals": np.zeros(50, np.float32),
    }
    args = bcq_ft.Args(batch_size=16)
    bcq_ft.update(learner, bcq_ft.UniformReplay(data, 0), args, "online")
    # VAE fit on the batch, the target's 10 next actions per row, the perturbation net's VAE actions
    assert sizes == [16, 16 * args.target_samples, 16] and args.target_samples == 10


def test_bcq_policy_picks_the_best_of_its_candidates():
    """Candidates a_i with first coordinates spread over [-1, 1], identity perturbation, Q1 = -(a_0 - 0.3)^2:
    the best of 100 candidates is within 1/99 of 0.3; with 10 it could be 0.11 away."""

    class SpreadVAE(torch.nn.Module):
        latent_dim = 1

        def decode(self, s, z=None):  # candidate i of each state: first coordinate -1 + 2 i / (n - 1)
            n = len(s) // 2
            first = torch.linspace(-1, 1, n).repeat(2)
            return torch.stack([first, torch.zeros_like(first)], 1)

    class PreferQ(torch.nn.Module):
        def forward(self, s, a):
            q1 = -(a[:, 0] - 0.3).pow(2)
            return torch.stack([q1, -q1])

    learner = SimpleNamespace(vae=SpreadVAE(), actor=lambda s, a: a, critic=PreferQ(), device=torch.device("cpu"))
    for n, tolerance in ((100, 1 / 99), (10, 1 / 9)):
        learner.select_samples = n
        a = bcq_ft.act(learner, np.zeros((2, 4), np.float32), True)
        best = np.linspace(-1, 1, n)[np.abs(np.linspace(-1, 1, n) - 0.3).argmin()]
        assert np.allclose(a[:, 0], best) and abs(best - 0.3) <= tolerance
    learner.select_samples = 100
    assert abs(bcq_ft.act(learner, np.zeros((2, 4), np.float32), False)[0, 0] - 0.3) < 0.011


def test_bcq_deterministic_flag():
    """deterministic=True: the action is a function of the state (same state, same action, in any batch, and
    the global RNG is untouched); False: fresh latents, so repeated calls differ."""
    learner = tiny_bcq()
    obs = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32)
    torch.manual_seed(0)
    first = bcq_ft.act(learner, obs, True)
    rng_after = torch.get_rng_state()
    torch.manual_seed(123)
    again = bcq_ft.act(learner, obs, True)
    assert np.array_equal(first, again)
    assert np.array_equal(bcq_ft.act(learner, obs[2:3], True), first[2:3])  # batch-independent
    torch.manual_seed(0)
    torch.rand(1)
    assert not torch.equal(torch.get_rng_state(), rng_after)  # (sanity: a draw moves the state)
    torch.manual_seed(0)
    assert torch.equal(torch.get_rng_state(), rng_after)  # act(..., True) drew nothing from it
    explore = [bcq_ft.act(learner, obs, False) for _ in range(2)]
    assert not np.array_equal(explore[0], explore[1])


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
    buf = mod.UniformReplay(data, online_capacity=2 * n_on)
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


TRAIN_COLUMNS = {
    "sac_ft": ["critic_loss", "actor_loss", "alpha", "q_mean", "entropy"],
    "awac": ["critic_loss", "actor_loss", "q_mean", "advantage_mean", "advantage_std", "weight_max", "weight_std"],
    "bcq_ft": ["vae_loss", "critic_loss", "actor_loss", "q_mean"],
}


def scalar_steps(run_dir) -> dict:
    """tensorboard tag -> the steps it was logged at."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


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
    assert ck["format"] == mod.FORMAT and ck["updates"] == 64 and ck["env_steps"] == 40
    assert ck["online"].shape[0] == 40  # every online transition, for an exact resume
    assert ck["evals"] == 5
    # train.csv: one row per online epoch, the epoch's means; none for the offline phase
    name = mod.__name__.split(".")[-1]
    train = list(csv.DictReader(open(tmp_path / "run" / "train.csv")))
    assert list(train[0]) == ["env_steps", "updates", *TRAIN_COLUMNS[name]]
    assert [(int(r["env_steps"]), int(r["updates"])) for r in train] == [(20, 44), (40, 64)]
    assert all(np.isfinite(float(v)) for r in train for v in r.values())
    # tensorboard: offline/<stat> against updates, online/<stat> against env steps; no tag shared by both
    steps = scalar_steps(tmp_path / "run")
    assert all(tag.startswith(("offline/", "online/")) for tag in steps)
    for stat in TRAIN_COLUMNS[name]:
        assert steps[f"offline/{stat}"] == [2, 4] and steps[f"online/{stat}"] == [20, 40]
    assert steps["offline/eval_policy/return"] == [2, 4] and steps["online/eval_policy/return"] == [0, 20, 40]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after", [1, 4], ids=["mid-offline", "mid-online"])
@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_resume_is_exact(mod, stop_after, tiny_dataset, tmp_path, monkeypatch):
    """A run killed after its k-th checkpoint and resumed ends with the same weights, optimizer
    states, buffer, evaluations and train.csv as an uninterrupted run; every evaluation starts from new
    states (the k-th resets with eval_seed(seed, k)) and the resumed run goes on with the seeds the
    uninterrupted run used. (walker2d, resumed without --env: the run's own arguments must win over the
    CLI defaults.)"""
    tiny_dataset("walker2d", "medium-replay")
    seeds, real_evaluate = [], mod.evaluate

    def recording_evaluate(env_name, act_fn, episodes, seed):
        seeds.append(seed)
        return real_evaluate(env_name, act_fn, episodes, seed)

    monkeypatch.setattr(mod, "evaluate", recording_evaluate)
    mod.main(tiny_args(mod, tmp_path / "straight", env="walker2d"))
    straight = list(seeds)
    assert straight == [mod.eval_seed(3, k) for k in range(5)] and len(set(straight)) == 5
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
    seeds.clear()
    mod.main(mod.Args(run_dir=str(tmp_path / "resumed"), resume=True, online_steps=40, device="cpu"))
    assert seeds == straight[len(straight) - len(seeds) :] and len(seeds) == 5 - stop_after

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
    assert (tmp_path / "straight" / "train.csv").read_text() == (tmp_path / "resumed" / "train.csv").read_text()


def test_consecutive_evaluations_start_from_different_states():
    import gymnasium as gym

    starts = []
    for k in range(2):
        envs = gym.vector.SyncVectorEnv([lambda: gym.make("Walker2d-v5") for _ in range(2)])
        starts.append(envs.reset(seed=awac.eval_seed(3, k))[0])
        envs.close()
    assert not np.allclose(starts[0], starts[1])


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_bad_input_is_one_clear_error(mod, tmp_path):
    with pytest.raises(mod.InputError, match="unknown env"):
        mod.main(mod.Args(env="ant", run_dir=str(tmp_path / "x")))
    with pytest.raises(mod.InputError, match="--resume needs --run-dir"):
        mod.main(mod.Args(resume=True))
    with pytest.raises(mod.InputError, match="make_dataset.py --env walker2d --kinds expert"):
        mod.main(mod.Args(env="walker2d", dataset="expert", run_dir=str(tmp_path / "y")))
    old = tmp_path / "old"  # a run of the previous checkpoint layout
    old.mkdir()
    torch.save({"format": mod.FORMAT[:-1] + "2", "env_steps": 0}, old / "checkpoint.pt")
    with pytest.raises(mod.InputError, match=r"is not an off2on-\S+/3 checkpoint of a run .*; it cannot be resumed"):
        mod.main(mod.Args(resume=True, run_dir=str(old)))

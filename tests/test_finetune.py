"""Tests of off2on_finetune.py: the sum-tree, the density-ratio estimator, the moment-matched ensemble
policy, the SAC losses against a hand computation, balanced-replay bookkeeping, tiny end-to-end runs
(from a hand-made ensemble file and from one made by off2on_cql_ensemble.py), exact resume, bad input."""

import csv
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT
from scipy import stats

import off2on_finetune as ft


def ensemble_file(path, env="hopper", dataset="medium-replay", obs_dim=11, act_dim=3, n=3, hidden=16, seed=0):
    """An ensemble file in the hand-off format of off2on_cql_ensemble.py, made from the networks of the script."""
    torch.manual_seed(seed)
    actor, critic = ft.EnsembleActor(obs_dim, act_dim, n, hidden), ft.EnsembleCritic(obs_dim, act_dim, n, hidden)
    torch.save(
        {
            "format": "off2on-cql-ensemble/1",
            "env": env,
            "dataset": dataset,
            "obs_dim": obs_dim,
            "act_dim": act_dim,
            "members": n,
            "hidden": hidden,
            "actor": actor.state_dict(),
            "critic": critic.state_dict(),
            "critic_target": critic.state_dict(),
            "log_alpha": torch.zeros(n),
            "updates": 0,
        },
        path,
    )
    return str(path)


def tiny_args(tmp_path, name="run", **kw):
    base = dict(
        env="hopper",
        dataset="medium-replay",
        device="cpu",
        checkpoint=str(tmp_path / "ens.pt"),
        online_steps=60,
        epoch_steps=20,
        first_epoch_multiplier=2,
        eval_every=20,
        eval_episodes=2,
        batch_size=16,
        run_dir=str(tmp_path / name),
    )
    base.update(kw)
    return ft.Args(**base)


def evals(run_dir):
    return list(csv.DictReader(open(os.path.join(run_dir, "evals.csv"))))


# ----------------------------------------------------------------------------- sum-tree
def test_sumtree_sampling_frequencies_match_priorities():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.1, 5.0, 37)
    p[[3, 17, 36]] = 0.0  # empty leaves must never be drawn
    tree = ft.SumTree(40)  # 3 padding leaves beyond the 37 used ones, also never drawn
    tree.update(np.arange(37), p)
    np.random.seed(0)
    draws = np.concatenate([tree.sample(1024) for _ in range(120)])  # 122,880 draws
    counts = np.bincount(draws, minlength=40)
    assert counts[[3, 17, 36, 37, 38, 39]].sum() == 0
    keep = p > 0
    expected = len(draws) * p[keep] / p.sum()
    chi2 = ((counts[:37][keep] - expected) ** 2 / expected).sum()
    assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-3, chi2
    # a biased sampler fails the same test: drawing leaves uniformly instead of by priority
    uniform = np.bincount(rng.choice(np.flatnonzero(keep), len(draws)), minlength=40)[:37][keep]
    assert stats.chi2.sf(((uniform - expected) ** 2 / expected).sum(), keep.sum() - 1) < 1e-6


def sequential(capacity, idx, values):
    """Reference: one-at-a-time updates."""
    tree = ft.SumTree(capacity)
    for i, v in zip(idx, values):
        tree.update(np.array([i]), np.array([v]))
    return tree


def test_sumtree_batch_update_with_repeated_indices():
    tree = ft.SumTree(10)
    tree.update(np.arange(10), np.ones(10))
    idx, vals = np.array([3, 3, 5, 3, 9, 5]), np.array([1.5, 2.0, 3.0, 4.0, 0.25, 7.0])
    tree.update(idx, vals)
    leaves = tree.nodes[tree.start : tree.start + 10]
    assert leaves[3] == 4.0 and leaves[5] == 7.0 and leaves[9] == 0.25  # the last write wins
    ref = sequential(10, np.r_[np.arange(10), idx], np.r_[np.ones(10), vals])
    np.testing.assert_array_equal(tree.nodes, ref.nodes)
    assert tree.nodes[0] == 7 * 1.0 + 4.0 + 7.0 + 0.25


def test_sumtree_totals_after_many_updates():
    rng = np.random.default_rng(1)
    cap = 1000
    tree = ft.SumTree(cap)
    for _ in range(3000):
        idx = rng.integers(0, cap, 64)  # repeats within a batch are common at this size
        tree.update(idx, rng.exponential(size=64) * rng.choice([1e-3, 1.0, 1e3], 64))
    inner = np.arange(tree.start)
    np.testing.assert_array_equal(tree.nodes[inner], tree.nodes[2 * inner + 1] + tree.nodes[2 * inner + 2])
    leaves = tree.nodes[tree.start : tree.start + cap]
    assert tree.nodes[0] == pytest.approx(leaves.sum(), rel=1e-12)
    fresh = ft.SumTree(cap)
    fresh.update(np.arange(cap), leaves)  # the tree a resumed run rebuilds from the saved leaves
    np.testing.assert_array_equal(fresh.nodes, tree.nodes)


# ----------------------------------------------------------------------------- balanced replay
def test_replay_initial_online_share_and_max_priority():
    m, d = 4000, 2
    data = {
        "observations": np.zeros((m, d), np.float32),
        "actions": np.zeros((m, 1), np.float32),
        "rewards": np.zeros(m, np.float32),
        "next_observations": np.zeros((m, d), np.float32),
        "terminals": np.zeros(m, np.float32),
    }
    for f in (0.5, 0.1):
        replay = ft.Replay(data, 2000, torch.device("cpu"), init_online_fraction=f)
        assert replay.max_priority == pytest.approx(m * f / ((1 - f) * 1000))
        replay.add_online(np.ones((1000, replay.rows.shape[1]), np.float32))
        online_mass = replay.tree.nodes[replay.tree.start + m : replay.tree.start + m + 1000].sum()
        assert online_mass / replay.tree.nodes[0] == pytest.approx(f)  # the first 1,000 online rows hold f
        assert torch.equal(replay.rows[m : m + 1000], torch.ones(1000, replay.rows.shape[1]))
    s, a, r, s2, dn = replay.split(replay.rows[m - 1 : m + 1])
    assert s.shape == (2, d) and a.shape == (2, 1) and r.shape == (2,) and s2.shape == (2, d) and dn.shape == (2,)


def test_priorities_and_ratio_loss_by_hand():
    w_rl, w_off = torch.tensor([0.0, 1.0, 32.0, 1e20]), torch.tensor([1.0, 32.0])
    norm = (1.0 + 2.0) / 2  # mean of w_off^(1/5)
    expected = [1e-3, 1.0 / norm, 2.0 / norm, 1e3]  # clipped to [1e-3, 1e3] at both ends
    got = ft.priorities(w_rl, w_off, 5.0, 1e-3, 1e3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    w_off, w_on = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.5, 2.0])
    hand = np.mean([-np.log(2 / 1), -np.log(2 / 2), -np.log(2 / 4)]) - np.mean([np.log(1 / 1.5), np.log(4 / 3)])
    assert ft.ratio_loss(w_off, w_on).item() == pytest.approx(hand, rel=1e-5)


def halfcheetah_inputs(n=4096, seed=0):
    """(s, a) rows of HalfCheetah-v5 under uniform random actions: inputs at the env's own scale."""
    import gymnasium as gym

    env = gym.make("HalfCheetah-v5")
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(n):
        act = rng.uniform(-1, 1, 6).astype(np.float32)
        rows.append(np.concatenate([obs, act]))
        obs, _, term, trunc, _ = env.step(act)
        if term or trunc:
            obs, _ = env.reset()
    return torch.tensor(np.array(rows), dtype=torch.float32)


def test_ratio_net_starts_at_one_like_the_authors():
    x = halfcheetah_inputs()
    for seed in range(3):
        torch.manual_seed(seed)
        with torch.no_grad():
            w = ft.density_ratio_net(23)(x).squeeze(-1)
        assert abs(w.mean().item() - 1.0) < 0.01 and w.std().item() < 0.01, (w.mean(), w.std())
    # PyTorch's default init (what rlkit's init replaces) fails the same check
    torch.manual_seed(0)
    default = torch.nn.Sequential(
        torch.nn.Linear(23, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1)
    )
    torch.nn.init.constant_(default[4].bias, 1.0)
    with torch.no_grad():
        assert default(x).std().item() > 0.01


def test_ratio_net_recovers_gaussian_density_ratio():
    """Offline N(0, I), online N(mu, I) in 3-D: the true ratio is exp(mu.x - |mu|^2/2)."""
    torch.manual_seed(0)
    mu = torch.tensor([0.6, -0.4, 0.3])
    net = ft.density_ratio_net(3, hidden=64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(1500):
        w = net(torch.cat([torch.randn(256, 3), torch.randn(256, 3) + mu])).squeeze(-1)
        loss = ft.ratio_loss(w[:256], w[256:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.cat([torch.randn(1000, 3), torch.randn(1000, 3) + mu])
    with torch.no_grad():
        w = net(x).squeeze(-1)
        true = torch.exp(x @ mu - mu.dot(mu) / 2)
    assert stats.spearmanr(w.numpy(), true.numpy()).statistic >= 0.9
    with torch.no_grad():  # E_off[w] = 1 for the true ratio
        assert 0.8 < net(torch.randn(4000, 3)).mean().item() < 1.2


# ----------------------------------------------------------------------------- ensemble policy
def test_moment_matching_equals_monte_carlo_of_the_mixture():
    torch.manual_seed(0)
    n, b, a = 4, 3, 2
    mu_i, log_std_i = torch.randn(n, b, a, dtype=torch.float64), torch.randn(n, b, a, dtype=torch.float64) * 0.5
    mu, std = ft.ensemble_moments(mu_i, log_std_i)
    paper = (log_std_i.exp() ** 2 + mu_i**2).mean(0) - mu_i.mean(0) ** 2  # the formula of the paper
    torch.testing.assert_close(std**2, paper)
    k = 400_000  # the uniform mixture of the members' Gaussians
    member = torch.randint(0, n, (k, b, a))
    x = torch.gather(mu_i.expand(k, -1, -1, -1), 1, member[:, None]).squeeze(1) + torch.gather(
        log_std_i.exp().expand(k, -1, -1, -1), 1, member[:, None]
    ).squeeze(1) * torch.randn(k, b, a, dtype=torch.float64)
    torch.testing.assert_close(mu, x.mean(0), atol=0.02, rtol=0)
    torch.testing.assert_close(std**2, x.var(0), atol=0.0, rtol=0.02)
    # sigma is clamped to [e^-20, e^2]
    _, s = ft.ensemble_moments(torch.zeros(2, 1, 1), torch.full((2, 1, 1), 5.0))
    assert s.item() == pytest.approx(np.exp(2.0))


def test_ensemble_policy_log_prob_is_the_tanh_gaussian_density():
    torch.manual_seed(1)
    actor = ft.EnsembleActor(4, 2, 3, 8).double()
    obs = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(2)
    act, logp = ft.ensemble_policy(actor, obs)
    mu, std = ft.ensemble_moments(*actor(obs.expand(3, 5, 4)))
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu, std), [torch.distributions.TanhTransform()]
    )
    torch.testing.assert_close(logp, dist.log_prob(act).sum(-1), rtol=1e-6, atol=1e-6)
    torch.manual_seed(2)  # the same draw: u = mu + std * eps
    torch.testing.assert_close(act, torch.tanh(mu + std * torch.randn_like(mu)))


# ----------------------------------------------------------------------------- SAC losses
def test_sac_losses_match_a_member_by_member_hand_computation():
    torch.manual_seed(4)  # a draw where both rows win min(Q1, Q2) somewhere (asserted below)
    n, od, ad, b, gamma, alpha = 2, 3, 2, 16, 0.9, 0.7
    actor, critic = ft.EnsembleActor(od, ad, n, 5).double(), ft.EnsembleCritic(od, ad, n, 5).double()
    target = ft.EnsembleCritic(od, ad, n, 5).double()
    with torch.no_grad():  # make Q depend strongly on (s, a), so that min(Q1, Q2) picks both rows
        for net in (critic, target):
            net.net[4].weight.mul_(30)
    log_alpha = torch.tensor(np.log(alpha), dtype=torch.float64, requires_grad=True)
    s, a, s2 = torch.randn(b, od).double(), torch.rand(b, ad).double() * 2 - 1, torch.randn(b, od).double()
    r, d = torch.randn(b).double(), (torch.arange(b) % 3 == 1).double()
    torch.manual_seed(5)
    learner = SimpleNamespace(
        members=n, actor=actor, critic=critic, critic_target=target, log_alpha=log_alpha, target_entropy=-float(ad)
    )
    critic_loss, actor_loss, alpha_loss, _ = ft.sac_losses(learner, (s, a, r, s2, d), gamma)
    torch.manual_seed(5)  # the same two noise draws, in order: for s' (target) then for s (actor)
    eps_next, eps = torch.randn(b, ad, dtype=torch.float64), torch.randn(b, ad, dtype=torch.float64)

    def lin(layer, i, x):
        return x @ layer.weight[i] + layer.bias[i, 0]

    def member_q(net, row, obs, act):
        h = torch.cat([obs, act], -1)
        for j in (0, 2):
            h = torch.relu(lin(net.net[j], row, h))
        return lin(net.net[4], row, h)[:, 0]

    def ens_sample(obs, e):  # mixture moments and tanh-Gaussian log-density, written out
        mus, stds = [], []
        for i in range(n):
            h = torch.relu(lin(actor.net[2], i, torch.relu(lin(actor.net[0], i, obs))))
            mus.append(lin(actor.mu, i, h))
            stds.append(lin(actor.log_std, i, h).clamp(-20, 2).exp())
        m = sum(mus) / n
        var = sum(sd**2 + mm**2 for sd, mm in zip(stds, mus)) / n - m**2
        sd = var.sqrt()
        u = m + sd * e
        logp = (-0.5 * e**2 - sd.log() - 0.5 * np.log(2 * np.pi) - torch.log(1 - torch.tanh(u) ** 2)).sum(-1)
        return torch.tanh(u), logp

    with torch.no_grad():
        a2, logp2 = ens_sample(s2, eps_next)
        a_pi, logp_pi = ens_sample(s, eps)
        hand_critic, qmins = 0.0, []
        for i in range(n):
            q1, q2 = member_q(target, i, s2, a2), member_q(target, n + i, s2, a2)
            assert (q1 < q2).any() and (q1 > q2).any()  # the test can tell min from either row
            y = r + (1 - d) * gamma * (torch.min(q1, q2) - alpha * logp2)
            hand_critic += ((member_q(critic, i, s, a) - y) ** 2).mean() + (
                (member_q(critic, n + i, s, a) - y) ** 2
            ).mean()
            q1, q2 = member_q(critic, i, s, a_pi), member_q(critic, n + i, s, a_pi)
            assert (q1 < q2).any() and (q1 > q2).any()
            qmins.append(torch.min(q1, q2))
        hand_actor = (alpha * logp_pi - sum(qmins) / n).mean()
        hand_alpha = -(np.log(alpha) * (logp_pi - ad)).mean()
    assert critic_loss.item() == pytest.approx(hand_critic.item(), rel=1e-6)
    assert actor_loss.item() == pytest.approx(hand_actor.item(), rel=1e-6)
    assert alpha_loss.item() == pytest.approx(hand_alpha.item(), rel=1e-5)
    actor_loss.backward()  # the actor loss must not move the critics
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in actor.parameters())


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("replay,members", [("balanced", 0), ("uniform", 2), ("online-only", 1)])
def test_tiny_end_to_end_run(tmp_path, tiny_dataset, capsys, replay, members):
    tiny_dataset("hopper", "medium-replay")
    ensemble_file(tmp_path / "ens.pt")
    args = tiny_args(tmp_path, replay=replay, members=members)
    ft.main(args)
    out = capsys.readouterr().out
    assert args.run_dir in out and os.path.join(args.run_dir, "checkpoint.pt") in out
    rows = evals(args.run_dir)
    assert [(r["phase"], r["policy"], r["env_steps"]) for r in rows] == [
        ("online", "ensemble", str(s)) for s in (0, 20, 40, 60)
    ]
    assert [int(r["updates"]) for r in rows] == [0, 40, 60, 80]  # first epoch x2
    assert all(np.isfinite(float(r["normalized_score"])) for r in rows)
    ck = torch.load(os.path.join(args.run_dir, "checkpoint.pt"), weights_only=True)
    k = members or 3
    assert (
        ck["members"] == k and ck["actor"]["mu.weight"].shape[0] == k and ck["critic"]["net.4.weight"].shape[0] == 2 * k
    )
    assert ck["online"].shape == (60, 2 * 11 + 3 + 2) and (ck["env_steps"], ck["updates"]) == (60, 80)
    leaves = ck["priorities"].numpy()
    m = len(leaves) - 60
    assert np.all(leaves > 0)
    if replay == "balanced":  # priorities moved away from their initial values
        assert not np.all(leaves[:m] == 1.0) and ck["max_priority"] >= m * 0.5 / (0.5 * 1000)
    else:
        assert np.all(leaves[:m] == 1.0)
    ens = torch.load(tmp_path / "ens.pt", weights_only=True)  # members are the first K rows, and were trained
    assert not torch.equal(ck["actor"]["mu.weight"], ens["actor"]["mu.weight"][:k])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(args.run_dir))
    train = list(csv.DictReader(open(os.path.join(args.run_dir, "train.csv"))))  # one row per epoch
    assert list(train[0]) == ["env_steps", "updates", *ft.TRAIN_COLUMNS]
    assert [(r["env_steps"], r["updates"]) for r in train] == [("20", "40"), ("40", "60"), ("60", "80")]
    share = [float(r["online_fraction"]) for r in train]
    if replay == "online-only":
        assert share == [1.0, 1.0, 1.0]
    else:
        assert all(0 < f < 1 for f in share)
    if replay == "balanced":
        assert all(float(r["w_offline_mean"]) > 0 and float(r["ratio_loss"]) < 0.1 for r in train)
    else:
        assert all(r["ratio_loss"] == "" for r in train)


def test_resume_continues_exactly(tmp_path, tiny_dataset, monkeypatch):
    tiny_dataset("hopper", "medium-replay")
    ensemble_file(tmp_path / "ens.pt")
    real_evaluate, seeds = ft.evaluate, []

    def recording_evaluate(env_name, act_fn, episodes, seed):
        seeds.append(seed)
        return real_evaluate(env_name, act_fn, episodes, seed)

    monkeypatch.setattr(ft, "evaluate", recording_evaluate)
    ft.main(tiny_args(tmp_path, "a"))
    seeds_a, seeds[:] = list(seeds), []
    assert len(set(seeds_a)) == len(seeds_a) == 4  # every evaluation starts from new states
    real_save, calls = ft.save_checkpoint, []

    def killed_at_second_save(obj, path):  # the run dies after its 2nd evaluation, before saving
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(ft, "save_checkpoint", killed_at_second_save)
    with pytest.raises(KeyboardInterrupt):
        ft.main(tiny_args(tmp_path, "b"))
    monkeypatch.setattr(ft, "save_checkpoint", real_save)
    assert len(evals(tmp_path / "b")) == 3  # start, epoch 1 and the unsaved epoch 2
    # the run's saved arguments rule: a different --env/--dataset on the command line is ignored
    ft.main(
        ft.Args(
            resume=True, run_dir=str(tmp_path / "b"), online_steps=60, device="cpu", env="walker2d", dataset="not-used"
        )
    )
    a, b = (torch.load(tmp_path / x / "checkpoint.pt", weights_only=True) for x in "ab")
    for key in ("actor", "critic", "critic_target", "ratio"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after resume"
    for key in ("log_alpha", "online", "priorities"):
        assert torch.equal(a[key], b[key]), key
    assert (a["max_priority"], a["updates"], a["env_steps"]) == (b["max_priority"], b["updates"], b["env_steps"])
    strip = [{k: v for k, v in r.items() if k != "wall_time_s"} for r in evals(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "wall_time_s"} for r in evals(tmp_path / "b")]
    # run b evaluated 0, 20, 40 (killed before saving), then redid 40 and 60 with the same seeds as run a
    assert seeds == seeds_a[:3] + seeds_a[2:]
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()


def test_consecutive_evaluations_start_from_different_states():
    import gymnasium as gym

    starts = []
    for k in range(2):
        envs = gym.vector.SyncVectorEnv([lambda: gym.make("Hopper-v5") for _ in range(3)])
        starts.append(envs.reset(seed=ft.eval_seed(1, k))[0])
        envs.close()
    assert not np.allclose(starts[0], starts[1])
    assert len({ft.eval_seed(1, k) for k in range(100)}) == 100


def test_fine_tunes_an_export_of_off2on_cql_ensemble(tmp_path, tiny_dataset):
    cq = pytest.importorskip("off2on_cql_ensemble")
    tiny_dataset("hopper", "medium-replay")
    path = cq.main(
        cq.Args(
            env="hopper",
            dataset="medium-replay",
            device="cpu",
            members=2,
            hidden=16,
            batch_size=8,
            cql_samples=2,
            offline_updates=6,
            bc_steps=2,
            eval_episodes=0,
            log_every=3,
            checkpoint_every=3,
            run_dir=str(tmp_path / "offline"),
            export_path=str(tmp_path / "cql.pt"),
        )
    )
    args = tiny_args(tmp_path, checkpoint=path, online_steps=20)
    ft.main(args)
    ck = torch.load(os.path.join(args.run_dir, "checkpoint.pt"), weights_only=True)
    assert ck["members"] == 2 and ck["actor"]["net.0.weight"].shape == (2, 11, 16)
    assert [r["env_steps"] for r in evals(args.run_dir)] == ["0", "20"]


# ----------------------------------------------------------------------------- bad input
def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_bad_input_gives_one_clear_line(tmp_path, tiny_dataset):
    tiny_dataset("hopper", "medium-replay")
    with pytest.raises(ft.InputError) as e:
        ft.main(tiny_args(tmp_path, checkpoint=str(tmp_path / "missing.pt")))
    assert "make it with: python off2on_cql_ensemble.py --env hopper --dataset medium-replay --seed 1" in one_line(e)
    ensemble_file(tmp_path / "cheetah.pt", env="halfcheetah", obs_dim=17, act_dim=6)
    with pytest.raises(ft.InputError) as e:
        ft.main(tiny_args(tmp_path, checkpoint=str(tmp_path / "cheetah.pt")))
    assert "17/6" in one_line(e) and "11/3" in one_line(e)
    ensemble_file(tmp_path / "wrongdims.pt", obs_dim=12)  # right env name, wrong shapes
    with pytest.raises(ft.InputError) as e:
        ft.main(tiny_args(tmp_path, checkpoint=str(tmp_path / "wrongdims.pt")))
    assert "12/3" in one_line(e)
    ensemble_file(tmp_path / "ens.pt")
    with pytest.raises(ft.InputError) as e:
        ft.main(tiny_args(tmp_path, members=4))
    assert "--members 4" in one_line(e)
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ft.InputError) as e:
        ft.main(tiny_args(tmp_path, checkpoint=str(tmp_path / "corrupt.pt")))
    assert "not a readable checkpoint" in one_line(e)
    with pytest.raises(ft.InputError) as e:
        ft.main(tiny_args(tmp_path, replay="prioritized"))
    assert "--replay" in one_line(e)
    with pytest.raises(ft.InputError) as e:
        ft.main(ft.Args(resume=True, run_dir=str(tmp_path / "nothing-here")))
    assert "--resume needs --run-dir" in one_line(e)


def test_cli_prints_one_line_and_exits_2(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "off2on_finetune.py"),
            "--env",
            "hopper",
            "--dataset",
            "medium-replay",
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "warn" not in ln.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr

"""baselines/sac.py: the update on toy problems with known answers, the training loop end to end,
exact resume, and one-line errors for bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from baselines import sac

CPU = torch.device("cpu")
TINY = dict(
    env="hopper",
    device="cpu",
    learning_starts=100,
    epoch_steps=100,
    eval_every=200,
    eval_episodes=2,
    batch_size=32,
    hidden=16,
    checkpoint_every=100,
)


def toy_learner(obs_dim=2, act_dim=1, hidden=32, lr=3e-3, alpha=None):
    torch.manual_seed(0)
    learner = sac.Learner(sac.Args(hidden=hidden, lr=lr), obs_dim, act_dim, CPU)
    if alpha is not None:  # fixed temperature: the soft value equals the plain value when alpha ~ 0
        with torch.no_grad():
            learner.log_alpha.fill_(np.log(alpha))
        learner.log_alpha.requires_grad_(False)  # no gradient: Adam leaves it alone
    return learner


def one_step_batch(n, reward_fn, term):
    """A batch (s, a, r, s', terminated) of the shape ReplayBuffer.sample returns."""
    obs, act = torch.rand(n, 2), torch.rand(n, 1) * 2 - 1
    return obs, act, reward_fn(obs, act), torch.rand(n, 2), torch.full((n,), float(term))


def test_q_converges_to_reward_on_terminal_step():
    """One-step task ending in a termination: Q(s, a) must converge to r(s, a) = 1 + s0 - a."""
    learner = toy_learner()
    reward = lambda o, a: 1.0 + o[:, 0] - a[:, 0]  # noqa: E731
    for _ in range(400):
        sac.sac_update(learner, one_step_batch(128, reward, term=1), gamma=0.99, tau=5e-3)
    s, a, r, _, _ = one_step_batch(512, reward, term=1)
    with torch.no_grad():
        q = learner.critic(s, a)
    assert q.shape == (2, 512)
    assert (q - r).abs().mean() < 0.1


def test_truncation_bootstraps_termination_does_not():
    """Reward 1 forever, gamma 0.5, alpha ~ 0: a step that is not terminated (a truncated one: the
    buffer's batches carry terminations only) has value 1 / (1 - 0.5) = 2, a terminated step 1."""
    values = {}
    for name, term in (("terminated", 1), ("truncated", 0)):
        learner = toy_learner(alpha=1e-12)
        for _ in range(300):
            m = sac.sac_update(learner, one_step_batch(128, lambda o, a: torch.ones(len(o)), term), gamma=0.5, tau=1.0)
        values[name] = float(m["q_mean"])
    assert values["terminated"] == pytest.approx(1.0, abs=0.1)
    assert values["truncated"] == pytest.approx(2.0, abs=0.15)


def test_actor_finds_the_best_action():
    """One-step task, r = -4 (a - 0.5)^2: the deterministic action must move to ~0.5."""
    learner = toy_learner(lr=3e-3)
    reward = lambda o, a: -4 * (a[:, 0] - 0.5) ** 2  # noqa: E731
    for _ in range(600):
        sac.sac_update(learner, one_step_batch(128, reward, term=1), gamma=0.99, tau=5e-3)
    with torch.no_grad():
        a = learner.actor.act(torch.rand(64, 2), deterministic=True)
    assert (a - 0.5).abs().max() < 0.15


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    torch.manual_seed(0)
    actor = sac.Actor(3, 2, 16)
    obs = torch.randn(5, 3)
    a, logp = actor.sample(obs)
    mu, log_std = actor(obs)
    u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    ref = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum(-1) - torch.log(1 - a**2).sum(-1)
    assert a.abs().max() < 1
    assert torch.allclose(logp, ref, atol=1e-3)


def test_replay_buffer_roundtrip_and_sample():
    buf = sac.ReplayBuffer(10, 3, 2)
    for i in range(12):  # wraps around
        buf.add(
            observations=np.full(3, i),
            actions=np.full(2, i),
            rewards=i,
            next_observations=np.full(3, i + 1),
            terminations=0.0,
            truncations=float(i == 5),
        )
    assert buf.size == 10 and buf.ptr == 2
    s, a, r, s2, d = buf.sample(64, CPU)
    assert s.shape == (64, 3) and a.shape == (64, 2) and r.shape == d.shape == (64,)
    assert torch.equal(s2[:, 0], s[:, 0] + 1) and torch.equal(a[:, 0], r)
    assert (d == 0).all()  # the truncation of step 5 is not a termination
    other = sac.ReplayBuffer(10, 3, 2)
    other.load_state_dict(buf.state_dict())
    assert all(np.array_equal(other.data[k], buf.data[k]) for k in buf.data) and other.ptr == 2


def test_time_limit_is_a_truncation(tmp_path):
    """HalfCheetah never terminates: its 1000-step episode end must be stored as a truncation."""
    args = sac.Args(
        **{
            **TINY,
            "env": "halfcheetah",
            "learning_starts": 2000,
            "epoch_steps": 550,
            "eval_every": 1100,
            "eval_episodes": 1,
        },
        online_steps=1100,
        run_dir=str(tmp_path / "run"),
    )
    progress = []
    sac.main(args, after_eval=progress.append)  # called after every evaluation but the untrained policy's
    assert [p.env_steps for p in progress] == [1100]
    p = progress[-1]
    tr, te = p.buffer.data["truncations"][:1100], p.buffer.data["terminations"][:1100]
    assert te.sum() == 0 and tr.sum() == 1 and tr[999] == 1
    assert p.updates == 0  # all 1100 steps were warm-up


def test_train_smoke_and_exact_resume(tmp_path):
    sac.main(sac.Args(**TINY, online_steps=400, run_dir=str(tmp_path / "a")))
    sac.main(sac.Args(**TINY, online_steps=200, run_dir=str(tmp_path / "b")))
    with open(tmp_path / "b" / "evals.csv", "a") as f:  # a row written after the checkpoint, lost in a kill
        f.write("online,300,300,policy,1,0,0,0\n")
    sac.main(sac.Args(**TINY, online_steps=400, run_dir=str(tmp_path / "b"), resume=True))
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in "ab")
    assert a["env_steps"] == b["env_steps"] == 400 and a["updates"] == b["updates"] == 400
    for net in ("actor", "critic", "critic_target"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net])
    assert torch.equal(a["buffer"]["observations"], b["buffer"]["observations"])
    rows = [open(tmp_path / r / "evals.csv").read().splitlines() for r in "ab"]
    assert [r.split(",")[:5] for r in rows[0]] == [r.split(",")[:5] for r in rows[1]]
    assert rows[0][0] == ",".join(sac.EVAL_COLUMNS) and len(rows[0]) == 4  # evals at 0, 200 and 400
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()


def test_evaluation_protocol_defaults():
    """The protocol of every off2on script: 5 episodes every 1,000 env steps (and at 0)."""
    assert (sac.Args().eval_every, sac.Args().eval_episodes, sac.Args().epoch_steps) == (1_000, 5, 1_000)


def test_evaluations_start_from_new_states_and_resume_keeps_the_sequence(tmp_path, monkeypatch):
    """The k-th evaluation resets with eval_seed(seed, k); a run killed after an evaluation that its last
    checkpoint did not see redoes that evaluation with the same seed, and goes on as the straight run."""
    seeds, real_evaluate = [], sac.evaluate

    def recording_evaluate(env_name, act_fn, episodes, seed):
        seeds.append(seed)
        if len(seeds) == kill_at:
            raise KeyboardInterrupt
        return real_evaluate(env_name, act_fn, episodes, seed)

    monkeypatch.setattr(sac, "evaluate", recording_evaluate)
    tiny = {**TINY, "eval_every": 100, "checkpoint_every": 200, "eval_episodes": 1}
    kill_at = 0
    sac.main(sac.Args(**tiny, online_steps=400, run_dir=str(tmp_path / "a")))
    straight = list(seeds)
    assert straight == [sac.eval_seed(0, k) for k in range(5)]  # at 0, 100, 200, 300, 400 env steps
    assert len(set(straight)) == 5
    seeds.clear()
    kill_at = 4  # dies in the evaluation at 300 env steps; the last checkpoint is at 200 (3 evaluations)
    with pytest.raises(KeyboardInterrupt):
        sac.main(sac.Args(**tiny, online_steps=400, run_dir=str(tmp_path / "b")))
    seeds.clear()
    kill_at = 0
    sac.main(sac.Args(**tiny, online_steps=400, run_dir=str(tmp_path / "b"), resume=True))
    assert seeds == straight[3:]
    rows = [open(tmp_path / r / "evals.csv").read().splitlines() for r in "ab"]
    assert [r.split(",")[:7] for r in rows[0]] == [r.split(",")[:7] for r in rows[1]]


def test_resume_errors_are_one_line(tmp_path):
    with pytest.raises(sac.InputError, match="--resume needs --run-dir"):
        sac.main(sac.Args(**TINY, online_steps=100, resume=True))
    with pytest.raises(sac.InputError, match="--resume needs --run-dir <a run dir holding checkpoint.pt>"):
        sac.main(sac.Args(**TINY, online_steps=100, resume=True, run_dir=str(tmp_path / "none")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(sac.InputError, match="not a readable checkpoint"):
        sac.main(sac.Args(**TINY, online_steps=100, resume=True, run_dir=str(tmp_path / "bad")))
    (tmp_path / "old").mkdir()  # a run of the previous checkpoint layout
    torch.save({"format": "off2on-sac/2"}, tmp_path / "old" / "checkpoint.pt")
    with pytest.raises(sac.InputError, match="is not an off2on-sac/3 checkpoint of a run .*; it cannot be resumed"):
        sac.main(sac.Args(**TINY, online_steps=100, resume=True, run_dir=str(tmp_path / "old")))


def test_cli_unknown_env_is_one_line_exit_2():
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "baselines", "sac.py"), "--env", "ant"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown env 'ant'; choose one of: hopper, halfcheetah, walker2d"]

"""Tests of off2on_cql_ensemble.py: the CQL regularizer, pessimism, the vectorized ensemble,
checkpoints and resume, the import of the authors' agents, a smoke run and bad input."""

import csv
import glob
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import OFFICIAL, ROOT

import off2on_cql_ensemble as cq


def tiny_args(tmp_path, name="run", **kw):
    base = dict(
        env="hopper",
        dataset="medium-replay",
        device="cpu",
        members=2,
        hidden=16,
        batch_size=8,
        cql_samples=2,
        offline_updates=20,
        bc_steps=5,
        eval_episodes=0,
        log_every=5,
        checkpoint_every=10,
        run_dir=str(tmp_path / name),
        export_path=str(tmp_path / f"{name}.pt"),
    )
    base.update(kw)
    return cq.Args(**base)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- losses
def test_cql_logsumexp_known_answer():
    # one state, K = 2 samples per proposal, |A| = 2 (uniform density on [-1, 1]^2 is 1/4)
    q_rand, q_pi, q_next = torch.tensor([[1.0, -0.5]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[0.5, 3.0]])
    lp_pi, lp_next = torch.tensor([[-1.0, 0.5]]), torch.tensor([[0.0, 2.0]])
    terms = [1.0 + math.log(4), -0.5 + math.log(4), 2.0 + 1.0, 0.0 - 0.5, 0.5 - 0.0, 3.0 - 2.0]
    want = math.log(sum(math.exp(t) for t in terms))
    got = cq.cql_logsumexp(q_rand, q_pi, q_next, lp_pi, lp_next, act_dim=2)
    assert got.shape == (1,) and got.item() == pytest.approx(want, rel=1e-6)
    # temperature: temp * log sum exp(x / temp)
    want_t = 2.0 * math.log(sum(math.exp(t / 2.0) for t in terms))
    got_t = cq.cql_logsumexp(q_rand, q_pi, q_next, lp_pi, lp_next, act_dim=2, temp=2.0)
    assert got_t.item() == pytest.approx(want_t, rel=1e-6)


def test_tanh_log_prob_matches_change_of_variables():
    torch.manual_seed(0)
    mu, log_std = torch.randn(4, 3), torch.randn(4, 3).clamp(-2, 1)
    u = mu + log_std.exp() * torch.randn(4, 3) * 3  # includes large |u| where tanh saturates
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu.double(), log_std.exp().double()), torch.distributions.transforms.TanhTransform()
    )
    want = ref.log_prob(torch.tanh(u.double()).clamp(-1 + 1e-12, 1 - 1e-12)).sum(-1)
    got = cq.tanh_log_prob(u, mu, log_std)
    finite = torch.tanh(u.double()).abs().max(-1).values < 1 - 1e-6  # where the double reference is exact
    assert torch.allclose(got.double()[finite], want[finite], atol=1e-3)
    assert torch.isfinite(got).all()


def test_pessimism_on_narrow_data():
    """After a short CQL run on data whose actions lie in [0.3, 0.5]^2, every member's Q is higher
    at dataset actions than at uniform actions."""
    torch.manual_seed(0)
    m, obs_dim, act_dim = 2000, 3, 2
    data = {
        "observations": torch.randn(m, obs_dim),
        "next_observations": torch.randn(m, obs_dim),
        "actions": 0.3 + 0.2 * torch.rand(m, act_dim),
        "rewards": torch.randn(m),
        "terminals": torch.zeros(m),
    }
    args = cq.Args(members=2, hidden=32, batch_size=64, bc_steps=20)
    agent = cq.Agent(obs_dim, act_dim, 2, 32, args, "cpu")
    for step in range(300):
        cq.update(agent, cq.sample(data, 2, 64), step < args.bc_steps, args)
    with torch.no_grad():
        s = data["observations"][:500].expand(4, -1, -1)
        q_data = agent.critic(s, data["actions"][:500].expand(4, -1, -1)).mean(1)
        q_unif = agent.critic(s, torch.rand(4, 500, act_dim) * 2 - 1).mean(1)
    assert (q_data > q_unif + 0.5).all(), (q_data, q_unif)


# ----------------------------------------------------------------------------- networks
def separate_mlp(ens_layers, i):
    """member i of a stack of VectorizedLinear as an nn.Sequential of nn.Linear (ReLU between)."""
    mods = []
    for j, layer in enumerate(ens_layers):
        lin = nn.Linear(layer.weight.shape[1], layer.weight.shape[2])
        with torch.no_grad():
            lin.weight.copy_(layer.weight[i].t())
            lin.bias.copy_(layer.bias[i, 0])
        mods += [lin] + ([nn.ReLU()] if j < len(ens_layers) - 1 else [])
    return nn.Sequential(*mods)


def test_vectorized_ensemble_equals_separate_mlps():
    torch.manual_seed(0)
    n, obs_dim, act_dim, hidden, b = 3, 5, 2, 16, 7
    critic = cq.EnsembleCritic(obs_dim, act_dim, n, hidden)
    actor = cq.EnsembleActor(obs_dim, act_dim, n, hidden)
    c_layers = [m for m in critic.net if isinstance(m, cq.VectorizedLinear)]
    obs, act = torch.randn(2 * n, b, obs_dim), torch.randn(2 * n, b, act_dim)
    q = critic(obs, act)
    q.pow(2).sum().backward()
    assert not torch.equal(c_layers[0].weight[0], c_layers[0].weight[1])  # independent init
    for i in range(2 * n):
        ref = separate_mlp(c_layers, i)
        qi = ref(torch.cat([obs[i], act[i]], -1)).squeeze(-1)
        assert torch.allclose(q[i], qi, atol=1e-6)
        qi.pow(2).sum().backward()
        for lin, layer in zip([m for m in ref if isinstance(m, nn.Linear)], c_layers):
            assert torch.allclose(layer.weight.grad[i], lin.weight.grad.t(), atol=1e-5)
            assert torch.allclose(layer.bias.grad[i, 0], lin.bias.grad, atol=1e-5)
    mu, log_std = actor(obs[:n])
    for i in range(n):
        trunk = separate_mlp([actor.net[0], actor.net[2]], i)
        h = F.relu(trunk(obs[i]))
        assert torch.allclose(mu[i], separate_mlp([actor.mu], i)(h), atol=1e-6)
        want_ls = separate_mlp([actor.log_std], i)(h).clamp(cq.LOG_STD_MIN, cq.LOG_STD_MAX)
        assert torch.allclose(log_std[i], want_ls, atol=1e-6)


# ----------------------------------------------------------------------------- end to end
def test_smoke_run_writes_evals_and_spec_file(tmp_path, tiny_dataset, capsys):
    tiny_dataset("hopper", "medium-replay")
    args = tiny_args(tmp_path, offline_updates=6, eval_every=3, eval_episodes=1, checkpoint_every=3)
    path = cq.main(args)
    out = capsys.readouterr().out
    assert args.run_dir in out and path in out
    rows = list(csv.DictReader(open(tmp_path / "run" / "evals.csv")))
    assert [(r["updates"], r["policy"]) for r in rows] == [
        (u, p) for u in ("3", "6") for p in ("member0", "member1", "ensemble")
    ]
    assert all(r["phase"] == "offline" for r in rows)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run"))
    f = torch.load(path, weights_only=True)  # the hand-off format of the module docstring
    assert f["format"] == "off2on-cql-ensemble/1" and (f["env"], f["dataset"]) == ("hopper", "medium-replay")
    assert (f["obs_dim"], f["act_dim"], f["members"], f["hidden"], f["updates"]) == (11, 3, 2, 16, 6)
    actor, critic = cq.EnsembleActor(11, 3, 2, 16), cq.EnsembleCritic(11, 3, 2, 16)
    actor.load_state_dict(f["actor"])
    critic.load_state_dict(f["critic"])
    critic.load_state_dict(f["critic_target"])
    assert f["log_alpha"].shape == (2,)
    assert not torch.equal(f["critic"]["net.4.weight"], f["critic_target"]["net.4.weight"])


def test_resume_is_exact(tmp_path, tiny_dataset):
    tiny_dataset("hopper", "medium-replay")
    straight = torch.load(cq.main(tiny_args(tmp_path, "a")), weights_only=True)
    cq.main(tiny_args(tmp_path, "b", offline_updates=10))
    first = torch.load(tmp_path / "b.pt", weights_only=True)
    assert first["updates"] == 10
    resumed = torch.load(
        cq.main(cq.Args(resume=True, run_dir=str(tmp_path / "b"), offline_updates=20, device="cpu")), weights_only=True
    )
    assert resumed["updates"] == straight["updates"] == 20
    for key in ("actor", "critic", "critic_target"):
        for name, t in straight[key].items():
            assert torch.equal(t, resumed[key][name]), f"{key}.{name} differs after resume"
            assert not torch.equal(t, first[key][name]), f"{key}.{name} did not train"
    assert torch.equal(straight["log_alpha"], resumed["log_alpha"])
    ca = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for a, b in zip(ca["critic_opt"]["state"].values(), cb["critic_opt"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


# ----------------------------------------------------------------------------- import
def official_part(seed: int, part: str) -> dict:
    """A state dict of the authors' agent `seed` (its folder: seed<k>/ or <task>_seed<k>/)."""
    folder = glob.glob(os.path.join(OFFICIAL, f"*seed{seed}"))[0]
    return torch.load(os.path.join(folder, f"{part}_1000000.pt"), map_location="cpu", weights_only=True)


@pytest.mark.skipif(not os.path.isdir(OFFICIAL), reason="set OFF2ON_OFFICIAL_AGENTS to a folder of the authors' agents")
def test_import_official_reproduces_their_actions(tmp_path):
    path = cq.main(
        cq.Args(
            import_official=OFFICIAL,
            env="halfcheetah",
            dataset="medium",
            export_path=str(tmp_path / "off.pt"),
            eval_episodes=0,
        )
    )
    f = torch.load(path, weights_only=True)
    assert (f["members"], f["obs_dim"], f["act_dim"], f["hidden"], f["updates"]) == (5, 17, 6, 256, 1_000_000)
    actor, critic = cq.EnsembleActor(17, 6, 5, 256), cq.EnsembleCritic(17, 6, 5, 256)
    actor.load_state_dict(f["actor"])
    critic.load_state_dict(f["critic"])
    torch.manual_seed(0)
    obs, act = torch.randn(64, 17), torch.rand(64, 6) * 2 - 1
    with torch.no_grad():
        mu, log_std = actor(obs.expand(5, -1, -1))
        q = critic(obs.expand(10, -1, -1), act.expand(10, -1, -1))
    for i, seed in enumerate((0, 4, 8, 12, 16)):
        sd = official_part(seed, "actor")
        assert torch.equal(f["actor"]["net.0.weight"][i], sd["fc0.weight"].t())  # bit-exact weights
        h = F.relu(F.linear(F.relu(F.linear(obs, sd["fc0.weight"], sd["fc0.bias"])), sd["fc1.weight"], sd["fc1.bias"]))
        assert torch.allclose(
            torch.tanh(mu[i]), torch.tanh(F.linear(h, sd["last_fc.weight"], sd["last_fc.bias"])), atol=1e-5
        )
        assert torch.allclose(
            log_std[i], F.linear(h, sd["last_fc_log_std.weight"], sd["last_fc_log_std.bias"]).clamp(-20, 2), atol=1e-5
        )
        for row, part in ((i, "critic1"), (5 + i, "critic2")):
            c = official_part(seed, part)
            x = torch.cat([obs, act], -1)
            hq = F.relu(F.linear(F.relu(F.linear(x, c["fc0.weight"], c["fc0.bias"])), c["fc1.weight"], c["fc1.bias"]))
            assert torch.allclose(q[row], F.linear(hq, c["last_fc.weight"], c["last_fc.bias"]).squeeze(-1), atol=1e-3)
    with pytest.raises(cq.InputError) as e:  # the agents are halfcheetah's: shapes do not fit hopper
        cq.main(cq.Args(import_official=OFFICIAL, env="hopper", export_path=str(tmp_path / "x.pt"), eval_episodes=0))
    assert "17/6" in one_line_error(e) and "11/3" in str(e.value)


# ----------------------------------------------------------------------------- bad input
def test_bad_checkpoints_give_one_line(tmp_path, tiny_dataset):
    tiny_dataset("hopper", "medium-replay")
    run = tmp_path / "run"
    cq.main(tiny_args(tmp_path, offline_updates=2))
    good = torch.load(run / "checkpoint.pt", weights_only=True)
    resume = cq.Args(resume=True, run_dir=str(run), device="cpu")

    with pytest.raises(cq.InputError) as e:  # checkpoint of another env's run copied in
        other = dict(good, obs_dim=17, actor=cq.EnsembleActor(17, 6, 2, 16).state_dict())
        torch.save(other, run / "checkpoint.pt")
        cq.main(resume)
    assert "obs_dim=17" in one_line_error(e) and "obs_dim=11" in str(e.value)

    with pytest.raises(cq.InputError) as e:  # right header, wrong weights inside
        torch.save(dict(good, actor=cq.EnsembleActor(11, 3, 2, 32).state_dict()), run / "checkpoint.pt")
        cq.main(resume)
    assert "does not fit" in one_line_error(e)

    with pytest.raises(cq.InputError) as e:  # some other torch file
        torch.save({"model": torch.zeros(3)}, run / "checkpoint.pt")
        cq.main(resume)
    assert "is not an off2on-cql-ensemble/1 checkpoint" in one_line_error(e)

    with pytest.raises(cq.InputError) as e:  # the ensemble file has no training state
        torch.save(torch.load(tmp_path / "run.pt", weights_only=True), run / "checkpoint.pt")
        cq.main(resume)
    assert "cannot be resumed" in one_line_error(e)

    with pytest.raises(cq.InputError) as e:
        cq.main(cq.Args(resume=True))
    assert "--run-dir" in one_line_error(e)
    with pytest.raises(cq.InputError) as e:
        cq.main(cq.Args(import_official=str(tmp_path), env="halfcheetah"))
    assert "no seed*/" in one_line_error(e)

    (run / "checkpoint.pt").write_bytes(b"\x00garbage" * 10)  # corrupt: the CLI prints one line, exit 2
    p = subprocess.run(
        [sys.executable, os.path.join(ROOT, "off2on_cql_ensemble.py"), "--resume", "--run-dir", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and "not a readable checkpoint" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1

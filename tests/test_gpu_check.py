"""The speed paths and their check: benchmarks/gpu_check.py at small size on the CPU (so that the report a
GPU machine will produce cannot rot unseen), the hand-written gradients of the benchmark's one-output layer,
the analytic FLOP counts of the benchmarks, and the host-side logic of gpu_check's CUDA-graph fine-tune update
(which runs eagerly on a CPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import OFFICIAL, ROOT
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cql_ensemble_speed as cqs  # noqa: E402
import finetune_speed as fts  # noqa: E402
import gpu_check  # noqa: E402

import off2on_cql_ensemble as cq  # noqa: E402
import off2on_finetune as ft  # noqa: E402

SECTIONS = ("## 1. System", "## 2. Equivalence", "## 3. Speed", "## 4. End to end")


def run_check(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu", "--quick"]
    proc = subprocess.run(cmd + ["--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(out / "gpu_check.json"))
    return report, open(out / "gpu_check.md").read()


def test_gpu_check_quick_on_cpu_writes_every_section(tmp_path):
    report, md = run_check(tmp_path / "check")
    for title in SECTIONS:
        assert title in md
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(
        ("system", "equivalence", "speed", "end_to_end"), "ok"
    ), {name: p.get("error") for name, p in parts.items()}
    assert parts["system"]["results"]["peak_tflops"]["fp32"] > 0
    eq = parts["equivalence"]["results"]
    for script in ("CQL ensemble", "fine-tune"):  # on a CPU both sides are the CPU: identical
        assert eq[f"{script}: fp32, TF32 off"]["weights"]["max_abs"] == 0
        assert 0 < eq[f"{script}: bf16 autocast"]["weights"]["max_abs"] < 1e-2  # bf16 moves weights a little
        assert [s["max_abs"] for s in eq[f"{script}: CUDA graph vs eager"]["steps"]] == [0, 0]
    speed = parts["speed"]["results"]
    for key in (
        "CQL ensemble: vectorized, eager",
        "fine-tune: vectorized, eager",
        "fine-tune: member-by-member, eager",
    ):
        assert speed[key]["per_s"] > 0 and speed[key]["tflops"] > 0
    e2e = parts["end_to_end"]["results"]
    assert e2e["env_steps"] == 200 and e2e["updates"] == 200
    assert [int(e["env_steps"]) for e in e2e["evals"]] == [0, 200]


@pytest.mark.skipif(not os.path.isdir(OFFICIAL), reason="the authors' released agents are not here")
def test_gpu_check_end_to_end_from_the_released_agents(tmp_path):
    report, md = run_check(tmp_path / "check", "--parts", "end_to_end", "--official", OFFICIAL)
    e2e = report["parts"]["end_to_end"]
    assert e2e["status"] == "ok", e2e.get("error")
    assert "released agents" in e2e["results"]["start"]
    start = float(e2e["results"]["evals"][0]["normalized_score"])
    assert 30 < start < 45  # the five agents' ensemble policy scores ~38 on halfcheetah


def test_gpu_check_rejects_unknown_parts(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu", "--parts", "speeed"]
    proc = subprocess.run(cmd + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown --parts")


def test_benchmark_one_output_layer_gradients_equal_baddbmm():
    """cql_ensemble_speed.py --gemv: VectorizedGemv computes the one-output layers with baddbmm's gradients."""
    torch.manual_seed(0)
    layer = cq.VectorizedLinear(7, 1, 3).double()
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cqs.VectorizedGemv.apply, (x, layer.weight, layer.bias))
    g = torch.randn(3, 5, 1, dtype=torch.float64)
    with cqs.gemv_output_layers(cq):
        gemv = torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)
    reference = torch.autograd.grad(torch.baddbmm(layer.bias, x, layer.weight), (x, layer.weight, layer.bias), g)
    for a, b in zip(gemv, reference):
        torch.testing.assert_close(a, b)
    with cqs.gemv_output_layers(cq):  # layers with more outputs stay baddbmm
        wide = cq.VectorizedLinear(7, 4, 3).double()
        torch.testing.assert_close(wide(x), torch.baddbmm(wide.bias, x, wide.weight))
    assert cq.VectorizedLinear.forward.__name__ == "forward"  # restored on leaving


def test_cql_update_flops_equal_the_flop_counter():
    n, b, k, od, ad, h = 2, 8, 3, 5, 2, 16
    args = cq.Args(members=n, hidden=h, batch_size=b, cql_samples=k)
    agent = cq.Agent(od, ad, n, h, args, "cpu")
    data = cqs.synthetic_data(100, od, ad, "cpu")
    for bc in (False, True):
        with FlopCounterMode(display=False) as counter:
            loss, _ = cq.losses(agent, cq.sample(data, n, b), bc, args)
            loss.backward()
        assert counter.get_total_flops() == cqs.update_flops(n, b, k, od, ad, h, bc)


def small_learner_and_buffer(replay_seed: int = 0, ratio_hidden: int = 12):
    n, od, ad, h = 2, 5, 2, 16
    torch.manual_seed(0)
    learner = ft.Learner(ft.EnsembleActor(od, ad, n, h), ft.EnsembleCritic(od, ad, n, h), 3e-4)
    learner.ratio = ft.density_ratio_net(od + ad, ratio_hidden)
    learner.ratio_opt = torch.optim.Adam(learner.ratio.parameters())
    rng = np.random.default_rng(replay_seed)
    replay = ft.Replay(fts.fake_data(50, od, ad, rng), 100, torch.device("cpu"), 0.5)
    replay.add_online(rng.standard_normal((20, 2 * od + ad + 2)).astype(np.float32))
    return learner, replay


def test_finetune_iteration_flops_equal_the_flop_counter():
    learner, replay = small_learner_and_buffer()
    obs = np.random.default_rng(1).standard_normal((1, 5)).astype(np.float32)
    for mode in ("balanced", "uniform"):
        with FlopCounterMode(display=False) as counter:
            ft.act(learner.actor, obs, False)
            ft.update(learner, replay, ft.Args(batch_size=8, replay=mode))
        assert counter.get_total_flops() == fts.iteration_flops(2, 8, 5, 2, 16, 12, mode == "balanced")


def state_of(learner, replay) -> list:
    nets = [learner.actor, learner.critic, learner.critic_target, learner.ratio]
    return [p.detach().clone() for net in nets for p in net.parameters()] + [torch.from_numpy(replay.tree.nodes.copy())]


@pytest.mark.parametrize("mode", ["balanced", "uniform", "online-only"])
def test_graphed_update_on_cpu_is_update(mode):
    """gpu_check.GraphedUpdate (its graphs run eagerly on a CPU) takes the same steps as off2on_finetune.update():
    with the uniform draws of update() in place of its device-count draws, the same weights, sum-tree, max priority
    and statistics."""
    args = ft.Args(batch_size=64, replay=mode)
    eager = small_learner_and_buffer()
    graphed = small_learner_and_buffer()
    step = gpu_check.GraphedUpdate(*graphed, args)
    step.draw = lambda lo, count: torch.randint(lo, lo + int(count), (args.batch_size,))  # update()'s draws
    for i in range(3):
        np.random.seed(i)
        torch.manual_seed(i)
        expected = ft.update(*eager, args)
        np.random.seed(i)
        torch.manual_seed(i)
        got = step()
        assert got.keys() == expected.keys()
        for key in expected:
            assert float(got[key]) == pytest.approx(float(expected[key]), rel=1e-6), key
        for a, b in zip(state_of(*eager), state_of(*graphed)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert eager[1].max_priority == graphed[1].max_priority


def test_graphed_update_draws_reach_every_row_and_no_other():
    learner, replay = small_learner_and_buffer()
    for mode, low in (("online-only", replay.n_offline), ("uniform", 0)):
        step = gpu_check.GraphedUpdate(learner, replay, ft.Args(batch_size=4000, replay=mode))
        step()  # sets the device copy of the online count
        drawn = step.draw(low, step.n_online + (replay.n_offline if mode == "uniform" else 0))
        assert drawn.min() == low and drawn.max() == replay.n_offline + replay.n_online - 1
        online = float(step()["online_fraction"])
        share = replay.n_online / (replay.n_offline + replay.n_online)
        assert online == 1.0 if mode == "online-only" else abs(online - share) < 0.05
        replay.add_online(np.zeros((5, replay.rows.shape[1]), np.float32))  # the next draws see the new rows
        step()
        assert step.draw(low, step.n_online + (replay.n_offline - low)).max() == replay.n_offline + replay.n_online - 1

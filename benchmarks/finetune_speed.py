"""Speed of one off2on_finetune.py iteration at paper size: one env step with the ensemble policy, one
density-ratio step, one SAC step of the N-member ensemble, one priority update of the sum-tree.

Compares, in the same process and on the same machine (interleaved repeats, median it/s):
  vectorized  off2on_finetune.py as it is: each layer of the ensemble is one batched matmul;
  loop        the same iteration with every ensemble layer computed member by member (N separate
              weight tensors per layer, one matmul each, as N separate nn.Linear MLPs would do).
Both use the same code path (off2on_finetune.act / train_step); only the layers differ, and they start
from identical weights (checked). Then a profile of the vectorized iteration by timed sections.

    python benchmarks/finetune_speed.py                  # CPU (or CUDA when available), paper size
    python benchmarks/finetune_speed.py --device cuda
    python benchmarks/finetune_speed.py --offline-size 20000 --iters 20 --repeats 1   # quick check
"""

import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import off2on_finetune as ft  # noqa: E402


@dataclass
class Args:
    device: str = "auto"
    """auto, cpu or cuda"""
    env: str = "halfcheetah"
    """env whose dims and dynamics are used (the paper's fine-tuning tasks are 17/6 or 11/3 dims)"""
    members: int = 5
    """N, ensemble members"""
    hidden: int = 256
    """hidden width of actors and critics (the released checkpoints: 256)"""
    batch_size: int = 256
    """RL batch (and each half of the density-ratio batch)"""
    offline_size: int = 1_000_000
    """offline transitions in the prioritized buffer (D4RL halfcheetah-medium: 1M)"""
    iters: int = 200
    """timed iterations per repeat and implementation"""
    warmup: int = 20
    """untimed iterations before timing"""
    repeats: int = 3
    """interleaved repeats (the median is reported)"""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)"""
    seed: int = 0
    """seed"""


class LoopLinear(nn.Module):
    """The E layers of a VectorizedLinear as E separate (weight, bias) pairs, computed one member at a
    time. `weight` is a shape-only view (one element, expanded) so the script's shape and device look-ups
    still work."""

    def __init__(self, vec: ft.VectorizedLinear):
        super().__init__()
        self.w = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in vec.weight])
        self.b = nn.ParameterList([nn.Parameter(b.detach().clone()) for b in vec.bias])
        self.shape = tuple(vec.weight.shape)

    @property
    def weight(self) -> torch.Tensor:
        return self.w[0].detach().view(-1)[:1].expand(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.addmm(b, x[i], w) for i, (w, b) in enumerate(zip(self.w, self.b))])


def looped(module: nn.Module) -> nn.Module:
    """A copy of an ensemble module with every VectorizedLinear replaced by a LoopLinear."""
    module = copy.deepcopy(module)
    for name, child in module.named_children():
        setattr(module, name, LoopLinear(child) if isinstance(child, ft.VectorizedLinear) else looped(child))
    return module


def fake_data(m: int, obs_dim: int, act_dim: int, rng) -> dict:
    return {
        "observations": rng.standard_normal((m, obs_dim), dtype=np.float32),
        "actions": rng.uniform(-1, 1, (m, act_dim)).astype(np.float32),
        "rewards": rng.standard_normal(m, dtype=np.float32),
        "next_observations": rng.standard_normal((m, obs_dim), dtype=np.float32),
        "terminals": np.zeros(m, np.float32),
    }


class Setup:
    """One learner + replay buffer + env; `iterate(k)` runs k full iterations."""

    def __init__(self, args: Args, fargs: ft.Args, loop: bool, device, data: dict, capacity: int):
        torch.manual_seed(args.seed)
        env = gym.make(ft.ENVS[args.env])
        od, ad = env.observation_space.shape[0], env.action_space.shape[0]
        actor = ft.EnsembleActor(od, ad, args.members, args.hidden).to(device)
        critic = ft.EnsembleCritic(od, ad, args.members, args.hidden).to(device)
        lr = ft.make_learner(actor, critic, fargs.lr)
        if loop:
            actor, critic, target = looped(lr.actor), looped(lr.critic), looped(lr.critic_target)
            sac_params = [*actor.parameters(), *critic.parameters(), lr.log_alpha]
            lr = ft.Learner(
                actor,
                critic,
                target,
                lr.log_alpha,
                lr.ratio,
                torch.optim.Adam(sac_params, lr=fargs.lr, fused=True),
                lr.ratio_opt,
            )
        self.lr, self.env, self.fargs, self.device = lr, env, fargs, device
        self.buf = ft.Replay(data, capacity, device, fargs.init_online_fraction)
        self.obs, _ = env.reset(seed=args.seed)
        self.staged = []
        self.step_env(1000)  # the first epoch's online rows, so the ratio net has online data
        self.flush()

    def step_env(self, k: int) -> None:
        for _ in range(k):
            a = ft.act(self.lr.actor, self.obs[None], False)[0]
            nxt, r, term, trunc, _ = self.env.step(a)
            self.staged.append(np.concatenate([self.obs, a, [r], nxt, [float(term)]]).astype(np.float32))
            self.obs = self.env.reset()[0] if term or trunc else nxt

    def flush(self) -> None:
        if self.staged:
            self.buf.add_online(np.stack(self.staged))
            self.staged = []

    def iterate(self, k: int) -> None:
        for _ in range(k):
            self.step_env(1)
            ft.train_step(self.lr, self.buf, self.fargs)
            if len(self.staged) == 250:  # the script adds an epoch's rows at once; amortized the same
                self.flush()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ft.pick_device(args.device)
    env = gym.make(ft.ENVS[args.env])
    od, ad = env.observation_space.shape[0], env.action_space.shape[0]
    rng = np.random.default_rng(args.seed)
    data = fake_data(args.offline_size, od, ad, rng)
    fargs = ft.Args(batch_size=args.batch_size)
    per_setup = 1000 + (args.warmup + args.iters * args.repeats) * 2 + 1000
    setups = {name: Setup(args, fargs, name == "loop", device, data, per_setup) for name in ("vectorized", "loop")}
    with torch.no_grad():  # both start from the same weights and compute the same functions
        o = torch.randn(args.members, 7, od, device=device)
        a = torch.rand(2 * args.members, 7, ad, device=device) * 2 - 1
        vec, loop = setups["vectorized"].lr, setups["loop"].lr
        torch.testing.assert_close(vec.actor(o)[0], loop.actor(o)[0])
        torch.testing.assert_close(vec.critic(o.repeat(2, 1, 1), a), loop.critic(o.repeat(2, 1, 1), a))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu} ({os.cpu_count()} cores)"
    print(
        f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"size: N={args.members}, hidden {args.hidden}x2, batch {args.batch_size}, {args.env} "
        f"(obs {od}, act {ad}), {args.offline_size} offline transitions in the sum-tree"
    )
    for s in setups.values():
        s.iterate(args.warmup)
    rates = {k: [] for k in setups}
    for _ in range(args.repeats):
        for k, setup in setups.items():
            rates[k].append(args.iters / timed(lambda setup=setup: setup.iterate(args.iters), device))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print("| implementation | iterations/s (median) | all repeats | 250k online steps |\n|---|---|---|---|")
    for k in setups:
        print(f"| {k} | {med[k]:.1f} | {', '.join(f'{r:.1f}' for r in rates[k])} | {254_000 / med[k] / 3600:.1f} h |")
    print(f"speed-up of the vectorized iteration over the loop: {med['vectorized'] / med['loop']:.2f}x")

    # profile of the vectorized iteration: sections timed separately (each synchronized), interleaved over
    # the repeats, median of each (the machine is shared: single measurements are noisy)
    s, n = setups["vectorized"], args.iters
    idx, _ = s.buf.sample_rl(args.batch_size, "balanced")
    prio = np.random.default_rng(0).uniform(0.5, 2.0, args.batch_size)
    uniform = ft.Args(batch_size=args.batch_size, replay="uniform")
    sections = {
        "env step (ensemble policy sample + MuJoCo)": lambda: s.step_env(n),
        "sum-tree sample + gather of the batch": lambda: [
            s.buf.sample_rl(args.batch_size, "balanced") for _ in range(n)
        ],
        "sum-tree priority update": lambda: [s.buf.tree.update(idx, prio) for _ in range(n)],
        "SAC step of the ensemble (incl. uniform sample)": lambda: [
            ft.train_step(s.lr, s.buf, uniform) for _ in range(n)
        ],
        "full update (balanced)": lambda: [ft.train_step(s.lr, s.buf, fargs) for _ in range(n)],
    }
    times = {k: [] for k in sections}
    for _ in range(args.repeats):
        for k, fn in sections.items():
            times[k].append(timed(fn, device) / n)
            s.flush()
    parts = {k: statistics.median(v) for k, v in times.items()}
    full = parts.pop("full update (balanced)")
    parts["density-ratio step + priorities + transfers (rest)"] = full - sum(parts[k] for k in list(parts)[1:4])
    total = parts["env step (ensemble policy sample + MuJoCo)"] + full
    print("| section (vectorized) | ms / iteration | share |\n|---|---|---|")
    for k, v in parts.items():
        print(f"| {k} | {1000 * v:.2f} | {100 * v / total:.0f}% |")
    print(f"| total | {1000 * total:.2f} | 100% |")


if __name__ == "__main__":
    main(tyro.cli(Args))

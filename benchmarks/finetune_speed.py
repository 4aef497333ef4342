"""Speed of one off2on_finetune.py iteration at paper size: one env step with the ensemble policy, one
density-ratio step, one SAC step of the N-member ensemble, one priority update of the sum-tree.

Compares, in the same process and on the same machine (implementations alternate round by round, A B A B;
each row gives the median and the range over the rounds):
  vectorized  off2on_finetune.py as it is: each layer of the ensemble is one batched matmul;
  loop        the same iteration with every ensemble layer computed member by member (N separate
              weight tensors per layer, one matmul each, as N separate nn.Linear MLPs would do);
and optionally the vectorized iteration with its ReLUs out of place (--relu-out-of-place; the script computes them
in place), under bf16 autocast (--bf16), or through the script's --compile path (--compile: torch.compile of the
SAC losses, mode reduce-overhead, CUDA graphs on CUDA).
All start from identical weights (checked) and run the same code (off2on_finetune.act / update).
Achieved GFLOP/s use the iteration's matmul FLOPs counted analytically (iteration_flops, checked against
torch.utils.flop_counter in tests/test_gpu_check.py), against the fp32 matmul peak measured in the same
run; "matmuls alone" times the very matmul calls of one iteration without anything else. Then a profile
of the vectorized iteration by timed sections.

    python benchmarks/finetune_speed.py --threads 1 --cpu-time        # CPU: one core, CPU time (docs/speed.md)
    python benchmarks/finetune_speed.py --device cuda --compile
    python benchmarks/finetune_speed.py --offline-size 20000 --iters 5 --rounds 1   # quick check
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cql_ensemble_speed as cqs  # noqa: E402

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
    iters: int = 20
    """timed iterations per implementation and round"""
    warmup: int = 5
    """untimed iterations of each implementation first"""
    rounds: int = 7
    """rounds; each times every implementation once, in turn"""
    loop: bool = True
    """also time the member-by-member loop (--no-loop: skip it)"""
    relu_out_of_place: bool = False
    """also time the vectorized iteration with its ReLUs out of place (the script computes them in place)"""
    bf16: bool = False
    """also time the vectorized iteration with the SAC losses under bf16 autocast (the ratio step stays fp32)"""
    compile: bool = False
    """also time the script's --compile path (torch.compile of the SAC losses, mode reduce-overhead)"""
    keep_freed_memory: bool = False
    """on CPU, keep freed memory in the heap as off2on_cql_ensemble.py does (off2on_finetune.py does not: no
    measurable gain, docs/speed.md)"""
    profile: bool = True
    """end with a profile of the vectorized iteration by timed sections"""
    op_profile: bool = False
    """and with torch.profiler's per-op self time of the vectorized iteration (the ops above 1%)"""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)"""
    cpu_time: bool = False
    """time with the process's CPU time (CPU, --threads 1 only): robust to other load on a shared machine"""
    peak_size: int = 2048
    """matrix size of the fp32 matmul peak measurement"""
    seed: int = 0
    """seed"""


def iteration_flops(n: int, b: int, obs: int, act: int, h: int, ratio_hidden: int = 256, balanced: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of one iteration: env step, density-ratio step (balanced replay),
    SAC step of the N members. wg = weight gradient, ig = input gradient (each costs the layer's forward)."""
    p = obs + act
    actor = obs * h + h * h + 2 * h * act
    critic = p * h + h * h + h
    sac = (
        n * b * actor  # a' ~ pi_ens(s'): every actor at s', no grad
        + 2 * n * b * critic  # target critics at (s', a'), no grad
        + 2 * n * b * (2 * critic + h * h + h)  # critics at (s, a): fwd + wg, ig of layers 2 and 3
        + n * b * (2 * actor + h * h + 2 * h * act)  # a ~ pi_ens(s): fwd + wg, ig of all but the first layer
        + 2 * n * b * 2 * critic  # frozen critics at (s, a~): fwd + ig of every layer (a~ needs its gradient)
    )
    r = ratio_hidden
    ratio_net = p * r + r * r + r
    ratio = 2 * b * (2 * ratio_net + r * r + r) + b * ratio_net if balanced else 0  # + priorities of the batch
    env = n * actor  # the exploration action: every actor at one observation
    return 2 * (sac + ratio + env)


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


def learner(obs_dim: int, act_dim: int, members: int, hidden: int, fargs, device, seed: int, loop: bool):
    """A fresh learner (seeded: equal weights for every `loop` value); loop: member-by-member layers."""
    torch.manual_seed(seed)
    actor = ft.EnsembleActor(obs_dim, act_dim, members, hidden).to(device)
    critic = ft.EnsembleCritic(obs_dim, act_dim, members, hidden).to(device)
    learner = ft.Learner(actor, critic, fargs.lr)
    if loop:
        learner.actor, learner.critic = looped(learner.actor), looped(learner.critic)
        learner.critic_target = looped(learner.critic_target)
        sac_params = [*learner.actor.parameters(), *learner.critic.parameters(), learner.log_alpha]
        learner.sac_opt = torch.optim.Adam(sac_params, lr=fargs.lr, fused=True)
    return learner


class Setup:
    """One learner + replay buffer + env; `iterate(k)` runs k full iterations (env step + train step).
    The train step: off2on_finetune.update with the SAC losses `loss_fn` (e.g. bf16_losses, or the torch.compile'd
    losses of --compile), or make_step(learner, replay)() where given (benchmarks/gpu_check.py's CUDA graphs)."""

    def __init__(self, lr, env_name, fargs, device, data, capacity, seed, loss_fn=ft.sac_losses, make_step=None):
        self.lr = lr
        self.fargs = fargs
        self.device = device
        self.env = gym.make(ft.ENVS[env_name])
        self.buf = ft.Replay(data, capacity, device, fargs.init_online_fraction)
        self.step = make_step(lr, self.buf) if make_step else lambda: ft.update(self.lr, self.buf, self.fargs, loss_fn)
        self.obs, _ = self.env.reset(seed=seed)
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
            self.step()
            if len(self.staged) == 250:  # the script adds an epoch's rows at once; amortized the same
                self.flush()


def bf16_losses(*args):
    """off2on_finetune.sac_losses under bf16 autocast (its matmuls in bfloat16; the backward follows)."""
    device_type = args[0].log_alpha.device.type
    with torch.autocast(device_type, torch.bfloat16, cache_enabled=False):
        return ft.sac_losses(*args)


def timed(fn, device, clock=time.perf_counter) -> float:
    cqs.sync(device)
    t = clock()
    fn()
    cqs.sync(device)
    return clock() - t


def main(args: Args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = cqs.pick_device(args.device)
    if args.cpu_time and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("error: --cpu-time needs --device cpu --threads 1")
    clock = time.process_time if args.cpu_time else time.perf_counter
    if device.type == "cpu" and args.keep_freed_memory:
        cqs.cq.keep_freed_memory()
    env = gym.make(ft.ENVS[args.env])
    od, ad = env.observation_space.shape[0], env.action_space.shape[0]
    data = fake_data(args.offline_size, od, ad, np.random.default_rng(args.seed))
    fargs = ft.Args(batch_size=args.batch_size)
    capacity = 2000 + args.warmup + 2 * args.iters * (args.rounds + 1)  # online rows each setup may add

    def setup(loop: bool = False, loss_fn=ft.sac_losses) -> Setup:
        lr = learner(od, ad, args.members, args.hidden, fargs, device, args.seed, loop)
        return Setup(lr, args.env, fargs, device, data, capacity, args.seed, loss_fn)

    setups = {"vectorized": setup()}
    if args.loop:
        setups["loop"] = setup(loop=True)
        with torch.no_grad():  # both start from the same weights and compute the same functions
            o = torch.randn(args.members, 7, od, device=device)
            a = torch.rand(2 * args.members, 7, ad, device=device) * 2 - 1
            vec, loop = setups["vectorized"].lr, setups["loop"].lr
            torch.testing.assert_close(vec.actor(o)[0], loop.actor(o)[0])
            torch.testing.assert_close(vec.critic(o.repeat(2, 1, 1), a), loop.critic(o.repeat(2, 1, 1), a))
    fns = {name: s.iterate for name, s in setups.items()}  # name -> fn(k): k iterations
    if args.relu_out_of_place:
        out_of_place = setup()

        def out_of_place_iterate(k: int) -> None:
            with cqs.relus_out_of_place(out_of_place.lr.actor, out_of_place.lr.critic, out_of_place.lr.critic_target):
                out_of_place.iterate(k)

        fns["ReLUs out of place"] = out_of_place_iterate
    if args.bf16:
        fns["bf16 autocast (SAC losses)"] = setup(loss_fn=bf16_losses).iterate
    if args.compile:
        fns["--compile"] = setup(loss_fn=torch.compile(ft.sac_losses, mode="reduce-overhead")).iterate

    flops = iteration_flops(args.members, args.batch_size, od, ad, args.hidden)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cqs.cpu_name()
    print(
        f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'CPU' if args.cpu_time else 'wall'} time; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"size: N={args.members}, hidden {args.hidden}x2, batch {args.batch_size}, {args.env} "
        f"(obs {od}, act {ad}), {args.offline_size} offline transitions in the sum-tree; "
        f"{flops / 1e9:.2f} GFLOP (matmul) per iteration; fp32 mm peak: {args.peak_size}^3 mm, timed in every round",
        flush=True,
    )
    vec_setup = setups["vectorized"]
    alone = "its matmuls alone (same calls)"
    replay = cqs.matmuls_replay(lambda: vec_setup.iterate(1), device)
    for fn in fns.values():
        fn(args.warmup)
    timing = {name: (lambda fn=fn: fn(args.iters), 1) for name, fn in fns.items()}
    timing[alone] = (replay, args.iters)
    timing[cqs.PEAK] = (cqs.peak_mm(device, args.peak_size), 3)
    rates = cqs.interleaved(timing, args.rounds, device, clock)
    units = {**dict.fromkeys(fns, args.iters), alone: 1, cqs.PEAK: 1}
    flops_of = {**dict.fromkeys(fns, flops), alone: flops, cqs.PEAK: 2 * args.peak_size**3}
    share = cqs.print_table(rates, flops_of, units, "iterations", 254_000, "250k online steps")
    print(f"ratio: vectorized iteration at {share['vectorized']:.0f}% of the fp32 mm peak (target >= 60% on one core)")
    to_alone = statistics.median(v * args.iters / a for v, a in zip(rates["vectorized"], rates[alone]))
    print(f"ratio: its matmuls alone at {share[alone]:.0f}% of the peak; the iteration at {100 * to_alone:.0f}% of")
    print("       its matmuls-alone speed (the rest of its time is what is not a matmul)")
    for k in fns:
        if k != "vectorized":
            ratio = statistics.median(v / w for v, w in zip(rates["vectorized"], rates[k]))
            print(f"ratio: vectorized / {k} = {ratio:.2f}x (median of the rounds' ratios)")
    if args.profile:
        profile(vec_setup, fargs, args, device, clock)
    if args.op_profile:
        cqs.op_profile(lambda: vec_setup.iterate(1), calls=10)


def profile(s: Setup, fargs, args: Args, device, clock) -> None:
    """Sections of the vectorized iteration timed separately (each synchronized), interleaved over the
    rounds, median of each (on a shared machine single measurements are noisy)."""
    n = args.iters
    idx, _ = s.buf.sample(args.batch_size, "balanced")
    prio = np.random.default_rng(0).uniform(0.5, 2.0, args.batch_size)
    uniform = ft.Args(batch_size=args.batch_size, replay="uniform")
    sections = {
        "env step (ensemble policy sample + MuJoCo)": lambda: s.step_env(n),
        "sum-tree sample + gather of the batch": lambda: [s.buf.sample(args.batch_size, "balanced") for _ in range(n)],
        "sum-tree priority update": lambda: [s.buf.tree.update(idx, prio) for _ in range(n)],
        "SAC step of the ensemble (incl. uniform sample)": lambda: [ft.update(s.lr, s.buf, uniform) for _ in range(n)],
        "full update (balanced)": lambda: [ft.update(s.lr, s.buf, fargs) for _ in range(n)],
    }
    times = {k: [] for k in sections}
    for _ in range(args.rounds):
        for k, fn in sections.items():
            times[k].append(timed(fn, device, clock) / n)
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

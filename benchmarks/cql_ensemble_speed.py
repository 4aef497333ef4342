"""Speed of the vectorized CQL-ensemble update (off2on_cql_ensemble.update) against a member-by-member
loop of the same update, at the paper's size, on one machine in one run.

    python benchmarks/cql_ensemble_speed.py                  # CPU or the GPU (--device auto)
    python benchmarks/cql_ensemble_speed.py --device cuda --compile

Reports updates/s, achieved GFLOP/s (the update's matmul FLOPs, counted analytically below) against
the machine's measured fp32 matmul peak (large torch.mm), and the time 1M updates take. Synthetic data
(random transitions) of the given dims: the update's cost does not depend on the values. Timed updates
are past the BC warm-start (the regime of 96% of a 1M-update run)."""

import os
import sys
import time
from dataclasses import dataclass

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import off2on_cql_ensemble as cq  # noqa: E402


@dataclass
class Bench:
    device: str = "auto"
    """auto, cpu or cuda"""
    members: int = 5
    """N"""
    hidden: int = 256
    """hidden width"""
    batch_size: int = 256
    """minibatch per member"""
    cql_samples: int = 10
    """K actions per proposal (uniform, pi(.|s), pi(.|s'))"""
    obs_dim: int = 17
    """observation dims (17 = HalfCheetah)"""
    act_dim: int = 6
    """action dims (6 = HalfCheetah)"""
    updates: int = 10
    """timed updates per window"""
    warmup: int = 3
    """untimed updates first (allocator, compile)"""
    repeats: int = 3
    """time --updates updates this many times and keep the best (other load on the machine only slows)"""
    compile: bool = False
    """also time the vectorized update with --compile (torch.compile of the losses)"""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)"""
    cpu_time: bool = False
    """time with the process's CPU time instead of wall time (CPU, --threads 1 only): robust to other
    load on a shared machine, since waiting for a core is not counted"""
    keep_freed_memory: bool = True
    """on CPU, keep freed memory in the heap as off2on_cql_ensemble.py does (--no-keep-freed-memory: glibc's default)"""
    peak_size: int = 4096
    """matrix size of the fp32 matmul peak measurement (8192 on a GPU is better)"""


def update_flops(n: int, b: int, k: int, obs: int, act: int, h: int, bc: bool = False) -> int:
    """Matmul FLOPs (2 per multiply-add) of one update of all N members; elementwise work is not counted.
    fwd = forward, wg = weight gradient, ig = input gradient (each costs the layer's forward MACs).
    Equals torch.utils.flop_counter.FlopCounterMode's count of losses() + backward (checked at small sizes)."""
    p = obs + act
    actor_rows = n * 2 * b  # one actor call for s and s'
    # fwd + wg of every layer, ig of all but the first (the observations need no gradient)
    actor = actor_rows * ((obs * h + h * h + 2 * h * act) * 2 + (h * h + 2 * h * act))
    critic_layers = p * h + h * h + h
    target = 2 * n * b * critic_layers  # target critics at (s', a'), no grad
    big_rows = 2 * n * b * (1 + 3 * k)  # every critic at the dataset action and 3K CQL actions
    big = big_rows * (critic_layers * 2 + (h * h + h))  # fwd + wg, ig of layers 2 and 3
    frozen = 0 if bc else 2 * n * b * critic_layers * 2  # actor loss: fwd + ig of all layers, no wg
    return 2 * (actor + target + big + frozen)


def matmul_peak(device: torch.device, size: int, reps: int = 5, clock=time.perf_counter) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = clock()
        torch.mm(a, b)
        sync(device)
        best = min(best, clock() - t)
    return 2 * size**3 / best / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step_fn, device, warmup: int, updates: int, repeats: int, clock=time.perf_counter) -> float:
    """Best updates/s over `repeats` windows of `updates` updates."""
    for _ in range(warmup):
        step_fn()
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t = clock()
        for _ in range(updates):
            step_fn()
        sync(device)
        best = max(best, updates / (clock() - t))
    return best


def main(bench: Bench) -> None:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if bench.device == "auto" else bench.device)
    if bench.threads > 0:
        torch.set_num_threads(bench.threads)
    if bench.cpu_time and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("error: --cpu-time needs --device cpu --threads 1")
    clock = time.process_time if bench.cpu_time else time.perf_counter
    torch.manual_seed(0)
    m, n, b = 100_000, bench.members, bench.batch_size
    data = {
        "observations": torch.randn(m, bench.obs_dim),
        "next_observations": torch.randn(m, bench.obs_dim),
        "actions": torch.rand(m, bench.act_dim) * 2 - 1,
        "rewards": torch.randn(m),
        "terminals": torch.zeros(m),
    }
    data = {k: v.to(device) for k, v in data.items()}
    if device.type == "cpu" and bench.keep_freed_memory:
        cq.keep_freed_memory()
    args = cq.Args(members=n, hidden=bench.hidden, batch_size=b, cql_samples=bench.cql_samples, bc_steps=0)
    vec = cq.Agent(bench.obs_dim, bench.act_dim, n, bench.hidden, args, device)
    loop = [cq.Agent(bench.obs_dim, bench.act_dim, 1, bench.hidden, args, device) for _ in range(n)]

    flops = update_flops(n, b, bench.cql_samples, bench.obs_dim, bench.act_dim, bench.hidden)
    peak = matmul_peak(device, bench.peak_size, clock=clock)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(
        f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'CPU' if bench.cpu_time else 'wall'} time"
    )
    print(
        f"size: N={n}, hidden {bench.hidden}x2, batch {b}, K={bench.cql_samples}, obs {bench.obs_dim}, "
        f"act {bench.act_dim}; {flops / 1e9:.2f} GFLOP (matmul) per update; fp32 mm peak {peak:.0f} GFLOP/s"
    )
    print("| implementation | updates/s | GFLOP/s | % of mm peak | 1M updates |")
    print("|---|---|---|---|---|", flush=True)
    rows = {}

    def report(label: str, step_fn) -> None:
        rows[label] = ups = timed(step_fn, device, bench.warmup, bench.updates, bench.repeats, clock)
        gf = ups * flops / 1e9
        print(f"| {label} | {ups:.2f} | {gf:.0f} | {100 * gf / peak:.0f}% | {1e6 / ups / 3600:.1f} h |", flush=True)

    report("vectorized (one batched update)", lambda: cq.update(vec, cq.sample(data, n, b), False, args))

    def loop_step():
        for agent in loop:
            cq.update(agent, cq.sample(data, 1, b), False, args)

    report("member-by-member loop", loop_step)
    if bench.compile:
        fn = torch.compile(cq.losses)
        report("vectorized + --compile", lambda: cq.update(vec, cq.sample(data, n, b), False, args, fn))
    print(f"vectorized / loop: {rows['vectorized (one batched update)'] / rows['member-by-member loop']:.2f}x")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "cpu"


if __name__ == "__main__":
    main(tyro.cli(Bench))

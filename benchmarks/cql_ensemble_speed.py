"""Speed of the vectorized CQL-ensemble update (off2on_cql_ensemble.update) against a member-by-member
loop of the same update, at the paper's size, on one machine in one run.

    python benchmarks/cql_ensemble_speed.py --threads 1 --cpu-time      # CPU: one core, CPU time (docs/speed.md)
    python benchmarks/cql_ensemble_speed.py --threads 1 --cpu-time --no-loop --gemv --relu-out-of-place  # A/B
    python benchmarks/cql_ensemble_speed.py --device cuda --compile      # GPU: adds the script's --compile path

Reports updates/s, achieved GFLOP/s (the update's matmul FLOPs, counted analytically below) against the
machine's fp32 matmul peak measured in the same run (large torch.mm), and the time 1M updates take. The
implementations alternate (A B A B ...) so that a change of load on a shared machine hits all of them;
each row gives the median and the range over the rounds. "matmuls alone" times the very matmul calls of
one update (same shapes and memory layouts, recorded from it) without anything else: the ceiling this
BLAS allows, so that the gap between it and the update is the cost of everything that is not a matmul.
Synthetic data (random transitions) of the given dims: the update's cost does not depend on the values.
Timed updates are past the BC warm-start (the regime of 96% of a 1M-update run). Variants that are not in the
script, for an A/B in one run: --gemv (the critics' one-output layer as VectorizedGemv, below) and
--relu-out-of-place (the script's in-place ReLUs computed out of place)."""

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode

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
    updates: int = 2
    """timed updates per implementation and round"""
    warmup: int = 2
    """untimed updates of each implementation first (allocator, compile)"""
    rounds: int = 5
    """rounds; each times every implementation once, in turn"""
    compile: bool = False
    """also time the script's --compile path (torch.compile of the losses, mode reduce-overhead: CUDA graphs on CUDA)"""
    bf16: bool = False
    """also time the vectorized update under bf16 autocast (matmuls in bfloat16, weights and Adam in fp32)"""
    gemv: bool = False
    """also time the vectorized update with the critics' one-output layer as VectorizedGemv (benchmark only)"""
    relu_out_of_place: bool = False
    """also time the vectorized update with its ReLUs out of place (the script computes them in place)"""
    loop: bool = True
    """also time the member-by-member loop (--no-loop: skip it)"""
    threads: int = 0
    """torch intra-op threads (0 = torch's default)"""
    cpu_time: bool = False
    """time with the process's CPU time instead of wall time (CPU, --threads 1 only): robust to other
    load on a shared machine, since waiting for a core is not counted"""
    keep_freed_memory: bool = True
    """on CPU, keep freed memory in the heap as off2on_cql_ensemble.py does (--no-keep-freed-memory: glibc's default)"""
    peak_size: int = 2048
    """matrix size of the fp32 matmul peak measurement (8192 on a GPU is better)"""
    op_profile: bool = False
    """end with torch.profiler's per-op self time of the vectorized update (the ops above 1%)"""


def update_flops(n: int, b: int, k: int, obs: int, act: int, h: int, bc: bool = False) -> int:
    """Matmul FLOPs (2 per multiply-add) of one update of all N members; elementwise work is not counted.
    fwd = forward, wg = weight gradient, ig = input gradient (each costs the layer's forward MACs).
    Equals torch.utils.flop_counter.FlopCounterMode's count of losses() + backward with every layer a
    baddbmm (tests/test_gpu_check.py checks it)."""
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


class VectorizedGemv(torch.autograd.Function):
    """torch.baddbmm(bias, x, weight) for a one-output layer, weight [E, in, 1], with each product one pass over x.
    Autograd's gradients of baddbmm, x^T g and g w^T, are matmuls with an inner or outer size of 1, which a CPU BLAS
    runs several times slower than a pass over x. Not in the scripts (for readability): timed here with --gemv."""

    @staticmethod
    def forward(x, weight, bias):
        return torch.bmm(weight.transpose(1, 2), x.transpose(1, 2)).transpose(1, 2) + bias  # (w^T x^T)^T + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    @staticmethod
    def backward(ctx, grad):  # grad [E, B, 1] -> g w^T, x^T g, the sum of g over the batch
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)  # x is bfloat16 under autocast
        grad_weight = torch.bmm(grad.transpose(1, 2), x).transpose(1, 2)
        return grad * weight.transpose(1, 2), grad_weight, grad.sum(1, keepdim=True)


@contextlib.contextmanager
def gemv_output_layers(script):
    """Within: every one-output VectorizedLinear of `script` (a script module) computes with VectorizedGemv."""
    layer = script.VectorizedLinear
    forward = layer.forward

    def gemv_forward(self, x):
        return VectorizedGemv.apply(x, self.weight, self.bias) if self.weight.shape[2] == 1 else forward(self, x)

    layer.forward = gemv_forward
    try:
        yield
    finally:
        layer.forward = forward


@contextlib.contextmanager
def relus_out_of_place(*nets):
    """Within: the ReLU modules of `nets` compute out of place (the actors' last ReLU, a relu_() call in
    EnsembleActor.forward, stays in place)."""
    relus = [m for net in nets for m in net.modules() if isinstance(m, torch.nn.ReLU)]
    for relu in relus:
        relu.inplace = False
    try:
        yield
    finally:
        for relu in relus:
            relu.inplace = True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, size: int, reps: int = 5, clock=time.perf_counter, dtype=torch.float32) -> float:
    """GFLOP/s of the best of `reps` size^3 torch.mm (after one untimed)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = clock()
        torch.mm(a, b)
        sync(device)
        best = min(best, clock() - t)
    return 2 * size**3 / best / 1e9


MATMULS = {"mm", "bmm", "addmm", "baddbmm"}


class RecordMatmuls(TorchDispatchMode):
    """Records every matmul op that runs under it (forward and backward): op and its tensor arguments'
    shapes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in MATMULS:
            spec = [(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, spec, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def matmuls_replay(step_fn, device: torch.device):
    """A function that runs the matmul calls of one step_fn() alone: fresh inputs with the same shapes and
    memory layouts, nothing else."""
    with RecordMatmuls() as rec:
        step_fn()

    def like(shape, stride, dtype):  # random values in this layout (expanded dims keep their stride 0)
        size = 1 + sum((length - 1) * step for length, step in zip(shape, stride)) if all(shape) else 0
        return torch.randn(size, dtype=dtype, device=device).as_strided(shape, stride)

    calls = [(func, [like(*s) if isinstance(s, tuple) else s for s in spec], kw) for func, spec, kw in rec.calls]

    def replay():
        for func, args, kwargs in calls:
            func(*args, **kwargs)

    return replay


def peak_mm(device: torch.device, size: int):
    """One size^3 fp32 torch.mm (2 size^3 FLOPs): the peak, timed in turn with the implementations."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return lambda: torch.mm(a, b)


def interleaved(fns: dict, rounds: int, device, clock=time.perf_counter) -> dict:
    """fns: name -> (fn, calls). Returns name -> calls/s, one value per round; every round times each fn in
    turn (A B A B ...), so that a change of load hits all of them."""
    rates = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, calls) in fns.items():
            sync(device)
            t = clock()
            for _ in range(calls):
                fn()
            sync(device)
            rates[name].append(calls / (clock() - t))
    return rates


PEAK = "fp32 mm peak"


def print_table(rates: dict, flops: dict, units: dict, unit: str, total: float, total_label: str) -> dict:
    """The table of an interleaved run. rates: name -> calls/s per round (PEAK among them); flops: name ->
    FLOPs per unit; units: name -> units (updates, iterations) per call. % of peak is the median over the
    rounds of each round's GFLOP/s over the same round's peak. Returns name -> that median (percent)."""
    pct = "% of mm peak (same rounds): median, range"
    print(f"| implementation | {unit}/s (median) | range | GFLOP/s | {pct} | {total_label} |")
    print("|---|---|---|---|---|---|")
    peak = [r * flops[PEAK] for r in rates[PEAK]]
    share = {}
    for name, per_round in rates.items():
        per_s = [r * units[name] for r in per_round]
        gflops = [u * flops[name] / 1e9 for u in per_s]
        shares = [100 * g * 1e9 / p for g, p in zip(gflops, peak)]
        share[name] = statistics.median(shares)
        med = statistics.median(per_s)
        hours = "" if name == PEAK or name.startswith("its matmuls") else f"{total / med / 3600:.1f} h"
        print(
            f"| {name} | {med:.3g} | {spread(per_s)} | {statistics.median(gflops):.0f} | {share[name]:.0f}%, "
            f"{min(shares):.0f}-{max(shares):.0f}% | {hours} |"
        )
    return share


def spread(values: list) -> str:
    return f"{min(values):.3g}-{max(values):.3g}"


def op_profile(step_fn, calls: int = 2, floor: float = 1.0) -> None:
    """torch.profiler's self time per op over `calls` calls of step_fn: the ops above `floor` percent, each
    marked matmul or not (the non-matmul ones are the update's overhead)."""
    from torch.profiler import ProfilerActivity, profile

    step_fn()
    with profile(
        activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
    ) as prof:
        for _ in range(calls):
            step_fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    device_time = torch.cuda.is_available() and any(e.self_device_time_total > 0 for e in events)
    time_of = (lambda e: e.self_device_time_total) if device_time else (lambda e: e.self_cpu_time_total)
    total = sum(time_of(e) for e in events)
    print(f"| op (torch.profiler, self {'device' if device_time else 'CPU'} time) | share | calls per step | matmul |")
    print("|---|---|---|---|")
    for e in sorted(events, key=time_of, reverse=True):
        share = 100 * time_of(e) / total
        if share >= floor:
            matmul = e.key.removeprefix("aten::") in MATMULS
            print(f"| {e.key} | {share:.1f}% | {e.count / calls:.0f} | {'yes' if matmul else 'no'} |")


def synthetic_data(m: int, obs_dim: int, act_dim: int, device) -> dict:
    data = {
        "observations": torch.randn(m, obs_dim),
        "next_observations": torch.randn(m, obs_dim),
        "actions": torch.rand(m, act_dim) * 2 - 1,
        "rewards": torch.randn(m),
        "terminals": torch.zeros(m),
    }
    return {k: v.to(device) for k, v in data.items()}


def main(bench: Bench) -> None:
    device = pick_device(bench.device)
    if bench.threads > 0:
        torch.set_num_threads(bench.threads)
    if bench.cpu_time and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("error: --cpu-time needs --device cpu --threads 1")
    clock = time.process_time if bench.cpu_time else time.perf_counter
    torch.manual_seed(0)
    n, b = bench.members, bench.batch_size
    data = synthetic_data(100_000, bench.obs_dim, bench.act_dim, device)
    if device.type == "cpu" and bench.keep_freed_memory:
        cq.keep_freed_memory()
    args = cq.Args(members=n, hidden=bench.hidden, batch_size=b, cql_samples=bench.cql_samples, bc_steps=0)

    def make(size: int) -> cq.Agent:
        return cq.Agent(bench.obs_dim, bench.act_dim, size, bench.hidden, args, device)

    vec = make(n)
    flops = update_flops(n, b, bench.cql_samples, bench.obs_dim, bench.act_dim, bench.hidden)
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    print(
        f"device: {name}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'CPU' if bench.cpu_time else 'wall'} time; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"size: N={n}, hidden {bench.hidden}x2, batch {b}, K={bench.cql_samples}, obs {bench.obs_dim}, "
        f"act {bench.act_dim}; {flops / 1e9:.2f} GFLOP (matmul) per update; fp32 mm peak: {bench.peak_size}^3 "
        "torch.mm, timed in every round",
        flush=True,
    )
    fns = {"vectorized (one batched update)": lambda: cq.update(vec, data, False, args)}
    if bench.loop:
        loop = [make(1) for _ in range(n)]

        def loop_step():
            for agent in loop:
                cq.update(agent, data, False, args)

        fns["member-by-member loop"] = loop_step
    if bench.gemv:

        def gemv_step():
            with gemv_output_layers(cq):
                cq.update(vec, data, False, args)

        fns["with VectorizedGemv (not in the script)"] = gemv_step
    if bench.relu_out_of_place:

        def out_of_place_step():
            with relus_out_of_place(vec.actor, vec.critic, vec.critic_target):
                cq.update(vec, data, False, args)

        fns["with ReLUs out of place"] = out_of_place_step
    if bench.bf16:

        def bf16_step():
            with torch.autocast(device.type, torch.bfloat16, cache_enabled=False):
                cq.update(vec, data, False, args)

        fns["vectorized, bf16 autocast"] = bf16_step
    if bench.compile:
        loss_fn = torch.compile(cq.losses, mode="reduce-overhead")  # the script's --compile
        fns["vectorized + --compile"] = lambda: cq.update(vec, data, False, args, loss_fn)
    main_label, alone = "vectorized (one batched update)", "its matmuls alone (same calls)"
    fns[alone] = matmuls_replay(fns[main_label], device)
    for fn in fns.values():
        for _ in range(max(bench.warmup, 4 if bench.compile else 0)):  # compiled, then its CUDA graphs recorded
            fn()
    timing = {name: (fn, bench.updates) for name, fn in fns.items()}
    timing[PEAK] = (peak_mm(device, bench.peak_size), 3)
    rates = interleaved(timing, bench.rounds, device, clock)
    flops_of = {**dict.fromkeys(fns, flops), PEAK: 2 * bench.peak_size**3}
    share = print_table(rates, flops_of, dict.fromkeys(timing, 1), "updates", 1e6, "1M updates")
    print(f"ratio: vectorized update at {share[main_label]:.0f}% of the fp32 mm peak (target >= 70% on one CPU core)")
    to_alone = statistics.median(v / a for v, a in zip(rates[main_label], rates[alone]))
    print(f"ratio: its matmuls alone at {share[alone]:.0f}% of the peak; the update at {100 * to_alone:.0f}% of")
    print("       its matmuls-alone speed (the rest of its time is what is not a matmul)")
    for name in rates:
        if name not in (main_label, alone, PEAK):
            ratio = statistics.median(v / w for v, w in zip(rates[main_label], rates[name]))
            print(f"ratio: vectorized / {name} = {ratio:.2f}x (median of the rounds' ratios)")
    if bench.op_profile:
        op_profile(fns[main_label])


def pick_device(name: str) -> torch.device:  # auto: cuda if available, else cpu
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


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

"""One command, one report: what a CUDA GPU does with off2on's two updates.

    python3 benchmarks/gpu_check.py --out DIR                          # CUDA machine, paper size, <= 8 minutes
    python3 benchmarks/gpu_check.py --out DIR --official <Off2OnRL>/rlkit/data/cql
    python3 benchmarks/gpu_check.py --device cpu --quick --out DIR     # every part at small size (a test runs it)

Writes DIR/gpu_check.md (human-readable) and DIR/gpu_check.json, rewritten after every measurement, so a run
cut short still leaves what it measured. Each part runs in its own try/except (an error is recorded with its
traceback and the next part runs) under a share of one time budget (--budget-s, default 460 s; the end-to-end
run keeps its reserve). Needs no dataset and no network: the offline data are synthetic (HalfCheetah dims) or
rolled out here.

1. system: device, driver, CUDA, torch; fp32 (TF32 off), TF32 and bf16 matmul peaks measured in this run.
2. equivalence: one CQL-ensemble update and one fine-tune update computed on the CPU and on the device from
   identical weights, an identical batch and identical random draws (every torch.randn/rand/randint of the
   update is drawn on the CPU from one seeded generator and copied to the update's device; the sum-tree
   draws come from the same numpy seed): max absolute and relative differences of the losses, the
   gradients and the updated weights, in fp32 with TF32 off, with TF32 on, and under bf16 autocast. Then,
   against eager on the device from identical states and CUDA RNG states: the scripts' --compile path
   (torch.compile of the losses, mode reduce-overhead; inductor's fallback_random so that it draws the eager
   numbers) and the CUDA-graph updates defined here, not in the scripts (CudaGraph: a whole CQL update as one
   CUDA graph; GraphedUpdate: a fine-tune update as two).
3. speed at paper size (N = 5, 2x256, batch 256, K = 10, HalfCheetah 17/6, 1M offline rows in the sum-tree):
   CQL-ensemble updates/s and fine-tune iterations/s (env step + ratio step + ensemble SAC step + sum-tree
   update), vectorized and member-by-member, eager, --compile and the CUDA-graph updates, with TF32 and bf16
   variants: achieved TFLOP/s (analytic matmul FLOPs) against the measured peak of the same precision, peak memory.
4. end to end: off2on_finetune.py on the device for --e2e-s seconds (stopped then; its evaluations so far
   are the result), from the authors' released agents (--official, imported as off2on_cql_ensemble.py
   --import-official does) or a freshly initialized ensemble, on a dataset rolled out here by that ensemble's
   policy (a D4RL-layout .hdf5 in a temp folder).
"""

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import cql_ensemble_speed as cqs  # noqa: E402
import finetune_speed as fts  # noqa: E402

import off2on_cql_ensemble as cq  # noqa: E402
import off2on_finetune as ft  # noqa: E402


@dataclass
class Check:
    out: str = "gpu_check"
    """folder for gpu_check.md and gpu_check.json"""
    device: str = "auto"
    """auto (cuda if available), cuda or cpu"""
    quick: bool = False
    """every part at small size (for a CPU: the whole check in about a minute)"""
    official: str = ""
    """folder of the authors' released agents (seed*/actor_*.pt, ...): the end-to-end run starts from them"""
    budget_s: float = 0.0
    """time budget of the whole check (0 = 460 s; --quick: 170 s)"""
    e2e_s: float = 0.0
    """seconds of the end-to-end fine-tune (0 = 150 s; --quick: 30 s, stopped by its step budget first)"""
    compile: bool = True
    """check and time the scripts' --compile path on CUDA (torch.compile; --no-compile skips it)"""
    compile_on_cpu: bool = False
    """also run torch.compile on a CPU (several minutes of compiling; off by default)"""
    parts: tuple[str, ...] = ("system", "equivalence", "speed", "end_to_end")
    """the parts to run (e.g. --parts speed end_to_end to redo two of them)"""
    seed: int = 0
    """seed of weights, data and draws"""


@dataclass
class Size:
    members: int = 5
    hidden: int = 256
    batch: int = 256
    cql_samples: int = 10
    obs: int = 17  # HalfCheetah
    act: int = 6
    offline_rows: int = 1_000_000  # the fine-tune's sum-tree (D4RL halfcheetah-medium: 1M)
    cql_rows: int = 100_000  # the CQL benchmark's synthetic dataset
    peak: int = 8192  # matrix size of the peak measurements
    variant_s: float = 2.0  # timed seconds per speed variant


PARTS = ("system", "equivalence", "speed", "end_to_end")
COMPILE_LABEL = "--compile (torch.compile, reduce-overhead)"
PAPER = Size()
QUICK = Size(members=2, hidden=32, batch=16, cql_samples=2, offline_rows=2000, cql_rows=2000, peak=256, variant_s=0.2)


class PartTimeout(Exception):
    """A part ran out of its share of the time budget."""


class Report:
    """Parts, their status and results; gpu_check.md and gpu_check.json rewritten at every write()."""

    def __init__(self, out: str, check: Check):
        os.makedirs(out, exist_ok=True)
        self.out, self.start = out, time.time()
        self.data = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "args": vars(check)}
        self.data["parts"] = {}

    def part(self, name: str, title: str) -> dict:
        part = {"title": title, "status": "running", "seconds": 0.0, "lines": [], "results": {}}
        self.data["parts"][name] = part
        return part

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.start, 1)
        with open(os.path.join(self.out, "gpu_check.json.tmp"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(os.path.join(self.out, "gpu_check.json.tmp"), os.path.join(self.out, "gpu_check.json"))
        lines = [
            "# off2on GPU check",
            "",
            f"Command: `{self.data['command']}`; elapsed {self.data['elapsed_s']} s.",
            "",
        ]
        for part in self.data["parts"].values():
            lines += [f"## {part['title']}", "", f"Status: **{part['status']}** ({part['seconds']:.1f} s)", ""]
            lines += part["lines"]
            if part.get("error"):
                lines += ["", "Error:", "", "```", part["error"], part.get("traceback", "")[-2500:], "```"]
            lines.append("")
        with open(os.path.join(self.out, "gpu_check.md.tmp"), "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(os.path.join(self.out, "gpu_check.md.tmp"), os.path.join(self.out, "gpu_check.md"))

    def run(self, name: str, title: str, seconds: float, fn, *args) -> None:
        """fn(part, *args) under an alarm of `seconds`; any exception is recorded, never raised."""
        part = self.part(name, title)
        start = time.time()
        self.write()
        if seconds < 1:
            part["status"] = "skipped: no time left in the budget"
        else:
            previous = signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                fn(part, *args)
                part["status"] = "ok"
            except BaseException as e:  # noqa: BLE001 (the check goes on whatever happened in a part)
                part["status"] = "timed out" if isinstance(e, PartTimeout) else "error"
                part["error"] = f"{type(e).__name__}: {e}"
                part["traceback"] = traceback.format_exc()
                if isinstance(e, KeyboardInterrupt):
                    raise
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        part["seconds"] = time.time() - start
        self.write()


def _on_alarm(signum, frame):
    raise PartTimeout("the part ran out of its share of the time budget")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (x == 0 or 1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}" if isinstance(x, float) else str(x)


def table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


@contextlib.contextmanager
def tf32(on: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def autocast(device: torch.device, on: bool):
    if not on:
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16, cache_enabled=False)


# -------------------------------------------------------------------------------------
# CUDA-graph updates: checked and timed here, not in the scripts (whose --compile is torch.compile's
# mode reduce-overhead on the losses); on a CPU they run eagerly
# -------------------------------------------------------------------------------------
class CudaGraph:
    """fn() as one CUDA graph, one launch per step instead of hundreds. Calls 1..warmup run fn eagerly on a side
    stream (allocator, cuBLAS workspaces, Adam states, torch.compile); the next captures it, and every call replays
    it: each call is one step and returns fn's outputs, overwritten by the next replay. Assumes static shapes, no
    host sync in fn, every state it changes updated in place (weights, buffers, Adams made capturable), torch's
    graph-safe CUDA RNG (each replay advances its offset: new draws)."""

    def __init__(self, fn, warmup: int = 3):
        self.fn = fn
        self.warmup = warmup
        self.graph = torch.cuda.CUDAGraph()
        self.out = None  # fn's outputs in the graph's memory

    def __call__(self):
        if self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.fn()
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.out is None:
            with torch.cuda.graph(self.graph):
                self.out = self.fn()
        self.graph.replay()
        return self.out


def make_capturable(*optimizers) -> None:
    """Lets Adam.step() run inside a CUDA graph: fused Adam keeps its step count on the device anyway, so the flag
    only passes torch's capture check (the fused kernel is the same)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["capturable"] = True


def graphed(fn, device: torch.device, optimizers=()):
    """fn as a CudaGraph on CUDA (its optimizers made capturable), else fn itself."""
    if device.type != "cuda":
        return fn
    make_capturable(*optimizers)
    return CudaGraph(fn)


def ratio_step(learner: ft.Learner, x: torch.Tensor, x_rl: torch.Tensor, args: ft.Args) -> tuple:
    """off2on_finetune.update's density-ratio step on (s, a) rows x (uniform offline rows, then as many uniform online
    rows) -> the priorities of the RL batch's (s, a) x_rl from the net before its step, and the statistics."""
    w_off, w_on = learner.ratio(x).squeeze(-1).chunk(2)
    loss = ft.ratio_loss(w_off, w_on)
    learner.ratio_opt.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        prio = ft.priorities(learner.ratio(x_rl).squeeze(-1), w_off, args.temperature, *args.priority_clip)
    learner.ratio_opt.step()
    stats = {"ratio_loss": loss.detach(), "w_offline_mean": w_off.detach().mean()}
    return prio, {**stats, "w_online_mean": w_on.detach().mean()}


def sac_step(learner: ft.Learner, batch: tuple, args: ft.Args, loss_fn=ft.sac_losses) -> dict:
    """off2on_finetune.update's SAC step and Polyak averaging of the target critics."""
    critic_loss, actor_loss, alpha_loss, stats = loss_fn(learner, batch, args.gamma)
    learner.sac_opt.zero_grad(set_to_none=True)
    (critic_loss + actor_loss + alpha_loss).backward()
    learner.sac_opt.step()
    with torch.no_grad():
        for p, tp in zip(learner.critic.parameters(), learner.critic_target.parameters()):
            tp.lerp_(p, args.tau)
    return stats


class GraphedUpdate:
    """off2on_finetune.update as two CUDA graphs; on a CPU the same steps run eagerly (tests/test_gpu_check.py:
    then exactly update()'s steps). Graph 1 gathers the RL batch at the sum-tree's indices (copied in), takes the
    density-ratio step and the batch's priorities (copied out); graph 2 takes the SAC step. The host waits for graph 1
    only and writes the priorities into the sum-tree while graph 2 runs, before the next batch is drawn, as update()
    does. Uniform draws read a device copy of the online count (randint(2^62) % count, bias < 1e-13): no count is
    baked into a graph."""

    def __init__(self, learner: ft.Learner, replay: ft.Replay, args: ft.Args, loss_fn=ft.sac_losses):
        self.learner = learner
        self.replay = replay
        self.args = args
        self.loss_fn = loss_fn
        self.cuda = replay.rows.device.type == "cuda"
        self.idx_host = torch.zeros(args.batch_size, dtype=torch.long, pin_memory=self.cuda)  # copied in asynchronously
        self.idx = torch.zeros(args.batch_size, dtype=torch.long, device=replay.rows.device)
        self.n_online = torch.zeros((), dtype=torch.long, device=replay.rows.device)
        optimizers = (learner.sac_opt, learner.ratio_opt)
        self.ratio_graph = graphed(self.ratio_part, replay.rows.device, optimizers)
        self.sac_graph = graphed(self.sac_part, replay.rows.device, optimizers)

    def draw(self, lo: int, count: torch.Tensor) -> torch.Tensor:  # batch_size row indices uniform in [lo, lo + count)
        return lo + torch.randint(2**62, (self.args.batch_size,), device=count.device) % count

    def ratio_part(self) -> tuple:  # graph 1: uniform offline and online (s, a) rows, the density-ratio step
        sa = self.replay.obs_dim + self.replay.act_dim
        offline = torch.randint(self.replay.n_offline, (self.args.batch_size,), device=self.idx.device)
        x = self.replay.rows[torch.cat([offline, self.draw(self.replay.n_offline, self.n_online)])][:, :sa]
        return ratio_step(self.learner, x, self.replay.rows[self.idx][:, :sa], self.args)

    def sac_part(self) -> dict:  # graph 2: the SAC step on the RL batch (drawn here unless by priority)
        replay = self.replay
        lo = 0 if self.args.replay == "uniform" else replay.n_offline
        idx = self.idx if self.args.replay == "balanced" else self.draw(lo, self.n_online + replay.n_offline - lo)
        stats = sac_step(self.learner, replay.split(replay.rows[idx]), self.args, self.loss_fn)
        return {"online_fraction": (idx >= replay.n_offline).float().mean(), **stats}

    def __call__(self) -> dict:
        replay = self.replay
        self.n_online.fill_(replay.n_online)
        if self.args.replay == "balanced":
            idx = replay.tree.sample(self.args.batch_size)
            self.idx_host.numpy()[:] = idx  # free: the host waited for the last graph 1, after its last copy
            self.idx.copy_(self.idx_host, non_blocking=True)
            prio, ratio_stats = self.ratio_graph()
            prio = prio.cpu().numpy()  # waits for graph 1 only: graph 2 is launched next
        stats = self.sac_graph()
        if self.args.replay == "balanced":  # the sum-tree is written while graph 2 runs
            replay.tree.update(idx, prio)
            replay.max_priority = max(replay.max_priority, float(prio.max()))
            stats = {**stats, **ratio_stats}
        return {k: v.clone() for k, v in stats.items()}  # the graphs' outputs are overwritten by the next replay


# -------------------------------------------------------------------------------------
# 1. system
# -------------------------------------------------------------------------------------
def part_system(part: dict, device: torch.device, size: Size) -> None:
    r = part["results"]
    r["python"] = platform.python_version()
    r["torch"] = torch.__version__
    r["numpy"] = np.__version__
    r["gymnasium"] = gym.__version__
    r["cpu"] = cqs.cpu_name()
    r["torch_threads"] = torch.get_num_threads()
    r["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        r["gpu"] = props.name
        r["compute_capability"] = f"{props.major}.{props.minor}"
        r["multiprocessors"] = props.multi_processor_count
        r["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        r["cuda_runtime"] = torch.version.cuda
        r["cudnn"] = torch.backends.cudnn.version()
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"]
            r["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            r["nvidia_smi"] = f"not available ({e})"
    part["lines"] += [f"- {k}: {v}" for k, v in r.items()]
    peaks = r["peak_tflops"] = {}
    part["lines"] += ["", f"Matmul peaks measured now ({size.peak}^3 torch.mm, best of 5):", ""]
    for name, dtype, use_tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ):
        if name == "tf32" and device.type != "cuda":
            continue
        with tf32(use_tf32):
            peaks[name] = cqs.matmul_peak(device, size.peak, dtype=dtype) / 1000
        part["lines"].append(f"- {name}: {peaks[name]:.3g} TFLOP/s")
    peaks.setdefault("tf32", peaks["fp32"])


# -------------------------------------------------------------------------------------
# 2. equivalence
# -------------------------------------------------------------------------------------
@contextlib.contextmanager
def noise_from_cpu(seed: int):
    """Every torch.randn/rand/randn_like/rand_like/randint called inside draws on the CPU from one generator
    seeded `seed` and is copied to the device asked for: the same numbers on every device."""
    gen = torch.Generator().manual_seed(seed)
    saved = {name: getattr(torch, name) for name in ("randn", "rand", "randn_like", "rand_like", "randint")}

    def shape_of(size):
        return tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)

    def randn(*size, device=None, dtype=None, **_):
        return saved["randn"](shape_of(size), generator=gen, dtype=dtype).to(device)

    def rand(*size, device=None, dtype=None, **_):
        return saved["rand"](shape_of(size), generator=gen, dtype=dtype).to(device)

    def randn_like(t, **_):
        return saved["randn"](t.shape, generator=gen, dtype=t.dtype).to(t.device)

    def rand_like(t, **_):
        return saved["rand"](t.shape, generator=gen, dtype=t.dtype).to(t.device)

    def randint(*args, device=None, **_):
        return saved["randint"](*args, generator=gen).to(device)

    for name, fn in (("randn", randn), ("rand", rand), ("randn_like", randn_like), ("rand_like", rand_like)):
        setattr(torch, name, fn)
    torch.randint = randint
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)


def tensors(named) -> dict:
    return {name: t.detach().double().cpu() for name, t in named}


def grads(named) -> dict:
    return {name: p.grad.detach().double().cpu() for name, p in named if p.grad is not None}


def compare(ref: dict, other: dict) -> dict:
    """Max absolute difference and max relative difference (|a - b| / max |a| of the same tensor; for
    scalars |a - b| / |a|) over matching entries."""
    max_abs, max_rel = 0.0, 0.0
    for k, a in ref.items():
        a = torch.as_tensor(a, dtype=torch.float64)
        b = torch.as_tensor(other[k], dtype=torch.float64)
        d = float((a - b).abs().max()) if a.numel() else 0.0
        max_abs = max(max_abs, d)
        scale = float(a.abs().max()) if a.numel() else 0.0
        max_rel = max(max_rel, d / scale if scale > 0 else (0.0 if d == 0 else math.inf))
    return {"max_abs": max_abs, "max_rel": max_rel}


def cql_args(size: Size) -> cq.Args:
    return cq.Args(members=size.members, hidden=size.hidden, batch_size=size.batch, cql_samples=size.cql_samples)


def cql_agent(size: Size, device, seed: int) -> cq.Agent:
    torch.manual_seed(seed)
    return cq.Agent(size.obs, size.act, size.members, size.hidden, cql_args(size), device)


def cql_named(agent: cq.Agent):
    yield from (("actor." + k, v) for k, v in agent.actor.named_parameters())
    yield from (("critic." + k, v) for k, v in agent.critic.named_parameters())
    yield from (("critic_target." + k, v) for k, v in agent.critic_target.named_parameters())
    yield "log_alpha", agent.log_alpha


def cql_once(size: Size, device, seed: int, use_tf32: bool, bf16: bool) -> dict:
    """One CQL-ensemble update from the same agent and data; every random draw (the minibatch indices too) from
    noise_from_cpu."""
    agent = cql_agent(size, "cpu", seed)
    if device.type != "cpu":
        moved = cq.Agent(size.obs, size.act, size.members, size.hidden, cql_args(size), device)
        for net in ("actor", "critic", "critic_target"):
            getattr(moved, net).load_state_dict(getattr(agent, net).state_dict())
        with torch.no_grad():
            moved.log_alpha.copy_(agent.log_alpha)
        agent = moved
    torch.manual_seed(seed + 1)
    data = {k: v.to(device) for k, v in cqs.synthetic_data(size.cql_rows, size.obs, size.act, "cpu").items()}
    with tf32(use_tf32), autocast(device, bf16), noise_from_cpu(seed + 2):  # the minibatch indices too
        metrics = cq.update(agent, data, False, cql_args(size))
    losses = {k: float(v) for k, v in metrics.items() if k.startswith("losses/")}
    return {"losses": losses, "grads": grads(cql_named(agent)), "weights": tensors(cql_named(agent))}


def ft_learner(size: Size, device, seed: int, fargs):
    """A fine-tune learner built on the CPU (seeded), copied to `device`."""
    torch.manual_seed(seed)
    actor = ft.EnsembleActor(size.obs, size.act, size.members, size.hidden)
    critic = ft.EnsembleCritic(size.obs, size.act, size.members, size.hidden)
    lr = ft.Learner(actor, critic, fargs.lr)
    if device.type == "cpu":
        return lr
    moved = ft.Learner(copy.deepcopy(actor).to(device), copy.deepcopy(critic).to(device), fargs.lr)
    moved.ratio.load_state_dict(lr.ratio.state_dict())
    moved.critic_target.load_state_dict(lr.critic_target.state_dict())
    return moved


def ft_named(lr):
    for net in ("actor", "critic", "critic_target", "ratio"):
        yield from ((f"{net}.{k}", v) for k, v in getattr(lr, net).named_parameters())
    yield "log_alpha", lr.log_alpha


def ft_buffer(size: Size, device, seed: int, fargs) -> ft.Replay:
    rng = np.random.default_rng(seed)
    buf = ft.Replay(fts.fake_data(size.offline_rows // 10, size.obs, size.act, rng), 2000, device, 0.75)
    online = fts.fake_data(1000, size.obs, size.act, rng)
    rows = [online[k].reshape(1000, -1) for k in ("observations", "actions", "rewards", "next_observations")]
    buf.add_online(np.concatenate(rows + [online["terminals"][:, None]], 1))
    return buf


def ft_once(size: Size, device, seed: int, use_tf32: bool, bf16: bool) -> dict:
    """One fine-tune update (balanced replay: ratio step, priorities, SAC step) from the same learner,
    buffer, sum-tree draws (numpy seed) and torch draws (noise_from_cpu)."""
    fargs = ft.Args(batch_size=size.batch)
    lr = ft_learner(size, device, seed, fargs)
    buf = ft_buffer(size, device, seed, fargs)
    np.random.seed(seed + 3)
    with tf32(use_tf32), noise_from_cpu(seed + 2):
        stats = ft.update(lr, buf, fargs, fts.bf16_losses if bf16 else ft.sac_losses)
    losses = {k: float(stats[k]) for k in ("critic_loss", "actor_loss", "ratio_loss")}
    tree = buf.tree.nodes[buf.tree.start : buf.tree.start + buf.n_offline + buf.n_online]
    weights = tensors(ft_named(lr))
    weights["sum-tree priorities"] = torch.from_numpy(tree.copy())
    return {"losses": losses, "grads": grads(ft_named(lr)), "weights": weights}


def compiled(fn):
    """The scripts' --compile: torch.compile with mode reduce-overhead (on CUDA its kernels replay as CUDA graphs)."""
    return torch.compile(fn, mode="reduce-overhead")


def cql_graph_pair(size: Size, device, seed: int, path: str, steps: int = 5) -> list:
    """Eager updates against `path` ("compile": the script's --compile; "graph": each update as one CudaGraph) from
    identical agents, every step from the same torch seed (CPU and CUDA generators): weight differences after each
    step past the warm-up (a CudaGraph captures at step 4; torch.compile's CUDA graphs are recorded by then)."""
    args = cql_args(size)
    data = cqs.synthetic_data(size.cql_rows, size.obs, size.act, device)
    eager = cql_agent(size, device, seed)
    other = cql_agent(size, device, seed)
    loss_fn = compiled(cq.losses) if path == "compile" else cq.losses

    def other_update():
        return cq.update(other, data, False, args, loss_fn)

    step = graphed(other_update, device, other.opts) if path == "graph" else other_update
    out = []
    for i in range(steps):
        torch.manual_seed(seed + 10 + i)
        cq.update(eager, data, False, args)
        torch.manual_seed(seed + 10 + i)
        step()
        sync(device)
        if i >= 3:
            out.append({"step": i + 1, **compare(tensors(cql_named(eager)), tensors(cql_named(other)))})
    return out


def ft_graph_pair(size: Size, device, seed: int, path: str, steps: int = 5) -> list:
    """Eager fine-tune updates against `path` from identical learners and buffers, every step from the same numpy
    and torch seeds: weights and sum-tree after each step past the warm-up. "compile": off2on_finetune.update with
    the script's --compile losses against update(); "graph": GraphedUpdate against the same object with its two
    graphs replaced by the plain eager functions (the same draws)."""
    fargs = ft.Args(batch_size=size.batch)
    ref_lr = ft_learner(size, device, seed, fargs)
    other_lr = ft_learner(size, device, seed, fargs)
    ref_buf = ft_buffer(size, device, seed, fargs)
    other_buf = ft_buffer(size, device, seed, fargs)
    if path == "graph":
        ref = GraphedUpdate(ref_lr, ref_buf, fargs)
        ref.ratio_graph = ref.ratio_part  # the same code, eager
        ref.sac_graph = ref.sac_part
        other = GraphedUpdate(other_lr, other_buf, fargs)
    else:
        loss_fn = compiled(ft.sac_losses)

        def ref():
            return ft.update(ref_lr, ref_buf, fargs)

        def other():
            return ft.update(other_lr, other_buf, fargs, loss_fn)

    out = []
    for i in range(steps):
        for run in (ref, other):
            np.random.seed(seed + 20 + i)
            torch.manual_seed(seed + 20 + i)
            run()
        sync(device)
        if i >= 3:
            trees = [{"t": torch.from_numpy(buf.tree.nodes.copy())} for buf in (ref_buf, other_buf)]
            out.append({"step": i + 1, **compare(tensors(ft_named(ref_lr)), tensors(ft_named(other_lr)))})
            out[-1]["sum_tree"] = compare(*trees)
    return out


def part_equivalence(part: dict, device: torch.device, size: Size, check: Check, state: dict) -> None:
    r, lines = part["results"], part["lines"]
    lines += [
        "CPU vs " + str(device) + ": one update from identical weights, batch and random draws (all drawn on "
        "the CPU). `rel` = max |a - b| / max |a| per tensor (losses: |a - b| / |a|), worst tensor; the CPU "
        "side is plain fp32. Adam's first step moves each weight by about its learning rate "
        "(1e-4 to 3e-4), so weight differences read against that.",
        "",
    ]
    configs = [("fp32, TF32 off", False, False), ("fp32, TF32 on", True, False), ("bf16 autocast", False, True)]
    if device.type != "cuda":
        configs = [c for c in configs if c[0] != "fp32, TF32 on"]
        lines += ["(On a CPU both sides are the CPU: the numbers only show that the check runs.)", ""]
    rows = []
    for script, once in (("CQL ensemble", cql_once), ("fine-tune", ft_once)):
        ref = once(size, torch.device("cpu"), check.seed, False, False)
        for label, use_tf32, bf16 in configs:
            got = once(size, device, check.seed, use_tf32, bf16)
            res = {key: compare(ref[key], got[key]) for key in ("losses", "grads", "weights")}
            r[f"{script}: {label}"] = res
            row = [script, label]
            for key in ("losses", "grads", "weights"):
                row += [res[key]["max_abs"], res[key]["max_rel"]]
            rows.append(row)
    state["fp32_agrees"] = all(
        r[f"{s}: fp32, TF32 off"]["losses"]["max_rel"] < 1e-4 and r[f"{s}: fp32, TF32 off"]["grads"]["max_rel"] < 1e-3
        for s in ("CQL ensemble", "fine-tune")
    )
    header = ["update", "precision", "losses abs", "losses rel", "grads abs", "grads rel", "weights abs", "weights rel"]
    lines += table(header, rows)
    lines += [
        "",
        f"fp32 with TF32 off agrees to float32 round-off (losses rel < 1e-4, gradients rel < 1e-3): "
        f"**{state['fp32_agrees']}**",
        "",
    ]
    graph_rows = []
    paths = [("CUDA graph", "graph")]
    if check.compile and (device.type == "cuda" or check.compile_on_cpu):
        paths.append((COMPILE_LABEL, "compile"))
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True  # compiled code draws with eager's RNG ops: the same numbers
    for label, path in paths:
        for script, pair in (("CQL ensemble", cql_graph_pair), ("fine-tune", ft_graph_pair)):
            key = f"{script}: {label} vs eager"
            try:
                t0 = time.time()
                steps = pair(size, device, check.seed, path)
                r[key] = {"steps": steps, "seconds": time.time() - t0}
                for s in steps:
                    graph_rows.append([script, label, s["step"], s["max_abs"], s["max_rel"], time.time() - t0])
                state[f"{script} {path} ok"] = True
            except PartTimeout:
                raise
            except Exception as e:  # noqa: BLE001 (recorded; the other variants still run)
                r[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                graph_rows.append([script, label, "error", f"{type(e).__name__}: {str(e)[:200]}", "", ""])
    lines += [
        f"The CUDA-graph updates (this check's, not the scripts') and the scripts' --compile vs eager on {device} "
        "(same states, same seeds at every step; a CudaGraph runs steps 1-3 eagerly, captures and replays step 4, "
        "replays step 5; weights compared after the step; on a CPU the CUDA-graph path runs eagerly):",
        "",
    ]
    lines += table(["update", "path", "step", "weights abs", "weights rel", "seconds (incl. compile)"], graph_rows)


# -------------------------------------------------------------------------------------
# 3. speed
# -------------------------------------------------------------------------------------
def measure(step, device, min_seconds: float, warmup: int = 4) -> dict:
    """Calls/s of step() after `warmup` calls (a CUDA-graph step is captured by then), peak device memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    t = time.perf_counter()
    step()
    sync(device)
    calls = int(max(3, min(20_000, min_seconds / max(time.perf_counter() - t, 1e-6))))
    t = time.perf_counter()
    for _ in range(calls):
        step()
    sync(device)
    seconds = time.perf_counter() - t
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"per_s": calls / seconds, "calls": calls, "seconds": seconds, "peak_memory_gib": mem}


def cql_variants(device: torch.device, size: Size, check: Check) -> list:
    """(label, precision, make) of the CQL-ensemble speed variants; make() -> step."""
    args = cql_args(size)
    data = cqs.synthetic_data(size.cql_rows, size.obs, size.act, device)
    n = size.members

    def vectorized(graph: bool, loss_fn=cq.losses, bf16: bool = False):
        def make():
            agent = cql_agent(size, device, check.seed)

            def step():
                with autocast(device, bf16):
                    return cq.update(agent, data, False, args, loss_fn)

            return graphed(step, device, agent.opts) if graph else step

        return make

    def loop(graph: bool):
        def make():
            torch.manual_seed(check.seed)
            agents = [cq.Agent(size.obs, size.act, 1, size.hidden, args, device) for _ in range(n)]

            def step():
                return [cq.update(a, data, False, args) for a in agents]

            return graphed(step, device, [opt for a in agents for opt in a.opts]) if graph else step

        return make

    cuda = device.type == "cuda"
    variants = [
        ("vectorized, eager", "fp32", vectorized(False)),
        ("member-by-member, eager", "fp32", loop(False)),
        ("vectorized, eager, bf16 autocast", "bf16", vectorized(False, bf16=True)),
    ]
    if cuda:
        variants += [
            ("vectorized, CUDA graph", "fp32", vectorized(True)),
            ("member-by-member, CUDA graph", "fp32", loop(True)),
            ("vectorized, CUDA graph, TF32", "tf32", vectorized(True)),
            ("vectorized, CUDA graph, bf16 autocast", "bf16", vectorized(True, bf16=True)),
        ]
    if check.compile and (cuda or check.compile_on_cpu):
        variants.append((f"vectorized, {COMPILE_LABEL}", "fp32", vectorized(False, compiled(cq.losses))))
        if cuda:
            variants.append(("vectorized, --compile --tf32", "tf32", vectorized(False, compiled(cq.losses))))
    return variants


def ft_variants(device: torch.device, size: Size, check: Check) -> list:
    fargs = ft.Args(batch_size=size.batch)
    data = fts.fake_data(size.offline_rows, size.obs, size.act, np.random.default_rng(check.seed))
    capacity = 30_000 if size is PAPER else 5_000

    def setup(loop: bool, graph: bool, loss_fn=ft.sac_losses):
        def make_step(learner, replay):
            return GraphedUpdate(learner, replay, fargs, loss_fn)

        def make():
            lr = fts.learner(size.obs, size.act, size.members, size.hidden, fargs, device, check.seed, loop)
            graphs = make_step if graph else None
            s = fts.Setup(lr, "halfcheetah", fargs, device, data, capacity, check.seed, loss_fn, graphs)
            return lambda: s.iterate(1)

        return make

    cuda = device.type == "cuda"
    variants = [
        ("vectorized, eager", "fp32", setup(False, False)),
        ("member-by-member, eager", "fp32", setup(True, False)),
        ("vectorized, eager, bf16 autocast (SAC losses)", "bf16", setup(False, False, fts.bf16_losses)),
    ]
    if cuda:
        variants += [
            ("vectorized, CUDA graphs", "fp32", setup(False, True)),
            ("member-by-member, CUDA graphs", "fp32", setup(True, True)),
            ("vectorized, CUDA graphs, TF32", "tf32", setup(False, True)),
            ("vectorized, CUDA graphs, bf16 autocast (SAC losses)", "bf16", setup(False, True, fts.bf16_losses)),
        ]
    if check.compile and (cuda or check.compile_on_cpu):
        variants.append((f"vectorized, {COMPILE_LABEL}", "fp32", setup(False, False, compiled(ft.sac_losses))))
        if cuda:
            variants.append(("vectorized, --compile --tf32", "tf32", setup(False, False, compiled(ft.sac_losses))))
    return variants


def part_speed(part: dict, device: torch.device, size: Size, check: Check, state: dict) -> None:
    r, lines = part["results"], part["lines"]
    peaks = state.get("peaks") or {"fp32": float("nan"), "tf32": float("nan"), "bf16": float("nan")}
    s = size
    cql_flops = cqs.update_flops(s.members, s.batch, s.cql_samples, s.obs, s.act, s.hidden)
    ft_flops = fts.iteration_flops(s.members, s.batch, s.obs, s.act, s.hidden)
    lines += [
        f"Size: N={s.members}, hidden {s.hidden}x2, batch {s.batch}, K={s.cql_samples}, obs {s.obs}, act {s.act}; "
        f"fine-tune sum-tree over {s.offline_rows} offline rows. Matmul FLOPs counted analytically: "
        f"{cql_flops / 1e9:.2f} GFLOP per CQL update, {ft_flops / 1e9:.2f} GFLOP per fine-tune iteration. "
        "% of peak: against the peak of the same precision measured in part 1. Targets on one H100/H200: "
        ">= 2,000 CQL updates/s and >= 1,000 fine-tune iterations/s.",
        "",
    ]
    header = ["variant", "per s", "TFLOP/s", "% of peak", "peak memory GiB", "1M updates / 250k steps (min)"]
    for script, variants, flops, total, unit in (
        ("CQL ensemble", cql_variants(device, size, check), cql_flops, 1e6, "updates"),
        ("fine-tune", ft_variants(device, size, check), ft_flops, 254e3, "iterations"),
    ):
        rows = []
        lines += [f"### {script} ({unit}/s)", ""]
        block_start = len(lines)
        for label, precision, make in variants:
            key = f"{script}: {label}"
            try:
                with tf32(precision == "tf32"):
                    got = measure(make(), device, size.variant_s)
                tflops = got["per_s"] * flops / 1e12
                got.update(tflops=tflops, precision=precision, pct_of_peak=100 * tflops / peaks[precision])
                r[key] = got
                state[key] = got["per_s"]
                rows.append(
                    [label, got["per_s"], tflops, got["pct_of_peak"], got["peak_memory_gib"], total / got["per_s"] / 60]
                )
            except PartTimeout:
                raise
            except Exception as e:  # noqa: BLE001 (recorded; the other variants still run)
                r[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                rows.append([label, "error", f"{type(e).__name__}: {str(e)[:150]}", "", "", ""])
            finally:
                gc.collect()  # the variant's graphs and buffers (some sit in reference cycles)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            lines[block_start:] = table(header, rows) + [""]
            part["seconds"] = time.time() - state["speed_start"]
            state["report"].write()


# -------------------------------------------------------------------------------------
# 4. end to end
# -------------------------------------------------------------------------------------
def write_rollout_hdf5(path: str, actor, episodes: int, steps: int, seed: int) -> int:
    """A D4RL-layout .hdf5 of `episodes` episodes of `steps` steps of the ensemble policy (sampled)."""
    import h5py

    # every episode ends at step `steps` (HalfCheetah never terminates); the vector env would reset it at
    # the next step() (autoreset NEXT_STEP), which never comes: every returned observation is a true s'
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(ft.ENVS["halfcheetah"], max_episode_steps=steps) for _ in range(episodes)]
    )
    obs, _ = envs.reset(seed=seed)
    cols = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    for _ in range(steps):
        a = ft.act(actor, obs, False)
        nxt, rew, term, trunc, _ = envs.step(a)
        for k, v in zip(cols, (obs, a, rew, nxt, term, trunc)):
            cols[k].append(np.asarray(v))
        obs = nxt
    envs.close()
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            f[k] = np.concatenate(v).astype(np.float32 if k not in ("terminals", "timeouts") else bool)
    return episodes * steps


def part_end_to_end(part: dict, device: torch.device, size: Size, check: Check, state: dict, seconds: float) -> None:
    r, lines = part["results"], part["lines"]
    tmp = state["e2e_tmp"] = tempfile.mkdtemp(prefix="gpu_check_e2e_")
    ensemble_path, dataset_path = os.path.join(tmp, "ensemble.pt"), os.path.join(tmp, "rollouts.hdf5")
    if check.official:
        cq.import_official(
            cq.Args(
                import_official=check.official,
                env="halfcheetah",
                dataset=dataset_path,
                export_path=ensemble_path,
                eval_episodes=0,
            )
        )
        r["start"] = f"the authors' released agents in {check.official}"
    else:
        agent = cql_agent(size, "cpu", check.seed)
        cq.save_checkpoint(cq.ensemble_dict(agent, "halfcheetah", dataset_path, 0), ensemble_path)
        r["start"] = f"a freshly initialized ensemble (N={size.members}, hidden {size.hidden})"
    ck = torch.load(ensemble_path, weights_only=True)
    actor = ft.EnsembleActor(ck["obs_dim"], ck["act_dim"], ck["members"], ck["hidden"]).to(device)
    actor.load_state_dict(ck["actor"])
    quick = size is not PAPER
    episodes, steps = (2, 50) if quick else (10, 1000)
    r["dataset_rows"] = write_rollout_hdf5(dataset_path, actor, episodes, steps, check.seed)
    use_compile = device.type == "cuda" and check.compile and state.get("fine-tune compile ok", False)
    rate_key = f"fine-tune: vectorized, {COMPILE_LABEL}" if use_compile else "fine-tune: vectorized, eager"
    rate = state.get(rate_key) or 50.0
    # an epoch (1,000 env steps + 1,000 updates) at the measured rate; enough of them to outlast `seconds`
    online = 200 if quick else int(min(250_000, max(20_000, 3 * rate * seconds)) // 1000 * 1000)
    command = [
        sys.executable,
        os.path.join(ROOT, "off2on_finetune.py"),
        "--env", "halfcheetah",
        "--dataset", dataset_path,
        "--checkpoint", ensemble_path,
        "--device", device.type,
        "--online-steps", str(online),
        "--run-dir", os.path.join(tmp, "run"),
    ]  # fmt: skip
    if quick:
        command += ["--epoch-steps", "100", "--first-epoch-multiplier", "1", "--eval-every", "200"]
        command += ["--eval-episodes", "1", "--batch-size", str(size.batch)]
    if use_compile:
        command.append("--compile")
    r["command"] = " ".join(command)
    lines += [f"Start: {r['start']}; offline data: {r['dataset_rows']} transitions rolled out by its policy.", ""]
    lines += [f"Command: `{r['command']}`", ""]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "PYTHONUNBUFFERED": "1"}
    log_path = os.path.join(tmp, "log.txt")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        try:
            proc.wait(timeout=seconds)
            r["stopped"] = f"finished (exit code {proc.returncode})"
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # the script's finally-block closes its logs
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            r["stopped"] = f"stopped after {seconds:.0f} s (SIGINT), as planned"
        finally:  # also when this part's own time runs out
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    r["wall_s"] = time.time() - t0
    log_tail = open(log_path, errors="replace").read()[-3000:]
    r["log_tail"] = log_tail
    run_dir = os.path.join(tmp, "run")
    evals = read_csv(os.path.join(run_dir, "evals.csv"))
    train = read_csv(os.path.join(run_dir, "train.csv"))
    r["evals"], r["train_rows"] = evals, len(train)
    last = train[-1] if train else {}
    r["env_steps"], r["updates"] = int(last.get("env_steps", 0)), int(last.get("updates", 0))
    lines += [
        f"{r['stopped']}; wall time {r['wall_s']:.0f} s (start-up, compile and evaluations included); "
        f"{r['env_steps']} env steps, {r['updates']} updates ({r['updates'] / max(r['wall_s'], 1e-9):.0f} updates "
        "per wall-clock second overall).",
        "",
    ]
    if evals:
        picks = evals if len(evals) <= 12 else [evals[int(i * (len(evals) - 1) / 11)] for i in range(12)]
        rows = [[int(e["env_steps"]), float(e["return_mean"]), float(e["normalized_score"])] for e in picks]
        lines += table(["env steps", "return (mean)", "D4RL normalized score"], rows)
    else:
        lines += ["No evaluation was written. Log tail:", "", "```", log_tail, "```"]
    if not evals or r["env_steps"] == 0:
        raise RuntimeError("the end-to-end run wrote no training epoch (see the log tail)")


def read_csv(path: str) -> list:
    if not os.path.exists(path):
        return []
    lines = open(path).read().splitlines()
    if not lines:
        return []
    keys = lines[0].split(",")
    return [dict(zip(keys, ln.split(","))) for ln in lines[1:] if ln]


# -------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------
def main(check: Check) -> int:
    start = time.time()
    budget = check.budget_s or (170.0 if check.quick else 460.0)
    e2e_s = check.e2e_s or (30.0 if check.quick else 150.0)
    report = Report(check.out, check)
    state = {"report": report}
    if check.device not in ("auto", "cpu", "cuda") or (check.device == "cuda" and not torch.cuda.is_available()):
        print(f"error: --device {check.device}: use auto, cpu, or cuda where a CUDA GPU is visible", file=sys.stderr)
        return 2
    device = cqs.pick_device(check.device)
    size = QUICK if check.quick else PAPER
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 unless a variant asks for TF32
    report.data["size"] = dataclasses.asdict(size)

    def left(reserve: float = 0.0) -> float:
        return budget - (time.time() - start) - reserve

    unknown = set(check.parts) - set(PARTS)
    if unknown:
        print(f"error: unknown --parts {sorted(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    reserve = e2e_s + 45 if "end_to_end" in check.parts else 0.0  # the end-to-end run, start-up, dataset
    if "system" in check.parts or "speed" in check.parts:  # the speed part needs the peaks
        report.run("system", "1. System and matmul peaks", min(60, left(reserve)), part_system, device, size)
        state["peaks"] = report.data["parts"]["system"]["results"].get("peak_tflops")
    if "equivalence" in check.parts:
        cap = left(reserve) if check.compile_on_cpu else min(240, left(reserve))  # CPU compiling takes minutes
        title = "2. Equivalence: CPU vs device, graph and compile vs eager"
        report.run("equivalence", title, cap, part_equivalence, device, size, check, state)
    if "speed" in check.parts:
        state["speed_start"] = time.time()
        report.run("speed", "3. Speed", left(reserve), part_speed, device, size, check, state)
    if "end_to_end" in check.parts:
        e2e = min(e2e_s, max(0.0, left(15)))
        title = "4. End to end: off2on_finetune.py"
        report.run("end_to_end", title, e2e + 60, part_end_to_end, device, size, check, state, e2e)
    if state.get("e2e_tmp"):
        shutil.rmtree(state["e2e_tmp"], ignore_errors=True)
    statuses = {name: p["status"] for name, p in report.data["parts"].items()}
    report.data["statuses"] = statuses
    report.write()
    print(
        f"wrote {os.path.join(check.out, 'gpu_check.md')} and gpu_check.json in {time.time() - start:.0f} s: {statuses}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(Check)))

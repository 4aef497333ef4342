"""Off2On online phase (Lee et al., "Offline-to-Online Reinforcement Learning via Balanced Replay and
Pessimistic Q-Ensemble", CoRL 2021): SAC fine-tuning of an offline CQL ensemble through its moment-matched
policy, on a buffer of offline + online transitions prioritized by a density-ratio net (balanced replay).

Run: python off2on_finetune.py --env hopper --dataset medium-replay   (resume: --run-dir D --resume;
ablations: --replay balanced|uniform|online-only, --members K)
Reads --checkpoint (default checkpoints/<env>__<dataset>__cql_ensemble__seed<seed>.pt), the export of
off2on_cql_ensemble.py (format "off2on-cql-ensemble/1", documented there): its actor and critic (row i =
Q1 of member i, row N+i its Q2). Writes <run dir>/checkpoint.pt ("off2on-finetune/1", atomic): nets,
optimizers, online rows [s, a, r, s', terminal], sum-tree leaves, counters, env and RNG states.
"""

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm


@dataclass
class Args:
    seed: int = 1
    """seed of python, numpy, torch and the environments (1, as off2on_cql_ensemble.py: same default file)"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    track: bool = False
    """log to Weights & Biases as well as tensorboard"""
    wandb_project: str = "off2on"
    """wandb project name (with --track)"""
    run_dir: str = ""
    """run directory; empty = runs/<env>__<dataset>__off2on_finetune__seed<seed>__<unix time>"""
    resume: bool = False
    """continue exactly from <run dir>/checkpoint.pt (needs --run-dir; --online-steps may be raised)"""
    env: str = "hopper"
    """hopper, halfcheetah or walker2d (Gymnasium MuJoCo v5)"""
    dataset: str = "medium-replay"
    """offline dataset: a kind (local off2on/<env>/<kind>-v0), a Minari id, or a D4RL .hdf5 path"""
    checkpoint: str = ""
    """offline ensemble file; empty = checkpoints/<env>__<dataset>__cql_ensemble__seed<seed>.pt"""
    members: int = 0
    """use the first K members of the checkpoint (0 = all)"""
    replay: Literal["balanced", "uniform", "online-only"] = "balanced"
    """balanced (prioritized by density ratio), uniform over offline+online, or online-only"""
    online_steps: int = 250_000
    """environment steps online (the paper: 250k)"""
    epoch_steps: int = 1_000
    """env steps per epoch; each epoch is followed by as many updates"""
    first_epoch_multiplier: int = 5
    """the first epoch is followed by this many times --epoch-steps updates (5: the command of the authors'
    README, `examples/ours.py --first_epoch_multiplier 5`; their argparse default is 10)"""
    eval_every: int = 1_000
    """evaluate the deterministic ensemble policy every this many env steps (rounded to epochs)"""
    eval_episodes: int = 5
    """episodes per evaluation"""
    batch_size: int = 256
    """RL minibatch; the density-ratio step uses as many online and as many offline rows"""
    lr: float = 3e-4
    """Adam learning rate of actors, critics, alpha and the density-ratio net"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """target critic Polyak rate"""
    priority_clip: tuple[float, float] = (1e-3, 1e3)
    """priorities are clipped to this range"""
    temperature: float = 5.0
    """T in the priority w^(1/T) / mean_offline(w^(1/T))"""
    init_online_fraction: float = 0.75
    """f: new online transitions enter at max priority, initially M*f/((1-f)*1000) for M offline ones
    (0.75: the command of the authors' README, `--init_online_fraction 0.75`; their argparse default is 0.5)"""


# =====================================================================================
# Data: env table, D4RL reference returns, dataset loading.
# This section is identical in every algorithm script (tests/test_common_sections.py checks it).
# =====================================================================================
ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
# D4RL reference returns (random, expert) used by the normalized score (Fu et al. 2020).
REF_RETURNS = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
}
KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert", "policy-rollouts")
# MuJoCo (from 3.16) warns at every compilation of a model that sets the deprecated compiler attribute
# settotalmass, and gymnasium's half_cheetah.xml sets it (still in gymnasium 1.4.0, the newest), so every
# HalfCheetah env printed the same warning to stderr (and appended it to ./MUJOCO_LOG.TXT), and every
# evaluation makes 5-11 envs. The attribute still scales the masses as before: only its message is dropped.
SETTOTALMASS_WARNING = "compiler attribute 'settotalmass' is deprecated"


def mujoco_warning(message: str) -> None:
    """MuJoCo's warning callback: every warning goes to stderr, except the settotalmass deprecation."""
    if not message.startswith(SETTOTALMASS_WARNING):
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


def install_mujoco_warning_filter() -> None:
    import mujoco

    mujoco.set_mju_user_warning(mujoco_warning)  # one global callback: replaces MuJoCo's default printing


install_mujoco_warning_filter()


class InputError(Exception):
    """Bad user input; `main` prints it as one `error: ...` line and exits with code 2."""


def check_env(env: str) -> str:
    if env not in ENVS:
        raise InputError(f"unknown env {env!r}; choose one of: {', '.join(ENVS)}")
    return ENVS[env]


def normalized_score(env: str, ret):
    """D4RL normalized score: 100 * (R - R_random) / (R_expert - R_random)."""
    lo, hi = REF_RETURNS[env]
    return 100.0 * (np.asarray(ret, dtype=np.float64) - lo) / (hi - lo)


def local_dataset_id(env: str, kind: str) -> str:
    return f"off2on/{env}/{kind}-v0"


def dataset_slug(dataset: str) -> str:
    """A file-name-safe name for a dataset argument (kind, Minari id or .hdf5 path)."""
    if dataset.endswith(".hdf5"):
        return os.path.splitext(os.path.basename(dataset))[0]
    return dataset.replace("/", "-")


def load_dataset(env: str, dataset: str) -> dict:
    """Offline transitions as float32 numpy arrays: observations, actions, rewards,
    next_observations, terminals (1.0 only for true terminations; time-limit ends bootstrap).

    `dataset` is a kind (local Minari dataset off2on/<env>/<kind>-v0 made by make_dataset.py),
    any Minari id (downloaded where a hub is reachable), or a D4RL-layout .hdf5 file."""
    check_env(env)
    if dataset.endswith(".hdf5"):
        return load_d4rl_hdf5(dataset)
    import minari

    if dataset in KINDS:
        ds_id = local_dataset_id(env, dataset)
        if ds_id not in minari.list_local_datasets():
            raise InputError(
                f"no local dataset {ds_id}; make it with: python make_dataset.py --env {env} --kinds {dataset}"
            )
    elif "/" in dataset:
        ds_id = dataset
    else:
        raise InputError(f"unknown dataset {dataset!r}; use one of {', '.join(KINDS)}, a Minari id, or a .hdf5 path")
    if ds_id not in minari.list_local_datasets():
        download_minari_dataset(ds_id)
    try:
        ds = minari.load_dataset(ds_id)
    except Exception as e:  # corrupt or incompatible files: one line, not a traceback
        raise InputError(f"could not load Minari dataset {ds_id}: {first_line(e)}") from e
    return minari_to_arrays(ds)


def download_minari_dataset(ds_id: str) -> None:
    """Download a Minari id from Minari's remote (Farama's datasets on the Hugging Face hub unless
    MINARI_REMOTE says otherwise) into the local Minari folder; any failure is one InputError line."""
    import minari

    try:  # huggingface_hub: minari's hf extra, which minari imports only to download
        from huggingface_hub.utils import logging as hub_logging
    except ImportError as e:
        raise InputError(
            f"could not download Minari dataset {ds_id}: huggingface_hub is not installed; "
            "install the pinned versions with: pip install -r requirements.txt"
        ) from e
    print(f"{ds_id} is not in the local Minari folder: downloading it", flush=True)
    # huggingface_hub logs each of its 5 retries to stderr (about 25 s in all when no hub answers); the one
    # error line below says what went wrong.
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        minari.download_dataset(ds_id)
    except Exception as e:
        # No answer: OfflineModeIsEnabled (a ConnectionError) under HF_HUB_OFFLINE=1, or a transport
        # error of huggingface_hub's HTTP client (httpx2: connection refused, unknown host, timeout).
        if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith("httpx"):
            raise InputError(
                f"could not download Minari dataset {ds_id}: no answer from the hub ({first_line(e)}); "
                "check the network (and HF_ENDPOINT, HF_HUB_OFFLINE), or use a dataset kind made by "
                "make_dataset.py or a D4RL .hdf5 file"
            ) from e
        reason = first_line(e).rstrip(".")
        raise InputError(
            f"could not download Minari dataset {ds_id}: {reason}; `minari list remote` lists the ids"
        ) from e
    finally:
        hub_logging.set_verbosity(verbosity)


def first_line(e: Exception) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def minari_to_arrays(ds) -> dict:
    """Flatten Minari episodes (T+1 observations, T actions) into transition arrays."""
    parts = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    for ep in ds.iterate_episodes():
        obs = np.asarray(ep.observations, dtype=np.float32)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, dtype=np.float32))
        parts["rewards"].append(np.asarray(ep.rewards, dtype=np.float32))
        parts["terminals"].append(np.asarray(ep.terminations, dtype=np.float32))
    if not parts["rewards"]:
        raise InputError("dataset has no episodes")
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_d4rl_hdf5(path: str) -> dict:
    """Original D4RL layout: observations, actions, rewards, terminals, timeouts, optional
    next_observations. Without next_observations, s' is the next row and rows that end an
    episode by timeout (whose next row is another episode's start) are dropped, as D4RL's
    qlearning_dataset does."""
    import h5py

    if not os.path.exists(path):
        raise InputError(f"no such file: {path}")
    try:
        with h5py.File(path, "r") as f:
            d = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals")}
            timeouts = f["timeouts"][()] if "timeouts" in f else np.zeros_like(d["terminals"])
            nxt = f["next_observations"][()] if "next_observations" in f else None
    except (OSError, KeyError) as e:
        raise InputError(f"{path} is not a D4RL-layout hdf5 file ({str(e).splitlines()[0]})") from e
    n = len(d["rewards"])
    if nxt is None:
        keep = np.flatnonzero(~timeouts[: n - 1].astype(bool))
        nxt = d["observations"][keep + 1]
    else:
        keep = np.arange(n)
    return {
        "observations": d["observations"][keep].astype(np.float32),
        "actions": d["actions"][keep].astype(np.float32),
        "rewards": d["rewards"][keep].astype(np.float32).reshape(-1),
        "next_observations": nxt.astype(np.float32),
        "terminals": d["terminals"][keep].astype(np.float32).reshape(-1),
    }


# =====================================================================================
# Replay: one prioritized buffer over offline + online transitions (the paper's balanced experience replay).
# =====================================================================================
class SumTree:
    """Binary sum-tree over `capacity` leaves in one float64 array (children of node i: 2i+1, 2i+2;
    leaves from `start`). Batched sampling and updates are numpy ops over the whole batch, one per
    tree level. Inner nodes are always recomputed as the exact sum of their children: no drift."""

    def __init__(self, capacity: int):
        self.depth = max(1, math.ceil(math.log2(capacity)))
        self.start = 2**self.depth - 1
        self.nodes = np.zeros(2 * self.start + 1)

    def update(self, idx: np.ndarray, priorities: np.ndarray) -> None:  # repeated index: its last value wins
        idx = np.asarray(idx, dtype=np.int64)
        keep = len(idx) - 1 - np.unique(idx[::-1], return_index=True)[1]
        node = idx[keep] + self.start
        self.nodes[node] = np.asarray(priorities, dtype=np.float64)[keep]
        for _ in range(self.depth):  # parents within one level are independent: repeats are harmless
            node = (node - 1) // 2
            self.nodes[node] = self.nodes[2 * node + 1] + self.nodes[2 * node + 2]

    def sample(self, batch: int) -> np.ndarray:
        """Stratified: one uniform draw in each of `batch` equal slices of the total, then descend,
        going right when the draw passes the left subtree's sum (never into an empty subtree)."""
        u, node = (np.arange(batch) + np.random.random(batch)) * (self.nodes[0] / batch), np.zeros(batch, np.int64)
        for _ in range(self.depth):
            left = 2 * node + 1
            right = (u >= self.nodes[left]) & (self.nodes[left + 1] > 0)
            u = np.where(right, u - self.nodes[left], u)
            node = left + right
        return node - self.start


class Replay:
    """All transitions as rows [s, a, r, s', terminal] of one device tensor: M offline rows, then up to
    `online_capacity` online rows. Balanced replay samples by sum-tree priority (offline rows start
    at 1, online rows at the running max); the ablations sample uniformly."""

    def __init__(self, data: dict, online_capacity: int, device: torch.device, init_online_fraction: float):
        d, self.M, self.n_online, self.device = data, len(data["rewards"]), 0, device
        self.obs_dim, self.act_dim = d["observations"].shape[1], d["actions"].shape[1]
        rows = torch.from_numpy(
            np.concatenate(
                [
                    d["observations"],
                    d["actions"],
                    d["rewards"][:, None],
                    d["next_observations"],
                    d["terminals"][:, None],
                ],
                1,
            )
        )
        rows = rows.to(device, torch.float32)
        self.rows = torch.cat([rows, rows.new_zeros(online_capacity, rows.shape[1])])
        self.tree = SumTree(self.M + online_capacity)
        self.tree.update(np.arange(self.M), np.ones(self.M))
        # initial max priority p: the first 1,000 online rows hold a share f of the mass,
        # 1000 p / (M + 1000 p) = f  =>  p = M f / ((1 - f) 1000)
        self.max_priority = self.M * init_online_fraction / ((1 - init_online_fraction) * 1000)

    def add_online(self, rows: np.ndarray) -> None:
        i = self.M + self.n_online
        self.rows[i : i + len(rows)] = torch.from_numpy(rows).to(self.device)
        self.tree.update(np.arange(i, i + len(rows)), np.full(len(rows), self.max_priority))
        self.n_online += len(rows)

    def split(self, rows: torch.Tensor):  # -> s, a, r, s', d (views; r and d are [B])
        o, a = self.obs_dim, self.act_dim
        return rows[:, :o], rows[:, o : o + a], rows[:, o + a], rows[:, o + a + 1 : -1], rows[:, -1]

    def uniform(self, lo: int, hi: int, n: int) -> torch.Tensor:
        return self.rows[torch.randint(lo, hi, (n,), device=self.device)]

    def sample_rl(self, n: int, mode: str):  # -> (row indices, rows) of the RL batch
        if mode == "balanced":  # sum-tree indices (numpy): the one host->device copy
            idx = self.tree.sample(n)
            return idx, self.rows[torch.from_numpy(idx).to(self.device)]
        idx = torch.randint(0 if mode == "uniform" else self.M, self.M + self.n_online, (n,), device=self.device)
        return idx, self.rows[idx]


# =====================================================================================
# Networks: an ensemble of E independent MLPs computed with one batched matmul per layer.
# Identical in off2on_cql_ensemble.py and off2on_finetune.py (the checkpoint hand-off).
# =====================================================================================
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class VectorizedLinear(nn.Module):
    """E independent linear layers: x [E, B, in] -> [E, B, out]; weight [E, in, out]."""

    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features))
        # each member gets nn.Linear's default init (uniform with bound 1/sqrt(in)), drawn independently
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleActor(nn.Module):
    """N tanh-Gaussian policies. obs [N, B, obs] -> pre-tanh mean, log_std [N, B, act]."""

    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            VectorizedLinear(obs_dim, hidden, n), nn.ReLU(), VectorizedLinear(hidden, hidden, n), nn.ReLU()
        )
        self.mu = VectorizedLinear(hidden, act_dim, n)
        self.log_std = VectorizedLinear(hidden, act_dim, n)

    def forward(self, obs: torch.Tensor):
        h = self.net(obs)
        return self.mu(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)


class EnsembleCritic(nn.Module):
    """2N Q-networks in one ensemble: row i is member i's Q1, row N+i its Q2.
    (obs, act) [2N, B, *] -> Q [2N, B]."""

    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            VectorizedLinear(obs_dim + act_dim, hidden, 2 * n),
            nn.ReLU(),
            VectorizedLinear(hidden, hidden, 2 * n),
            nn.ReLU(),
            VectorizedLinear(hidden, 1, 2 * n),
        )

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


# =====================================================================================
# Density-ratio net, ensemble policy, losses and the update (one gradient step).
# =====================================================================================
def density_ratio_net(in_dim: int, hidden: int = 256) -> nn.Sequential:
    """w(s, a) >= 0 [B, 1], trained so that w ~ d_online(s,a) / d_offline(s,a): 2x256 ReLU MLP with a ReLU
    output. Initialized as the authors' weight net (rlkit ConcatMlp, then last bias 1): hidden weights
    U(-1/sqrt(fan), 1/sqrt(fan)) with rlkit's fanin_init, which reads the fan from dim 0 of the [out, in]
    weight, i.e. out_features; hidden biases 0; last weights U(-3e-3, 3e-3); last bias 1. So w = 1.000 +- 0.003
    everywhere before training and the first priorities are all about 1."""
    net = nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.ReLU()
    )
    for layer in (net[0], net[2]):
        bound = 1.0 / math.sqrt(layer.weight.shape[0])
        nn.init.uniform_(layer.weight, -bound, bound)
        nn.init.zeros_(layer.bias)
    nn.init.uniform_(net[4].weight, -3e-3, 3e-3)
    nn.init.constant_(net[4].bias, 1.0)
    return net


def ratio_loss(w_off: torch.Tensor, w_on: torch.Tensor) -> torch.Tensor:
    """Density-ratio loss of balanced replay, Jensen-Shannon variational form (f(y) = y log y - (y+1) log((y+1)/2)):
    L(w) = E_off[f*(f'(w))] - E_on[f'(w)] = E_off[-log(2/(w+1))] - E_on[log(2w/(w+1))], minimized
    pointwise at w = d_on/d_off. (+1e-10 keeps log finite at w = 0, as the authors do.)"""
    return (-torch.log(2.0 / (w_off + 1.0) + 1e-10)).mean() - torch.log(2.0 * w_on / (w_on + 1.0) + 1e-10).mean()


def priorities(w_rl: torch.Tensor, w_off: torch.Tensor, temperature: float, lo: float, hi: float) -> torch.Tensor:
    """Balanced-replay priority: p = w^(1/T) / mean_offline-batch(w^(1/T)), clipped to [lo, hi]."""
    return (w_rl.pow(1.0 / temperature) / (w_off.pow(1.0 / temperature).mean() + 1e-10)).clamp(lo, hi)


def ensemble_moments(mu_i: torch.Tensor, log_std_i: torch.Tensor):
    """Pessimistic Q-ensemble's policy by moment matching, members' pre-tanh N(mu_i, sigma_i^2) [N, B, A]:
    mu = mean_i mu_i, sigma^2 = mean_i(sigma_i^2 + mu_i^2) - mu^2, computed as the equal
    mean_i(sigma_i^2) + mean_i((mu_i - mu)^2) (no cancellation); sigma clamped to [e^-20, e^2]."""
    mu = mu_i.mean(0)
    var = (2 * log_std_i).exp().mean(0) + (mu_i - mu).pow(2).mean(0)
    return mu, var.sqrt().clamp(math.exp(LOG_STD_MIN), math.exp(LOG_STD_MAX))


def ensemble_policy(actor: EnsembleActor, obs: torch.Tensor, n: int):
    """Reparameterized sample of the tanh-squashed ensemble policy at obs [B, obs] -> a [B, A], log pi [B]:
    u = mu + sigma eps, a = tanh(u), log pi(a|s) = log N(u; mu, sigma^2) - sum log(1 - tanh(u)^2)."""
    mu, std = ensemble_moments(*actor(obs.expand(n, *obs.shape)))
    eps = torch.randn_like(mu)
    u = mu + std * eps
    log_normal = (-0.5 * eps.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_det = (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # = log(1 - tanh(u)^2), stable form
    return torch.tanh(u), log_normal - log_det


def sac_losses(actor, critic, critic_target, log_alpha, batch, n: int, gamma: float, target_entropy: float):
    """SAC losses of the whole ensemble on one batch, no CQL term online. Critic rows [0:n] are the
    members' Q1, rows [n:2n] their Q2; (x).expand(2n, ...) feeds one batch to every row."""
    s, a, r, s2, d = batch
    alpha = log_alpha.exp().detach()
    with torch.no_grad():
        a2, logp2 = ensemble_policy(actor, s2, n)  # one shared next action a' ~ pi_ens(s')
        q_next = critic_target(s2.expand(2 * n, *s2.shape), a2.expand(2 * n, *a2.shape))  # [2N, B]
        # per-member target: y_i = r + (1-d) gamma [min(Q1'_i, Q2'_i)(s', a') - alpha log pi_ens(a'|s')]
        y = r + (1 - d) * gamma * (torch.min(q_next[:n], q_next[n:]) - alpha * logp2)  # [N, B]
    q = critic(s.expand(2 * n, *s.shape), a.expand(2 * n, *a.shape))
    # critic loss: sum over members (and over Q1, Q2) of the batch mean of (Q(s,a) - y_i)^2
    critic_loss = (q - y.repeat(2, 1)).pow(2).mean(1).sum()
    # actor loss: E[alpha log pi_ens(a|s) - (1/N) sum_i min(Q1_i, Q2_i)(s, a)], a ~ pi_ens(s) reparameterized;
    # critics frozen for this forward, so the actor loss gives them no gradient
    a_pi, logp_pi = ensemble_policy(actor, s, n)
    critic.requires_grad_(False)
    q_pi = critic(s.expand(2 * n, *s.shape), a_pi.expand(2 * n, *a_pi.shape))
    critic.requires_grad_(True)
    actor_loss = (alpha * logp_pi - torch.min(q_pi[:n], q_pi[n:]).mean(0)).mean()
    # temperature loss: -log alpha (log pi + target entropy), target entropy -|A|
    alpha_loss = -(log_alpha * (logp_pi.detach() + target_entropy)).mean()
    stats = {
        "critic_loss": critic_loss.detach(),
        "actor_loss": actor_loss.detach(),
        "alpha": alpha,
        "q_mean": q.detach().mean(),
        "entropy": -logp_pi.detach().mean(),
    }
    return critic_loss, actor_loss, alpha_loss, stats


Learner = namedtuple("Learner", "actor critic critic_target log_alpha ratio sac_opt ratio_opt")


def make_learner(actor: EnsembleActor, critic: EnsembleCritic, lr: float) -> Learner:
    """Target critics copied from the loaded critics, alpha re-initialized to 1, fresh Adam states. Adam
    is per-parameter, so one Adam over all actors, critics and alpha equals one per network."""
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    log_alpha = torch.zeros((), device=critic.net[0].weight.device, requires_grad=True)
    ratio = density_ratio_net(critic.net[0].weight.shape[1]).to(log_alpha.device)  # input (s, a) like the critics
    sac_params = [*actor.parameters(), *critic.parameters(), log_alpha]
    return Learner(
        actor,
        critic,
        critic_target,
        log_alpha,
        ratio,
        torch.optim.Adam(sac_params, lr=lr, fused=True),
        torch.optim.Adam(ratio.parameters(), lr=lr, fused=True),
    )


def train_step(lr: Learner, buf: Replay, args) -> dict:
    """One gradient step: density-ratio step, new priorities for the RL batch, SAC step of the ensemble.
    Host transfers: indices in, priorities out (waits only for the small ratio net; on a GPU the SAC step
    then runs while the host samples the next batch)."""
    idx, rows = buf.sample_rl(args.batch_size, args.replay)
    stats, na = {}, buf.obs_dim + buf.act_dim  # rows start with (s, a)
    if args.replay == "balanced":  # density-ratio step on uniform offline and online (s, a) batches
        x_off = buf.uniform(0, buf.M, args.batch_size)[:, :na]
        x_on = buf.uniform(buf.M, buf.M + buf.n_online, args.batch_size)[:, :na]
        w = lr.ratio(torch.cat([x_off, x_on])).squeeze(-1)
        loss = ratio_loss(w[: len(x_off)], w[len(x_off) :])
        lr.ratio_opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # priorities from the net before its step, as the authors do
            prio = priorities(
                lr.ratio(rows[:, :na]).squeeze(-1), w[: len(x_off)], args.temperature, *args.priority_clip
            )
        lr.ratio_opt.step()
        prio = prio.cpu().numpy()
        buf.tree.update(idx, prio)
        buf.max_priority = max(buf.max_priority, float(prio.max()))  # running max, for new online rows
        stats = {
            "ratio_loss": loss.detach(),
            "w_offline_mean": w[: len(x_off)].detach().mean(),
            "w_online_mean": w[len(x_off) :].detach().mean(),
        }
    stats["online_fraction"] = (idx >= buf.M).mean() if args.replay == "balanced" else (idx >= buf.M).float().mean()
    n, act_dim = lr.actor.mu.weight.shape[0], lr.actor.mu.weight.shape[2]
    critic_loss, actor_loss, alpha_loss, sac_stats = sac_losses(
        lr.actor, lr.critic, lr.critic_target, lr.log_alpha, buf.split(rows), n, args.gamma, -float(act_dim)
    )
    lr.sac_opt.zero_grad(set_to_none=True)
    (critic_loss + actor_loss + alpha_loss).backward()  # each loss reaches only its own parameters
    lr.sac_opt.step()
    with torch.no_grad():  # target critics: theta' <- (1 - tau) theta' + tau theta
        for p, tp in zip(lr.critic.parameters(), lr.critic_target.parameters()):
            tp.lerp_(p, args.tau)
    return {**stats, **sac_stats}


# =====================================================================================
# Run directory, logging, checkpoints, evaluation.
# This section is identical in every algorithm script (tests/test_common_sections.py checks it).
# =====================================================================================
EVAL_COLUMNS = (
    "phase",
    "updates",
    "env_steps",
    "policy",
    "return_mean",
    "return_std",
    "normalized_score",
    "wall_time_s",
)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA GPU is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    # numpy's key array goes in as a tensor: torch.load(weights_only=True) refuses numpy arrays
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    kind, key, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class Logger:
    """evals.csv + tensorboard always, wandb with --track. Scalars are buffered tensors until
    `flush` so the hot loop never syncs with the device."""

    def __init__(self, args, run_dir: str, script: str):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
        self.run_dir = run_dir
        self.csv_path = os.path.join(run_dir, "evals.csv")
        if not os.path.exists(self.csv_path):
            with open(self.csv_path, "w") as f:
                f.write(",".join(EVAL_COLUMNS) + "\n")
        self.writer = SummaryWriter(run_dir)
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(
                project=args.wandb_project,
                config=dataclasses.asdict(args),
                name=os.path.basename(run_dir),
                dir=run_dir,
                resume="allow",
                id=f"{script}-{os.path.basename(run_dir)}".replace("/", "_")[-128:],
            )
        self.start = time.time()

    def scalars(self, metrics: dict, step: int) -> None:
        """metrics: name -> float or 0-d tensor (converted here, once per log interval)."""
        vals = {k: float(v) for k, v in metrics.items()}
        for k, v in vals.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(vals, step=step)

    def eval_row(self, phase: str, updates: int, env_steps: int, policy: str, returns, env: str, step: int) -> float:
        r = np.asarray(returns, dtype=np.float64)
        score = float(normalized_score(env, r.mean()))
        row = (
            phase,
            updates,
            env_steps,
            policy,
            f"{r.mean():.3f}",
            f"{r.std():.3f}",
            f"{score:.3f}",
            f"{time.time() - self.start:.1f}",
        )
        with open(self.csv_path, "a") as f:
            f.write(",".join(str(x) for x in row) + "\n")
        self.scalars(
            {f"{phase}/eval_{policy}/return": r.mean(), f"{phase}/eval_{policy}/normalized_score": score}, step
        )
        return score

    def train_row(self, row: dict) -> None:
        """One row of train.csv (the header is written with the first row)."""
        path = os.path.join(self.run_dir, "train.csv")
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        with open(path, "a") as f:
            if new:
                f.write(",".join(row) + "\n")
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()) + "\n")

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def default_run_dir(args, script: str) -> str:
    return os.path.join(
        "runs", f"{args.env}__{dataset_slug(args.dataset)}__{script}__seed{args.seed}__{int(time.time())}"
    )


def save_checkpoint(obj: dict, path: str) -> None:
    """Atomic: write a temp file beside `path`, then rename over it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str, make_cmd: str) -> dict:
    """torch.load(weights_only=True) with one-line errors for missing or corrupt files."""
    if not os.path.exists(path):
        raise InputError(f"no checkpoint {path}; make it with: {make_cmd}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path} is not a readable checkpoint ({str(e).splitlines()[0][:200]})") from e


def evaluate(env_name: str, act_fn, episodes: int, seed: int) -> np.ndarray:
    """Returns of `episodes` deterministic episodes; act_fn maps an obs batch [n, obs] -> actions."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(ENVS[env_name]) for _ in range(episodes)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    obs, _ = envs.reset(seed=seed)
    returns, done = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    while not done.all():
        obs, r, term, trunc, _ = envs.step(act_fn(obs))
        returns += r * ~done
        done |= term | trunc
    envs.close()
    return returns


def eval_seed(seed: int, k: int) -> int:
    """Reset seed of the k-th evaluation of a run (k = 0, 1, ...): each evaluation starts from new states."""
    return seed + 10_000 + 1_000 * k


def trim_rows(csv_path: str, column: str, last: int) -> None:
    """On resume, drop the rows of a csv file written after the checkpoint (column > last): they are redone."""
    if os.path.exists(csv_path):
        lines = open(csv_path).read().splitlines()
        col = lines[0].split(",").index(column) if lines else 0
        with open(csv_path, "w") as f:
            f.write("\n".join(lines[:1] + [ln for ln in lines[1:] if int(ln.split(",")[col]) <= last]) + "\n")


def run_main(main_fn) -> None:
    """CLI entry: parse Args with tyro, turn InputError into one line on stderr and exit 2."""
    try:
        main_fn(tyro.cli(Args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# =====================================================================================
# Loading the offline ensemble, env state for exact resume, the loop.
# =====================================================================================
def load_offline_ensemble(path: str, args, obs_dim: int, act_dim: int, device):
    """The offline ensemble file -> (actor, critic) of its first K members, checked against the env."""
    make = f"python off2on_cql_ensemble.py --env {args.env} --dataset {args.dataset} --seed {args.seed}"
    ck = load_checkpoint(path, make)
    if not isinstance(ck, dict) or ck.get("format") != "off2on-cql-ensemble/1":
        raise InputError(f"{path} is not an off2on-cql-ensemble/1 file; make one with: {make}")
    if (ck.get("env"), ck.get("obs_dim"), ck.get("act_dim")) != (args.env, obs_dim, act_dim):
        raise InputError(
            f"{path} was made for env {ck.get('env')!r} (obs/action dims {ck.get('obs_dim')}/"
            f"{ck.get('act_dim')}), not {args.env} ({obs_dim}/{act_dim}); use one made for {args.env}"
        )
    n, k = ck["members"], args.members or ck["members"]
    if not 1 <= k <= n:
        raise InputError(f"--members {args.members}: the checkpoint has {n} members; use 1..{n} (0 = all)")
    actor = EnsembleActor(obs_dim, act_dim, k, ck["hidden"]).to(device)
    critic = EnsembleCritic(obs_dim, act_dim, k, ck["hidden"]).to(device)
    try:  # first K members: actor rows [0:K]; critic rows [0:K] (Q1) and [N:N+K] (Q2)
        actor.load_state_dict({key: v[:k] for key, v in ck["actor"].items()})
        critic.load_state_dict({key: torch.cat([v[:k], v[n : n + k]]) for key, v in ck["critic"].items()})
    except (RuntimeError, KeyError) as e:
        raise InputError(f"{path}: weights do not match its declared shapes ({str(e).splitlines()[0][:99]})") from e
    return actor, critic


def get_env_state(env: gym.Env) -> dict:
    """Full MuJoCo integration state (with solver warm start: a resumed run is bit-identical), steps
    into the episode (gym.make's outermost wrapper is the TimeLimit) and the env's RNG."""
    u, spec = env.unwrapped, mujoco.mjtState.mjSTATE_INTEGRATION
    mj = np.empty(mujoco.mj_stateSize(u.model, spec))
    mujoco.mj_getState(u.model, u.data, mj, spec)
    return {
        "mujoco": torch.from_numpy(mj),
        "elapsed_steps": env._elapsed_steps,
        "np_random": u.np_random.bit_generator.state,
    }


def set_env_state(env: gym.Env, s: dict) -> None:
    u = env.unwrapped
    mujoco.mj_setState(u.model, u.data, s["mujoco"].numpy(), mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(u.model, u.data)
    env._elapsed_steps, u.np_random.bit_generator.state = s["elapsed_steps"], s["np_random"]


@torch.no_grad()
def act(actor: EnsembleActor, obs: np.ndarray, deterministic: bool) -> np.ndarray:
    """obs [n, obs] -> actions [n, act]: tanh(mu) of the ensemble policy, or a sample of it."""
    o, n = torch.as_tensor(obs, dtype=torch.float32, device=actor.mu.weight.device), actor.mu.weight.shape[0]
    if deterministic:
        return torch.tanh(ensemble_moments(*actor(o.expand(n, *o.shape)))[0]).cpu().numpy()
    return ensemble_policy(actor, o, n)[0].cpu().numpy()


STATE = ("actor", "critic", "critic_target", "ratio", "sac_opt", "ratio_opt")
# train.csv: epoch means (ratio columns stay empty without balanced replay)
TRAIN_COLUMNS = ("q_mean", "alpha", "entropy", "online_fraction", "ratio_loss", "w_offline_mean", "w_online_mean")


def main(args: Args) -> None:
    if args.replay not in ("balanced", "uniform", "online-only"):
        raise InputError(f"unknown --replay {args.replay!r}; use balanced, uniform or online-only")
    for name in ("online_steps", "epoch_steps", "first_epoch_multiplier", "eval_every", "eval_episodes", "batch_size"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if not 0 < args.init_online_fraction < 1:
        raise InputError("--init-online-fraction must be in (0, 1)")
    if args.resume:  # continue with the run's own arguments; device, tracking and step budget may change
        if not args.run_dir or not os.path.exists(os.path.join(args.run_dir, "checkpoint.pt")):
            raise InputError(f"--resume needs --run-dir <a run dir holding checkpoint.pt> (got {args.run_dir!r})")
        run = load_checkpoint(os.path.join(args.run_dir, "checkpoint.pt"), "")
        if run.get("format") != "off2on-finetune/1" or args.online_steps < run["env_steps"]:
            raise InputError(f"{args.run_dir}/checkpoint.pt is not an off2on_finetune run, or is past --online-steps")
        keep = {k: getattr(args, k) for k in ("device", "track", "online_steps", "resume", "run_dir")}
        args = dataclasses.replace(Args(**run["args"]), **keep)
    env_id, device = check_env(args.env), pick_device(args.device)
    run_dir = args.run_dir or default_run_dir(args, "off2on_finetune")
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    seed_everything(args.seed)
    env = gym.make(env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    data = load_dataset(args.env, args.dataset)
    if (data["observations"].shape[1], data["actions"].shape[1]) != (obs_dim, act_dim):
        raise InputError(
            f"dataset {args.dataset!r} has obs/action dims {data['observations'].shape[1]}/"
            f"{data['actions'].shape[1]} but {env_id} has {obs_dim}/{act_dim}; use a dataset of {env_id}"
        )
    offline_path = args.checkpoint or os.path.join(
        "checkpoints", f"{args.env}__{dataset_slug(args.dataset)}__cql_ensemble__seed{args.seed}.pt"
    )
    lr = make_learner(*load_offline_ensemble(offline_path, args, obs_dim, act_dim, device), args.lr)
    buf = Replay(data, args.online_steps, device, args.init_online_fraction)
    del data
    obs, _ = env.reset(seed=args.seed)
    counters, ep_ret, ep_len = {"env_steps": 0, "updates": 0, "epoch": 0, "evals": 0}, 0.0, 0
    if args.resume:  # everything the run would hold had it not stopped
        for k in STATE:
            getattr(lr, k).load_state_dict(run[k])
        lr.log_alpha.data.copy_(run["log_alpha"])
        buf.n_online, buf.max_priority = len(run["online"]), run["max_priority"]
        buf.rows[buf.M : buf.M + buf.n_online] = run["online"].to(device)
        buf.tree.update(np.arange(len(run["priorities"])), run["priorities"].numpy())
        counters = {k: run[k] for k in counters}
        set_env_state(env, run["env_state"])
        st = run["env_state"]
        obs, ep_ret, ep_len = st["obs"].numpy(), st["ep_return"], st["ep_length"]
        set_rng_state(run["rng"])
        for name in ("evals.csv", "train.csv"):
            trim_rows(os.path.join(run_dir, name), "env_steps", counters["env_steps"])
        del run
    logger = Logger(args, run_dir, "off2on_finetune")
    print(
        f"run dir: {run_dir}\ncheckpoint: {ckpt_path}\noffline ensemble: {offline_path} "
        f"({lr.actor.mu.weight.shape[0]} members, {buf.M} offline transitions, replay {args.replay})"
        + (f"\nresumed at {counters['env_steps']} env steps" if args.resume else "")
    )

    def eval_row() -> float:  # deterministic ensemble policy tanh(mu), D4RL normalized score, new start states
        seed = eval_seed(args.seed, counters["evals"])
        returns = evaluate(args.env, lambda o: act(lr.actor, o, True), args.eval_episodes, seed)
        counters["evals"] += 1
        return logger.eval_row(
            "online", counters["updates"], counters["env_steps"], "ensemble", returns, args.env, counters["env_steps"]
        )

    def save():
        n_rows = buf.M + buf.n_online
        save_checkpoint(
            {
                "format": "off2on-finetune/1",
                "args": dataclasses.asdict(args),
                "members": lr.actor.mu.weight.shape[0],
                **{k: getattr(lr, k).state_dict() for k in STATE},
                "log_alpha": lr.log_alpha.detach().cpu(),
                "online": buf.rows[buf.M : n_rows].cpu(),
                "priorities": torch.from_numpy(buf.tree.nodes[buf.tree.start : buf.tree.start + n_rows].copy()),
                "max_priority": buf.max_priority,
                **counters,
                "rng": rng_state(),
                "env_state": {
                    **get_env_state(env),
                    "obs": torch.from_numpy(np.array(obs)),
                    "ep_return": ep_ret,
                    "ep_length": ep_len,
                },
            },
            ckpt_path,
        )

    if counters["env_steps"] == 0:  # the offline ensemble before any online step
        print(f"start: normalized score {eval_row():.1f}")
    pbar = tqdm(
        total=args.online_steps, initial=counters["env_steps"], desc="off2on env steps", mininterval=5, disable=None
    )
    try:
        while counters["env_steps"] < args.online_steps:
            start = counters["env_steps"]
            new_rows = np.empty((min(args.epoch_steps, args.online_steps - start), buf.rows.shape[1]), np.float32)
            for i in range(len(new_rows)):  # explore by sampling the ensemble policy
                a = act(lr.actor, obs[None], False)[0]
                next_obs, rew, term, trunc, _ = env.step(a)
                new_rows[i] = np.concatenate([obs, a, [rew], next_obs, [float(term)]])  # truncation: not terminal
                obs, ep_ret, ep_len = next_obs, ep_ret + float(rew), ep_len + 1
                if term or trunc:
                    logger.scalars({"online/episodic_return": ep_ret, "online/episodic_length": ep_len}, start + i + 1)
                    (obs, _), ep_ret, ep_len = env.reset(), 0.0, 0
            buf.add_online(new_rows)
            counters["env_steps"] += len(new_rows)
            pbar.update(len(new_rows))
            n_updates = len(new_rows) * (args.first_epoch_multiplier if counters["epoch"] == 0 else 1)
            sums = {}
            for _ in range(n_updates):
                for key, value in train_step(lr, buf, args).items():
                    sums[key] = sums.get(key, 0.0) + value
                counters["updates"] += 1
            means = {key: float(total) / n_updates for key, total in sums.items()}  # one host sync per epoch
            logger.scalars({f"online/{key}": value for key, value in means.items()}, counters["env_steps"])
            logger.train_row(
                {
                    "env_steps": counters["env_steps"],
                    "updates": counters["updates"],
                    **{key: means.get(key, "") for key in TRAIN_COLUMNS},
                }
            )
            counters["epoch"] += 1
            done = counters["env_steps"] >= args.online_steps
            if done or counters["env_steps"] // args.eval_every > start // args.eval_every:
                pbar.set_postfix(score=f"{eval_row():.1f}")
            save()  # every epoch: a killed run loses at most one epoch
    finally:
        pbar.close()
        logger.close()
        env.close()
    print(
        f"done: {counters['env_steps']} env steps, {counters['updates']} updates\n"
        f"run dir: {run_dir}\ncheckpoint: {ckpt_path}"
    )


if __name__ == "__main__":
    run_main(main)

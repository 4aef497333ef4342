"""Offline phase of off2on: N conservative Q-learning (CQL) agents trained as one vectorized ensemble.

Paper: Lee et al., "Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic Q-Ensemble",
CoRL 2021 (arXiv 2107.00591): fine-tuning starts from N=5 CQL agents trained offline. CQL(H): Kumar et al. 2020
(arXiv 2006.04779), importance-sampled logsumexp and D4RL gym settings of the authors' code. SAC: Haarnoja et
al. 2018 (arXiv 1812.05905). Each member has its own initialization and its own minibatch every step; the
members' layers are stacked ([N, in, out] weights) and run as one batched matmul per layer.

    python off2on_cql_ensemble.py --env hopper --dataset medium-replay        # train (1M updates)
    python off2on_cql_ensemble.py --resume --run-dir runs/<run>               # continue a killed run
    python off2on_cql_ensemble.py --import-official ../shared/official-cql-checkpoints/halfcheetah-medium-v0 \
        --env halfcheetah --dataset medium      # the authors' released agents -> the ensemble file

Ensemble file (the hand-off to off2on_finetune.py), written atomically at the end of training to
checkpoints/<env>__<dataset_slug>__cql_ensemble__seed<seed>.pt (or --export-path); the import writes
checkpoints/<env>__<dataset_slug>__cql_ensemble__official.pt. A dict for torch.load(weights_only=True):
    format         "off2on-cql-ensemble/1"
    env, dataset   str: the --env and --dataset it was trained on
    obs_dim, act_dim, members (N), hidden: int
    actor          EnsembleActor(obs_dim, act_dim, N, hidden).state_dict()
    critic         EnsembleCritic(obs_dim, act_dim, N, hidden).state_dict(): row i = Q1 of member i, N+i its Q2
    critic_target  the target critics, same layout
    log_alpha      tensor [N], log of each member's SAC temperature (zeros for imported agents)
    updates        int, gradient steps done
VectorizedLinear stores weight [E, in, out], bias [E, 1, out]. The run's checkpoint.pt (atomic, every
--checkpoint-every updates) is the same dict plus actor_opt, critic_opt, alpha_opt (Adam state dicts), rng
(python/numpy/torch/cuda RNG states) and args (dict): all an exact --resume needs.
"""

import copy
import ctypes
import dataclasses
import glob
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

SCRIPT = "cql_ensemble"
FORMAT = "off2on-cql-ensemble/1"


@dataclass
class Args:
    seed: int = 1
    """seed of the run (the members' initializations and minibatches are independent draws from it)"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    track: bool = False
    """log to Weights & Biases (works with WANDB_MODE=offline)"""
    wandb_project: str = "off2on"
    """wandb project"""
    run_dir: str = ""
    """run directory ("" = runs/<env>__<dataset>__cql_ensemble__seed<seed>__<unix time>)"""
    resume: bool = False
    """continue the run in --run-dir from its checkpoint.pt with its saved args (the command line's
    --device, --track, --compile and --offline-updates still apply)"""
    env: str = "hopper"
    """hopper, halfcheetah or walker2d (MuJoCo v5 env used for evaluation)"""
    dataset: str = "medium-replay"
    """dataset kind (local Minari dataset off2on/<env>/<kind>-v0), a Minari id, or a D4RL .hdf5 path"""
    members: int = 5
    """N, CQL agents in the ensemble"""
    hidden: int = 256
    """width of the 2 hidden layers of every actor and critic"""
    offline_updates: int = 1_000_000
    """gradient steps (each one updates every member)"""
    batch_size: int = 256
    """minibatch size per member"""
    gamma: float = 0.99
    """discount"""
    tau: float = 5e-3
    """Polyak rate of the target critics"""
    policy_lr: float = 1e-4
    """actor learning rate (Adam)"""
    q_lr: float = 3e-4
    """critic learning rate (Adam)"""
    alpha_lr: float = 1e-4
    """learning rate of log alpha (the authors' code uses the policy lr)"""
    target_entropy: float | None = None
    """entropy target of the automatic temperature tuning (None = -|A|)"""
    cql_alpha: float = 5.0
    """alpha': weight of the CQL regularizer, fixed (no Lagrange); 5.0 for the gym tasks"""
    cql_samples: int = 10
    """actions sampled per state from each of uniform, pi(.|s) and pi(.|s') for the logsumexp"""
    cql_temp: float = 1.0
    """temperature of the CQL logsumexp"""
    deterministic_backup: bool = True
    """TD target without the entropy bonus (the authors' gym setting)"""
    bc_steps: int = 40_000
    """behaviour-cloning warm-start: for this many steps the actor maximizes log pi(a_data|s)"""
    eval_every: int = 10_000
    """evaluate every member and the ensemble policy every this many updates"""
    eval_episodes: int = 10
    """episodes per policy and evaluation (0 = no evaluation)"""
    log_every: int = 1_000
    """write training scalars every this many updates (the only host syncs of the loop)"""
    checkpoint_every: int = 10_000
    """write run_dir/checkpoint.pt every this many updates"""
    export_path: str = ""
    """ensemble file ("" = checkpoints/<env>__<dataset_slug>__cql_ensemble__seed<seed>.pt)"""
    import_official: str = ""
    """folder of the authors' released agents (seed*/actor_*.pt, critic1_*.pt, critic2_*.pt): convert
    them to an ensemble file (checkpoints/<env>__<dataset_slug>__cql_ensemble__official.pt unless
    --export-path), evaluate them (unless --eval-episodes 0) and exit"""
    compile: bool = False
    """torch.compile the loss computation (fuses elementwise work: meant for CUDA; no gain measured on CPU)"""


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


def sample(data: dict, n: int, batch_size: int) -> dict:
    """An independent minibatch per member: indices [N, B] -> every field [N, B, ...]."""
    idx = torch.randint(len(data["rewards"]), (n, batch_size), device=data["rewards"].device)
    return {k: v[idx] for k, v in data.items()}


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


# -------------------------------------------------------------------------------------
# CQL(H) + SAC losses and the vectorized update
# -------------------------------------------------------------------------------------
def tanh_log_prob(u: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)|s) for pre-tanh u under N(mu, exp(log_std)^2): the Gaussian log-density minus
    sum log(1 - tanh(u)^2) (SAC Eq. 26), written stably as 2 (log 2 - u - softplus(-2u))."""
    gauss = -0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return (gauss - 2 * (math.log(2.0) - u - F.softplus(-2 * u))).sum(-1)


def cql_logsumexp(q_rand, q_pi, q_pi_next, logp_pi, logp_pi_next, act_dim: int, temp: float = 1.0):
    """Importance-sampled log sum_a exp Q(s, a) of CQL(H) (CQL paper Eq. 4 and its Appendix F; the
    authors' min_q_version 3): temp * logsumexp over the 3K samples of (Q(s, a_k) - log mu(a_k)) / temp,
    a_k drawn from mu = uniform on [-1, 1]^|A| (log density -|A| log 2), pi(.|s) or pi(.|s'), all
    evaluated at the state s. Inputs [..., K], output [...]. The constant -log 3K is left out, as
    in the authors' code (it changes no gradient)."""
    x = torch.cat([q_rand + act_dim * math.log(2.0), q_pi - logp_pi, q_pi_next - logp_pi_next], -1)
    return temp * torch.logsumexp(x / temp, -1)


def frozen_q(critic: nn.Module, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """critic(obs, act) through detached weights: the actor loss moves the actions, not the critic."""
    return torch.func.functional_call(critic, {k: v.detach() for k, v in critic.named_parameters()}, (obs, act))


class Agent:
    """N CQL agents: actors, critics (2 per member), target critics, log alphas and three Adams.
    Adam is elementwise, so one Adam over stacked weights equals N separate Adams."""

    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int, args: Args, device):
        self.obs_dim, self.act_dim, self.n, self.hidden = obs_dim, act_dim, n, hidden
        self.actor = EnsembleActor(obs_dim, act_dim, n, hidden).to(device)
        self.critic = EnsembleCritic(obs_dim, act_dim, n, hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros(n, device=device, requires_grad=True)  # alpha = 1 at the start
        self.target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, fused=True)  # one kernel per step
        self.actor_opt = adam(self.actor.parameters(), args.policy_lr)
        self.critic_opt = adam(self.critic.parameters(), args.q_lr)
        self.alpha_opt = adam([self.log_alpha], args.alpha_lr)
        self.opts = (self.actor_opt, self.critic_opt, self.alpha_opt)


def losses(agent: Agent, b: dict, bc: bool, args: Args):
    """The summed losses of one gradient step of all members and detached metrics. Each member's
    losses are means over its own batch, summed over members (and over its two critics), so every
    member gets exactly the gradient of its own CQL run."""
    n, batch, act_dim = b["actions"].shape
    k = args.cql_samples
    # one actor call for s and s' ([N, 2B]); 1 + K samples per state: sample 0 of s is the actor's
    # reparameterized action, sample 0 of s' the TD target's a', samples 1..K go to the CQL term
    mu, log_std = agent.actor(torch.cat([b["observations"], b["next_observations"]], 1))
    mu, log_std = mu.unsqueeze(2), log_std.unsqueeze(2)  # [N, 2B, 1, A]
    u = mu + log_std.exp() * torch.randn(n, 2 * batch, k + 1, act_dim, device=mu.device)
    act, logp = torch.tanh(u), tanh_log_prob(u, mu, log_std)  # [N, 2B, 1+K, A], [N, 2B, 1+K]
    a_pi, logp_pi = act[:, :batch, 0], logp[:, :batch, 0]
    a_next, logp_next = act[:, batch:, 0].detach(), logp[:, batch:, 0].detach()
    cql_act, cql_logp = act[:, :, 1:].detach(), logp[:, :, 1:].detach()
    alpha = agent.log_alpha.exp().detach()[:, None]  # [N, 1]
    obs2 = b["observations"].repeat(2, 1, 1)  # [2N, B, obs]: member i's Q1 (row i) and Q2 (row N+i)

    # TD target (SAC Eq. 5 with clipped double Q): y = r + gamma (1 - d) [min_j Q'_j(s', a') - alpha log pi(a'|s')]
    # (the entropy term is dropped with --deterministic-backup, the authors' gym setting)
    with torch.no_grad():
        q_next = agent.critic_target(b["next_observations"].repeat(2, 1, 1), a_next.repeat(2, 1, 1))
        v_next = torch.min(q_next[:n], q_next[n:])
        if not args.deterministic_backup:
            v_next = v_next - alpha * logp_next
        y = (b["rewards"] + args.gamma * (1.0 - b["terminals"]) * v_next).repeat(2, 1)  # [2N, B]

    # Q(s, .) of every critic at 1 + 3K actions per state in one batched call [2N, B * (1+3K), obs+act]:
    # the dataset action, K uniform actions, K from pi(.|s) and K from pi(.|s') (all at the state s)
    a_all = torch.cat(
        [
            b["actions"].unsqueeze(2),
            torch.rand_like(cql_act[:, :batch]) * 2 - 1,
            cql_act[:, :batch],
            cql_act[:, batch:],
        ],
        2,
    ).repeat(2, 1, 1, 1)
    s_all = obs2.unsqueeze(2).expand(-1, -1, 1 + 3 * k, -1)
    q = agent.critic(s_all.reshape(2 * n, -1, agent.obs_dim), a_all.reshape(2 * n, -1, act_dim)).view(
        2 * n, batch, 1 + 3 * k
    )
    q_data = q[..., 0]
    lse = cql_logsumexp(
        q[..., 1 : 1 + k],
        q[..., 1 + k : 1 + 2 * k],
        q[..., 1 + 2 * k :],
        cql_logp[:, :batch].repeat(2, 1, 1),
        cql_logp[:, batch:].repeat(2, 1, 1),
        act_dim,
        args.cql_temp,
    )  # [2N, B]
    # critic loss, CQL(H) (CQL paper Eq. 4): alpha' (E_s[log sum_a exp Q(s,a)] - E_(s,a)~D[Q(s,a)])
    # + E_D[(Q(s,a) - y)^2] (SAC Eq. 5; mean squared error without the 1/2, as rlkit)
    td = ((q_data - y) ** 2).mean(1)  # [2N]
    cql = args.cql_alpha * (lse.mean(1) - q_data.mean(1))  # [2N]
    critic_loss = (td + cql).sum()

    # actor loss (SAC Eq. 7, reparameterized): E_s[alpha log pi(a~|s) - min_j Q_j(s, a~)], a~ ~ pi(.|s);
    # during the BC warm-start: E_s[alpha log pi(a~|s) - log pi(a_data|s)]
    if bc:
        u_data = torch.atanh(b["actions"].clamp(-1 + 1e-6, 1 - 1e-6))
        gain = tanh_log_prob(u_data, mu[:, :batch, 0], log_std[:, :batch, 0])
    else:
        q_pi = frozen_q(agent.critic, obs2, a_pi.repeat(2, 1, 1))
        gain = torch.min(q_pi[:n], q_pi[n:])
    actor_loss = (alpha * logp_pi - gain).mean(1).sum()
    # temperature loss (SAC Eq. 18): E_s[-log alpha (log pi(a~|s) + target entropy)]
    alpha_loss = -(agent.log_alpha[:, None] * (logp_pi.detach() + agent.target_entropy)).mean(1).sum()

    metrics = {
        "losses/critic_td": td.mean(),
        "losses/cql": cql.mean(),
        "losses/actor": actor_loss / n,
        "losses/alpha": alpha_loss / n,
        "charts/alpha": alpha.mean(),
        "charts/q_data": q_data.mean(),
        "charts/cql_logsumexp": lse.mean(),
        "charts/entropy": -logp_pi.mean(),
    }
    return critic_loss + actor_loss + alpha_loss, {k: v.detach() for k, v in metrics.items()}


def keep_freed_memory() -> None:
    """CPU speed: glibc returns each freed block over 32 MB to the OS and page-faults the next one in again,
    which costs more than a pass over it; the critic pass makes many 80 MB activations per update (paper
    size). Keeping freed memory in the heap makes updates ~1.4x faster on CPU. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0), libc.mallopt(-1, 2**31 - 1)  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max
    except (OSError, AttributeError):
        pass


def update(agent: Agent, b: dict, bc: bool, args: Args, loss_fn=losses) -> dict:
    """One gradient step of every member: one backward (the three losses touch disjoint parameters),
    three Adam steps, Polyak averaging of the target critics."""
    loss, metrics = loss_fn(agent, b, bc, args)
    for opt in agent.opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in agent.opts:
        opt.step()
    with torch.no_grad():
        for t, p in zip(agent.critic_target.parameters(), agent.critic.parameters()):
            t.lerp_(p, args.tau)  # theta' <- (1 - tau) theta' + tau theta
    return metrics


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


# -------------------------------------------------------------------------------------
# Evaluation, the ensemble file, checkpoints, import of the authors' agents
# -------------------------------------------------------------------------------------
def eval_policies(actor: EnsembleActor, env: str, episodes: int, seed: int) -> dict:
    """Returns per policy: member<i> acts with tanh(mu_i), the moment-matched ensemble policy with
    tanh(mean_i mu_i). All N+1 policies run in one vector env: episode chunk j belongs to policy j."""
    n, device = actor.mu.weight.shape[0], actor.mu.weight.device

    def act_fn(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            o = torch.as_tensor(obs, dtype=torch.float32, device=device)
            mu = actor(o.expand(n, -1, -1))[0].view(n, n + 1, episodes, -1)  # every member on every chunk
            own = mu[torch.arange(n), torch.arange(n)]  # [N, E, A]: member i on chunk i
            return torch.tanh(torch.cat([own, mu[:, n].mean(0, keepdim=True)])).flatten(0, 1).cpu().numpy()

    returns = evaluate(env, act_fn, (n + 1) * episodes, seed).reshape(n + 1, episodes)
    return {**{f"member{i}": returns[i] for i in range(n)}, "ensemble": returns[n]}


def ensemble_dict(agent: Agent, env: str, dataset: str, updates: int) -> dict:
    """The ensemble file of the module docstring."""
    return {
        "format": FORMAT,
        "env": env,
        "dataset": dataset,
        "obs_dim": agent.obs_dim,
        "act_dim": agent.act_dim,
        "members": agent.n,
        "hidden": agent.hidden,
        "actor": agent.actor.state_dict(),
        "critic": agent.critic.state_dict(),
        "critic_target": agent.critic_target.state_dict(),
        "log_alpha": agent.log_alpha.detach().clone(),
        "updates": int(updates),
    }


def checkpoint_dict(agent: Agent, args: Args, updates: int) -> dict:
    return {
        **ensemble_dict(agent, args.env, args.dataset, updates),
        "actor_opt": agent.actor_opt.state_dict(),
        "critic_opt": agent.critic_opt.state_dict(),
        "alpha_opt": agent.alpha_opt.state_dict(),
        "rng": rng_state(),
        "args": dataclasses.asdict(args),
    }


def check_ensemble(ckpt, path: str, need: dict) -> None:
    """One-line InputError unless `ckpt` is an ensemble file whose dims equal `need`."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(f"{path} is not an off2on CQL-ensemble checkpoint (format {got!r}, not {FORMAT!r})")
    for key, want in need.items():
        if ckpt.get(key) != want:
            raise InputError(
                f"{path} has {key}={ckpt.get(key)} (made for {ckpt.get('env')}/"
                f"{ckpt.get('dataset')}) but this run needs {key}={want}; use one made for this env"
            )


def load_agent(agent: Agent, ckpt: dict, path: str, optimizers: bool) -> None:
    try:
        agent.actor.load_state_dict(ckpt["actor"])
        agent.critic.load_state_dict(ckpt["critic"])
        agent.critic_target.load_state_dict(ckpt["critic_target"])
        with torch.no_grad():
            agent.log_alpha.copy_(ckpt["log_alpha"])
        if optimizers:
            for name, opt in zip(("actor_opt", "critic_opt", "alpha_opt"), agent.opts):
                opt.load_state_dict(ckpt[name])
    except (KeyError, RuntimeError, ValueError) as e:
        raise InputError(f"{path} does not fit this ensemble ({str(e).strip().splitlines()[0][:200]})") from e


def env_dims(env: str) -> tuple:
    with gym.make(ENVS[env]) as e:
        return e.observation_space.shape[0], e.action_space.shape[0]


def import_official(args: Args) -> str:
    """The authors' rlkit agents (seed*/actor_<step>.pt, critic1_<step>.pt, critic2_<step>.pt; Linear
    weights [out, in]) -> the ensemble file: fc0/fc1/last_fc -> net.0/net.2/mu (critics: net.4),
    last_fc_log_std -> log_std; member i = i-th seed folder in numeric order; critic1 -> critic rows
    0..N-1, critic2 -> rows N..2N-1; critic_target = critic; log_alpha = 0 (alpha was not released)."""
    check_env(args.env)
    step_of = lambda p: int(re.findall(r"\d+", os.path.basename(p))[-1])
    seeds = sorted(glob.glob(os.path.join(args.import_official, "seed*")), key=step_of)
    if not seeds:
        raise InputError(
            f"no seed*/ folders in {args.import_official}; expected the layout of "
            "../shared/official-cql-checkpoints/README.md"
        )
    parts, updates = {"actor": [], "critic1": [], "critic2": []}, 0
    for folder in seeds:
        for part, sds in parts.items():
            files = sorted(glob.glob(os.path.join(folder, f"{part}_*.pt")), key=step_of)
            if not files:
                raise InputError(f"{folder} has no {part}_<step>.pt")
            sds.append(load_checkpoint(files[-1], "see ../shared/official-cql-checkpoints/README.md"))
            updates = step_of(files[-1])  # the file names carry the gradient step

    def stack(sds: list, name: str) -> dict:  # N rlkit Linear layers -> one VectorizedLinear
        try:
            return {
                "weight": torch.stack([sd[f"{name}.weight"].t() for sd in sds]),
                "bias": torch.stack([sd[f"{name}.bias"] for sd in sds]).unsqueeze(1),
            }
        except (KeyError, RuntimeError, TypeError) as e:
            raise InputError(f"{args.import_official}: not rlkit state dicts with layer {name} ({e})") from e

    layers = lambda sds, names: {f"{new}.{k}": v for new, old in names for k, v in stack(sds, old).items()}
    actor = layers(
        parts["actor"], [("net.0", "fc0"), ("net.2", "fc1"), ("mu", "last_fc"), ("log_std", "last_fc_log_std")]
    )
    critic = layers(parts["critic1"] + parts["critic2"], [("net.0", "fc0"), ("net.2", "fc1"), ("net.4", "last_fc")])
    n, hidden = len(seeds), actor["net.0.weight"].shape[2]
    obs_dim, act_dim = actor["net.0.weight"].shape[1], actor["mu.weight"].shape[2]
    if (obs_dim, act_dim) != env_dims(args.env):
        raise InputError(
            f"the agents in {args.import_official} have obs/action dims {obs_dim}/{act_dim} but "
            f"{ENVS[args.env]} has {'/'.join(map(str, env_dims(args.env)))}; pass their --env"
        )
    agent = Agent(obs_dim, act_dim, n, hidden, args, "cpu")
    load_agent(
        agent,
        {"actor": actor, "critic": critic, "critic_target": critic, "log_alpha": torch.zeros(n)},
        args.import_official,
        optimizers=False,
    )
    path = args.export_path or os.path.join(
        "checkpoints", f"{args.env}__{dataset_slug(args.dataset)}__{SCRIPT}__official.pt"
    )
    save_checkpoint(ensemble_dict(agent, args.env, args.dataset, updates), path)
    print(f"imported {n} agents ({', '.join(map(os.path.basename, seeds))}) -> {path}")
    if args.eval_episodes > 0:
        for name, r in eval_policies(agent.actor, args.env, args.eval_episodes, eval_seed(args.seed, 0)).items():
            print(
                f"{name}: return {r.mean():.1f} +- {r.std():.1f}, normalized {normalized_score(args.env, r.mean()):.1f}"
            )
    return path


# -------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------
def main(args: Args) -> str:
    """Train (or resume) the ensemble; returns the path of the ensemble file."""
    if args.import_official:
        return import_official(args)
    ckpt = None
    if args.resume:  # the saved args rule, except for what may change between sessions
        if not args.run_dir:
            raise InputError("--resume needs --run-dir <the run directory holding checkpoint.pt>")
        path = os.path.join(args.run_dir, "checkpoint.pt")
        ckpt = load_checkpoint(path, f"python off2on_cql_ensemble.py --run-dir {args.run_dir} (then --resume)")
        check_ensemble(ckpt, path, {})
        if not isinstance(ckpt.get("args"), dict) or "rng" not in ckpt:
            raise InputError(f"{path} is an ensemble file without training state; it cannot be resumed")
        fields = {f.name for f in dataclasses.fields(Args)}
        keep = {k: getattr(args, k) for k in ("device", "track", "compile", "offline_updates", "run_dir", "resume")}
        args = dataclasses.replace(Args(**{k: v for k, v in ckpt["args"].items() if k in fields}), **keep)
    if min(args.members, args.batch_size, args.eval_every, args.log_every, args.checkpoint_every) < 1:
        raise InputError("--members, --batch-size, --eval-every, --log-every and --checkpoint-every must be >= 1")
    device = pick_device(args.device)
    check_env(args.env)
    obs_dim, act_dim = env_dims(args.env)
    data = load_dataset(args.env, args.dataset)
    if data["observations"].shape[1] != obs_dim or data["actions"].shape[1] != act_dim:
        raise InputError(
            f"dataset {args.dataset} has obs/action dims {data['observations'].shape[1]}/"
            f"{data['actions'].shape[1]} but {ENVS[args.env]} has {obs_dim}/{act_dim}"
        )
    seed_everything(args.seed)
    agent = Agent(obs_dim, act_dim, args.members, args.hidden, args, device)
    data = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
    if device.type == "cpu":
        keep_freed_memory()
    start = 0
    if ckpt is not None:
        need = {"obs_dim": obs_dim, "act_dim": act_dim, "members": args.members, "hidden": args.hidden}
        check_ensemble(ckpt, path, need)
        load_agent(agent, ckpt, path, optimizers=True)
        start = ckpt["updates"]
        set_rng_state(ckpt["rng"])
    run_dir = args.run_dir or default_run_dir(args, SCRIPT)
    args = dataclasses.replace(args, run_dir=run_dir)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    export_path = args.export_path or os.path.join(
        "checkpoints", f"{args.env}__{dataset_slug(args.dataset)}__{SCRIPT}__seed{args.seed}.pt"
    )
    logger = Logger(args, run_dir, SCRIPT)
    print(f"run dir: {run_dir}\ncheckpoint: {ckpt_path}\nensemble file (at the end): {export_path}")
    loss_fn = torch.compile(losses) if args.compile else losses
    t0, since = time.time(), start
    bar = tqdm(
        range(start, args.offline_updates),
        initial=start,
        total=args.offline_updates,
        desc=f"cql_ensemble N={args.members}",
        mininterval=2.0,
    )
    for step in bar:
        metrics = update(agent, sample(data, args.members, args.batch_size), step < args.bc_steps, args, loss_fn)
        updates = step + 1
        if updates % args.log_every == 0:
            metrics["charts/updates_per_s"] = (updates - since) / (time.time() - t0)
            logger.scalars(metrics, updates)
            bar.set_postfix(q=f"{float(metrics['charts/q_data']):.1f}", cql=f"{float(metrics['losses/cql']):.2f}")
            t0, since = time.time(), updates
        if args.eval_episodes > 0 and (updates % args.eval_every == 0 or updates == args.offline_updates):
            k = (updates - 1) // args.eval_every  # index of this evaluation: new start states each time
            for name, r in eval_policies(agent.actor, args.env, args.eval_episodes, eval_seed(args.seed, k)).items():
                score = logger.eval_row("offline", updates, 0, name, r, args.env, updates)
            bar.write(f"update {updates}: ensemble normalized score {score:.1f}")
        if updates % args.checkpoint_every == 0 or updates == args.offline_updates:
            save_checkpoint(checkpoint_dict(agent, args, updates), ckpt_path)
    bar.close()
    save_checkpoint(ensemble_dict(agent, args.env, args.dataset, max(start, args.offline_updates)), export_path)
    logger.close()
    print(f"run dir: {run_dir}\ncheckpoint: {ckpt_path}\nensemble file: {export_path}")
    return export_path


if __name__ == "__main__":
    run_main(main)

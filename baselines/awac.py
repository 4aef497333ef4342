"""AWAC: advantage-weighted actor-critic (Nair, Dalal, Gupta, Levine, "AWAC: Accelerating Online
Reinforcement Learning with Offline Datasets", arXiv 2006.09359), trained offline on a dataset and then
fine-tuned online with the same update rule: a baseline of Lee et al., "Offline-to-Online Reinforcement
Learning via Balanced Replay and Pessimistic Q-Ensemble" (CoRL 2021).

Settings: the authors' MuJoCo launcher, rlkit examples/awac/mujoco/awac1.py ("awac1.py" below: its
`variant` and `search_space`), run by rlkit/torch/sac/awac_trainer.py ("the trainer": AWACTrainer's
defaults where awac1.py sets nothing). Each Args field names the setting it copies.

Critic: twin Q by TD with the target from the current policy, y = r + gamma (1-d) min_j Q'_j(s', a'),
a' ~ pi(.|s') (no entropy term: awac1.py alpha=0, use_automatic_entropy_tuning=False; reward_scale=1).
Actor: advantage-weighted regression onto the buffer's actions (awr_weight=1, awr_sample_actions=False):
max E_D[log pi(a|s) w(s,a)] with A(s,a) = min_j Q_j(s,a) - V(s) (awr_min_q=True) and V(s) = min_j Q_j(s, a~)
for ONE action a~ ~ pi(.|s) sampled from the policy (awr_use_mle_for_vf=False, the trainer's vf_K=1),
not the policy's mean action.

Weights: w = B softmax_batch(A/beta) (the trainer's normalize_over_batch=True; clip_score=None: no clip),
beta = 2 (awac1.py search_space 'trainer_kwargs.beta': [2], over the variant's beta=1). That is
exp(A/beta) divided by its mean over the batch: one normalizer shared by every row of the batch, a
Monte-Carlo estimate of E_D[exp(A/beta)]. It is not the paper's per-state partition function
Z(s) = E_{a ~ pi_beta(.|s)}[exp(A(s,a)/beta)] (which AWAC drops); it rescales the batch's actor gradient,
is invariant to a shift of A and, as softmax subtracts the max, cannot overflow at any Q scale (raw
exp(A/beta) overflows float32 past A/beta ~ 88). Within a batch a few high-advantage rows can take
most of the weight (train.csv's weight_max and weight_std show how much).

Networks (awac1.py policy_class=GaussianPolicy, policy_kwargs, qf_kwargs; rlkit's Mlp initialization):
policy 4 hidden layers x 256, mean tanh(.), log sigma a state-independent parameter squashed into [-6, 0]
by a sigmoid (std_architecture="values", min_log_std=-6, max_log_std=0); Q-nets 2 x 256. Optimizers
(one Adam with param groups equals the trainer's three per-network Adams): lr 3e-4 for both, weight decay
1e-4 on the policy only (policy_weight_decay=1e-4; q_weight_decay: the trainer's 0). Targets: Polyak
tau 5e-3 every update (soft_target_tau=5e-3, target_update_period=1), gamma 0.99.

Not copied from rlkit: its Gaussian samples go unclipped to the critics and the buffer (the env wrapper
clips them); here a sampled action is clipped to [-1, 1] once, so the critics, the buffer and the env see
the same action. rlkit's SplitReplayBuffer keeps ~10% of the paths out of training (a validation set
nothing reads); here every transition is trained on.

Offline phase (the trainer's pretrain_q_with_bc_data): --offline-updates AWAC steps on the dataset with
--offline-batch-size rows (evaluation every --eval-every updates). Online phase, the schedule of
off2on_finetune.py: epochs of --epoch-steps env steps with the stochastic policy, then as many updates
of --batch-size rows (the first epoch x --first-epoch-multiplier), an evaluation after every epoch and
one before the first (env_steps 0); one buffer of offline + online transitions sampled uniformly (AWAC
keeps the offline data in its replay buffer). Every evaluation runs --eval-episodes deterministic
episodes (the mean action) from new start states: the k-th evaluation of a run resets with
eval_seed(seed, k).

Run: python baselines/awac.py --env hopper --dataset medium-replay   (resume: --run-dir D --resume)
Writes to the run directory: evals.csv; train.csv, one row per online epoch: env_steps, updates and the
epoch's means of critic_loss, actor_loss, q_mean, advantage_mean, advantage_std, weight_max, weight_std
(the offline phase writes no rows); tensorboard scalars offline/<stat> (means over --log-every updates,
x axis: updates) and online/<stat> (epoch means, x axis: env steps); checkpoint.pt ("off2on-awac/2",
atomic, after every evaluation; torch.load with weights_only=True): {"format", "args", "actor", "critic",
"critic_target", "opt" (Adam), "online" (online rows [s, a, r, s', terminal]), "updates", "env_steps",
"epoch", "started", "evals" (evaluations so far), "env_state" (MuJoCo state, time-limit counter, env RNG,
current obs, episode stats), "rng"}.
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

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

SCRIPT = "awac"
CKPT_FORMAT = f"off2on-{SCRIPT}/2"


@dataclass
class Args:
    seed: int = 0
    """seed of python, numpy, torch and the environments"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    track: bool = False
    """log to Weights & Biases as well as tensorboard"""
    wandb_project: str = "off2on"
    """wandb project name (with --track)"""
    run_dir: str = ""
    """run directory; empty = runs/<env>__<dataset>__awac__seed<seed>__<unix time>"""
    resume: bool = False
    """continue exactly from <run dir>/checkpoint.pt (needs --run-dir; --online-steps may be raised)"""
    env: str = "hopper"
    """hopper, halfcheetah or walker2d (Gymnasium MuJoCo v5)"""
    dataset: str = "medium-replay"
    """offline dataset: a kind (local off2on/<env>/<kind>-v0), a Minari id, or a D4RL .hdf5 path"""
    offline_updates: int = 50_000
    """gradient steps on the dataset before going online (awac1.py q_num_pretrain2_steps=50000: policy and
    Q together; q_num_pretrain1_steps=0)"""
    online_steps: int = 250_000
    """environment steps online (the paper of Lee et al.: 250k)"""
    epoch_steps: int = 1_000
    """env steps per online epoch; each epoch is followed by as many updates (awac1.py
    num_expl_steps_per_train_loop=1000, num_trains_per_train_loop=1000)"""
    first_epoch_multiplier: int = 5
    """the first online epoch is followed by this many times --epoch-steps updates (5: off2on_finetune.py's
    schedule, shared by the fine-tuning baselines; awac1.py has none, i.e. 1)"""
    eval_every: int = 5_000
    """offline: evaluate (and checkpoint) every this many updates; online: after every epoch"""
    eval_episodes: int = 5
    """episodes per evaluation (deterministic policy: the mean action; new start states each time)"""
    log_every: int = 1_000
    """offline: write training scalars (means over this many updates) every this many updates (online:
    once per epoch)"""
    batch_size: int = 1024
    """online minibatch (awac1.py batch_size=1024)"""
    offline_batch_size: int = 128
    """offline minibatch (the trainer's pretraining draws bc_batch_size rows: its default 128, which awac1.py
    keeps)"""
    hidden: int = 256
    """width of the hidden layers of actor and critics (awac1.py policy_kwargs hidden_sizes=[256] * 4,
    qf_kwargs hidden_sizes=[256, 256])"""
    actor_layers: int = 4
    """hidden layers of the policy (awac1.py: 4; the critics have 2)"""
    lr: float = 3e-4
    """Adam learning rate of actor and critics (awac1.py policy_lr=3E-4, qf_lr=3E-4)"""
    actor_weight_decay: float = 1e-4
    """Adam weight decay of the policy (awac1.py policy_weight_decay=1e-4; the critics: the trainer's 0)"""
    beta: float = 2.0
    """beta (the paper's lambda): temperature of the advantage weights exp(A/beta) (awac1.py search_space
    'trainer_kwargs.beta': [2])"""
    gamma: float = 0.99
    """discount (awac1.py discount=0.99)"""
    tau: float = 5e-3
    """target critic Polyak rate, every update (awac1.py soft_target_tau=5e-3, target_update_period=1)"""


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


# =====================================================================================
# Replay: offline + online transitions in one buffer, sampled uniformly.
# =====================================================================================
class Replay:
    """All transitions as rows [s, a, r, s', terminal] of one preallocated numpy array: M offline rows,
    then up to `online_capacity` online rows. A batch is one vectorized index draw, uniform over every
    row filled so far, so each source is sampled in proportion to its size."""

    def __init__(self, data: dict, online_capacity: int):
        self.obs_dim, self.act_dim = data["observations"].shape[1], data["actions"].shape[1]
        self.M, self.n_online = len(data["rewards"]), 0
        width = 2 * self.obs_dim + self.act_dim + 2
        self.rows = np.zeros((self.M + online_capacity, width), np.float32)
        self.rows[: self.M] = np.concatenate(
            [
                data["observations"],
                data["actions"],
                data["rewards"][:, None],
                data["next_observations"],
                data["terminals"][:, None],
            ],
            1,
        )

    def add_online(self, rows: np.ndarray) -> None:
        self.rows[self.M + self.n_online : self.M + self.n_online + len(rows)] = rows
        self.n_online += len(rows)

    def split(self, rows: torch.Tensor):  # -> s, a, r, s', d (views; r and d are [B])
        o, a = self.obs_dim, self.act_dim
        return rows[:, :o], rows[:, o : o + a], rows[:, o + a], rows[:, o + a + 1 : -1], rows[:, -1]

    def sample(self, n: int, device: torch.device):
        idx = np.random.randint(0, self.M + self.n_online, n)
        return self.split(torch.from_numpy(self.rows[idx]).to(device))


# =====================================================================================
# Networks (rlkit's Mlp initialization)
# =====================================================================================
LOG_STD_MIN, LOG_STD_MAX = -6.0, 0.0


def rlkit_init_(weight: torch.Tensor, bias: torch.Tensor, bound: float) -> None:
    """In place: weight ~ U(-bound, bound), bias 0. rlkit's Mlp initialization uses it with bound 1/sqrt(n) for
    hidden layers, n read by rlkit's fanin_init from dim 0 of the [out, in] weight, i.e. the layer's output
    width, and with bound init_w for the last layer."""
    with torch.no_grad():
        weight.uniform_(-bound, bound)
        bias.zero_()


def sample_action(mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """One action of N(mean, sigma^2) per row, clipped to the action box [-1, 1]."""
    return (mean + log_std.exp() * torch.randn_like(mean)).clamp(-1.0, 1.0)


class Actor(nn.Module):
    """AWAC's Gaussian policy N(mean(s), sigma^2) (rlkit's GaussianPolicy, std_architecture="values"):
    mean = tanh(MLP(s)) with `layers` hidden layers, log sigma a state-independent parameter squashed into
    [-6, 0] by a sigmoid (-3 at the start)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 4):
        super().__init__()
        mods, width = [], obs_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.net = nn.Sequential(*mods)
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std_logit = nn.Parameter(torch.zeros(act_dim))
        for layer in self.net[::2]:  # rlkit's Mlp initialization; the mean layer: GaussianPolicy's init_w 1e-3
            rlkit_init_(layer.weight, layer.bias, 1.0 / math.sqrt(layer.out_features))
        rlkit_init_(self.mu.weight, self.mu.bias, 1e-3)

    def forward(self, obs):
        mean = torch.tanh(self.mu(self.net(obs)))
        log_std = LOG_STD_MIN + (LOG_STD_MAX - LOG_STD_MIN) * torch.sigmoid(self.log_std_logit)
        return mean, log_std.expand_as(mean)

    def sample(self, obs):
        return sample_action(*self(obs))


class TwinQ(nn.Module):
    """Two Q-networks in one module: weights [2, in, out], one batched matmul per layer. Output [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.weights.append(nn.Parameter(torch.empty(2, fan_in, fan_out)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out)))
            # rlkit's Mlp initialization, each of the two drawn independently; the last layer: Mlp's init_w 3e-3
            rlkit_init_(self.weights[-1], self.biases[-1], 3e-3 if i == len(sizes) - 2 else 1.0 / math.sqrt(fan_out))

    def forward(self, obs, act):
        x = torch.cat([obs, act], -1).expand(2, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


# =====================================================================================
# Losses and the update (one gradient step; the same rule offline and online).
# =====================================================================================
Learner = namedtuple("Learner", "actor critic critic_target opt")


def make_learner(obs_dim: int, act_dim: int, args: Args, device: torch.device) -> Learner:
    """Fresh AWAC: target critics = critics; one Adam (per-parameter, so the same as one per network)
    with weight decay on the policy only."""
    actor = Actor(obs_dim, act_dim, args.hidden, args.actor_layers).to(device)
    critic = TwinQ(obs_dim, act_dim, args.hidden).to(device)
    opt = torch.optim.Adam(
        [{"params": actor.parameters(), "weight_decay": args.actor_weight_decay}, {"params": critic.parameters()}],
        lr=args.lr,
        fused=True,
    )
    return Learner(actor, critic, copy.deepcopy(critic).requires_grad_(False), opt)


def gaussian_log_prob(a, mean, log_std):
    """log N(a; mean, sigma^2), summed over action dimensions."""
    return (-0.5 * ((a - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def state_value(critic: TwinQ, s: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """V(s) = min_j Q_j(s, a~) at ONE action a~ ~ pi(.|s) sampled from the policy (rlkit's
    awr_use_mle_for_vf=False with vf_K=1), not at the mean action. [B]"""
    return critic(s, sample_action(mean, log_std)).min(0).values


def awac_weights(adv: torch.Tensor, beta: float) -> torch.Tensor:
    """w = B softmax_batch(A/beta) = exp(A/beta) / mean_batch(exp(A/beta)): mean 1 over the batch, one
    normalizer for every row (rlkit's normalize_over_batch=True; not a per-state Z(s)). Softmax subtracts
    the max, so no overflow at any Q scale."""
    return adv.shape[0] * torch.softmax(adv / beta, 0)


def awac_losses(learner: Learner, batch, gamma: float, beta: float):
    """The two AWAC losses on one batch (Nair et al. 2020, Algorithm 1: policy evaluation by TD,
    policy improvement by weighted maximum likelihood). Random draws in this order: a' at s', then a~ of V(s)."""
    s, a, r, s2, d = batch
    with torch.no_grad():  # AWAC policy evaluation target: y = r + gamma (1-d) Q'(s', a'), a' ~ pi(.|s'), current pi
        y = r + (1 - d) * gamma * learner.critic_target(s2, learner.actor.sample(s2)).min(0).values
    q = learner.critic(s, a)
    # AWAC critic loss: phi = argmin E_D[(Q_phi(s,a) - y)^2], for each twin critic j = 1, 2 (summed)
    critic_loss = (q - y).pow(2).mean(1).sum()
    mean, log_std = learner.actor(s)  # one policy forward: V(s)'s sampled action and log pi(a|s)
    with torch.no_grad():  # A(s,a) = min_j Q_j(s,a) - V(s), V from one sampled action
        adv = q.min(0).values - state_value(learner.critic, s, mean, log_std)
        w = awac_weights(adv, beta)
    # AWAC actor update (weighted maximum likelihood on the buffer's actions):
    # theta = argmax E_D[log pi_theta(a|s) w(s,a)], w = exp(A/beta) normalized over the batch
    actor_loss = -(w * gaussian_log_prob(a, mean, log_std)).mean()
    stats = {
        "critic_loss": critic_loss.detach(),
        "actor_loss": actor_loss.detach(),
        "q_mean": q.detach().mean(),
        "advantage_mean": adv.mean(),
        "advantage_std": adv.std(),
        "weight_max": w.max(),
        "weight_std": w.std(),
    }
    return critic_loss, actor_loss, stats


def train_step(learner: Learner, buf: Replay, batch_size: int, args: Args) -> dict:
    """One AWAC gradient step on a uniform batch of `batch_size` offline + online rows (both gradients from
    the pre-update weights, as rlkit). Returns detached scalars: no host sync here."""
    batch = buf.sample(batch_size, learner.critic.weights[0].device)
    critic_loss, actor_loss, stats = awac_losses(learner, batch, args.gamma, args.beta)
    learner.opt.zero_grad(set_to_none=True)
    (critic_loss + actor_loss).backward()  # each loss reaches only its own parameters
    learner.opt.step()
    with torch.no_grad():  # target critics: theta' <- (1 - tau) theta' + tau theta
        for p, tp in zip(learner.critic.parameters(), learner.critic_target.parameters()):
            tp.lerp_(p, args.tau)
    return stats


@torch.no_grad()
def act(learner: Learner, obs: np.ndarray, deterministic: bool) -> np.ndarray:
    """obs [n, obs] -> actions [n, act]: the mean to evaluate (rlkit's MakeDeterministic), a (clipped)
    sample of the policy to explore."""
    o = torch.as_tensor(obs, dtype=torch.float32, device=learner.critic.weights[0].device)
    return (learner.actor(o)[0] if deterministic else learner.actor.sample(o)).cpu().numpy()


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


# =====================================================================================
# Env state for exact resume, checkpoint helpers, the loop.
# =====================================================================================
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


def learner_state(learner: Learner) -> dict:
    """The checkpoint entries of a Learner: its fields' state dicts."""
    return {k: v.state_dict() for k, v in learner._asdict().items()}


def load_learner_state(learner: Learner, s: dict) -> None:
    for k, v in learner._asdict().items():
        v.load_state_dict(s[k])


def trim_evals(csv_path: str, rows: int) -> None:
    """On resume, keep the first `rows` evaluations (those the checkpoint had seen); later ones are redone.
    (By count: the last offline evaluation and the one at 0 online steps share their updates and env_steps.)"""
    if os.path.exists(csv_path):
        lines = open(csv_path).read().splitlines()
        with open(csv_path, "w") as f:
            f.write("\n".join(lines[: 1 + rows]) + "\n")


class StatMeans:
    """Sums of the updates' statistics, kept as device tensors until `pop`: one host sync per log."""

    def __init__(self):
        self.sums = {}
        self.count = 0

    def add(self, stats: dict) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def pop(self) -> dict:
        """The means since the last pop, as floats; then start over."""
        means = {key: float(total) / self.count for key, total in self.sums.items()}
        self.sums = {}
        self.count = 0
        return means


def main(args: Args) -> None:
    for name in (
        "online_steps",
        "epoch_steps",
        "first_epoch_multiplier",
        "eval_every",
        "eval_episodes",
        "log_every",
        "batch_size",
        "offline_batch_size",
    ):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.offline_updates < 0:
        raise InputError("--offline-updates must be >= 0")
    if args.resume:  # continue with the run's own arguments; device, tracking and step budget may change
        if not args.run_dir or not os.path.exists(os.path.join(args.run_dir, "checkpoint.pt")):
            raise InputError(f"--resume needs --run-dir <a run dir holding checkpoint.pt> (got {args.run_dir!r})")
        run = load_checkpoint(os.path.join(args.run_dir, "checkpoint.pt"), "")
        if run.get("format") != CKPT_FORMAT or args.online_steps < run["env_steps"]:
            raise InputError(
                f"{args.run_dir}/checkpoint.pt is not an {CKPT_FORMAT} checkpoint (older versions cannot be "
                "resumed; start a new --run-dir), or is past --online-steps"
            )
        keep = {k: getattr(args, k) for k in ("device", "track", "online_steps", "resume", "run_dir")}
        try:
            args = dataclasses.replace(Args(**run["args"]), **keep)
        except TypeError as e:
            raise InputError(f"{args.run_dir}/checkpoint.pt was written by another version of {SCRIPT}.py ({e})") from e
    env_id, device = check_env(args.env), pick_device(args.device)
    run_dir = args.run_dir or default_run_dir(args, SCRIPT)
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
    learner = make_learner(obs_dim, act_dim, args, device)
    buf = Replay(data, args.online_steps)
    del data
    obs, _ = env.reset(seed=args.seed)
    counters, ep_ret, ep_len = {"updates": 0, "env_steps": 0, "epoch": 0, "started": False, "evals": 0}, 0.0, 0
    if args.resume:  # everything the run would hold had it not stopped
        try:
            load_learner_state(learner, run)
        except (RuntimeError, KeyError, ValueError) as e:
            raise InputError(f"{ckpt_path} does not fit these networks ({str(e).splitlines()[0][:99]})") from e
        buf.add_online(run["online"].numpy())
        counters = {k: run[k] for k in counters}
        set_env_state(env, run["env_state"])
        st = run["env_state"]
        obs, ep_ret, ep_len = st["obs"].numpy(), st["ep_return"], st["ep_length"]
        set_rng_state(run["rng"])
        trim_evals(os.path.join(run_dir, "evals.csv"), counters["evals"])
        trim_rows(os.path.join(run_dir, "train.csv"), "env_steps", counters["env_steps"])
        del run
    logger = Logger(args, run_dir, SCRIPT)
    print(
        f"run dir: {run_dir}\ncheckpoint: {ckpt_path}\n{buf.M} offline transitions"
        + (f"\nresumed at {counters['updates']} updates, {counters['env_steps']} env steps" if args.resume else "")
    )

    def eval_row(phase: str) -> float:  # deterministic policy (the mean), D4RL normalized score, new start states
        seed = eval_seed(args.seed, counters["evals"])
        returns = evaluate(args.env, lambda o: act(learner, o, True), args.eval_episodes, seed)
        counters["evals"] += 1
        step = counters["updates"] if phase == "offline" else counters["env_steps"]
        return logger.eval_row(phase, counters["updates"], counters["env_steps"], "policy", returns, args.env, step)

    def save():
        save_checkpoint(
            {
                "format": CKPT_FORMAT,
                "args": dataclasses.asdict(args),
                **learner_state(learner),
                "online": torch.from_numpy(buf.rows[buf.M : buf.M + buf.n_online].copy()),
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

    # ---- offline phase: the update rule on the dataset alone (no online rows yet); offline/<stat> against updates
    pbar = tqdm(
        total=args.offline_updates,
        initial=min(counters["updates"], args.offline_updates),
        desc=f"{SCRIPT} offline updates",
        mininterval=5,
        disable=None,
    )
    stat_means = StatMeans()
    try:
        while counters["updates"] < args.offline_updates:
            stat_means.add(train_step(learner, buf, args.offline_batch_size, args))
            counters["updates"] += 1
            pbar.update()
            last = counters["updates"] == args.offline_updates
            if counters["updates"] % args.log_every == 0 or last:  # means over the updates since the last log
                logger.scalars({f"offline/{k}": v for k, v in stat_means.pop().items()}, counters["updates"])
            if counters["updates"] % args.eval_every == 0 or last:
                pbar.set_postfix(score=f"{eval_row('offline'):.1f}")
                save()
        pbar.close()
        # ---- online phase: epochs of env steps, then as many updates, on offline + online rows
        if not counters["started"]:  # the offline agent before any online step
            print(f"start: normalized score {eval_row('online'):.1f}")
            counters["started"] = True
            save()
        pbar = tqdm(
            total=args.online_steps,
            initial=counters["env_steps"],
            desc=f"{SCRIPT} env steps",
            mininterval=5,
            disable=None,
        )
        while counters["env_steps"] < args.online_steps:
            start = counters["env_steps"]
            new_rows = np.empty((min(args.epoch_steps, args.online_steps - start), buf.rows.shape[1]), np.float32)
            for i in range(len(new_rows)):  # explore by sampling the policy
                a = act(learner, obs[None], False)[0]
                next_obs, rew, term, trunc, _ = env.step(a)
                new_rows[i] = np.concatenate([obs, a, [rew], next_obs, [float(term)]])  # truncation: not terminal
                obs, ep_ret, ep_len = next_obs, ep_ret + float(rew), ep_len + 1
                if term or trunc:
                    logger.scalars({"online/episodic_return": ep_ret, "online/episodic_length": ep_len}, start + i + 1)
                    (obs, _), ep_ret, ep_len = env.reset(), 0.0, 0
            buf.add_online(new_rows)
            counters["env_steps"] += len(new_rows)
            pbar.update(len(new_rows))
            for _ in range(len(new_rows) * (args.first_epoch_multiplier if counters["epoch"] == 0 else 1)):
                stat_means.add(train_step(learner, buf, args.batch_size, args))
                counters["updates"] += 1
            means = stat_means.pop()  # the epoch's means: one host sync per epoch
            logger.scalars({f"online/{k}": v for k, v in means.items()}, counters["env_steps"])
            logger.train_row({"env_steps": counters["env_steps"], "updates": counters["updates"], **means})
            counters["epoch"] += 1
            pbar.set_postfix(score=f"{eval_row('online'):.1f}")
            save()  # every epoch: a killed run loses at most one epoch
    finally:
        pbar.close()
        logger.close()
        env.close()
    print(
        f"done: {counters['updates']} updates, {counters['env_steps']} env steps\n"
        f"run dir: {run_dir}\ncheckpoint: {ckpt_path}"
    )


if __name__ == "__main__":
    run_main(main)

"""Soft Actor-Critic from scratch, trained online with no offline data: the "SAC" baseline of Lee, Seo, Lee, Abbeel,
Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic Q-Ensemble", CoRL 2021, arXiv
2107.00591. make_dataset.py trains its behaviour agents with it (main's hook `after_eval`).
SAC: Haarnoja, Zhou, Hartikainen, Tucker, Ha, Tan, Kumar, Zhu, Gupta, Abbeel, Levine, "Soft Actor-Critic Algorithms
and Applications", arXiv 1812.05905; its equation numbers below. "rlkit" marks details of rlkit's SAC
(rlkit/torch/sac/sac.py, also in github.com/shlee94/Off2OnRL).

Paper -> code:
  tanh-Gaussian policy, log pi(a|s) = log N(u; mu, sigma^2)               -> Actor
      - sum log(1 - tanh(u)^2) (SAC's Appendix C)
  twin soft Q-functions, Polyak-averaged targets                          -> TwinQ, Learner, sac_update
  soft Bellman residual, clipped double-Q target (SAC Eq. 5)              -> sac_losses
  policy loss, reparameterized (SAC Eq. 7)                                -> sac_losses
  temperature loss, target entropy -|A| (SAC Eq. 18)                      -> sac_losses
  replay of every transition in the order it happened (time-limit ends    -> ReplayBuffer
      stored as truncations: the target bootstraps through them)
  schedule (rlkit's): --learning-starts uniform random steps, then epochs -> main, the algorithm box
      of --epoch-steps env steps with the policy, each followed by as
      many updates
The SAC section is identical in baselines/sac_ft.py.

Run: python baselines/sac.py --env hopper --online-steps 250000   (resume: --run-dir D --resume)
Evaluation: --eval-episodes deterministic episodes (tanh(mu(s))) every --eval-every env steps (whole epochs) and at 0
env steps, the k-th from new start states (reset seed eval_seed(seed, k)).
Writes to the run directory args.json, evals.csv, train.csv (one row per epoch with updates: the epoch's means of
TRAIN_COLUMNS), tensorboard events and checkpoint.pt ("off2on-sac/3", atomic, every --checkpoint-every env steps
(whole epochs), at the end and when `after_eval` stops the run: networks, optimizer, the replay, counters, env and
RNG states, the current episode).
"""

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SCRIPT = "sac"
FORMAT = "off2on-sac/3"


@dataclass
class Args:
    seed: int = 0  # seed of python, numpy, torch and the envs
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    track: bool = False  # log to Weights & Biases as well as tensorboard
    wandb_project: str = "off2on"  # wandb project name (with --track)
    run_dir: str = ""  # run directory; empty = runs/<env>__<dataset>__sac__seed<seed>__<unix time>
    resume: bool = False  # continue exactly from <run dir>/checkpoint.pt (needs --run-dir; --online-steps may grow)
    env: str = "hopper"  # hopper, halfcheetah or walker2d (Gymnasium MuJoCo v5)
    dataset: str = "none"  # unused: SAC learns from scratch (kept so every script has the same CLI)
    online_steps: int = 250_000  # environment steps (the paper's online budget: 250k)
    offline_updates: int = 0  # unused: SAC has no offline phase (kept so every script has the same CLI)
    eval_every: int = 1_000  # evaluate the deterministic policy every this many env steps (whole epochs), and at 0
    eval_episodes: int = 5  # episodes per evaluation
    checkpoint_every: int = 25_000  # write checkpoint.pt every this many env steps (whole epochs)
    learning_starts: int = 10_000  # uniform random env steps before the first update
    epoch_steps: int = 1_000  # env steps per epoch; each epoch is followed by as many updates
    buffer_size: int = 1_000_000  # replay capacity (transitions)
    batch_size: int = 256  # minibatch size
    hidden: int = 256  # width of the two hidden layers of actor and critics
    lr: float = 3e-4  # Adam learning rate of actor, critics and temperature
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # target critic Polyak rate


# =====================================================================================
# Replay: every transition in the order it happened.
# =====================================================================================
class ReplayBuffer:
    """Preallocated numpy arrays, one per field, filled in the order the transitions happened (make_dataset.py reads
    the episodes back), overwriting the oldest past `capacity`; `sample` draws a minibatch with one index per field."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.capacity = capacity
        self.ptr = 0  # the next row to write
        self.size = 0
        self.data = {
            "observations": np.zeros((capacity, obs_dim), np.float32),
            "actions": np.zeros((capacity, act_dim), np.float32),
            "rewards": np.zeros(capacity, np.float32),
            "next_observations": np.zeros((capacity, obs_dim), np.float32),
            "terminations": np.zeros(capacity, np.float32),  # 1 only for true terminations
            "truncations": np.zeros(capacity, np.float32),  # time-limit ends: not used by the target
        }

    def add(self, **transition) -> None:
        for key, value in transition.items():
            self.data[key][self.ptr] = value
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n: int, device: torch.device) -> tuple:
        """A uniform minibatch (s, a, r, s', terminated) on `device`; truncations are left out (they bootstrap)."""
        idx = np.random.randint(0, self.size, n)
        keys = ("observations", "actions", "rewards", "next_observations", "terminations")
        return tuple(torch.as_tensor(self.data[key][idx], device=device) for key in keys)

    def state_dict(self) -> dict:
        arrays = {key: torch.from_numpy(array[: self.size].copy()) for key, array in self.data.items()}
        return {"ptr": self.ptr, "size": self.size, **arrays}

    def load_state_dict(self, state: dict) -> None:
        self.ptr = state["ptr"]
        self.size = state["size"]
        for key, array in self.data.items():
            array[: self.size] = state[key].numpy()


# =====================================================================================
# SAC: tanh-Gaussian actor, twin critics, the three losses, one gradient step, the policy.
# Identical in baselines/sac.py and baselines/sac_ft.py (tests/test_common_sections.py).
# =====================================================================================
LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0
TRAIN_COLUMNS = ("critic_loss", "actor_loss", "alpha", "q_mean", "entropy")  # train.csv: the epoch's means


class Actor(nn.Module):
    """tanh-Gaussian policy: a = tanh(u), u ~ N(mu(s), sigma(s)^2), log sigma clamped to [-20, 2]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.mu = nn.Linear(hidden, act_dim)
        self.log_std = nn.Linear(hidden, act_dim)

    def forward(self, obs: torch.Tensor):
        h = self.net(obs)
        return self.mu(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(self, obs: torch.Tensor):
        """Reparameterized a = tanh(mu + sigma eps) and its log-probability (SAC's Appendix C, enforcing action
        bounds): log pi(a|s) = log N(u; mu, sigma^2) - sum log(1 - tanh(u)^2)."""
        mu, log_std = self(obs)
        eps = torch.randn_like(mu)
        u = mu + log_std.exp() * eps
        log_normal = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_det = (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)  # = log(1 - tanh(u)^2), stable form
        return torch.tanh(u), log_normal - log_det

    def act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """tanh(mu(s)) to evaluate, a sample of the policy to explore."""
        return torch.tanh(self(obs)[0]) if deterministic else self.sample(obs)[0]


class TwinQ(nn.Module):
    """Two Q-networks in one module, layer widths `hidden`: weights [2, in, out], one batched matmul per layer,
    each layer initialized as nn.Linear's default (drawn for each of the two). (s, a) [B, *] -> Q [2, B]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple):
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(2, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, act], -1).expand(2, -1, -1)
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x.squeeze(-1)


class Learner:
    """What SAC trains: the actor, twin critics, target critics copied from them, the temperature
    alpha = exp(log_alpha) (1 at the start) and one Adam over all three (Adam is per parameter: one Adam equals
    one per network)."""

    STATE = ("actor", "critic", "critic_target", "opt")  # the networks and optimizer a checkpoint saves

    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.device = device
        self.actor = Actor(obs_dim, act_dim, args.hidden).to(device)
        self.critic = TwinQ(obs_dim, act_dim, (args.hidden, args.hidden)).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)
        sac_params = [*self.actor.parameters(), *self.critic.parameters(), self.log_alpha]
        self.opt = torch.optim.Adam(sac_params, lr=args.lr, fused=True)

    def state_dict(self) -> dict:  # a checkpoint's entries: the state_dicts of STATE, and log_alpha
        return {name: getattr(self, name).state_dict() for name in self.STATE} | {
            "log_alpha": self.log_alpha.detach().cpu()
        }

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            getattr(self, name).load_state_dict(state[name])
        self.log_alpha.data.copy_(state["log_alpha"])


def sac_losses(learner: Learner, batch: tuple, gamma: float) -> tuple:
    """The three SAC losses on one batch (s, a, r, s', terminated) [B, *]; a time-limit end is not a termination:
    its target bootstraps."""
    s, a, r, s2, d = batch
    alpha = learner.log_alpha.exp().detach()
    target_entropy = -float(learner.actor.mu.out_features)  # -|A|
    # the target of SAC Eq. 5 (clipped double Q): y = r + gamma (1-d) (min_j Q'_j(s', a') - alpha log pi(a'|s'))
    with torch.no_grad():
        a2, logp2 = learner.actor.sample(s2)
        y = r + (1 - d) * gamma * (learner.critic_target(s2, a2).min(0).values - alpha * logp2)
    q = learner.critic(s, a)
    # SAC Eq. 5, the soft Bellman residual (without its 1/2, as rlkit): J_Q = E[(Q_j(s,a) - y)^2], j = 1, 2
    critic_loss = (q - y).pow(2).mean(1).sum()
    # SAC Eq. 7, reparameterized: J_pi = E[alpha log pi(a|s) - min_j Q_j(s, a)], a = tanh(mu + sigma eps);
    # the critics are frozen for this forward, so the actor loss gives them no gradient
    a_pi, logp_pi = learner.actor.sample(s)
    learner.critic.requires_grad_(False)
    q_pi = learner.critic(s, a_pi).min(0).values
    learner.critic.requires_grad_(True)
    actor_loss = (alpha * logp_pi - q_pi).mean()
    # SAC Eq. 18 in log space (as rlkit): J(alpha) = E[-log alpha (log pi(a|s) + target entropy)]
    alpha_loss = -(learner.log_alpha * (logp_pi.detach() + target_entropy)).mean()
    stats = {
        "critic_loss": critic_loss.detach(),
        "actor_loss": actor_loss.detach(),
        "alpha": alpha,
        "q_mean": q.detach().mean(),
        "entropy": -logp_pi.detach().mean(),
    }
    return critic_loss, actor_loss, alpha_loss, stats


def sac_update(learner: Learner, batch: tuple, gamma: float, tau: float) -> dict:
    """One SAC gradient step: the three gradients from the pre-update weights (as rlkit), one Adam step, then the
    target critics. Returns detached scalars: no host sync here."""
    critic_loss, actor_loss, alpha_loss, stats = sac_losses(learner, batch, gamma)
    learner.opt.zero_grad(set_to_none=True)
    (critic_loss + actor_loss + alpha_loss).backward()  # each loss reaches only its own parameters
    learner.opt.step()
    with torch.no_grad():  # target critics: theta' <- (1 - tau) theta' + tau theta
        for param, target_param in zip(learner.critic.parameters(), learner.critic_target.parameters()):
            target_param.lerp_(param, tau)
    return stats


@torch.no_grad()
def act(learner: Learner, obs: np.ndarray, deterministic: bool) -> np.ndarray:
    """obs [n, obs] or [obs] -> actions: tanh(mu(s)) to evaluate, a sample of the policy to explore."""
    o = torch.as_tensor(obs, dtype=torch.float32, device=learner.device)
    return learner.actor.act(o, deterministic).cpu().numpy()


# =====================================================================================
# main: the algorithm box.
# =====================================================================================
@dataclass
class Progress:
    """What main hands `after_eval` after every evaluation but the first (the untrained policy's)."""

    env_steps: int
    updates: int
    eval_returns: np.ndarray
    learner: Learner
    buffer: ReplayBuffer  # every transition so far, while fewer than --buffer-size


def main(args: Args, after_eval=None) -> None:
    """SAC from scratch. after_eval(Progress) -> True stops the run after a checkpoint (make_dataset.py's hook)."""
    args, ckpt = check_args(args)  # with --resume: the run's own Args and its checkpoint
    device, run_dir = set_up(args, SCRIPT)  # seeds python, numpy and torch
    obs_dim, act_dim = env_dims(args.env)
    learner = Learner(args, obs_dim, act_dim, device)
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim)
    env = gym.make(ENVS[args.env])
    episode = {"obs": env.reset(seed=args.seed)[0], "ep_return": 0.0, "ep_length": 0}
    counters = {"env_steps": 0, "updates": 0, "epoch": 0, "evals": 0}  # epoch: epochs with updates
    if ckpt is not None:  # everything the run would hold had it not stopped
        restore_checkpoint(ckpt, learner, buffer, env, episode, counters, run_dir)
    logger = Logger(args, run_dir, SCRIPT)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    print(f"run dir: {run_dir}\ncheckpoint: {ckpt_path}")
    bar = tqdm(total=args.online_steps, initial=counters["env_steps"], desc="env steps", mininterval=5, disable=None)
    stop = False
    try:
        if counters["evals"] == 0:  # the untrained policy, before any env step
            evaluate_policy(args, learner, logger, counters)
        while not stop and counters["env_steps"] < args.online_steps:
            start = counters["env_steps"]
            steps = min(args.epoch_steps, args.online_steps - start)
            # env steps into the replay: uniform random actions for the first --learning-starts, then the policy's
            explore(env, episode, learner, buffer, steps, args.learning_starts, logger, start)
            counters["env_steps"] += steps
            bar.update(steps)
            if counters["env_steps"] >= args.learning_starts:  # then as many SAC updates as env steps
                stats = []
                for _ in range(steps):
                    stats.append(sac_update(learner, buffer.sample(args.batch_size, device), args.gamma, args.tau))
                counters["updates"] += steps
                counters["epoch"] += 1
                log_epoch(logger, stats, counters)
            done = counters["env_steps"] >= args.online_steps
            if done or counters["env_steps"] // args.eval_every > start // args.eval_every:
                returns = evaluate_policy(args, learner, logger, counters)
                bar.set_postfix(ret=f"{returns.mean():.0f}")
                progress = Progress(counters["env_steps"], counters["updates"], returns, learner, buffer)
                stop = after_eval is not None and after_eval(progress)
            if done or stop or counters["env_steps"] // args.checkpoint_every > start // args.checkpoint_every:
                save_checkpoint(checkpoint_dict(args, learner, buffer, env, episode, counters), ckpt_path)
    finally:
        bar.close()
        logger.close()
        env.close()
    print(f"done: {counters['env_steps']} env steps, {counters['updates']} updates\nrun dir: {run_dir}")
    print(f"checkpoint: {ckpt_path}")


# =====================================================================================
# This script's helpers: exploration, evaluation, logging, argument checks, checkpoints.
# =====================================================================================
def explore(env, episode: dict, learner: Learner, buffer, steps: int, learning_starts: int, logger, env_steps: int):
    """`steps` env steps into the replay, acting uniformly at random while env_steps < learning_starts, then with a
    sample of the policy. `episode`: the current observation, return and length, carried on."""
    for i in range(steps):
        if env_steps + i < learning_starts:
            a = np.random.uniform(env.action_space.low, env.action_space.high).astype(np.float32)
        else:
            a = act(learner, episode["obs"], deterministic=False)
        next_obs, reward, terminated, truncated, _ = env.step(a)
        transition = {"observations": episode["obs"], "actions": a, "rewards": reward, "next_observations": next_obs}
        buffer.add(**transition, terminations=terminated, truncations=truncated)
        episode.update(obs=next_obs, ep_return=episode["ep_return"] + float(reward), ep_length=episode["ep_length"] + 1)
        if terminated or truncated:
            episode_stats = {
                "online/episodic_return": episode["ep_return"],
                "online/episodic_length": episode["ep_length"],
            }
            logger.scalars(episode_stats, env_steps + i + 1)
            episode.update(obs=env.reset()[0], ep_return=0.0, ep_length=0)


def evaluate_policy(args: Args, learner: Learner, logger, counters: dict) -> np.ndarray:
    """The deterministic policy tanh(mu(s)), from new start states each time -> evals.csv; the episodes' returns."""
    seed = eval_seed(args.seed, counters["evals"])
    returns = evaluate(args.env, lambda obs: act(learner, obs, deterministic=True), args.eval_episodes, seed)
    counters["evals"] += 1
    steps = counters["env_steps"]
    logger.eval_row("online", counters["updates"], steps, "policy", returns, args.env, steps)
    return returns


def check_args(args: Args) -> tuple:
    """One-line errors for bad arguments; with --resume: (the run's own Args, its checkpoint), else (args, None)."""
    sizes = ("online_steps", "eval_every", "eval_episodes", "checkpoint_every", "epoch_steps", "buffer_size")
    for name in (*sizes, "batch_size", "hidden"):
        if getattr(args, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if not args.resume:
        return args, None
    # the run's own arguments; the device, tracking and the step budget may change
    args, ckpt = resume_run(args, FORMAT, keep=("device", "track", "online_steps", "resume", "run_dir"))
    if args.online_steps < ckpt["env_steps"]:
        raise InputError(f"{args.run_dir} is at {ckpt['env_steps']} env steps, past --online-steps {args.online_steps}")
    return args, ckpt


def checkpoint_dict(args: Args, learner: Learner, buffer: ReplayBuffer, env, episode: dict, counters: dict) -> dict:
    """<run dir>/checkpoint.pt: all an exact --resume needs."""
    return {
        "format": FORMAT,
        "args": dataclasses.asdict(args),
        **learner.state_dict(),
        "buffer": buffer.state_dict(),
        **counters,
        "rng": rng_state(env),
        "episode": {**episode, "obs": torch.from_numpy(np.array(episode["obs"]))},
    }


def restore_checkpoint(ckpt: dict, learner: Learner, buffer: ReplayBuffer, env, episode: dict, counters, run_dir):
    """Load what `checkpoint_dict` saved; drop the csv rows written after it (they are redone)."""
    learner.load_state_dict(ckpt)
    buffer.load_state_dict(ckpt["buffer"])
    counters.update({k: ckpt[k] for k in counters})
    episode.update(ckpt["episode"], obs=ckpt["episode"]["obs"].numpy())
    set_rng_state(ckpt["rng"], env)
    trim_rows(os.path.join(run_dir, "evals.csv"), counters["evals"])
    trim_rows(os.path.join(run_dir, "train.csv"), counters["epoch"])  # one row per epoch with updates
    print(f"resumed at {counters['env_steps']} env steps")


def log_epoch(logger, stats: list, counters: dict) -> None:
    """Epoch means of the updates' statistics -> tensorboard and train.csv (one host sync per epoch)."""
    means = {key: float(sum(s[key] for s in stats)) / len(stats) for key in stats[0]}
    logger.scalars({f"online/{key}": value for key, value in means.items()}, counters["env_steps"])
    row = {"env_steps": counters["env_steps"], "updates": counters["updates"]}
    logger.csv_row("train.csv", {**row, **{key: means.get(key, "") for key in TRAIN_COLUMNS}})


def trim_rows(path: str, rows: int) -> None:
    """--resume: keep the header and the first `rows` rows of a csv file, those written before the checkpoint."""
    if os.path.exists(path):
        lines = open(path).readlines()
        with open(path, "w") as f:
            f.writelines(lines[: rows + 1])


# =====================================================================================
# Plumbing: datasets, run directory, logging, checkpoints, RNG and env state, evaluation, errors.
# Identical in every algorithm script (tests/test_common_sections.py); not the algorithm: a first read can stop here.
# =====================================================================================
ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
REF_RETURNS = {"hopper": (-20.272305, 3234.3), "halfcheetah": (-280.178953, 12135.0), "walker2d": (1.629008, 4592.3)}
INTEGRATION = mujoco.mjtState.mjSTATE_INTEGRATION  # MuJoCo's full state for an exact --resume
EVAL_COLUMNS = "phase,updates,env_steps,policy,return_mean,return_std,normalized_score,wall_time_s".split(",")


class InputError(Exception): ...  # bad user input: the command line prints one line `error: ...`, exit code 2


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def mujoco_warning(message: str) -> None:  # all to stderr but the settotalmass deprecation (gymnasium's half_cheetah)
    if not message.startswith("compiler attribute 'settotalmass' is deprecated"):
        print(f"WARNING: {message}", file=sys.stderr, flush=True)


mujoco.set_mju_user_warning(mujoco_warning)  # one global callback, in place of MuJoCo's default printing


def env_dims(env: str) -> tuple:  # -> (observation size, action size)
    if env not in ENVS:
        raise InputError(f"unknown env {env!r}; choose one of: {', '.join(ENVS)}")
    with gym.make(ENVS[env]) as e:
        return e.observation_space.shape[0], e.action_space.shape[0]


def normalized_score(env: str, ret):  # D4RL's (Fu et al. 2020): 100 (R - R_random) / (R_expert - R_random)
    lo, hi = REF_RETURNS[env]
    return 100.0 * (np.asarray(ret, dtype=np.float64) - lo) / (hi - lo)


def dataset_slug(dataset: str) -> str:
    return os.path.splitext(os.path.basename(dataset))[0] if dataset.endswith(".hdf5") else dataset.replace("/", "-")


def set_up(args, script: str) -> tuple:  # seeds python, numpy, torch -> (device, --run-dir or a new one in runs/)
    for seed_rng in (random.seed, np.random.seed, torch.manual_seed):
        seed_rng(args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise InputError(f"--device {args.device}: use auto, cpu, or cuda where a CUDA GPU is visible")
    name = f"{args.env}__{dataset_slug(args.dataset)}__{script}__seed{args.seed}__{int(time.time())}"
    return torch.device(device), args.run_dir or os.path.join("runs", name)


def rng_state(env: gym.Env | None = None) -> dict:  # with an env also its MuJoCo state, RNG, steps into the episode
    kind, key, *rest = np.random.get_state()  # the key as a list: torch.load(weights_only=True) refuses numpy
    state = {"python": random.getstate(), "numpy": (kind, key.tolist(), *rest), "torch": torch.get_rng_state()}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    if env is not None:
        state["mujoco"] = torch.empty(mujoco.mj_stateSize(env.unwrapped.model, INTEGRATION), dtype=torch.float64)
        mujoco.mj_getState(env.unwrapped.model, env.unwrapped.data, state["mujoco"].numpy(), INTEGRATION)
        state.update(elapsed_steps=env._elapsed_steps, env_rng=env.unwrapped.np_random.bit_generator.state)
    return state


def set_rng_state(state: dict, env: gym.Env | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # its key: a list (a tensor in older checkpoints)
    torch.set_rng_state(state["torch"])
    torch.cuda.set_rng_state_all(state["cuda"] if torch.cuda.is_available() else [])
    if env is not None:
        mujoco.mj_setState(env.unwrapped.model, env.unwrapped.data, state["mujoco"].numpy(), INTEGRATION)
        env._elapsed_steps = state["elapsed_steps"]
        env.unwrapped.np_random.bit_generator.state = state["env_rng"]


class Logger:  # the run directory's args.json, evals.csv, train.csv, tensorboard events and (--track) wandb run
    def __init__(self, args, run_dir: str, script: str):
        self.start = time.time()
        self.writer = SummaryWriter(run_dir)  # makes the run directory
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        self.wandb = None
        if args.track:
            import wandb

            name = os.path.basename(run_dir)  # the id below: the same wandb run again on --resume
            kwargs = dict(project=args.wandb_project, config=vars(args), dir=run_dir, resume="allow", name=name)
            self.wandb = wandb.init(id=f"{script}-{name}"[-128:], **kwargs)

    def scalars(self, metrics: dict, step: int) -> None:  # values: numbers or 0-d tensors (read here: a host sync)
        values = {k: float(v) for k, v in metrics.items()}
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def csv_row(self, name: str, row: dict) -> None:  # a row of <run dir>/<name>, after the header in a new file
        path = os.path.join(self.writer.log_dir, name)  # the run directory
        with open(path, "a") as f:
            if os.path.getsize(path) == 0:
                f.write(",".join(row) + "\n")
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()) + "\n")

    def eval_row(self, phase: str, updates: int, env_steps: int, policy: str, returns, env: str, step: int) -> float:
        score = float(normalized_score(env, np.mean(returns)))
        stats = (f"{np.mean(returns):.3f}", f"{np.std(returns):.3f}", f"{score:.3f}", f"{time.time() - self.start:.1f}")
        self.csv_row("evals.csv", dict(zip(EVAL_COLUMNS, (phase, updates, env_steps, policy, *stats))))
        tag = f"{phase}/eval_{policy}"
        self.scalars({f"{tag}/return": np.mean(returns), f"{tag}/normalized_score": score}, step)
        return score

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_checkpoint(obj: dict, path: str) -> None:  # atomic: a temp file beside `path`, renamed over it
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, f"{path}.tmp{os.getpid()}")
    os.replace(f"{path}.tmp{os.getpid()}", path)


def load_checkpoint(path: str, make_cmd: str):
    if not os.path.exists(path):
        raise InputError(f"no checkpoint {path}; make it with: {make_cmd}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path} is not a readable checkpoint ({first_line(e)[:200]})") from e


def resume_run(args, fmt: str, keep: tuple) -> tuple:  # -> (the run's Args but `keep` as given, its checkpoint)
    path = os.path.join(args.run_dir, "checkpoint.pt")
    if not args.run_dir or not os.path.exists(path):
        raise InputError(f"--resume needs --run-dir <a run dir holding checkpoint.pt> (got {args.run_dir!r})")
    ckpt = load_checkpoint(path, "")
    got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if got != fmt or not isinstance(ckpt.get("args"), dict) or "rng" not in ckpt:
        raise InputError(f"{path} is not an {fmt} checkpoint of a run (format {got!r}); it cannot be resumed")
    saved = {k: v for k, v in ckpt["args"].items() if hasattr(args, k) and k not in keep}
    return dataclasses.replace(args, **saved), ckpt


def evaluate(env: str, act_fn, episodes: int, seed: int) -> np.ndarray:  # episodes side by side -> their returns
    envs = gym.make_vec(ENVS[env], episodes, vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    obs, _ = envs.reset(seed=seed)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, dtype=bool)
    while not done.all():
        obs, reward, terminated, truncated, _ = envs.step(act_fn(obs))
        returns += reward * ~done
        done |= terminated | truncated
    envs.close()
    return returns


def eval_seed(seed: int, k: int) -> int:  # reset seed of the k-th evaluation of a run: new start states each time
    return seed + 10_000 + 1_000 * k


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""BCQ-ft: batch-constrained deep Q-learning trained offline on a dataset, then fine-tuned online with the same update
rule: the "BCQ-ft" baseline of Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced
Replay and Pessimistic Q-Ensemble", CoRL 2021, arXiv 2107.00591.
BCQ: Fujimoto, Meger, Precup, "Off-Policy Deep Reinforcement Learning without Exploration", ICML 2019, arXiv
1812.02900, and its authors' code (github.com/sfujim/BCQ, continuous_BCQ/BCQ.py: "BCQ.py").

Paper -> code (BCQ's equations named by what they define; one iteration of its Algorithm 1 is `update`):
  generative model G_w(s): a conditional VAE of the behaviour policy, latent   -> VAE, vae_loss
      of 2|A| dims, generating with z ~ N(0, I) clipped to [-0.5, 0.5]
  perturbation model xi_phi(s, a, Phi) = Phi tanh(f(s, a)), Phi = 0.05, and    -> Perturbation, update
      its objective max_phi E[Q_1(s, a + xi_phi(s, a, Phi))], a ~ G_w(s)
  soft clipped double-Q target over n = 10 perturbed VAE actions a_i at s':    -> bcq_target
      y = r + gamma (1-d) max_i [lam min_j Q'_j + (1 - lam) max_j Q'_j], lam = 0.75
  policy: the best by Q_1 of n = 100 perturbed VAE actions (BCQ.py             -> act
      select_action), stochastic through the latents: exploring draws fresh
      ones at every step (no extra noise); evaluating uses the same 100 at
      every state and step, so its action is a function of the state
  one buffer of offline + online transitions, sampled uniformly (the VAE       -> UniformReplay
      keeps training on it: the constraint follows the online data)
  schedule: --offline-updates steps on the dataset, then epochs as             -> main, the algorithm box
      off2on_finetune.py's

Run: python baselines/bcq_ft.py --env hopper --dataset medium-replay   (resume: --run-dir D --resume)
Evaluation: --eval-episodes deterministic episodes every --eval-every offline updates, before the first online step
and after every online epoch, the k-th from new start states (reset seed eval_seed(seed, k)).
Writes to the run directory args.json, evals.csv, train.csv (online epochs' means of TRAIN_COLUMNS), tensorboard events
and checkpoint.pt ("off2on-bcq_ft/3", atomic, after every evaluation: networks, optimizers, online rows, counters, env
and RNG states, the current episode).
"""

import copy
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import gymnasium as gym
import h5py
import minari
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SCRIPT = "bcq_ft"
FORMAT = "off2on-bcq_ft/3"


@dataclass
class Args:
    seed: int = 0  # seed of python, numpy, torch and the envs
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    track: bool = False  # log to Weights & Biases as well as tensorboard
    wandb_project: str = "off2on"  # wandb project name (with --track)
    run_dir: str = ""  # run directory; empty = runs/<env>__<dataset>__bcq_ft__seed<seed>__<unix time>
    resume: bool = False  # continue exactly from <run dir>/checkpoint.pt (needs --run-dir; --online-steps may grow)
    env: str = "hopper"  # hopper, halfcheetah or walker2d (Gymnasium MuJoCo v5)
    dataset: str = "medium-replay"  # a kind (local Minari off2on/<env>/<kind>-v0), a Minari id, or a D4RL .hdf5
    offline_updates: int = 1_000_000  # gradient steps on the dataset first (the BCQ authors' default run length)
    online_steps: int = 250_000  # environment steps online (the paper: 250k)
    epoch_steps: int = 1_000  # env steps per online epoch; each epoch is followed by as many updates
    first_epoch_multiplier: int = 5  # the first online epoch is followed by this many times --epoch-steps updates
    eval_every: int = 10_000  # offline: evaluate (and checkpoint) every this many updates; online: every epoch
    eval_episodes: int = 5  # episodes per evaluation
    log_every: int = 1_000  # offline: tensorboard means over this many updates (online: once per epoch)
    batch_size: int = 100  # minibatch size (BCQ)
    vae_hidden: int = 750  # width of the VAE's hidden layers (the latent has 2|A| dims)
    lr: float = 1e-3  # Adam learning rate of the VAE, the perturbation net and the critics
    phi: float = 0.05  # Phi: the largest perturbation of a VAE action, per dimension
    lam: float = 0.75  # lambda of the soft clipped double-Q target (the weight of the twins' min)
    target_samples: int = 10  # n of the target: next actions sampled from the VAE, perturbed, scored (BCQ.py: 10)
    select_samples: int = 100  # n of the policy: actions sampled, perturbed and scored by Q1 (BCQ.py select_action)
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target networks


# =====================================================================================
# Replay: the dataset's transitions, then the online ones, in one buffer sampled uniformly.
# Identical in the three fine-tuning baselines (tests/test_common_sections.py).
# =====================================================================================
class UniformReplay:
    """Every transition as a row [s, a, r, s', terminal] of one preallocated numpy array: the n_offline dataset
    rows, then up to `online_capacity` online rows. A batch is one uniform draw of row indices (numpy's RNG) over
    every row filled so far, so each source is sampled in proportion to its size."""

    def __init__(self, data: dict, online_capacity: int):
        self.n_offline = len(data["rewards"])
        self.n_online = 0
        self.obs_dim = data["observations"].shape[1]
        self.act_dim = data["actions"].shape[1]
        columns = [data["observations"], data["actions"], data["rewards"][:, None], data["next_observations"]]
        self.rows = np.zeros((self.n_offline + online_capacity, 2 * self.obs_dim + self.act_dim + 2), np.float32)
        self.rows[: self.n_offline] = np.concatenate([*columns, data["terminals"][:, None]], 1)

    def add_online(self, rows: np.ndarray) -> None:
        start = self.n_offline + self.n_online
        self.rows[start : start + len(rows)] = rows
        self.n_online += len(rows)

    def sample(self, n: int, device: torch.device) -> tuple:  # -> s, a, r, s', terminal (r and terminal: [n])
        idx = np.random.randint(0, self.n_offline + self.n_online, n)
        rows = torch.from_numpy(self.rows[idx]).to(device)
        o = self.obs_dim
        a = self.act_dim
        return rows[:, :o], rows[:, o : o + a], rows[:, o + a], rows[:, o + a + 1 : -1], rows[:, -1]


# =====================================================================================
# Networks: the generative model G_w (a conditional VAE), the perturbation model xi_phi, the twin critics.
# =====================================================================================
def mlp(sizes: list) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    """Conditional VAE G_w of the behaviour policy: encoder (s, a) -> N(mu, sigma) of z, decoder (s, z) -> a."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 750):
        super().__init__()
        self.latent_dim = 2 * act_dim
        self.encoder = mlp([obs_dim + act_dim, hidden, hidden, 2 * self.latent_dim])  # -> mu, log sigma
        self.decoder = mlp([obs_dim + self.latent_dim, hidden, hidden, act_dim])

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple:
        """-> reconstruction, mu, sigma of the posterior; z = mu + sigma eps (reparameterized)."""
        mu, log_std = self.encoder(torch.cat([obs, act], -1)).chunk(2, -1)
        std = log_std.clamp(-4, 15).exp()
        return self.decode(obs, mu + std * torch.randn_like(std)), mu, std

    def decode(self, obs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:  # generate: z ~ N(0, I) clipped to [-0.5, 0.5]
            z = torch.randn(*obs.shape[:-1], self.latent_dim, device=obs.device).clamp(-0.5, 0.5)
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))


class Perturbation(nn.Module):
    """xi_phi(s, a, Phi): returns the perturbed action (a + Phi tanh(f(s, a))).clamp(-1, 1)."""

    def __init__(self, obs_dim: int, act_dim: int, phi: float = 0.05):
        super().__init__()
        self.net = mlp([obs_dim + act_dim, 400, 300, act_dim])
        self.phi = phi

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return (act + self.phi * torch.tanh(self.net(torch.cat([obs, act], -1)))).clamp(-1.0, 1.0)


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


# =====================================================================================
# BCQ's losses and one gradient step (the same rule offline and online), the policy.
# =====================================================================================
TRAIN_COLUMNS = ("vae_loss", "critic_loss", "actor_loss", "q_mean")  # train.csv: the epoch's means


class Learner:
    """What BCQ trains: the VAE, the perturbation net ("actor") and twin critics, target copies of the last two,
    one Adam per network (they step one after another); and n of the policy, --select-samples."""

    STATE = ("vae", "actor", "actor_target", "critic", "critic_target", "vae_opt", "actor_opt", "critic_opt")

    def __init__(self, args: Args, obs_dim: int, act_dim: int, device: torch.device):
        self.device = device
        self.select_samples = args.select_samples
        self.vae = VAE(obs_dim, act_dim, args.vae_hidden).to(device)
        self.actor = Perturbation(obs_dim, act_dim, args.phi).to(device)
        self.critic = TwinQ(obs_dim, act_dim, (400, 300)).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=args.lr, fused=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.lr, fused=True)

    def state_dict(self) -> dict:  # a checkpoint's entries: the state_dict of each network and optimizer
        return {name: getattr(self, name).state_dict() for name in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            getattr(self, name).load_state_dict(state[name])


def vae_loss(vae: VAE, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """BCQ's VAE objective (the paper's supplementary material): reconstruction + 0.5 KL(N(mu, sigma) || N(0, I)),
    L = E[(a - a_hat)^2] + 0.5 E[-1/2 (1 + log sigma^2 - mu^2 - sigma^2)]."""
    recon, mu, std = vae(s, a)
    kl = -0.5 * (1 + std.pow(2).log() - mu.pow(2) - std.pow(2)).mean()
    return F.mse_loss(recon, a) + 0.5 * kl


def bcq_target(learner: Learner, r: torch.Tensor, s2: torch.Tensor, d: torch.Tensor, gamma: float, lam: float, n: int):
    """BCQ's soft clipped double-Q target over n actions a_i = a'_i + xi'(s', a'_i), a'_i ~ G_w(s'):
    y = r + gamma (1-d) max_i [lam min_j Q'_j(s', a_i) + (1 - lam) max_j Q'_j(s', a_i)]."""
    s2n = s2.repeat_interleave(n, 0)  # [B n, obs]: n copies of each next state, side by side
    q = learner.critic_target(s2n, learner.actor_target(s2n, learner.vae.decode(s2n)))  # [2, B n]
    q = lam * q.min(0).values + (1 - lam) * q.max(0).values
    return r + (1 - d) * gamma * q.view(-1, n).max(1).values


def update(learner: Learner, replay: UniformReplay, args: Args, phase: str) -> dict:
    """One BCQ step on a uniform batch of offline + online rows, the same in both phases, in the authors' order:
    VAE, critics (whose target uses the new VAE), perturbation net (on the new critics), target nets. No host sync."""
    s, a, r, s2, d = replay.sample(args.batch_size, learner.device)
    loss_vae = vae_loss(learner.vae, s, a)
    learner.vae_opt.zero_grad(set_to_none=True)
    loss_vae.backward()
    learner.vae_opt.step()
    with torch.no_grad():
        y = bcq_target(learner, r, s2, d, args.gamma, args.lam, args.target_samples)
    q = learner.critic(s, a)
    # the critics' TD regression onto the target: E[(Q_j(s,a) - y)^2], summed over the twins j = 1, 2
    critic_loss = (q - y).pow(2).mean(1).sum()
    learner.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    learner.critic_opt.step()
    # the perturbation objective: max_phi E[Q_1(s, a + xi_phi(s, a, Phi))], a ~ G_w(s); critics frozen for it
    with torch.no_grad():
        a_vae = learner.vae.decode(s)
    learner.critic.requires_grad_(False)
    actor_loss = -learner.critic(s, learner.actor(s, a_vae))[0].mean()
    learner.critic.requires_grad_(True)
    learner.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    learner.actor_opt.step()
    with torch.no_grad():  # target nets: theta' <- (1 - tau) theta' + tau theta
        for net, target in ((learner.critic, learner.critic_target), (learner.actor, learner.actor_target)):
            for param, target_param in zip(net.parameters(), target.parameters()):
                target_param.lerp_(param, args.tau)
    return {
        "vae_loss": loss_vae.detach(),
        "critic_loss": critic_loss.detach(),
        "actor_loss": actor_loss.detach(),
        "q_mean": q.detach().mean(),
    }


@torch.no_grad()
def act(learner: Learner, obs: np.ndarray, deterministic: bool) -> np.ndarray:
    """BCQ's policy (BCQ.py `select_action`): pi(s) = the best by Q_1 of a_i + xi(s, a_i, Phi), i = 1..n, with
    a_i = G_w(s, z_i) and n = learner.select_samples. obs [B, obs] -> [B, act]."""
    n = learner.select_samples
    o = torch.as_tensor(obs, dtype=torch.float32, device=learner.device).repeat_interleave(n, 0)  # [B n, obs]
    z = None  # fresh latents of the clipped prior
    if deterministic:  # the same n latents at every call (their own generator: the global RNG is not touched)
        z = torch.randn(n, learner.vae.latent_dim, generator=torch.Generator().manual_seed(0)).clamp(-0.5, 0.5)
        z = z.to(learner.device).repeat(len(obs), 1)
    a = learner.actor(o, learner.vae.decode(o, z))  # [B n, act]
    best = learner.critic(o, a)[0].view(-1, n).argmax(1)  # [B]
    return a.view(-1, n, a.shape[-1])[torch.arange(len(best), device=learner.device), best].cpu().numpy()


def main(args: Args) -> None:
    """Offline, then online: the algorithm box, identical in the three fine-tuning baselines."""
    args, ckpt = check_args(args)  # with --resume: the run's own Args and its checkpoint
    device, run_dir = set_up(args, SCRIPT)  # seeds python, numpy and torch
    data = load_dataset(args.env, args.dataset)
    learner = Learner(args, data["observations"].shape[1], data["actions"].shape[1], device)
    replay = UniformReplay(data, args.online_steps)  # the dataset's rows; the online rows join them
    env = gym.make(ENVS[args.env])
    episode = {"obs": env.reset(seed=args.seed)[0], "ep_return": 0.0, "ep_length": 0}
    counters = {"updates": 0, "env_steps": 0, "epoch": 0, "started": False, "evals": 0}
    if ckpt is not None:  # everything the run would hold had it not stopped
        restore_checkpoint(ckpt, learner, replay, env, episode, counters, run_dir)
    logger = Logger(args, run_dir, SCRIPT)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    print(f"run dir: {run_dir}\ncheckpoint: {ckpt_path}\n{replay.n_offline} offline transitions")
    try:
        # offline: the update rule on the dataset alone; an evaluation and a checkpoint every --eval-every updates
        stats = []
        for _ in tqdm(range(counters["updates"], args.offline_updates), "offline updates", mininterval=5, disable=None):
            stats.append(update(learner, replay, args, "offline"))
            counters["updates"] += 1
            last = counters["updates"] == args.offline_updates
            if counters["updates"] % args.log_every == 0 or last:  # means over the updates since the last log
                means = {key: float(sum(s[key] for s in stats)) / len(stats) for key in stats[0]}
                logger.scalars({f"offline/{key}": value for key, value in means.items()}, counters["updates"])
                stats = []
            if counters["updates"] % args.eval_every == 0 or last:
                evaluate_policy(args, learner, logger, counters, "offline")
                save_checkpoint(checkpoint_dict(args, learner, replay, env, episode, counters), ckpt_path)
        if not counters["started"]:  # online: the offline agent first, before any online step
            print(f"start: normalized score {evaluate_policy(args, learner, logger, counters, 'online'):.1f}")
            counters["started"] = True
            save_checkpoint(checkpoint_dict(args, learner, replay, env, episode, counters), ckpt_path)
        bar = tqdm(
            total=args.online_steps, initial=counters["env_steps"], desc="env steps", mininterval=5, disable=None
        )
        while counters["env_steps"] < args.online_steps:
            start = counters["env_steps"]
            # explore with the policy; the new transitions join the replay
            rows = explore(env, episode, learner, min(args.epoch_steps, args.online_steps - start), logger, start)
            replay.add_online(rows)
            counters["env_steps"] += len(rows)
            bar.update(len(rows))
            # as many updates as env steps (the first epoch: x first_epoch_multiplier), on offline + online rows
            n_updates = len(rows) * (args.first_epoch_multiplier if counters["epoch"] == 0 else 1)
            stats = [update(learner, replay, args, "online") for _ in range(n_updates)]
            counters["updates"] += n_updates
            counters["epoch"] += 1
            log_epoch(logger, stats, counters)
            bar.set_postfix(score=f"{evaluate_policy(args, learner, logger, counters, 'online'):.1f}")
            save_checkpoint(checkpoint_dict(args, learner, replay, env, episode, counters), ckpt_path)  # every epoch
        bar.close()
    finally:
        logger.close()
        env.close()
    print(f"done: {counters['updates']} updates, {counters['env_steps']} env steps\nrun dir: {run_dir}")
    print(f"checkpoint: {ckpt_path}")


# =====================================================================================
# The fine-tuning loop's helpers: exploration, evaluation, logging, argument checks, checkpoints.
# Identical in the three fine-tuning baselines (tests/test_common_sections.py).
# =====================================================================================
def explore(env: gym.Env, episode: dict, learner: Learner, steps: int, logger, env_steps: int) -> np.ndarray:
    """`steps` env steps acting with a sample of the policy -> their rows [s, a, r, s', terminal] (a time-limit end
    is not terminal). `episode`: the current observation, return and length, carried on."""
    rows = []
    for i in range(steps):
        a = act(learner, episode["obs"][None], deterministic=False)[0]
        next_obs, reward, terminated, truncated, _ = env.step(a)
        rows.append(np.concatenate([episode["obs"], a, [reward], next_obs, [float(terminated)]]))
        episode.update(obs=next_obs, ep_return=episode["ep_return"] + float(reward), ep_length=episode["ep_length"] + 1)
        if terminated or truncated:
            episode_stats = {
                "online/episodic_return": episode["ep_return"],
                "online/episodic_length": episode["ep_length"],
            }
            logger.scalars(episode_stats, env_steps + i + 1)
            episode.update(obs=env.reset()[0], ep_return=0.0, ep_length=0)
    return np.array(rows, dtype=np.float32)


def evaluate_policy(args: Args, learner: Learner, logger, counters: dict, phase: str) -> float:
    """The deterministic policy, from new start states each time -> evals.csv (tensorboard: against updates
    offline, env steps online); its normalized score."""
    seed = eval_seed(args.seed, counters["evals"])
    returns = evaluate(args.env, lambda obs: act(learner, obs, deterministic=True), args.eval_episodes, seed)
    counters["evals"] += 1
    step = counters["updates"] if phase == "offline" else counters["env_steps"]
    return logger.eval_row(phase, counters["updates"], counters["env_steps"], "policy", returns, args.env, step)


def check_args(args: Args) -> tuple:
    """One-line errors for bad arguments; with --resume: (the run's own Args, its checkpoint), else (args, None)."""
    for name, value in vars(args).items():  # every integer flag is a count or a size, --seed aside
        if type(value) is int and name not in ("seed", "offline_updates") and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive")
    if args.offline_updates < 0:
        raise InputError("--offline-updates must be >= 0")
    if not args.resume:
        return args, None
    # the run's own arguments; the device, tracking and the step budget may change
    args, ckpt = resume_run(args, FORMAT, keep=("device", "track", "online_steps", "resume", "run_dir"))
    if args.online_steps < ckpt["env_steps"]:
        raise InputError(f"{args.run_dir} is at {ckpt['env_steps']} env steps, past --online-steps {args.online_steps}")
    return args, ckpt


def checkpoint_dict(args: Args, learner: Learner, replay: UniformReplay, env, episode: dict, counters: dict) -> dict:
    """<run dir>/checkpoint.pt: all an exact --resume needs (the online rows; the dataset's are reloaded)."""
    return {
        "format": FORMAT,
        "args": dataclasses.asdict(args),
        **learner.state_dict(),
        "online": torch.from_numpy(replay.rows[replay.n_offline : replay.n_offline + replay.n_online].copy()),
        **counters,
        "rng": rng_state(env),
        "episode": {**episode, "obs": torch.from_numpy(np.array(episode["obs"]))},
    }


def restore_checkpoint(ckpt: dict, learner: Learner, replay: UniformReplay, env, episode: dict, counters, run_dir):
    """Load what `checkpoint_dict` saved; drop the csv rows written after it (they are redone)."""
    learner.load_state_dict(ckpt)
    replay.add_online(ckpt["online"].numpy())
    counters.update({k: ckpt[k] for k in counters})
    episode.update(ckpt["episode"], obs=ckpt["episode"]["obs"].numpy())
    set_rng_state(ckpt["rng"], env)
    trim_rows(os.path.join(run_dir, "evals.csv"), counters["evals"])
    trim_rows(os.path.join(run_dir, "train.csv"), counters["epoch"])  # one row per online epoch
    print(f"resumed at {counters['updates']} updates, {counters['env_steps']} env steps")


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
KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert", "policy-rollouts")
INTEGRATION = mujoco.mjtState.mjSTATE_INTEGRATION  # MuJoCo's full state for an exact --resume
EVAL_COLUMNS = "phase,updates,env_steps,policy,return_mean,return_std,normalized_score,wall_time_s".split(",")
HUB_FIX = "check the network or HF_ENDPOINT/HF_HUB_OFFLINE, or use a kind made by make_dataset.py or a .hdf5 file"


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


def load_dataset(env: str, dataset: str) -> dict:
    """Transitions (float32; terminal: 1 at true ends) of a kind, a Minari id (downloaded if not local) or a .hdf5."""
    dims = env_dims(env)
    if dataset.endswith(".hdf5"):
        if not os.path.exists(dataset):
            raise InputError(f"no such file: {dataset}")
        try:
            with h5py.File(dataset, "r") as f:
                data = {k: f[k][()] for k in ("observations", "actions", "rewards", "terminals")}
                if "next_observations" in f:
                    data["next_observations"] = f["next_observations"][()]
                else:  # as D4RL's qlearning_dataset: s' is the next row; a row ending by timeout has none
                    keep = np.flatnonzero(~f.get("timeouts", np.zeros(len(data["rewards"])))[:-1].astype(bool))
                    data = {k: v[keep] for k, v in data.items()} | {"next_observations": data["observations"][keep + 1]}
        except (OSError, KeyError) as e:
            raise InputError(f"{dataset} is not a D4RL-layout hdf5 file ({first_line(e)})") from e
    else:
        ds_id = f"off2on/{env}/{dataset}-v0" if dataset in KINDS else dataset
        if dataset in KINDS and ds_id not in minari.list_local_datasets():
            make = f"python make_dataset.py --env {env} --kinds {dataset}"
            raise InputError(f"no local dataset {ds_id}; make it with: {make}")
        if "/" not in ds_id:
            raise InputError(f"unknown dataset {dataset!r}; use one of {', '.join(KINDS)}, a Minari id or a .hdf5 path")
        logging.getLogger("huggingface_hub.utils._http").setLevel(logging.ERROR)  # a download: no line per retry
        try:
            episodes = list(minari.load_dataset(ds_id, download=True).iterate_episodes())
            data = {  # an episode has T + 1 observations and T actions; no episode: np.concatenate fails
                "observations": np.concatenate([ep.observations[:-1] for ep in episodes]),
                "next_observations": np.concatenate([ep.observations[1:] for ep in episodes]),
                "actions": np.concatenate([ep.actions for ep in episodes]),
                "rewards": np.concatenate([ep.rewards for ep in episodes]),
                "terminals": np.concatenate([ep.terminations for ep in episodes]),
            }
        except Exception as e:  # no hub, an unknown id, a corrupt or empty dataset: one line, not a traceback
            raise InputError(f"could not load Minari dataset {ds_id}: {first_line(e).rstrip('.')}; {HUB_FIX}") from e
    data = {k: np.asarray(v, dtype=np.float32) for k, v in data.items()}
    data.update(rewards=data["rewards"].reshape(-1), terminals=data["terminals"].reshape(-1))  # D4RL's may be [n, 1]
    if (data["observations"].shape[1], data["actions"].shape[1]) != dims:
        got = f"{data['observations'].shape[1]}/{data['actions'].shape[1]}"
        raise InputError(f"dataset {dataset!r} has obs/action dims {got} but {ENVS[env]} has {dims[0]}/{dims[1]}")
    return data


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

"""Off2On, the online phase: SAC fine-tuning of N offline CQL agents through their moment-matched ensemble
policy, on one replay of offline + online transitions prioritized by a learned density ratio (balanced replay).
Lee, Seo, Lee, Abbeel, Shin, "Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic
Q-Ensemble", CoRL 2021, arXiv 2107.00591. SAC (Haarnoja et al. 2018, arXiv 1812.05905): equations cited in the code.
Paper -> code (components named as in the paper; "authors' code": github.com/shlee94/Off2OnRL, rlkit/examples/ours.py):
  pessimistic Q-ensemble: N CQL(H) agents trained offline            -> off2on_cql_ensemble.py, load_offline_ensemble
  ensemble policy: the Gaussian that matches the members' mixture, mu = mean_i mu_i,
      sigma^2 = mean_i(sigma_i^2 + mu_i^2) - mu^2, squashed by tanh         -> ensemble_moments, ensemble_policy, act
  SAC losses of the ensemble: critic i regresses on r + gamma (min(Q1_i, Q2_i)(s', a') - alpha log pi(a'|s')),
      a' ~ pi; actor: alpha log pi(a|s) - mean_i min(Q1_i, Q2_i)(s, a)                                  -> sac_losses
  balanced replay: density ratio w(s, a) ~ d_online / d_offline from the variational form
      of the Jensen-Shannon divergence, on uniform offline and online batches        -> density_ratio_net, ratio_loss
  priority of a sampled transition: w^(1/T) / mean_offline w^(1/T), clipped (authors' code)     -> priorities, update
  online rows' priority (authors' code): the running max, at first giving 1,000 rows --init-online-fraction -> Replay
  schedule: epochs of --epoch-steps env steps, each then as many updates (first x --first-epoch-multiplier)   -> main
Run: python off2on_finetune.py --env hopper --dataset medium-replay [--replay uniform|online-only] [--members K]
(resume: --run-dir D --resume). Reads --checkpoint; writes args.json, evals.csv, train.csv, events, checkpoint.pt.
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

import gymnasium as gym
import h5py
import minari
import mujoco
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SCRIPT = "off2on_finetune"
FORMAT = "off2on-finetune/2"


@dataclasses.dataclass
class Args:
    seed: int = 1  # seed of python, numpy, torch and the envs (1, as off2on_cql_ensemble.py: its default file)
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    track: bool = False  # log to Weights & Biases as well as tensorboard
    wandb_project: str = "off2on"  # wandb project name (with --track)
    run_dir: str = ""  # run directory; empty = runs/<env>__<dataset>__off2on_finetune__seed<seed>__<unix time>
    resume: bool = False  # continue exactly from <run dir>/checkpoint.pt (needs --run-dir; --online-steps may grow)
    env: str = "hopper"  # hopper, halfcheetah or walker2d (Gymnasium MuJoCo v5)
    dataset: str = "medium-replay"  # a kind (local Minari off2on/<env>/<kind>-v0), a Minari id, or a D4RL .hdf5
    checkpoint: str = ""  # offline ensemble file; empty = checkpoints/<env>__<dataset>__cql_ensemble__seed<seed>.pt
    members: int = 0  # use the first K members of the ensemble file (0 = all)
    replay: str = "balanced"  # balanced (by density ratio), uniform (all rows) or online-only (online rows)
    online_steps: int = 250_000  # environment steps online (the paper: 250k)
    epoch_steps: int = 1_000  # env steps per epoch; each epoch is followed by as many updates
    first_epoch_multiplier: int = 5  # x updates after the first epoch (5: the authors' README; their default 10)
    eval_every: int = 1_000  # evaluate the deterministic ensemble policy every this many env steps (whole epochs)
    eval_episodes: int = 5  # episodes per evaluation
    batch_size: int = 256  # RL minibatch; the density-ratio step uses as many online and as many offline rows
    lr: float = 3e-4  # Adam learning rate of actors, critics, alpha and the density-ratio net
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # target critic Polyak rate
    priority_clip: tuple[float, float] = (1e-3, 1e3)  # priorities are clipped to this range
    temperature: float = 5.0  # T in the priority w^(1/T) / mean_offline(w^(1/T))
    init_online_fraction: float = 0.75  # f of Replay's first priority (0.75: the authors' README; their default 0.5)
    compile: bool = False  # torch.compile the SAC losses (mode reduce-overhead: on CUDA, as CUDA graphs)
    tf32: bool = False  # TensorFloat-32 matmuls on CUDA: faster, less exact (10-bit mantissas, float32 sums)


# =====================================================================================
# Balanced replay: one buffer of offline + online transitions, sampled by priority through a sum-tree.
# =====================================================================================
class SumTree:  # binary, in one float64 array (children of i: 2i+1, 2i+2); batched, one numpy op per level
    def __init__(self, capacity: int):
        self.depth = max(1, math.ceil(math.log2(capacity)))
        self.start = 2**self.depth - 1
        self.nodes = np.zeros(2 * self.start + 1)

    def update(self, idx: np.ndarray, priorities: np.ndarray) -> None:  # repeated index: its last value wins
        keep = len(idx) - 1 - np.unique(idx[::-1], return_index=True)[1]
        node = idx[keep] + self.start
        self.nodes[node] = priorities[keep]
        for _ in range(self.depth):  # parents within one level are independent: repeats are harmless
            node = (node - 1) // 2
            self.nodes[node] = self.nodes[2 * node + 1] + self.nodes[2 * node + 2]  # exact sums: no drift

    def sample(self, batch: int) -> np.ndarray:  # stratified: a uniform draw in each of `batch` slices of the total
        u = (np.arange(batch) + np.random.random(batch)) * (self.nodes[0] / batch)
        node = np.zeros(batch, np.int64)
        for _ in range(self.depth):  # go right when the draw passes the left sum (never into an empty subtree)
            left = 2 * node + 1
            right = (u >= self.nodes[left]) & (self.nodes[left + 1] > 0)
            u = np.where(right, u - self.nodes[left], u)
            node = left + right
        return node - self.start


class Replay:  # every transition a row [s, a, r, s', terminal] of one tensor: the dataset's, then online ones
    def __init__(self, data: dict, online_capacity: int, device: torch.device, init_online_fraction: float):
        self.n_offline = len(data["rewards"])
        self.n_online = 0
        self.obs_dim = data["observations"].shape[1]
        self.act_dim = data["actions"].shape[1]
        columns = [data["observations"], data["actions"], data["rewards"][:, None], data["next_observations"]]
        rows = torch.from_numpy(np.concatenate([*columns, data["terminals"][:, None]], 1)).to(device, torch.float32)
        self.rows = torch.cat([rows, rows.new_zeros(online_capacity, rows.shape[1])])
        self.tree = SumTree(self.n_offline + online_capacity)
        self.tree.update(np.arange(self.n_offline), np.ones(self.n_offline))
        # new online rows enter at the running max priority; at first p, with 1000 p / (n_offline + 1000 p) = f
        self.max_priority = self.n_offline * init_online_fraction / ((1 - init_online_fraction) * 1000)

    def add_online(self, rows: np.ndarray) -> None:
        i = self.n_offline + self.n_online
        self.rows[i : i + len(rows)] = torch.from_numpy(rows).to(self.rows.device)
        self.tree.update(np.arange(i, i + len(rows)), np.full(len(rows), self.max_priority))
        self.n_online += len(rows)

    def split(self, rows: torch.Tensor) -> tuple:  # -> s, a, r, s', terminal (views; r and terminal are [B])
        s, a, r, s2, d = rows.split([self.obs_dim, self.act_dim, 1, self.obs_dim, 1], dim=1)
        return s, a, r[:, 0], s2, d[:, 0]

    def sample(self, n: int, mode: str) -> tuple:  # -> (row indices, rows): by priority, or uniform over some rows
        if mode == "balanced":  # sum-tree indices (numpy): the one host->device copy
            idx = self.tree.sample(n)
            return idx, self.rows[torch.from_numpy(idx).to(self.rows.device)]
        n_rows = self.n_offline + self.n_online
        lo, hi = {"uniform": (0, n_rows), "online-only": (self.n_offline, n_rows), "offline": (0, self.n_offline)}[mode]
        idx = torch.randint(lo, hi, (n,), device=self.rows.device)
        return idx, self.rows[idx]


# =====================================================================================
# Networks: E independent MLPs, one batched matmul per layer; identical in both scripts (the ensemble file's nets).
# =====================================================================================
LOG_STD_MIN = -20.0
LOG_STD_MAX = 2.0


class VectorizedLinear(nn.Module):  # E independent linear layers: x [E, B, in] -> [E, B, out]; weight [E, in, out]
    def __init__(self, in_features: int, out_features: int, ensemble_size: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # each member: nn.Linear's default init, drawn independently
        self.weight = nn.Parameter(torch.empty(ensemble_size, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble_size, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def mlp(sizes: list, n: int) -> nn.Sequential:  # n MLPs; ReLUs in place (a layer's backward needs x, not its output)
    layers = [VectorizedLinear(fan_in, fan_out, n) for fan_in, fan_out in zip(sizes, sizes[1:])]
    return nn.Sequential(*[module for layer in layers for module in (layer, nn.ReLU(inplace=True))][:-1])


class EnsembleActor(nn.Module):  # N tanh-Gaussian policies: obs [N, B, obs] -> pre-tanh mean, log_std [N, B, act]
    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int = 256):
        super().__init__()
        self.members = n
        self.net = mlp([obs_dim, hidden, hidden], n)
        self.mu = VectorizedLinear(hidden, act_dim, n)
        self.log_std = VectorizedLinear(hidden, act_dim, n)

    def forward(self, obs: torch.Tensor):
        h = self.net(obs).relu_()
        return self.mu(h), self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)


class EnsembleCritic(nn.Module):  # 2N Q-nets, row i member i's Q1, row N+i its Q2: (obs, act) [2N, B, *] -> Q [2N, B]
    def __init__(self, obs_dim: int, act_dim: int, n: int, hidden: int = 256):
        super().__init__()
        self.net = mlp([obs_dim + act_dim, hidden, hidden, 1], 2 * n)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, act], -1)).squeeze(-1)


def frozen_q(critic: nn.Module, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:  # with detached weights
    return torch.func.functional_call(critic, {k: v.detach() for k, v in critic.named_parameters()}, (obs, act))


# =====================================================================================
# Density ratio and priorities, the ensemble policy, the SAC losses, one update.
# =====================================================================================
def density_ratio_net(in_dim: int, hidden: int = 256) -> nn.Sequential:
    """w(s, a) >= 0 [B, 1] ~ d_online / d_offline: the authors' weight net (rlkit ConcatMlp, 2x256 ReLU, ReLU output,
    U(+-1/sqrt(fan)) hidden weights with fan = out_features, U(+-3e-3) last weights, last bias 1): w = 1 +- 0.003."""
    layers = [nn.Linear(in_dim, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)]
    for layer, bound in zip(layers, (1.0 / math.sqrt(hidden), 1.0 / math.sqrt(hidden), 3e-3)):
        nn.init.uniform_(layer.weight, -bound, bound)
        nn.init.constant_(layer.bias, 1.0 if layer is layers[-1] else 0.0)
    return nn.Sequential(*[module for layer in layers for module in (layer, nn.ReLU())])


def ratio_loss(w_off: torch.Tensor, w_on: torch.Tensor) -> torch.Tensor:
    """The paper's density-ratio objective, the variational form of the Jensen-Shannon divergence: L(w) = E_off[-log(2
    /(w+1))] - E_on[log(2w/(w+1))], minimized at w = d_on/d_off (+1e-10 keeps log finite at 0, as the authors')."""
    return (-torch.log(2.0 / (w_off + 1.0) + 1e-10)).mean() - torch.log(2.0 * w_on / (w_on + 1.0) + 1e-10).mean()


def priorities(w_rl: torch.Tensor, w_off: torch.Tensor, temperature: float, lo: float, hi: float) -> torch.Tensor:
    return (w_rl.pow(1.0 / temperature) / (w_off.pow(1.0 / temperature).mean() + 1e-10)).clamp(lo, hi)


def ensemble_moments(mu_i: torch.Tensor, log_std_i: torch.Tensor):  # -> the ensemble's pre-tanh (mu, sigma)
    mu = mu_i.mean(0)  # of the members' N(mu_i, sigma_i^2), mu_i and log sigma_i [N, B, A]
    var = (2 * log_std_i).exp().mean(0) + (mu_i - mu).pow(2).mean(0)  # sigma^2, written without cancellation
    return mu, var.sqrt().clamp(math.exp(LOG_STD_MIN), math.exp(LOG_STD_MAX))


def ensemble_policy(actor: EnsembleActor, obs: torch.Tensor):
    """Reparameterized sample of the tanh-squashed ensemble policy at obs [B, obs] -> a [B, A], log pi [B]:
    u = mu + sigma eps, a = tanh(u), log pi(a|s) = log N(u; mu, sigma^2) - sum log(1 - tanh(u)^2) (SAC Eq. 26)."""
    mu, std = ensemble_moments(*actor(obs.expand(actor.members, *obs.shape)))
    eps = torch.randn_like(mu)
    u = mu + std * eps
    log_normal = (-0.5 * eps.pow(2) - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_det = (2 * (math.log(2) - u - nn.functional.softplus(-2 * u))).sum(-1)  # = log(1 - tanh(u)^2), stable
    return torch.tanh(u), log_normal - log_det


class Learner:  # the offline ensemble's actors and critics, target critics, one alpha, the density-ratio net
    STATE = ("actor", "critic", "critic_target", "ratio", "sac_opt", "ratio_opt")  # the state_dicts it saves

    def __init__(self, actor: EnsembleActor, critic: EnsembleCritic, lr: float):
        self.actor = actor
        self.critic = critic
        self.critic_target = copy.deepcopy(critic).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=critic.net[0].weight.device, requires_grad=True)
        self.ratio = density_ratio_net(critic.net[0].weight.shape[1]).to(self.log_alpha.device)  # input (s, a)
        self.sac_opt = torch.optim.Adam([*actor.parameters(), *critic.parameters(), self.log_alpha], lr=lr, fused=True)
        self.ratio_opt = torch.optim.Adam(self.ratio.parameters(), lr=lr, fused=True)


def sac_losses(learner: Learner, batch: tuple, gamma: float) -> tuple:
    """SAC losses of the ensemble on one batch (no CQL term online); critic rows [0:N]: the members' Q1, [N:2N] Q2."""
    s, a, r, s2, d = batch
    n = learner.actor.members
    alpha = learner.log_alpha.exp().detach()
    # member i's TD target (the target of SAC Eq. 5, clipped double Q), one shared next action a' ~ pi_ens(s'):
    # y_i = r + (1-d) gamma [min(Q1'_i, Q2'_i)(s', a') - alpha log pi_ens(a'|s')]
    with torch.no_grad():
        a2, logp2 = ensemble_policy(learner.actor, s2)
        q_next = learner.critic_target(s2.expand(2 * n, *s2.shape), a2.expand(2 * n, *a2.shape))  # [2N, B]
        y = r + (1 - d) * gamma * (torch.min(q_next[:n], q_next[n:]) - alpha * logp2)  # [N, B]
    q = learner.critic(s.expand(2 * n, *s.shape), a.expand(2 * n, *a.shape))
    # critic loss (SAC Eq. 5 without its 1/2, as rlkit): summed over members and Q1, Q2, mean over the batch
    critic_loss = (q - y.repeat(2, 1)).pow(2).mean(1).sum()
    # actor loss (SAC Eq. 7 with the ensemble): E[alpha log pi_ens(a|s) - (1/N) sum_i min(Q1_i, Q2_i)(s, a)],
    # a ~ pi_ens(s) reparameterized; the critics are frozen for this forward, so it gives them no gradient
    a_pi, logp_pi = ensemble_policy(learner.actor, s)
    q_pi = frozen_q(learner.critic, s.expand(2 * n, *s.shape), a_pi.expand(2 * n, *a_pi.shape))
    actor_loss = (alpha * logp_pi - torch.min(q_pi[:n], q_pi[n:]).mean(0)).mean()
    # temperature loss (SAC Eq. 18): -log alpha (log pi + target entropy), target entropy -|A|
    alpha_loss = -(learner.log_alpha * (logp_pi.detach() - a.shape[1])).mean()
    stats = {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "alpha": alpha}
    stats.update(q_mean=q.detach().mean(), entropy=-logp_pi.detach().mean())
    return critic_loss, actor_loss, alpha_loss, stats


def update(learner: Learner, replay: Replay, args: Args, loss_fn=sac_losses) -> dict:
    """One gradient step: density ratio, priorities of the sampled batch, SAC (host transfers: indices, priorities)."""
    idx, rows = replay.sample(args.batch_size, args.replay)
    stats = {"online_fraction": torch.as_tensor(idx >= replay.n_offline).float().mean()}  # idx: numpy if balanced
    if args.replay == "balanced":  # density-ratio step on uniform offline and online (s, a) batches
        sa = replay.obs_dim + replay.act_dim  # rows start with (s, a)
        x = torch.cat([replay.sample(args.batch_size, part)[1] for part in ("offline", "online-only")])[:, :sa]
        w_off, w_on = learner.ratio(x).squeeze(-1).chunk(2)
        loss = ratio_loss(w_off, w_on)
        learner.ratio_opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # priorities from the net before its step, as the authors' code
            prio = priorities(learner.ratio(rows[:, :sa]).squeeze(-1), w_off, args.temperature, *args.priority_clip)
        learner.ratio_opt.step()
        replay.tree.update(idx, prio := prio.cpu().numpy())  # the one transfer out per update, reused below
        replay.max_priority = max(replay.max_priority, float(prio.max()))  # running max, for new online rows
        stats.update(ratio_loss=loss.detach(), w_offline_mean=w_off.detach().mean(), w_online_mean=w_on.detach().mean())
    critic_loss, actor_loss, alpha_loss, sac_stats = loss_fn(learner, replay.split(rows), args.gamma)
    learner.sac_opt.zero_grad(set_to_none=True)
    (critic_loss + actor_loss + alpha_loss).backward()  # a loss reaches only its own parameters: one Adam = one per net
    learner.sac_opt.step()
    with torch.no_grad():  # target critics: theta' <- (1 - tau) theta' + tau theta
        for p, tp in zip(learner.critic.parameters(), learner.critic_target.parameters()):
            tp.lerp_(p, args.tau)
    return {**stats, **sac_stats}


@torch.no_grad()
def act(actor: EnsembleActor, obs: np.ndarray, deterministic: bool) -> np.ndarray:  # -> tanh(mu), or a sample
    o = torch.as_tensor(obs, dtype=torch.float32, device=actor.mu.weight.device)
    if deterministic:
        return torch.tanh(ensemble_moments(*actor(o.expand(actor.members, *o.shape)))[0]).cpu().numpy()
    return ensemble_policy(actor, o)[0].cpu().numpy()


def explore(env: gym.Env, episode: dict, actor: EnsembleActor, steps: int, logger, start: int) -> np.ndarray:
    """`steps` env steps (after `start`) with samples of the ensemble policy -> rows [s, a, r, s', terminal]."""
    rows = []
    for i in range(steps):
        a = act(actor, episode["obs"][None], deterministic=False)[0]
        next_obs, reward, terminated, truncated, _ = env.step(a)
        rows.append(np.concatenate([episode["obs"], a, [reward], next_obs, [float(terminated)]]))  # not at time limits
        episode.update(obs=next_obs, ep_return=episode["ep_return"] + float(reward), ep_length=episode["ep_length"] + 1)
        if terminated or truncated:
            logger.scalars({f"online/episodic_{k}": episode[f"ep_{k}"] for k in ("return", "length")}, start + i + 1)
            episode.update(obs=env.reset()[0], ep_return=0.0, ep_length=0)
    return np.array(rows, dtype=np.float32)


def main(args: Args) -> None:
    args, ckpt = check_args(args)  # with --resume: the run's own Args and its checkpoint
    device, run_dir = set_up(args, SCRIPT)  # seeds python, numpy and torch
    data = load_dataset(args.env, args.dataset)
    learner = Learner(*load_offline_ensemble(args, data, device), args.lr)  # the pessimistic Q-ensemble
    replay = Replay(data, args.online_steps, device, args.init_online_fraction)  # offline rows at priority 1
    env = gym.make(ENVS[args.env])
    episode = {"obs": env.reset(seed=args.seed)[0], "ep_return": 0.0, "ep_length": 0}
    counters = {"env_steps": 0, "updates": 0, "epoch": 0, "evals": 0}
    if ckpt is not None:  # everything the run would hold had it not stopped
        restore_checkpoint(ckpt, learner, replay, env, episode, counters, run_dir)
    logger = Logger(args, run_dir, SCRIPT)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    print(f"run dir: {run_dir}\ncheckpoint: {ckpt_path}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    loss_fn = torch.compile(sac_losses, mode="reduce-overhead") if args.compile else sac_losses  # CUDA graphs on CUDA
    if counters["env_steps"] == 0:  # the offline ensemble, before any online step
        evaluate_policy(args, learner, logger, counters)
    bar = tqdm(total=args.online_steps, initial=counters["env_steps"], desc=SCRIPT, unit="env step", disable=None)
    try:
        for start in range(counters["env_steps"], args.online_steps, args.epoch_steps):  # epochs
            end = min(start + args.epoch_steps, args.online_steps)
            replay.add_online(explore(env, episode, learner.actor, end - start, logger, start))  # at the max priority
            n_updates = (end - start) * (args.first_epoch_multiplier if counters["epoch"] == 0 else 1)
            sums = {}  # the updates' statistics, summed on the device (read back once per epoch, in log_epoch)
            for _ in range(n_updates):
                sums = {key: sums.get(key, 0) + value for key, value in update(learner, replay, args, loss_fn).items()}
            counters.update(env_steps=end, updates=counters["updates"] + n_updates, epoch=counters["epoch"] + 1)
            log_epoch(logger, sums, n_updates, counters)
            bar.update(end - start)
            if end // args.eval_every > start // args.eval_every or end == args.online_steps:
                evaluate_policy(args, learner, logger, counters)
            save_checkpoint(checkpoint_dict(args, learner, replay, env, episode, counters), ckpt_path)  # every epoch
    finally:
        bar.close()
        logger.close()
        env.close()
    print(f"done: {counters['updates']} updates\nrun dir: {run_dir}\ncheckpoint: {ckpt_path}")


# =====================================================================================
# This script's plumbing: argument checks, the offline ensemble file, evaluation, logging, checkpoints.
# =====================================================================================
TRAIN_COLUMNS = ("q_mean", "alpha", "entropy", "online_fraction", "ratio_loss", "w_offline_mean", "w_online_mean")
POSITIVE = ("online_steps", "epoch_steps", "first_epoch_multiplier", "eval_every", "eval_episodes", "batch_size")


def check_args(args: Args) -> tuple:  # -> with --resume: (the run's own Args, its checkpoint), else (args, None)
    keep = ("device", "track", "compile", "tf32", "online_steps", "resume", "run_dir")  # what --resume may change
    args, ckpt = resume_run(args, FORMAT, keep) if args.resume else (args, None)  # --resume: the run's own Args
    done = ckpt["env_steps"] if ckpt else 0
    checks = [(name, getattr(args, name) > 0, "must be positive") for name in POSITIVE]
    checks += [("replay", args.replay in ("balanced", "uniform", "online-only"), "use balanced, uniform, online-only")]
    checks += [("init_online_fraction", 0 < args.init_online_fraction < 1, "must be in (0, 1)")]
    checks += [("online_steps", args.online_steps >= done, f"the run in --run-dir is at {done} env steps")]
    for name, ok, fix in checks:
        if not ok:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: {fix}")
    return args, ckpt


def load_offline_ensemble(args: Args, data: dict, device: torch.device) -> tuple:  # -> (actor, critic), K members
    path = args.checkpoint or f"checkpoints/{args.env}__{dataset_slug(args.dataset)}__cql_ensemble__seed{args.seed}.pt"
    make = f"python off2on_cql_ensemble.py --env {args.env} --dataset {args.dataset} --seed {args.seed}"
    ckpt = load_checkpoint(path, make)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "off2on-cql-ensemble/1":
        raise InputError(f"{path} is not an off2on-cql-ensemble/1 file; make one with: {make}")
    dims = (data["observations"].shape[1], data["actions"].shape[1])
    if (ckpt.get("env"), ckpt.get("obs_dim"), ckpt.get("act_dim")) != (args.env, *dims):
        made_for = f"{ckpt.get('env')!r} (obs/action dims {ckpt.get('obs_dim')}/{ckpt.get('act_dim')})"
        raise InputError(f"{path} was made for {made_for}, not {args.env} ({dims[0]}/{dims[1]}); use one made for it")
    n = ckpt["members"]
    k = args.members or n
    if not 1 <= k <= n:
        raise InputError(f"--members {args.members}: the checkpoint has {n} members; use 1..{n} (0 = all)")
    actor = EnsembleActor(*dims, k, ckpt["hidden"]).to(device)
    critic = EnsembleCritic(*dims, k, ckpt["hidden"]).to(device)
    try:  # the first K members: actor rows [0:K]; critic rows [0:K] (Q1) and [N:N+K] (Q2)
        actor.load_state_dict({key: v[:k] for key, v in ckpt["actor"].items()})
        critic.load_state_dict({key: torch.cat([v[:k], v[n : n + k]]) for key, v in ckpt["critic"].items()})
    except (RuntimeError, KeyError) as e:
        raise InputError(f"{path}: weights do not match its declared shapes ({first_line(e)[:99]})") from e
    return actor, critic


def evaluate_policy(args: Args, learner: Learner, logger, counters: dict) -> None:  # tanh(mu) -> evals.csv, stdout
    seed = eval_seed(args.seed, counters["evals"])
    returns = evaluate(args.env, lambda obs: act(learner.actor, obs, deterministic=True), args.eval_episodes, seed)
    counters["evals"] += 1
    steps = counters["env_steps"]
    score = logger.eval_row("online", counters["updates"], steps, "ensemble", returns, args.env, steps)
    tqdm.write(f"{steps} env steps: normalized score {score:.1f}")  # above the progress bar
    sys.stdout.flush()


def log_epoch(logger, sums: dict, n_updates: int, counters: dict) -> None:  # epoch means -> tensorboard, train.csv
    means = {key: float(total) / n_updates for key, total in sums.items()}
    logger.scalars({f"online/{key}": value for key, value in means.items()}, counters["env_steps"])
    logger.csv_row("train.csv", {k: {**counters, **means}.get(k, "") for k in ("env_steps", "updates", *TRAIN_COLUMNS)})


def checkpoint_dict(args, learner, replay, env, episode: dict, counters: dict) -> dict:  # all an exact --resume needs
    n_rows = replay.n_offline + replay.n_online
    leaves = replay.tree.nodes[replay.tree.start : replay.tree.start + n_rows]
    ckpt = {"format": FORMAT, "args": dataclasses.asdict(args), "members": learner.actor.members, **counters}
    ckpt.update({name: getattr(learner, name).state_dict() for name in Learner.STATE})
    ckpt.update(log_alpha=learner.log_alpha.detach().cpu(), online=replay.rows[replay.n_offline : n_rows].cpu())
    ckpt.update(priorities=torch.from_numpy(leaves.copy()), max_priority=replay.max_priority, rng=rng_state(env))
    return {**ckpt, "episode": {**episode, "obs": torch.from_numpy(np.array(episode["obs"]))}}


def restore_checkpoint(ckpt: dict, learner, replay, env, episode: dict, counters: dict, run_dir: str) -> None:
    for name in Learner.STATE:
        getattr(learner, name).load_state_dict(ckpt[name])
    learner.log_alpha.data.copy_(ckpt["log_alpha"])
    replay.add_online(ckpt["online"].numpy())
    replay.tree.update(np.arange(len(ckpt["priorities"])), ckpt["priorities"].numpy())
    replay.max_priority = ckpt["max_priority"]
    counters.update({k: ckpt[k] for k in counters})
    episode.update(ckpt["episode"], obs=ckpt["episode"]["obs"].numpy())
    set_rng_state(ckpt["rng"], env)
    for name, rows in (("evals.csv", counters["evals"]), ("train.csv", counters["epoch"])):  # later rows are redone
        if os.path.exists(path := os.path.join(run_dir, name)):
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

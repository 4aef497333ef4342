"""Off2On, the offline phase: N conservative Q-learning agents, CQL(H), trained on a dataset as one vectorized
ensemble (own initialization and minibatches per member; layers stacked as [N, in, out] weights, one batched matmul
per layer): the pessimistic Q-ensemble that off2on_finetune.py fine-tunes online. Lee, Seo, Lee, Abbeel, Shin,
"Offline-to-Online Reinforcement Learning via Balanced Replay and Pessimistic Q-Ensemble", CoRL 2021, arXiv 2107.00591.
Paper -> code ("authors' code": github.com/shlee94/Off2OnRL, rlkit with its CQL settings for gym):
  pessimistic Q-ensemble: N independent CQL(H) agents, trained at once                       -> Agent, losses, update
  CQL(H) critic loss (Kumar et al. 2020, arXiv 2006.04779, Eq. 4):
      alpha' (E_s[log sum_a exp Q(s, a)] - E_(s,a)~D[Q(s, a)]) + the TD error                               -> losses
  its log sum_a exp Q by importance sampling over uniform, pi(.|s) and pi(.|s') actions
      (CQL Appendix F; authors' code: min_q_version 3)                                               -> cql_logsumexp
  SAC (Haarnoja et al. 2018, arXiv 1812.05905): TD target (Eq. 5) without the entropy term (authors'
      code), actor (Eq. 7), temperature (Eq. 18), tanh log-density (Eq. 26); a behaviour-cloning
      warm start of the actor (authors' code)                                                -> losses, tanh_log_prob
  ensemble policy at evaluation: tanh(mean_i mu_i), the mean of off2on_finetune.py's                 -> eval_policies
Run: python off2on_cql_ensemble.py --env hopper --dataset medium-replay (1M updates; resume: --resume --run-dir D).
With --import-official DIR --env halfcheetah --dataset medium it converts the authors' five released agents instead
(DIR: the folder rlkit/data/cql/ of github.com/shlee94/Off2OnRL, one <task>_seed<k>/ folder per agent).
Ensemble file (the hand-off to off2on_finetune.py; written atomically at the end to --export-path, by default
checkpoints/<env>__<dataset_slug>__cql_ensemble__seed<seed>.pt, or ...__official.pt by the import), a dict:
    format         "off2on-cql-ensemble/1"
    env, dataset   str: the --env and --dataset it was trained on
    obs_dim, act_dim, members (N), hidden: int
    actor          EnsembleActor(obs_dim, act_dim, N, hidden).state_dict()
    critic         EnsembleCritic(obs_dim, act_dim, N, hidden).state_dict(): row i = Q1 of member i, N+i its Q2
    critic_target  the target critics, same layout
    log_alpha      tensor [N], log of each member's SAC temperature (zeros for imported agents)
    updates        int, gradient steps done
VectorizedLinear stores weight [E, in, out], bias [E, 1, out]. The run's checkpoint.pt (every --checkpoint-every
updates) adds actor_opt, critic_opt, alpha_opt (Adam state dicts), rng and args: all an exact --resume needs.
"""

import copy
import ctypes
import dataclasses
import glob
import json
import logging
import math
import os
import random
import re
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

SCRIPT = "cql_ensemble"
FORMAT = "off2on-cql-ensemble/1"


@dataclasses.dataclass
class Args:
    seed: int = 1  # seed of the run (the members' initializations and minibatches are independent draws from it)
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    track: bool = False  # log to Weights & Biases (works with WANDB_MODE=offline)
    wandb_project: str = "off2on"  # wandb project
    run_dir: str = ""  # run directory ("" = runs/<env>__<dataset>__cql_ensemble__seed<seed>__<unix time>)
    resume: bool = False  # continue --run-dir's run with its saved args but --device/track/compile/tf32/offline-updates
    env: str = "hopper"  # hopper, halfcheetah or walker2d (MuJoCo v5 env used for evaluation)
    dataset: str = "medium-replay"  # a kind (local Minari dataset off2on/<env>/<kind>-v0), a Minari id, or a .hdf5
    members: int = 5  # N, CQL agents in the ensemble
    hidden: int = 256  # width of the 2 hidden layers of every actor and critic
    offline_updates: int = 1_000_000  # gradient steps (each one updates every member; may grow on --resume)
    batch_size: int = 256  # minibatch size per member
    gamma: float = 0.99  # discount
    tau: float = 5e-3  # Polyak rate of the target critics
    policy_lr: float = 1e-4  # actor learning rate (Adam)
    q_lr: float = 3e-4  # critic learning rate (Adam)
    alpha_lr: float = 1e-4  # learning rate of log alpha (the authors' code uses the policy lr)
    target_entropy: float | None = None  # entropy target of the automatic temperature tuning (None = -|A|)
    cql_alpha: float = 5.0  # alpha': weight of the CQL regularizer, fixed (no Lagrange); 5.0 for the gym tasks
    cql_samples: int = 10  # actions sampled per state from each of uniform, pi(.|s) and pi(.|s') for the logsumexp
    cql_temp: float = 1.0  # temperature of the CQL logsumexp
    deterministic_backup: bool = True  # TD target without the entropy bonus (the authors' gym setting)
    bc_steps: int = 40_000  # behaviour-cloning warm start: for this many steps the actor maximizes log pi(a_data|s)
    eval_every: int = 10_000  # evaluate every member and the ensemble policy every this many updates
    eval_episodes: int = 10  # episodes per policy and evaluation (0 = no evaluation)
    log_every: int = 1_000  # write training scalars every this many updates (the only host syncs of the loop)
    checkpoint_every: int = 10_000  # write run_dir/checkpoint.pt every this many updates
    export_path: str = ""  # ensemble file ("" = checkpoints/<env>__<dataset_slug>__cql_ensemble__seed<seed>.pt)
    import_official: str = ""  # the authors' agents (docstring): convert, evaluate (unless --eval-episodes 0), exit
    compile: bool = False  # torch.compile the losses (mode reduce-overhead: on CUDA, as CUDA graphs)
    tf32: bool = False  # TensorFloat-32 matmuls on CUDA: faster, less exact (10-bit mantissas, float32 sums)


def sample(data: dict, n: int, batch_size: int) -> dict:  # an own minibatch per member: every field [N, B, ...]
    idx = torch.randint(len(data["rewards"]), (n, batch_size), device=data["rewards"].device)
    return {k: v[idx] for k, v in data.items()}


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
# CQL(H) and SAC losses, one update of every member.
# =====================================================================================
def tanh_log_prob(u: torch.Tensor, mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """log pi(tanh(u)|s) for pre-tanh u under N(mu, exp(log_std)^2): the Gaussian log-density minus
    sum log(1 - tanh(u)^2) (SAC Eq. 26), written stably as 2 (log 2 - u - softplus(-2u))."""
    gauss = -0.5 * ((u - mu) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    return (gauss - 2 * (math.log(2.0) - u - nn.functional.softplus(-2 * u))).sum(-1)


def cql_logsumexp(q_rand, q_pi, q_pi_next, logp_pi, logp_pi_next, act_dim: int, temp: float = 1.0):
    """Importance-sampled log sum_a exp Q(s, a) of CQL(H) (CQL Eq. 4, Appendix F; the authors' min_q_version 3):
    temp * logsumexp over the 3K samples of (Q(s, a_k) - log mu(a_k)) / temp, a_k from mu = uniform on [-1, 1]^|A|
    (log density -|A| log 2), pi(.|s) or pi(.|s'), all at the state s. Inputs [..., K], output [...]; without the
    constant -log 3K, as the authors' code (it changes no gradient)."""
    x = torch.cat([q_rand + act_dim * math.log(2.0), q_pi - logp_pi, q_pi_next - logp_pi_next], -1)
    return temp * torch.logsumexp(x / temp, -1)


class Agent:  # N CQL agents; 3 fused Adams (elementwise: one over stacked weights = N separate Adams)
    def __init__(self, obs_dim: int, act_dim: int, members: int, hidden: int, args: Args, device):
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.members = members
        self.hidden = hidden
        self.actor = EnsembleActor(obs_dim, act_dim, members, hidden).to(device)
        self.critic = EnsembleCritic(obs_dim, act_dim, members, hidden).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.zeros(members, device=device, requires_grad=True)  # alpha = 1 at the start
        self.target_entropy = -float(act_dim) if args.target_entropy is None else args.target_entropy
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.q_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr, fused=True)
        self.opts = (self.actor_opt, self.critic_opt, self.alpha_opt)


def losses(agent: Agent, batch: dict, bc: bool, args: Args) -> tuple:
    """The summed losses of one gradient step of all members and detached metrics. Each member's losses are means
    over its own batch, summed over members (and its two critics): every member gets the gradient of its own run."""
    n, b, act_dim = batch["actions"].shape  # members, batch size, action size
    k = args.cql_samples
    # one actor call for s and s' ([N, 2B]); 1 + K samples per state: sample 0 of s is the actor's
    # reparameterized action, sample 0 of s' the TD target's a', samples 1..K go to the CQL term
    mu, log_std = agent.actor(torch.cat([batch["observations"], batch["next_observations"]], 1))
    mu, log_std = mu.unsqueeze(2), log_std.unsqueeze(2)  # [N, 2B, 1, A]
    u = mu + log_std.exp() * torch.randn(n, 2 * b, k + 1, act_dim, device=mu.device)
    act, logp = torch.tanh(u), tanh_log_prob(u, mu, log_std)  # [N, 2B, 1+K, A], [N, 2B, 1+K]
    a_pi, logp_pi = act[:, :b, 0], logp[:, :b, 0]
    a_next, logp_next = act[:, b:, 0].detach(), logp[:, b:, 0].detach()
    cql_act, cql_logp = act[:, :, 1:].detach(), logp[:, :, 1:].detach()
    alpha = agent.log_alpha.exp().detach()[:, None]  # [N, 1]
    obs2 = batch["observations"].repeat(2, 1, 1)  # [2N, B, obs]: member i's Q1 (row i) and Q2 (row N+i)

    # TD target (SAC Eq. 5 with clipped double Q): y = r + gamma (1 - d) [min_j Q'_j(s', a') - alpha log pi(a'|s')]
    # (the entropy term is dropped with --deterministic-backup, the authors' gym setting)
    with torch.no_grad():
        q_next = agent.critic_target(batch["next_observations"].repeat(2, 1, 1), a_next.repeat(2, 1, 1))
        v_next = torch.min(q_next[:n], q_next[n:])
        if not args.deterministic_backup:
            v_next = v_next - alpha * logp_next
        y = (batch["rewards"] + args.gamma * (1.0 - batch["terminals"]) * v_next).repeat(2, 1)  # [2N, B]

    # Q(s, .) of every critic at 1 + 3K actions per state in one batched call [2N, B * (1+3K), obs+act]:
    # the dataset action, K uniform actions, K from pi(.|s) and K from pi(.|s') (all at the state s)
    uniform = torch.rand_like(cql_act[:, :b]) * 2 - 1
    a_all = torch.cat([batch["actions"].unsqueeze(2), uniform, cql_act[:, :b], cql_act[:, b:]], 2).repeat(2, 1, 1, 1)
    s_all = obs2.unsqueeze(2).expand(-1, -1, 1 + 3 * k, -1)
    q = agent.critic(s_all.reshape(2 * n, -1, agent.obs_dim), a_all.reshape(2 * n, -1, act_dim)).view(2 * n, b, -1)
    q_data = q[..., 0]
    q_rand, q_pi_k, q_next_k = q[..., 1:].split(k, -1)  # [2N, B, K] each: uniform, pi(.|s) and pi(.|s') actions
    logp_pi_k, logp_next_k = cql_logp.repeat(2, 1, 1).split(b, 1)  # log pi of the pi(.|s) and pi(.|s') samples
    lse = cql_logsumexp(q_rand, q_pi_k, q_next_k, logp_pi_k, logp_next_k, act_dim, args.cql_temp)  # [2N, B]
    # critic loss, CQL(H) (CQL paper Eq. 4): alpha' (E_s[log sum_a exp Q(s,a)] - E_(s,a)~D[Q(s,a)])
    # + E_D[(Q(s,a) - y)^2] (SAC Eq. 5; mean squared error without the 1/2, as rlkit)
    td = ((q_data - y) ** 2).mean(1)  # [2N]
    cql = args.cql_alpha * (lse.mean(1) - q_data.mean(1))  # [2N]
    critic_loss = (td + cql).sum()

    # actor loss (SAC Eq. 7, reparameterized): E_s[alpha log pi(a~|s) - min_j Q_j(s, a~)], a~ ~ pi(.|s);
    # during the BC warm-start: E_s[alpha log pi(a~|s) - log pi(a_data|s)]
    if bc:
        u_data = torch.atanh(batch["actions"].clamp(-1 + 1e-6, 1 - 1e-6))
        gain = tanh_log_prob(u_data, mu[:, :b, 0], log_std[:, :b, 0])
    else:
        q_pi = frozen_q(agent.critic, obs2, a_pi.repeat(2, 1, 1))
        gain = torch.min(q_pi[:n], q_pi[n:])
    actor_loss = (alpha * logp_pi - gain).mean(1).sum()
    # temperature loss (SAC Eq. 18): E_s[-log alpha (log pi(a~|s) + target entropy)]
    alpha_loss = -(agent.log_alpha[:, None] * (logp_pi.detach() + agent.target_entropy)).mean(1).sum()
    metrics = {"losses/critic_td": td.mean(), "losses/cql": cql.mean(), "losses/actor": actor_loss / n}
    metrics.update({"losses/alpha": alpha_loss / n, "charts/alpha": alpha.mean(), "charts/q_data": q_data.mean()})
    metrics.update({"charts/cql_logsumexp": lse.mean(), "charts/entropy": -logp_pi.mean()})
    return critic_loss + actor_loss + alpha_loss, {k: v.detach() for k, v in metrics.items()}


def update(agent: Agent, data: dict, bc: bool, args: Args, loss_fn=losses) -> dict:
    """One step of every member on its own minibatch: one backward (disjoint parameters), 3 Adams, Polyak averaging."""
    loss, metrics = loss_fn(agent, sample(data, agent.members, args.batch_size), bc, args)
    for opt in agent.opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in agent.opts:
        opt.step()
    with torch.no_grad():
        for t, p in zip(agent.critic_target.parameters(), agent.critic.parameters()):
            t.lerp_(p, args.tau)  # theta' <- (1 - tau) theta' + tau theta
    return metrics


def main(args: Args) -> str:  # -> the path of the ensemble file
    if args.import_official:
        return import_official(args)
    args, ckpt = check_args(args)  # with --resume: the run's own Args and its checkpoint
    device, run_dir = set_up(args, SCRIPT)  # seeds python, numpy and torch
    data = load_dataset(args.env, args.dataset)
    agent = Agent(data["observations"].shape[1], data["actions"].shape[1], args.members, args.hidden, args, device)
    data = {k: torch.as_tensor(v, device=device) for k, v in data.items()}
    if device.type == "cpu":
        keep_freed_memory()
    start = 0 if ckpt is None else restore_checkpoint(ckpt, agent, args)
    args = dataclasses.replace(args, run_dir=run_dir)
    logger = Logger(args, args.run_dir, SCRIPT)
    ckpt_path = os.path.join(args.run_dir, "checkpoint.pt")
    slug = dataset_slug(args.dataset)
    export_path = args.export_path or f"checkpoints/{args.env}__{slug}__{SCRIPT}__seed{args.seed}.pt"
    print(f"run dir: {args.run_dir}\ncheckpoint: {ckpt_path}\nensemble file (at the end): {export_path}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    loss_fn = torch.compile(losses, mode="reduce-overhead") if args.compile else losses  # CUDA graphs on CUDA
    t0 = time.time()  # for the updates per second since update `since`
    since = start
    desc = f"cql_ensemble N={args.members}"
    bar = tqdm(range(start, args.offline_updates), initial=start, total=args.offline_updates, desc=desc, disable=None)
    for step in bar:  # every member: its own minibatch, a CQL(H) critic step, a SAC (or, first, BC) actor step
        metrics = update(agent, data, step < args.bc_steps, args, loss_fn)
        updates = step + 1
        if updates % args.log_every == 0:
            logger.scalars({**metrics, "charts/updates_per_s": (updates - since) / (time.time() - t0)}, updates)
            bar.set_postfix(q=f"{float(metrics['charts/q_data']):.1f}", cql=f"{float(metrics['losses/cql']):.2f}")
            t0 = time.time()
            since = updates
        if args.eval_episodes > 0 and (updates % args.eval_every == 0 or updates == args.offline_updates):
            k = (updates - 1) // args.eval_every  # index of this evaluation: new start states each time
            policies = eval_policies(agent.actor, args.env, args.eval_episodes, eval_seed(args.seed, k))
            for name, returns in policies.items():
                score = logger.eval_row("offline", updates, 0, name, returns, args.env, updates)
            bar.write(f"update {updates}: ensemble normalized score {score:.1f}")
        if updates % args.checkpoint_every == 0 or updates == args.offline_updates:
            save_checkpoint(checkpoint_dict(agent, args, updates), ckpt_path)
    bar.close()
    save_checkpoint(ensemble_dict(agent, args.env, args.dataset, max(start, args.offline_updates)), export_path)
    logger.close()
    print(f"run dir: {args.run_dir}\ncheckpoint: {ckpt_path}\nensemble file: {export_path}")
    return export_path


# =====================================================================================
# This script's plumbing: argument checks, resume, evaluation, the ensemble file, the authors' agents, memory.
# =====================================================================================
OPTIMIZERS = ("actor_opt", "critic_opt", "alpha_opt")  # the Adams of Agent, in the order of Agent.opts


def check_args(args: Args) -> tuple:  # -> with --resume: (the run's own Args, its checkpoint), else (args, None)
    keep = ("device", "track", "compile", "tf32", "offline_updates", "run_dir", "resume")  # what --resume may change
    args, ckpt = resume_run(args, FORMAT, keep) if args.resume else (args, None)  # --resume: the run's own Args
    for name in ("members", "batch_size", "eval_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    return args, ckpt


def restore_checkpoint(ckpt: dict, agent: Agent, args: Args) -> int:  # a run's checkpoint.pt -> its updates
    path = os.path.join(args.run_dir, "checkpoint.pt")
    need = {"obs_dim": agent.obs_dim, "act_dim": agent.act_dim, "members": args.members, "hidden": args.hidden}
    for key, want in need.items():
        if ckpt.get(key) != want:
            made_for = f"{ckpt.get('env')}/{ckpt.get('dataset')}"
            raise InputError(f"{path} has {key}={ckpt.get(key)} (made for {made_for}) but this run needs {key}={want}")
    load_agent(agent, ckpt, path, optimizers=True)
    set_rng_state(ckpt["rng"])
    return ckpt["updates"]


def eval_policies(actor: EnsembleActor, env: str, episodes: int, seed: int) -> dict:
    """Returns per policy: member<i> acts with tanh(mu_i), the ensemble policy with tanh(mean_i mu_i). All N+1
    policies run in one vector env: episode chunk j belongs to policy j."""
    n = actor.members

    def act_fn(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            o = torch.as_tensor(obs, dtype=torch.float32, device=actor.mu.weight.device)
            mu = actor(o.expand(n, -1, -1))[0].view(n, n + 1, episodes, -1)  # every member on every chunk
            own = mu[torch.arange(n), torch.arange(n)]  # [N, E, A]: member i on chunk i
            return torch.tanh(torch.cat([own, mu[:, n].mean(0, keepdim=True)])).flatten(0, 1).cpu().numpy()

    returns = evaluate(env, act_fn, (n + 1) * episodes, seed).reshape(n + 1, episodes)
    return {**{f"member{i}": returns[i] for i in range(n)}, "ensemble": returns[n]}


def ensemble_dict(agent: Agent, env: str, dataset: str, updates: int) -> dict:  # the ensemble file (docstring)
    sizes = {"obs_dim": agent.obs_dim, "act_dim": agent.act_dim, "members": agent.members, "hidden": agent.hidden}
    nets = {name: getattr(agent, name).state_dict() for name in ("actor", "critic", "critic_target")}
    info = {"format": FORMAT, "env": env, "dataset": dataset, "log_alpha": agent.log_alpha.detach().clone()}
    return {**info, **sizes, **nets, "updates": int(updates)}


def checkpoint_dict(agent: Agent, args: Args, updates: int) -> dict:  # the ensemble file + Adams, RNGs, Args
    optimizers = {name: opt.state_dict() for name, opt in zip(OPTIMIZERS, agent.opts)}
    ensemble = ensemble_dict(agent, args.env, args.dataset, updates)
    return {**ensemble, **optimizers, "rng": rng_state(), "args": dataclasses.asdict(args)}


def load_agent(agent: Agent, ckpt: dict, path: str, optimizers: bool) -> None:
    try:
        for name in ("actor", "critic", "critic_target"):
            getattr(agent, name).load_state_dict(ckpt[name])
        with torch.no_grad():
            agent.log_alpha.copy_(ckpt["log_alpha"])
        for name, opt in zip(OPTIMIZERS, agent.opts if optimizers else ()):
            opt.load_state_dict(ckpt[name])
    except (KeyError, RuntimeError, ValueError) as e:
        raise InputError(f"{path} does not fit this ensemble ({first_line(e)[:200]})") from e


def import_official(args: Args) -> str:
    """The authors' rlkit agents (<task>_seed<k>/ or seed<k>/ folders, each with actor_<step>.pt, critic1_<step>.pt,
    critic2_<step>.pt; Linear weights [out, in]) -> the ensemble file: fc0/fc1/last_fc -> net.0/net.2/mu (critics:
    net.4), last_fc_log_std -> log_std; member i = the i-th folder by seed; critic1 -> critic rows 0..N-1, critic2
    -> rows N..2N-1; critic_target = critic; log_alpha = 0 (alpha was not released)."""
    dims = env_dims(args.env)

    def step_of(path: str) -> int:  # the last number in a file or folder name: the seed, or the gradient step
        return int(re.findall(r"\d+", os.path.basename(path))[-1])

    seeds = sorted(glob.glob(os.path.join(args.import_official, "*seed*")), key=step_of)
    if not seeds:
        fix = "pass the folder rlkit/data/cql/ of github.com/shlee94/Off2OnRL (one <task>_seed<k>/ folder per agent)"
        raise InputError(f"no seed*/ folders in {args.import_official}; {fix}")
    parts = {"actor": [], "critic1": [], "critic2": []}
    for folder in seeds:
        for part, state_dicts in parts.items():
            files = sorted(glob.glob(os.path.join(folder, f"{part}_*.pt")), key=step_of)
            if not files:
                raise InputError(f"{folder} has no {part}_<step>.pt")
            state_dicts.append(load_checkpoint(files[-1], "download it from github.com/shlee94/Off2OnRL"))
            updates = step_of(files[-1])  # the file names carry the gradient step

    def stack(state_dicts: list, name: str) -> dict:  # N rlkit Linear layers -> one VectorizedLinear
        try:
            weight = torch.stack([sd[f"{name}.weight"].t() for sd in state_dicts])
            return {"weight": weight, "bias": torch.stack([sd[f"{name}.bias"] for sd in state_dicts]).unsqueeze(1)}
        except (KeyError, RuntimeError, TypeError) as e:
            raise InputError(f"{args.import_official}: not rlkit state dicts with layer {name} ({e})") from e

    def layers(state_dicts: list, names: list) -> dict:  # [(our layer, rlkit's)] -> our state dict
        return {f"{new}.{k}": v for new, old in names for k, v in stack(state_dicts, old).items()}

    actor_names = [("net.0", "fc0"), ("net.2", "fc1"), ("mu", "last_fc"), ("log_std", "last_fc_log_std")]
    actor = layers(parts["actor"], actor_names)
    critic = layers(parts["critic1"] + parts["critic2"], [("net.0", "fc0"), ("net.2", "fc1"), ("net.4", "last_fc")])
    obs_dim = actor["net.0.weight"].shape[1]
    act_dim = actor["mu.weight"].shape[2]
    if (obs_dim, act_dim) != dims:
        raise InputError(
            f"the agents in {args.import_official} have obs/action dims {obs_dim}/{act_dim} but "
            f"{ENVS[args.env]} has {dims[0]}/{dims[1]}; pass their --env"
        )
    agent = Agent(obs_dim, act_dim, len(seeds), actor["net.0.weight"].shape[2], args, "cpu")
    weights = {"actor": actor, "critic": critic, "critic_target": critic, "log_alpha": torch.zeros(len(seeds))}
    load_agent(agent, weights, args.import_official, optimizers=False)
    path = args.export_path or f"checkpoints/{args.env}__{dataset_slug(args.dataset)}__{SCRIPT}__official.pt"
    save_checkpoint(ensemble_dict(agent, args.env, args.dataset, updates), path)
    print(f"imported {len(seeds)} agents ({', '.join(map(os.path.basename, seeds))}) -> {path}")
    if args.eval_episodes > 0:
        for name, r in eval_policies(agent.actor, args.env, args.eval_episodes, eval_seed(args.seed, 0)).items():
            score = normalized_score(args.env, r.mean())
            print(f"{name}: return {r.mean():.1f} +- {r.std():.1f}, normalized {score:.1f}")
    return path


def keep_freed_memory() -> None:
    """CPU speed: glibc returns each freed block over 32 MB to the OS and page-faults the next one in again, which
    costs more than a pass over it, and the critic pass makes many 80 MB activations per update (paper size): keeping
    freed memory in the heap makes updates ~1.4x faster on CPU. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD = max
    except (OSError, AttributeError):
        pass


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

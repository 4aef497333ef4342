"""Make D4RL-style offline datasets for Gymnasium MuJoCo v5 tasks, in Minari format.

D4RL's recipe (Fu et al. 2020, arXiv 2004.07219), with the behaviour agent trained by baselines/sac.py:
  random         N steps of a randomly initialized SAC policy
  medium         N steps of the first SAC snapshot (snapshots are taken at every evaluation) whose
                 average deterministic evaluation return reaches 1/3 of D4RL's expert reference return
  medium-replay  every transition SAC saw until that snapshot, random warm-up steps included, as
                 episodes (an episode cut by the snapshot is stored truncated)
  expert         N steps of the final SAC policy (after --sac-steps env steps)
  medium-expert  medium + expert, episode for episode
Not in D4RL, for fine-tuning agents trained elsewhere (e.g. the paper authors' released CQL agents):
  policy-rollouts  N steps of the members of an off2on ensemble file (--policy), N/K per member for K
                 members, each sampling actions from its own tanh-Gaussian policy: an offline buffer drawn
                 from the agents' own state-action distribution
Rollouts sample actions from the stochastic tanh-Gaussian policy, as D4RL's were (--deterministic
uses the mean action). N is --n-steps (D4RL: 1,000,000); the last episode of each rollout worker is
cut by the budget and stored truncated. Time-limit ends (1000 steps) are truncations, falls are
terminations.

Run:   python make_dataset.py --env hopper --kinds random medium medium-replay
       python make_dataset.py --env halfcheetah --kinds policy-rollouts \
           --policy checkpoints/halfcheetah__medium__cql_ensemble__official.pt
Each dataset is written with minari.create_dataset_from_buffers as off2on/<env>/<kind>-v0 (in
$MINARI_DATASETS_PATH or ~/.minari/datasets), with D4RL's reference returns as ref_min/max_score and
the behaviour policy beside it as behaviour_policy.pt:
{"format": "off2on-behaviour/1", "env", "kind", "obs_dim", "act_dim", "hidden",
 "actors": {"random"|"medium"|"expert": baselines.sac.Actor state_dict}, "sac_env_steps", "eval_return"}.
behaviour_policy.pt is written last: a dataset without it is an interrupted write and is remade.
Resumable: SAC checkpoints to <work dir>/sac/checkpoint.pt and the medium snapshot (policy + replay)
to <work dir>/medium_snapshot.pt; re-running skips finished datasets and continues SAC.
"""

import os
import random
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import tyro

from baselines import sac

ORDER = ("random", "medium", "medium-replay", "expert", "medium-expert")
ROLLOUTS = "policy-rollouts"


@dataclass
class Args:
    env: str = "hopper"
    """hopper, halfcheetah or walker2d"""
    kinds: tuple[str, ...] = ORDER
    """datasets to make: random medium medium-replay expert medium-expert (D4RL's), policy-rollouts"""
    n_steps: int = 1_000_000
    """transitions per rollout dataset (random, medium, expert; medium-expert has twice)"""
    sac_steps: int = 1_000_000
    """SAC env-step budget; the final policy is the expert"""
    medium_fraction: float = 1 / 3
    """medium = first snapshot whose eval return reaches this fraction of D4RL's expert return"""
    deterministic: bool = False
    """roll out medium/expert with the mean action instead of sampling (random always samples)"""
    policy: str = ""
    """policy-rollouts: the off2on ensemble file (off2on_cql_ensemble.py's output) whose members act"""
    seed: int = 0
    """seed of SAC and of the rollouts"""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda"""
    work_dir: str = ""
    """SAC run dir and snapshots; empty = checkpoints/make_dataset/<env>"""
    n_envs: int = 20
    """environments stepped together in the rollouts (one batched policy forward per step)"""
    eval_every: int = 5_000
    """SAC evaluation (= snapshot) interval in env steps"""
    eval_episodes: int = 10
    """episodes per SAC evaluation"""
    learning_starts: int = 10_000
    """SAC's uniform-random warm-up steps"""
    epoch_steps: int = 1_000
    """SAC env steps (then updates) per epoch"""
    checkpoint_every: int = 25_000
    """SAC checkpoint interval in env steps"""
    hidden: int = 256
    """SAC hidden width (smaller only for tests)"""
    batch_size: int = 256
    """SAC minibatch (smaller only for tests)"""
    author: str = "off2on make_dataset.py"
    """dataset metadata: author"""
    code_permalink: str = ""
    """dataset metadata: link to this code; empty = this file and its git commit"""
    track: bool = False
    """log SAC to Weights & Biases"""
    wandb_project: str = "off2on"
    """wandb project name (with --track)"""


def local_id(env: str, kind: str) -> str:  # the Minari id of a dataset made here, the --dataset kinds of the scripts
    return f"off2on/{env}/{kind}-v0"


def pick_device(name: str) -> torch.device:  # auto: cuda where a CUDA GPU is visible, else cpu
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        raise sac.InputError(f"--device {name}: use auto, cpu, or cuda where a CUDA GPU is visible")
    return torch.device(name)


def seed_all(seed: int) -> None:
    for seed_rng in (random.seed, np.random.seed, torch.manual_seed):
        seed_rng(seed)


def policy(actor: sac.Actor, deterministic: bool):
    """A SAC actor as a rollout policy: obs batch (numpy) -> actions (numpy), the mean action or a sample."""
    device = actor.mu.weight.device

    @torch.no_grad()
    def act(obs):
        return actor.act(torch.as_tensor(obs, dtype=torch.float32, device=device), deterministic).cpu().numpy()

    return act


def dataset_dir(ds_id: str) -> str:
    import minari.storage

    return str(minari.storage.get_dataset_path(ds_id))


def is_made(ds_id: str) -> bool:
    import minari

    return ds_id in minari.list_local_datasets() and os.path.exists(
        os.path.join(dataset_dir(ds_id), "behaviour_policy.pt")
    )


# ---------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------
def episode(i, obs, act, rew, term, trunc):
    from minari.data_collector.episode_buffer import EpisodeBuffer

    # np.array copies: the rollout reuses its per-env arrays for the next episode
    return EpisodeBuffer(
        id=i,
        observations=np.array(obs, np.float64),
        actions=np.array(act, np.float32),
        rewards=np.array(rew, np.float64),
        terminations=np.array(term, bool),
        truncations=np.array(trunc, bool),
        infos={},
    )


def rollout(env_id: str, act_fn, n_steps: int, n_envs: int, seed: int):
    """Exactly n_steps transitions from n_envs envs stepped together. Returns (episodes, returns of
    the episodes that ended by themselves). Per-env episode arrays are filled with one fancy index
    per field per step; Python only touches an env when its episode ends."""
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(env_id) for _ in range(n_envs)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    T = envs.envs[0].spec.max_episode_steps
    obs, _ = envs.reset(seed=seed)
    rows, t = np.arange(n_envs), np.zeros(n_envs, dtype=np.int64)
    O = np.zeros((n_envs, T + 1, obs.shape[1]))
    A = np.zeros((n_envs, T, envs.single_action_space.shape[0]), np.float32)
    R, TE, TR = np.zeros((n_envs, T)), np.zeros((n_envs, T), bool), np.zeros((n_envs, T), bool)
    O[:, 0] = obs
    episodes, returns, total = [], [], 0
    while total < n_steps:
        act = act_fn(obs)
        obs, rew, term, trunc, info = envs.step(act)
        done = term | trunc
        A[rows, t], R[rows, t], TE[rows, t], TR[rows, t] = act, rew, term, trunc
        t += 1
        O[rows, t] = obs  # SAME_STEP autoreset: obs of a finished env is already the next start...
        for i in np.flatnonzero(done):
            O[i, t[i]] = info["final_obs"][i]  # ...so its last observation comes from final_obs
        total += n_envs
        last = total >= n_steps
        if last:  # drop the surplus of the final step; every unfinished episode is cut by the budget
            surplus = total - n_steps
            if surplus:
                t[n_envs - surplus :] -= 1
                done[n_envs - surplus :] = False
        for i in np.flatnonzero(done | last):
            n = t[i]
            if n == 0:
                continue
            cut = not done[i]
            tr = TR[i, :n].copy()
            tr[-1] |= cut
            episodes.append(episode(len(episodes), O[i, : n + 1], A[i, :n], R[i, :n], TE[i, :n], tr))
            if not cut:
                returns.append(R[i, :n].sum())
            O[i, 0], t[i] = obs[i], 0
    envs.close()
    return episodes, np.asarray(returns)


def replay_to_episodes(buf: dict):
    """SAC's replay (transitions in the order they happened, one env) -> episodes. The last one,
    cut by the snapshot, is stored truncated. Returns (episodes, returns of the finished ones)."""
    term, trunc = buf["terminations"].numpy() > 0, buf["truncations"].numpy() > 0
    n = len(term)
    ends = list(np.flatnonzero(term | trunc))
    if not ends or ends[-1] != n - 1:
        ends.append(n - 1)
    obs, nxt = buf["observations"].numpy(), buf["next_observations"].numpy()
    episodes, returns, start = [], [], 0
    for end in ends:
        sl = slice(start, end + 1)
        tr = trunc[sl].copy()
        tr[-1] |= not term[end]  # cut by the snapshot -> truncated
        o = np.concatenate([obs[sl], nxt[end : end + 1]])
        episodes.append(episode(len(episodes), o, buf["actions"].numpy()[sl], buf["rewards"].numpy()[sl], term[sl], tr))
        if term[end] or trunc[end]:
            returns.append(float(buf["rewards"].numpy()[sl].sum()))
        start = end + 1
    return episodes, np.asarray(returns)


def load_episodes(ds_id: str):
    """Episodes of a dataset made earlier (for medium-expert)."""
    import minari

    ds = minari.load_dataset(ds_id)
    return [
        episode(None, ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations)
        for ep in ds.iterate_episodes()
    ]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------
def permalink(args: Args) -> str:
    if args.code_permalink:
        return args.code_permalink
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        sha = ""
    return f"off2on make_dataset.py (git {sha or 'unknown'})"


def write(
    args: Args, kind: str, episodes, actors: dict, info: dict, description: str, algorithm: str = "", dims: tuple = ()
) -> None:
    from dataclasses import replace

    import minari

    ds_id = local_id(args.env, kind)
    if ds_id in minari.list_local_datasets():  # an interrupted earlier write
        minari.delete_dataset(ds_id)
    episodes = [replace(ep, id=i) for i, ep in enumerate(episodes)]
    lo, hi = sac.REF_RETURNS[args.env]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is set to None.*")
        minari.create_dataset_from_buffers(
            ds_id,
            episodes,
            env=sac.ENVS[args.env],
            algorithm_name=algorithm or f"SAC ({kind}, baselines/sac.py)",
            author=args.author,
            code_permalink=permalink(args),
            ref_min_score=lo,
            ref_max_score=hi,
            description=description,
        )
    ref = next(iter(actors.values()))
    obs_dim, act_dim = dims or (ref["net.0.weight"].shape[1], ref["mu.weight"].shape[0])
    sac.save_checkpoint(
        {
            "format": "off2on-behaviour/1",
            "env": args.env,
            "kind": kind,
            "obs_dim": obs_dim,
            "act_dim": act_dim,
            "hidden": args.hidden,
            "actors": actors,
            **info,
        },
        os.path.join(dataset_dir(ds_id), "behaviour_policy.pt"),
    )


def report(env: str, kind: str, episodes, returns, seconds: float) -> None:
    steps = sum(len(ep.rewards) for ep in episodes)
    mean = returns.mean() if len(returns) else float("nan")
    print(
        f"{local_id(env, kind)}: {steps} transitions, {len(episodes)} episodes, "
        f"mean return {mean:.1f}, normalized score {float(sac.normalized_score(env, mean)):.1f}, "
        f"made in {seconds / 60:.1f} min",
        flush=True,
    )


def ensemble_members(path: str, env: str, device: torch.device):
    """The members of an off2on ensemble file as K act functions (obs batch -> actions sampled from member
    i's tanh-Gaussian policy), and the file. Layers are VectorizedLinear: weight [K, in, out], bias [K, 1, out]."""
    make = f"python off2on_cql_ensemble.py --env {env} ... (or --import-official DIR)"
    ck = sac.load_checkpoint(path, make)
    if not isinstance(ck, dict) or ck.get("format") != "off2on-cql-ensemble/1" or ck.get("env") != env:
        raise sac.InputError(f"{path} is not an off2on ensemble file for {env}; make one with: {make}")
    w = {k: v.to(device) for k, v in ck["actor"].items()}

    def member(i: int):
        @torch.no_grad()
        def act(obs):
            h = torch.as_tensor(obs, dtype=torch.float32, device=device)
            for layer in ("net.0", "net.2"):
                h = torch.relu(h @ w[f"{layer}.weight"][i] + w[f"{layer}.bias"][i])
            mu = h @ w["mu.weight"][i] + w["mu.bias"][i]
            std = (h @ w["log_std.weight"][i] + w["log_std.bias"][i]).clamp(-20.0, 2.0).exp()
            return torch.tanh(mu + std * torch.randn_like(mu)).cpu().numpy()

        return act

    return [member(i) for i in range(ck["members"])], ck


RECIPE = (
    "D4RL recipe on Gymnasium MuJoCo v5, behaviour agent trained by off2on baselines/sac.py "
    "(SAC, 2x256, Adam 3e-4, batch 256, tau 5e-3, gamma 0.99, auto-entropy). "
)


def main(args: Args) -> None:
    obs_dim, act_dim = sac.env_dims(args.env)  # one line for an unknown env
    env_id = sac.ENVS[args.env]
    for k in args.kinds:
        if k not in (*ORDER, ROLLOUTS):
            raise sac.InputError(f"unknown kind {k!r}; choose from: {' '.join(ORDER)} {ROLLOUTS}")
    if ROLLOUTS in args.kinds and not args.policy:
        raise sac.InputError(
            f"--kinds {ROLLOUTS} needs --policy <ensemble file>, e.g. the output of "
            "python off2on_cql_ensemble.py --import-official DIR --env halfcheetah --dataset medium"
        )
    for name in ("n_steps", "sac_steps", "n_envs", "eval_every", "eval_episodes", "epoch_steps"):
        if getattr(args, name) <= 0:
            raise sac.InputError(f"--{name.replace('_', '-')} must be positive")
    work = args.work_dir or os.path.join("checkpoints", "make_dataset", args.env)
    want = set(args.kinds) | ({"medium", "expert"} if "medium-expert" in args.kinds else set())
    todo = [k for k in ORDER if k in want and not is_made(local_id(args.env, k))]
    for k in ORDER:
        if k in want and k not in todo:
            print(f"{local_id(args.env, k)} exists, skipped (`minari delete {local_id(args.env, k)}` to remake it)")
    if ROLLOUTS in args.kinds:
        make_policy_rollouts(args, env_id)
    if not todo:
        return
    device = pick_device(args.device)
    rollout_kind = "mean actions" if args.deterministic else "actions sampled from the stochastic policy"
    print(f"making {', '.join(todo)} for {env_id}; work dir {work}", flush=True)

    if "random" in todo:
        t0 = time.time()
        seed_all(args.seed)
        actor = sac.Actor(obs_dim, act_dim, args.hidden).to(device)
        eps, rets = rollout(env_id, policy(actor, deterministic=False), args.n_steps, args.n_envs, args.seed + 1)
        write(
            args,
            "random",
            eps,
            {"random": actor.state_dict()},
            {"sac_env_steps": 0, "eval_return": float("nan")},
            RECIPE + f"random: {args.n_steps} steps of a randomly initialized SAC policy (sampled actions).",
        )
        report(args.env, "random", eps, rets, time.time() - t0)

    snap_path = os.path.join(work, "medium_snapshot.pt")
    sac_dir = os.path.join(work, "sac")
    ckpt_path = os.path.join(sac_dir, "checkpoint.pt")
    need_medium = bool({"medium", "medium-replay"} & set(todo)) and not os.path.exists(snap_path)
    need_expert = "expert" in todo
    thr = args.medium_fraction * sac.REF_RETURNS[args.env][1]
    if need_medium or need_expert:
        t0 = time.time()
        sargs = sac.Args(
            seed=args.seed,
            device=args.device,
            track=args.track,
            wandb_project=args.wandb_project,
            run_dir=sac_dir,
            resume=os.path.exists(ckpt_path),
            env=args.env,
            online_steps=args.sac_steps,
            eval_every=args.eval_every,
            eval_episodes=args.eval_episodes,
            checkpoint_every=args.checkpoint_every,
            learning_starts=args.learning_starts,
            epoch_steps=args.epoch_steps,
            hidden=args.hidden,
            batch_size=args.batch_size,
        )
        print(f"SAC: medium threshold {thr:.1f} (eval return); budget {args.sac_steps} env steps", flush=True)

        def after_eval(p: sac.Progress) -> bool:  # after each SAC evaluation; True: stop SAC (it checkpoints first)
            ret = float(p.eval_returns.mean())
            print(
                f"SAC {p.env_steps} env steps, {p.updates} updates: eval return {ret:.1f} "
                f"({time.time() - t0:.0f} s this run)",
                flush=True,
            )
            if not os.path.exists(snap_path) and ret >= thr:  # Progress.buffer holds every transition so far
                if p.buffer.size < p.env_steps:
                    raise sac.InputError(
                        "the SAC replay buffer wrapped before the medium snapshot; medium-replay needs every transition"
                    )
                sac.save_checkpoint(
                    {
                        "actor": p.learner.actor.state_dict(),
                        "env_steps": p.env_steps,
                        "eval_return": ret,
                        "replay": p.buffer.state_dict(),
                    },
                    snap_path,
                )
                print(
                    f"medium snapshot at {p.env_steps} env steps: eval return {ret:.1f} "
                    f"({time.time() - t0:.0f} s of SAC this run)",
                    flush=True,
                )
            return os.path.exists(snap_path) and not need_expert

        sac.main(sargs, after_eval)
        print(f"SAC stage: {(time.time() - t0) / 60:.1f} min", flush=True)
    if ({"medium", "medium-replay"} & set(todo)) and not os.path.exists(snap_path):
        raise sac.InputError(
            f"SAC reached --sac-steps {args.sac_steps} without an evaluation return >= {thr:.1f} "
            f"(1/3 of D4RL's expert return); raise --sac-steps"
        )

    if {"medium", "medium-replay"} & set(todo):
        snap = torch.load(snap_path, map_location="cpu", weights_only=True)
        info = {"sac_env_steps": snap["env_steps"], "eval_return": snap["eval_return"]}
        where = f"SAC snapshot after {snap['env_steps']} env steps (eval return {snap['eval_return']:.1f})"
        if "medium" in todo:
            t0 = time.time()
            torch.manual_seed(args.seed + 2)
            actor = sac.Actor(obs_dim, act_dim, args.hidden).to(device)
            actor.load_state_dict(snap["actor"])
            eps, rets = rollout(env_id, policy(actor, args.deterministic), args.n_steps, args.n_envs, args.seed + 2)
            write(
                args,
                "medium",
                eps,
                {"medium": snap["actor"]},
                info,
                RECIPE + f"medium: {args.n_steps} steps ({rollout_kind}) of the first {where} reaching "
                f"{args.medium_fraction:.3f} of D4RL's expert return.",
            )
            report(args.env, "medium", eps, rets, time.time() - t0)
        if "medium-replay" in todo:
            t0 = time.time()
            eps, rets = replay_to_episodes(snap["replay"])
            write(
                args,
                "medium-replay",
                eps,
                {"medium": snap["actor"]},
                info,
                RECIPE + f"medium-replay: every transition SAC saw until the medium {where}, including "
                f"{args.learning_starts} uniform-random warm-up steps; the last episode is cut (truncated).",
            )
            report(args.env, "medium-replay", eps, rets, time.time() - t0)

    if "expert" in todo:
        t0 = time.time()
        ck = sac.load_checkpoint(ckpt_path, f"python make_dataset.py --env {args.env} --kinds expert")
        actor = sac.Actor(obs_dim, act_dim, args.hidden).to(device)
        actor.load_state_dict(ck["actor"])
        torch.manual_seed(args.seed + 3)
        rows = open(os.path.join(sac_dir, "evals.csv")).read().splitlines()
        final_ret = float(rows[-1].split(",")[sac.EVAL_COLUMNS.index("return_mean")])
        eps, rets = rollout(env_id, policy(actor, args.deterministic), args.n_steps, args.n_envs, args.seed + 3)
        write(
            args,
            "expert",
            eps,
            {"expert": ck["actor"]},
            {"sac_env_steps": ck["env_steps"], "eval_return": final_ret},
            RECIPE + f"expert: {args.n_steps} steps ({rollout_kind}) of the final SAC policy after "
            f"{ck['env_steps']} env steps (eval return {final_ret:.1f}).",
        )
        report(args.env, "expert", eps, rets, time.time() - t0)

    if "medium-expert" in todo:
        t0 = time.time()
        eps = [load_episodes(local_id(args.env, k)) for k in ("medium", "expert")]
        pol = {
            k: torch.load(os.path.join(dataset_dir(local_id(args.env, k)), "behaviour_policy.pt"), weights_only=True)
            for k in ("medium", "expert")
        }
        T = gym.spec(env_id).max_episode_steps  # budget-cut episodes are the truncated ones shorter than T
        rets = np.array([ep.rewards.sum() for ep in eps[0] + eps[1] if ep.terminations[-1] or len(ep.rewards) == T])
        write(
            args,
            "medium-expert",
            eps[0] + eps[1],
            {k: pol[k]["actors"][k] for k in pol},
            {"sac_env_steps": pol["expert"]["sac_env_steps"], "eval_return": pol["expert"]["eval_return"]},
            RECIPE + "medium-expert: the episodes of off2on medium and expert datasets together.",
        )
        report(args.env, "medium-expert", eps[0] + eps[1], rets, time.time() - t0)


def make_policy_rollouts(args: Args, env_id: str) -> None:
    ds_id = local_id(args.env, ROLLOUTS)
    if is_made(ds_id):
        print(f"{ds_id} exists, skipped (`minari delete {ds_id}` to remake it)")
        return
    t0 = time.time()
    device = pick_device(args.device)
    members, ck = ensemble_members(args.policy, args.env, device)
    k = len(members)
    sizes = [args.n_steps // k + (i < args.n_steps % k) for i in range(k)]
    torch.manual_seed(args.seed + 4)
    episodes, returns = [], []
    for i, act in enumerate(members):
        eps, rets = rollout(env_id, act, sizes[i], args.n_envs, args.seed + 4 + 1_000 * i)
        episodes += eps
        returns.append(rets)
    returns = np.concatenate(returns)
    write(
        args,
        ROLLOUTS,
        episodes,
        {"ensemble": ck["actor"]},
        {
            "sac_env_steps": 0,
            "eval_return": float(returns.mean()) if len(returns) else float("nan"),
            "policy_file": os.path.abspath(args.policy),
        },
        f"policy-rollouts: {args.n_steps} steps of the {k} members of the off2on ensemble file "
        f"{os.path.basename(args.policy)} (trained on {ck.get('dataset')!r}, {ck.get('updates')} updates), "
        f"{sizes[0]} steps per member, {args.n_envs} envs, actions sampled from each member's own "
        "tanh-Gaussian policy (tanh(mu + sigma eps)). Time-limit ends are truncations, falls terminations; "
        "each member's last episodes are cut by its budget (truncated).",
        algorithm=f"off2on ensemble members ({os.path.basename(args.policy)})",
        dims=(ck["obs_dim"], ck["act_dim"]),
    )
    report(args.env, ROLLOUTS, episodes, returns, time.time() - t0)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except sac.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

"""Meta-training the Learned Policy Gradient: ``metabench discover lpg``.

Oh et al. 2020 meta-train LPG's parameters ``eta`` by gradient: a population of agents lives
lifetimes in environments drawn from the training distribution; every meta-step each agent
makes ``K`` updates with the rule (a sliding window of its lifetime), and ``eta`` follows the
gradient, *through those K updates*, of the updated agent's policy-gradient objective on fresh
experience, plus four regularisers (Oh et al. 2020, section 3.3):

    J(eta) = E[log pi_K(a|s) A]  +  b_pi H(pi_K)  +  b_y H(y_K)
             -  b_pihat E[pi_hat^2]  -  b_yhat E[||y_hat||^2]

``pi_K`` and ``y_K`` are the agent after its K updates, and ``pi_hat``, ``y_hat`` the rule's
outputs during them. The meta-gradient follows the rule's targets back through the agent's
earlier updates (the agent's own update treats them as constants): that path is the only one
by which eta learns what ``y`` should predict, since y reaches eta only as an input of later
targets.

``A`` is the advantage of the updated agent on a fresh validation rollout, estimated, as in
the paper, with a learned value function: a *meta-critic* ``V_w`` per lifetime (the agent's
torso with a scalar head, reset with the lifetime) that neither the agent nor the rule ever
sees. ``A`` is GAE(``critic_lambda``) with ``V_w``, bootstrapped from ``V_w`` at truncations
and at the end of the validation window (not at terminations), so a consequence beyond the
window still reaches eta; it is scaled by its batch standard deviation so that environments
weigh alike. After each meta-step the critic takes one step (``critic_lr``, Adam) towards the
lambda-returns of every rollout of the meta-step.

Hyperparameter balancing. Good agent hyperparameters differ across environments, and a rule
meta-trained at one setting over-fits it. As in the paper, each lifetime draws its agent
learning rate and ``alpha_y`` from a per-environment bandit over ``lr_arms x alpha_y_arms``:
arms are scored by the mean return of the lifetimes that used them (a running average), and
drawn by a softmax over standardised scores (``bandit_temperature``).

What ``y`` learns. With ``probe_every > 0`` the curve records, per tabular train env, the
held-out R^2 of a linear read-out of ``y(s)`` for the true optimal value ``V*(s)`` (value
iteration on lifetime 0's level, :mod:`metabench.envs.optimal`), the paper's test of whether
``y`` acquired a meaning; ``y_entropy`` (ln 30 = 3.401 for a uniform ``y``) shows whether the
rule uses ``y`` at all.

Departures from the paper, all for a CPU budget and named here: an LSTM of ``hidden`` units
(the paper: 256), a handful of lifetimes per env (the paper: many parallel lifetimes and
hundreds of millions of meta-training steps), and the critic also steps on the K training
rollouts, which the agent collected with slightly older parameters. The y regularisers'
weights are free settings: the gradient that reaches the y head through later targets is
tiny at first (about 4e-10 on tabular-sparse at initialisation, against 1e-4 for the pi
head), and at the default weight of 1e-3 the pull of the two y regularisers towards a
uniform ``y_hat`` is about 3000 times larger, so ``y`` never leaves uniform (measured for the
shipped run's settings; see docs/discovery.md).

Everything per environment (K updates of a population of lifetimes and the meta-gradient) is
one jitted call; environments with different observation spaces need separate agents, so
their meta-gradients are averaged in Python and one Adam step is taken on ``eta``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import harness
from metabench.discover import common
from metabench.discover.lpg_objective import (Critic, critic_advantage, critic_step,
                                              meta_objective)
from metabench.envs import optimal
from metabench.families import lpg as lpg_family
from metabench.families.base import finite_tree
from metabench.results import write_json_atomic
from metabench.tasks.spec import EnvSpec, TaskSpec, agent_config, make_env

FAMILY = "lpg"


@dataclasses.dataclass(frozen=True)
class LPGDiscoverConfig:
    """Settings of ``metabench discover lpg`` (defaults: CPU-sized)."""

    meta_steps: int = 200
    """Meta-gradient steps."""
    lifetimes: int = 8
    """Parallel lifetimes per train env."""
    inner_updates: int = 5
    """K: agent updates per meta-step that the meta-gradient goes through."""
    lifetime_updates: int | None = None
    """Agent updates per lifetime; None uses the task's budget (total_timesteps over the
    agent's steps per update)."""
    meta_lr: float = 1e-3
    """Adam learning rate on eta."""
    meta_grad_clip: float = 1.0
    """Global-norm clip of the meta-gradient."""
    meta_adam_eps: float = 1e-8
    """Adam's epsilon on eta (optax's default 1e-8). The meta-gradient that reaches the y head
    through later targets is about 4e-10 at initialisation, so at 1e-8 Adam shrinks the y
    head's steps about 25-fold against the other blocks; a smaller epsilon lets every block
    move at the rate ``meta_lr``."""
    beta_pi_entropy: float = 0.01
    """Weight of the entropy of the updated policy in the meta-objective."""
    beta_y_entropy: float = 0.001
    """Weight of the entropy of the updated prediction y."""
    beta_pi_hat: float = 0.001
    """Weight of the L2 penalty on pi_hat."""
    beta_y_hat: float = 0.001
    """Weight of the L2 penalty on y_hat."""
    hidden: int = 32
    """LSTM units of the rule (the paper uses 256)."""
    critic_lr: float = 0.05
    """Adam learning rate of the meta-critic (per lifetime; the agent and rule never see it)."""
    critic_lambda: float = 0.9
    """lambda of the meta-objective's GAE and of the critic's lambda-returns."""
    probe_every: int = 0
    """Meta-steps between probes of what ``y`` has learned (0: never): on tabular train
    envs, how well a linear read-out of ``y(s)`` predicts the true optimal state value."""
    lr_arms: tuple[float, ...] = ()
    """Agent learning rates the bandit balances over; empty uses only the task's rate."""
    alpha_y_arms: tuple[float, ...] = ()
    """Agent ``alpha_y`` values the bandit balances over; empty uses only the task's."""
    bandit_temperature: float = 1.0
    """Softmax temperature over standardised arm scores."""
    seed: int = 0
    """Seed of the meta-training."""
    checkpoint_every: int = 10
    """Meta-steps between checkpoints (a stopped run resumes from the last one)."""
    max_nonfinite_steps: int = 10
    """Meta-steps in a row whose meta-gradient is not finite that a run skips (eta unchanged,
    the offending envs' lifetimes restarted, the curve row marked ``skipped``) before it
    stops with an error; 0 stops at the first."""

    def __post_init__(self):
        object.__setattr__(self, "lr_arms", tuple(float(a) for a in self.lr_arms))
        object.__setattr__(self, "alpha_y_arms", tuple(float(a) for a in self.alpha_y_arms))
        for name in ("meta_steps", "lifetimes", "inner_updates", "hidden", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.lifetime_updates is not None and self.lifetime_updates < self.inner_updates:
            raise ValueError(f"lifetime_updates ({self.lifetime_updates}) must be at least "
                             f"inner_updates ({self.inner_updates})")
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be positive, got {self.meta_lr}")
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"max_nonfinite_steps must be non-negative, got "
                             f"{self.max_nonfinite_steps}")
        if not self.meta_adam_eps > 0:
            raise ValueError(f"meta_adam_eps must be positive, got {self.meta_adam_eps}")
        if not self.critic_lr > 0:
            raise ValueError(f"critic_lr must be positive, got {self.critic_lr}")
        if not 0.0 <= self.critic_lambda <= 1.0:
            raise ValueError(f"critic_lambda must be in [0, 1], got {self.critic_lambda}")
        if any(a <= 0 for a in self.lr_arms):
            raise ValueError(f"lr_arms must be positive, got {self.lr_arms}")
        if any(a < 0 for a in self.alpha_y_arms):
            raise ValueError(f"alpha_y_arms must be non-negative, got {self.alpha_y_arms}")


class Lifetimes(NamedTuple):
    """A population of agents mid-lifetime (leaves have a leading lifetime axis)."""

    agent: lpg_family.RunnerState
    critic: Any
    """The meta-critic's parameters (per lifetime)."""
    critic_opt: Any
    """Its optimiser state."""
    age: jax.Array
    """Agent updates done in the current lifetime."""
    arm: jax.Array
    """Index of the (learning rate, alpha_y) arm this lifetime uses."""
    ret_sum: jax.Array
    """Sum of returns of episodes finished in this lifetime (for the bandit)."""
    episodes: jax.Array
    """Episodes finished in this lifetime."""


class MetaStats(NamedTuple):
    objective: jax.Array
    """The policy-gradient surrogate of the updated agents (its gradient is the meta-grad)."""
    validation_return: jax.Array
    """Mean undiscounted reward per step of the validation rollouts."""
    pi_entropy: jax.Array
    y_entropy: jax.Array
    pi_hat_sq: jax.Array
    y_hat_sq: jax.Array
    critic_error: jax.Array
    """Mean squared error of the meta-critic against its lambda-returns (before its step)."""
    finished_return: jax.Array
    """Sum of returns of lifetimes that ended this meta-step, per arm ``[arms]``."""
    finished_count: jax.Array
    """How many lifetimes ended this meta-step, per arm ``[arms]``."""


class _EnvMeta:
    """Per train env: the agent, the jitted meta-gradient over its lifetimes, resets."""

    def __init__(self, spec: EnvSpec, task: TaskSpec, rule, cfg: LPGDiscoverConfig):
        self.spec = spec
        env, _, sampler = make_env(spec)
        self.env = env
        self.config = agent_config(task, FAMILY, spec)
        self.arms = [(lr, ay) for lr in (cfg.lr_arms or (self.config.lr,))
                     for ay in (cfg.alpha_y_arms or (self.config.alpha_y,))]
        config = dataclasses.replace(self.config, lr=1.0)  # the arm's rate scales the update
        self.agent = lpg_family.make_agent(env, config, rule, sample_params=sampler)
        self.steps_per_update = config.num_envs * config.rollout_len
        self.lifetime_updates = int(cfg.lifetime_updates or max(
            cfg.inner_updates, task.total_timesteps // self.steps_per_update))
        self.cfg = cfg
        agent, k = self.agent, cfg.inner_updates
        gamma = config.gamma

        critic = Critic(config.network, config.hidden, self.agent.network.one_hot)
        self.critic = critic
        critic_opt = optax.adam(cfg.critic_lr)
        self.critic_opt = critic_opt
        lam = cfg.critic_lambda

        def scaled_update(state, mp, traj, arm):
            # The agent's optimiser runs at rate 1; the arm's rate scales its step, which is
            # the same as building the optimiser at that rate (adam, rmsprop and sgd alike).
            # Targets come from outside the agent's gradient (constants to the agent) but
            # keep their dependence on earlier updates, which the meta-gradient follows.
            lr, alpha_y = arm[0], arm[1]
            target = agent.targets(state.params, mp, traj)
            grads = jax.grad(agent.loss)(state.params, target, traj, alpha_y)
            updates, opt_state = agent.optimiser.update(grads, state.opt_state, state.params)
            updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
            params = optax.apply_updates(state.params, updates)
            return state._replace(params=params, opt_state=opt_state), target

        def one_lifetime(mp, lt: Lifetimes, arm):
            def body(state, _):
                frozen = state._replace(params=jax.lax.stop_gradient(state.params))
                frozen, traj, finished = agent.rollout(frozen)
                state = state._replace(env_state=frozen.env_state, obs=frozen.obs,
                                       episode_return=frozen.episode_return, rng=frozen.rng)
                state, target = scaled_update(state, mp, traj, arm)
                sq = (jnp.mean(target.pi_hat ** 2), jnp.mean(jnp.sum(target.y_hat ** 2, -1)))
                return state, (finished, sq, traj)

            state, (finished, sq, trajs) = jax.lax.scan(body, lt.agent, None, length=k)
            # Validation rollout with the updated agent: its policy-gradient objective, with
            # the meta-critic's advantage (bootstrapped past the window).
            frozen = state._replace(params=jax.lax.stop_gradient(state.params))
            frozen, traj, fin_v = agent.rollout(frozen)
            adv, _ = critic_advantage(critic, lt.critic, traj, gamma, lam)
            adv = adv / (jnp.std(adv) + 1e-8)
            logits, y_logits = agent.network.apply(
                state.params, traj.obs.reshape((-1, *traj.obs.shape[2:])).astype(jnp.float32))
            pi_hat_sq, y_hat_sq = jnp.mean(sq[0]), jnp.mean(sq[1])
            objective, (pg, pi_ent, y_ent) = meta_objective(
                logits, y_logits, traj.action.reshape(-1), adv.reshape(-1), pi_hat_sq,
                y_hat_sq, cfg)
            # The critic follows the agent: one step towards the lambda-returns of every
            # rollout of this meta-step (the K training rollouts and the validation one).
            all_trajs = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([a.reshape((-1, *a.shape[2:])), b], axis=0),
                trajs, traj)
            c_params, c_opt, c_err = critic_step(
                critic, critic_opt, jax.lax.stop_gradient(lt.critic), lt.critic_opt,
                all_trajs, gamma, lam)
            state = frozen._replace(params=jax.lax.stop_gradient(state.params),
                                    opt_state=jax.lax.stop_gradient(state.opt_state))
            ret_sum = lt.ret_sum + jnp.sum(finished[0]) + fin_v[0]
            episodes = lt.episodes + jnp.sum(finished[1]) + fin_v[1]
            new = Lifetimes(state, c_params, jax.lax.stop_gradient(c_opt), lt.age + k, lt.arm,
                            ret_sum, episodes)
            stats = (objective, jnp.mean(traj.reward), pi_ent, y_ent, pi_hat_sq, y_hat_sq,
                     2.0 * c_err)  # the mean squared error
            return objective, (new, stats)

        def population(mp, lts: Lifetimes, arm_values):
            objs, (new, stats) = jax.vmap(one_lifetime, in_axes=(None, 0, 0))(
                mp, lts, arm_values[lts.arm])
            return jnp.mean(objs), (new, jax.tree_util.tree_map(jnp.mean, stats))

        grad = jax.grad(population, has_aux=True)

        def meta_grad(mp, lts: Lifetimes, arm_values, arm_probs, key):
            g, (new, stats) = grad(mp, lts, arm_values)
            # Lifetimes that reached their end: record their return for the bandit, restart.
            ended = new.age >= self.lifetime_updates
            mean_ret = new.ret_sum / jnp.maximum(new.episodes, 1.0)
            n_arms = arm_values.shape[0]
            onehot = jax.nn.one_hot(new.arm, n_arms) * ended[:, None]
            fin_ret = jnp.sum(onehot * mean_ret[:, None], 0)
            fin_cnt = jnp.sum(onehot, 0)
            k_init, k_arm = jax.random.split(key)
            fresh = self.fresh(jax.random.split(k_init, ended.shape[0]), k_arm, arm_probs)
            pick = lambda a, b: jnp.where(  # noqa: E731
                ended.reshape(ended.shape + (1,) * (a.ndim - 1)), b, a)
            new = jax.tree_util.tree_map(pick, new, fresh)
            return g, new, MetaStats(*stats, fin_ret, fin_cnt)

        self.meta_grad = jax.jit(meta_grad)

        def probe_rollouts(state, n):
            def body(st, _):
                st, traj, _ = agent.rollout(st)
                return st, traj.obs
            _, obs = jax.lax.scan(body, state, None, length=n)
            return obs

        self._probe_rollouts = jax.jit(probe_rollouts, static_argnums=1)
        self.arm_values = jnp.asarray(self.arms, jnp.float32)  # [arms, (lr, alpha_y)]

    def fresh(self, keys, arm_key, arm_probs) -> Lifetimes:
        agent = jax.lax.map(self.agent.init, keys)
        n = keys.shape[0]
        obs = agent.obs[:, :1].astype(jnp.float32)
        c_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        critic = jax.lax.map(lambda ko: self.critic.init(ko[0], ko[1]), (c_keys, obs))
        critic_opt = jax.vmap(self.critic_opt.init)(critic)
        arm = jax.random.choice(arm_key, arm_probs.shape[0], (n,), p=arm_probs)
        z = jnp.zeros(n)
        return Lifetimes(agent, critic, critic_opt, jnp.zeros(n, jnp.int32),
                         arm.astype(jnp.int32), z, z)

    def start(self, key) -> Lifetimes:
        """A population whose ages are staggered over the lifetime."""
        n = self.cfg.lifetimes
        probs = jnp.full(len(self.arms), 1.0 / len(self.arms))
        k1, k2 = jax.random.split(key)
        lts = jax.jit(self.fresh)(jax.random.split(k1, n), k2, probs)
        # Staggered ages: a lifetime at age a ends after (lifetime - a) more updates.
        span = self.lifetime_updates
        ages = (jnp.arange(n) * span // n // self.cfg.inner_updates) * self.cfg.inner_updates
        return lts._replace(age=ages.astype(jnp.int32))


def linear_readout_r2(features: np.ndarray, target: np.ndarray) -> float:
    """Held-out R^2 of a least-squares linear read-out (with intercept) of ``target [S]`` from
    ``features [S, m]``: fitted on the even-indexed rows, scored on the odd ones (so a 30-
    dimensional y cannot score by memorising a few states). NaN with fewer than 4 rows."""
    if len(target) < 4:
        return float("nan")
    x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    fit, test = slice(0, None, 2), slice(1, None, 2)
    w, *_ = np.linalg.lstsq(x[fit], target[fit], rcond=None)
    resid = target[test] - x[test] @ w
    var = np.var(target[test])
    return float(1.0 - np.mean(resid ** 2) / var) if var > 0 else float("nan")


def probe_y(e: "_EnvMeta", lts: Lifetimes, rollouts: int = 4) -> dict | None:
    """What lifetime 0's agent's ``y`` has come to predict, on a tabular grid: the held-out
    R^2 of a linear read-out of y(s) for the true discounted optimal value V*(s) (value
    iteration on the lifetime's level, metabench.envs.optimal), over the distinct states its
    policy visits in ``rollouts`` fresh rollouts; None for envs the solver cannot handle."""
    env = e.env
    if not (env.tabular and optimal.can_solve(env)):
        return None
    state = jax.tree_util.tree_map(lambda x: x[0], lts.agent)
    params = jax.device_get(state.env_params)
    values = optimal.optimal_values(env, params, e.config.gamma)
    obs = np.asarray(e._probe_rollouts(state, rollouts))
    index = np.unique(obs.reshape(-1, obs.shape[-1]).argmax(-1))
    _, y_logits = e.agent.network.apply(state.params, jnp.eye(obs.shape[-1])[index])
    y = np.asarray(jax.nn.softmax(y_logits, axis=-1))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(index))
    return {"y_value_r2": round(linear_readout_r2(y[order], values[index][order]), 4),
            "probe_states": int(len(index))}


class Bandit:
    """Per env, a running mean return per learning-rate arm and a softmax over them."""

    def __init__(self, n_arms: int, temperature: float):
        self.sums = np.zeros(n_arms)
        self.counts = np.zeros(n_arms)
        self.temperature = temperature

    def update(self, ret_sum: np.ndarray, count: np.ndarray) -> None:
        self.sums += ret_sum
        self.counts += count

    def probs(self) -> np.ndarray:
        n = len(self.sums)
        if n == 1:
            return np.ones(1)
        means = np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), np.nan)
        if np.all(np.isnan(means)):
            return np.full(n, 1.0 / n)
        known = means[~np.isnan(means)]
        z = (means - known.mean()) / (known.std() + 1e-8)
        z = np.where(np.isnan(z), z[~np.isnan(z)].max(), z)  # untried arms look promising
        p = np.exp((z - z.max()) / self.temperature)
        return p / p.sum()

    def state(self) -> dict:
        return {"sums": self.sums.tolist(), "counts": self.counts.tolist()}

    def load(self, d: dict) -> None:
        self.sums, self.counts = np.asarray(d["sums"], float), np.asarray(d["counts"], float)


def evaluate_objective(task: TaskSpec, cfg: LPGDiscoverConfig, eta: Any, seed: int = 0,
                       repeats: int = 1) -> float:
    """The meta-objective of ``eta`` on fixed lifetimes (drawn from ``seed``), averaged over
    train envs and ``repeats`` meta-steps: comparable across ``eta`` (common random numbers),
    so it shows what meta-training bought."""
    rule = lpg_family.lpg(hidden=cfg.hidden)
    out = []
    for spec in task.split("train"):
        e = _EnvMeta(spec, task, rule, cfg)
        key = jax.random.PRNGKey(seed)
        key, k = jax.random.split(key)
        pop = e.start(k)
        probs = jnp.full(len(e.arms), 1.0 / len(e.arms))
        for _ in range(repeats):
            key, k = jax.random.split(key)
            _, pop, stats = e.meta_grad(eta, pop, e.arm_values, probs, k)
            out.append(float(stats.objective))
    return float(np.mean(out))


class DiscoverResult(NamedTuple):
    meta_params: Any
    curve: list[dict]
    summary: dict
    out_dir: Path


def discover(task: TaskSpec, cfg: LPGDiscoverConfig, out_dir: str | Path, *,
             command: str | None = None, log: Callable[[str], None] = print,
             author: str = "metabench discover lpg") -> DiscoverResult:
    """Meta-trains LPG on ``task``'s train split; writes ``curve.jsonl``, checkpoints
    (``checkpoint.npz`` + ``checkpoint.json``, resumed from when present and compatible;
    ``curve.jsonl`` is then cut back to the checkpoint's rows, so meta-steps a stopped run did
    after it are not listed twice), ``summary.json`` and ``submission/`` (parameters +
    disclosure) under ``out_dir``."""
    if FAMILY not in task.families():
        raise ValueError(f"task {task.id} has no {FAMILY} agent config")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rule = lpg_family.lpg(hidden=cfg.hidden)
    envs = [_EnvMeta(spec, task, rule, cfg) for spec in task.split("train")]
    key = jax.random.PRNGKey(cfg.seed)
    key, k_eta = jax.random.split(key)
    eta = rule.init(k_eta)
    opt = optax.chain(optax.clip_by_global_norm(cfg.meta_grad_clip),
                      optax.adam(cfg.meta_lr, eps=cfg.meta_adam_eps))
    opt_state = opt.init(eta)
    bandits = [Bandit(len(e.arms), cfg.bandit_temperature) for e in envs]
    pops = []
    for e in envs:
        key, k = jax.random.split(key)
        pops.append(e.start(k))
    start_step, curve, env_steps, wall_prev = 0, [], 0, 0.0
    config_json = json.loads(json.dumps(dataclasses.asdict(cfg)))
    ckpt = common.Checkpoint(out_dir, config_json, task.fingerprint("lpg"), "step",
                             "meta_steps", "meta-step")
    found = ckpt.resume((eta, opt_state, pops, key), cfg.meta_steps, log)
    if found is not None:
        (eta, opt_state, pops, key), meta = found
        for b, d in zip(bandits, meta["bandits"]):
            b.load(d)
        start_step, curve = meta["step"], meta["curve"]
        env_steps, wall_prev = meta["env_steps"], meta["wall_s"]
    # Rows past the checkpoint (a run stopped between checkpoints) are dropped and redone.
    common.reset_curve(out_dir / "curve.jsonl", curve)
    update_eta = jax.jit(lambda g, s, p: _adam_step(opt, g, s, p))
    t0 = time.perf_counter()
    log(f"discover lpg: {task.id} train split ({', '.join(e.spec.name for e in envs)}), "
        f"{cfg.lifetimes} lifetimes x {cfg.inner_updates} updates per meta-step, lifetimes of "
        f"{', '.join(str(e.lifetime_updates) for e in envs)} updates, {cfg.meta_steps} "
        f"meta-steps")

    def save(step: int) -> None:
        ckpt.save((eta, opt_state, pops, key), step, curve=curve,
                  bandits=[b.state() for b in bandits], env_steps=env_steps,
                  wall_s=wall_prev + time.perf_counter() - t0)

    for step in range(start_step, cfg.meta_steps):
        grads, rows = [], {}
        for i, (e, b) in enumerate(zip(envs, bandits)):
            key, k = jax.random.split(key)
            probs = jnp.asarray(b.probs(), jnp.float32)
            g, pops[i], stats = e.meta_grad(eta, pops[i], e.arm_values, probs, k)
            stats = jax.device_get(stats)
            b.update(np.asarray(stats.finished_return), np.asarray(stats.finished_count))
            grads.append(g)
            env_steps += cfg.lifetimes * (cfg.inner_updates + 1) * e.steps_per_update
            rows[e.spec.name] = {"objective": float(stats.objective),
                                 "validation_reward": float(stats.validation_return),
                                 "pi_entropy": float(stats.pi_entropy),
                                 "y_entropy": float(stats.y_entropy),
                                 "critic_error": float(stats.critic_error),
                                 "arm_probs": [round(float(p), 4) for p in b.probs()]}
        if cfg.probe_every and (step + 1) % cfg.probe_every == 0:
            for i, e in enumerate(envs):
                found = probe_y(e, pops[i])
                if found is not None:
                    rows[e.spec.name].update(found)
        bad = [i for i, gi in enumerate(grads) if not finite_tree(gi)]
        skipped = {}
        if bad:
            # One diverged lifetime poisons its env's meta-gradient: skip the step (eta and
            # Adam unchanged), restart that env's lifetimes, and stop only when it persists.
            streak = 1 + next((n for n, r in enumerate(reversed(curve)) if "skipped" not in r),
                              len(curve))
            names = [envs[i].spec.name for i in bad]
            if streak > cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"non-finite meta-gradient at meta-step {step + 1} ({', '.join(names)}), "
                    f"{streak} meta-steps in a row (--max-nonfinite-steps "
                    f"{cfg.max_nonfinite_steps})")
            for i in bad:
                key, k = jax.random.split(key)
                pops[i] = envs[i].start(k)
            skipped = {"skipped": names}
            log(f"  meta-step {step + 1}: non-finite meta-gradient on {', '.join(names)}; "
                f"step skipped, their lifetimes restarted")
        else:
            g = jax.tree_util.tree_map(lambda *xs: -sum(xs) / len(xs), *grads)  # ascend J
            eta, opt_state = update_eta(g, opt_state, eta)
        row = {"step": step + 1, **skipped, "env_steps": env_steps,
               "wall_s": round(wall_prev + time.perf_counter() - t0, 2), "envs": rows,
               "objective": float(np.mean([r["objective"] for r in rows.values()])),
               "validation_reward": float(np.mean([r["validation_reward"]
                                                   for r in rows.values()]))}
        curve.append(row)
        with open(out_dir / "curve.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.meta_steps:
            save(step + 1)
            log(f"  meta-step {step + 1:4d}: objective {row['objective']:+.4f}  validation "
                f"reward/step {row['validation_reward']:.4f}  {row['wall_s']:.0f}s")
    summary = {
        "task": {"id": task.id, "fingerprint": task.fingerprint("lpg"), "split": "train",
                 "train_envs": [e.spec.name for e in envs]},
        "config": config_json,
        "lifetime_updates": {e.spec.name: e.lifetime_updates for e in envs},
        "bandit": {e.spec.name: {"arms (lr, alpha_y)": e.arms, "probs": b.probs().tolist(),
                                 **b.state()} for e, b in zip(envs, bandits)},
        "env_steps": env_steps, "wall_s": wall_prev + time.perf_counter() - t0,
        "meta_steps": cfg.meta_steps, "provenance": harness.provenance(command),
        "curve_first": curve[0] if curve else None, "curve_last": curve[-1] if curve else None,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    write_submission(out_dir / "submission", eta, task, summary, author)
    return DiscoverResult(eta, curve, summary, out_dir)


def _adam_step(opt, g, s, p):
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s


def write_submission(folder: Path, eta: Any, task: TaskSpec, summary: dict,
                     author: str) -> Path:
    """LPG's meta-parameters as a ready ``lpg`` submission (``factory: lpg`` with the
    parameter file), disclosure filled in, ``discovery.json`` beside it."""
    cfg = summary["config"]
    return common.write_submission(
        folder, name=f"lpg-{task.id}", family=FAMILY,
        rule={"factory": "lpg", "kwargs": {"hidden": cfg["hidden"]}},
        description=f"LPG meta-trained by `metabench discover lpg` on {task.id} (train split).",
        paper="https://arxiv.org/abs/2007.08794", task=task, summary=summary, author=author,
        params=eta, notes=(f"metabench discover lpg: {summary['meta_steps']} meta-steps, "
                           f"{cfg['lifetimes']} lifetimes per env, K = {cfg['inner_updates']}."))


def y_readout(task: TaskSpec, rule, meta_params: Any, env_name: str, *, updates: int = 300,
              seeds: int = 4, seed: int = 0) -> list[float]:
    """What a rule teaches ``y``, measured outside meta-training: trains ``seeds`` fresh agents
    (each on its own level of train env ``env_name``, at the task's agent settings) for
    ``updates`` updates with ``rule`` and returns, per agent, the held-out R^2 of a linear
    read-out of ``y(s)`` for the optimal discounted value ``V*(s)`` over the states its
    policy visits (:func:`probe_y`). Comparable across rules (the same levels and seeds):
    ``actor_critic``'s ``y`` *is* a value, an untrained LPG's carries no meaning."""
    spec = next(e for e in task.split("train") if e.name == env_name)
    cfg = LPGDiscoverConfig(lifetimes=seeds, inner_updates=1, lifetime_updates=updates)
    e = _EnvMeta(spec, task, rule, cfg)
    config = agent_config(task, FAMILY, spec)
    env, _, sampler = make_env(spec)
    agent = lpg_family.make_agent(env, config, rule, sample_params=sampler)

    @jax.jit
    def train(key):
        def body(state, _):
            state, traj, _ = agent.rollout(state)
            state, _, _ = agent.update(state, meta_params, traj)
            return state, None
        return jax.lax.scan(body, agent.init(key), None, length=updates)[0]

    out = []
    for i in range(seeds):
        state = train(jax.random.fold_in(jax.random.PRNGKey(seed), i))
        lts = jax.tree_util.tree_map(lambda x: x[None], state)
        found = probe_y(e, Lifetimes(lts, None, None, None, None, None, None))
        out.append(float("nan") if found is None else found["y_value_r2"])
    return out

"""The drift family: PPO as mirror learning, with the drift function as the rule.

Mirror learning (Kuba et al. 2022) views PPO as maximising ``E[r A] - E[drift(r, A)]`` where
``r = pi(a|s) / pi_old(a|s)`` and ``A`` is the (normalised) advantage. A *valid* drift is
non-negative, zero at ``r = 1`` and has zero derivative in ``r`` there. PPO-clip's drift is
``relu((r - clip(r, 1-eps, 1+eps)) A)``; Discovered Policy Optimisation (DPO) and Learned
Policy Optimisation (LPO) come from Lu et al. 2022, "Discovered Policy Optimisation"
(NeurIPS). The agent around the rule is a PureJaxRL-style PPO, fixed by the task.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import nets
from metabench.families.base import (Check, CheckReport, Family, Trainer, actor_critic_rollout,
                                     check_config, check_rule, env_info, register_family,
                                     update_count)
from metabench.params_io import shipped_params
from metabench.rl import (RunningStats, normalise, normalise_obs, running_stats_init,
                          running_stats_update, truncated_gae)
from metabench.rules import RuleInfo, UpdateRule, no_params
from metabench.types import Metrics


class Inputs(NamedTuple):
    """What a drift sees, per sample of a minibatch (shapes ``[N]``)."""

    ratio: jax.Array
    """``pi(a|s) / pi_old(a|s)``."""
    log_ratio: jax.Array
    """``log pi(a|s) - log pi_old(a|s)``."""
    advantage: jax.Array
    """GAE advantage, normalised over the minibatch."""


@dataclasses.dataclass(frozen=True)
class Config:
    """PPO's fixed hyperparameters (defaults: PureJaxRL's CartPole settings)."""

    num_envs: int = 4
    """Parallel environments per seed."""
    rollout_len: int = 128
    """Steps per environment between updates."""
    epochs: int = 4
    """Passes over each rollout."""
    minibatches: int = 4
    """Minibatches per epoch; must divide num_envs * rollout_len."""
    lr: float = 2.5e-4
    """Adam learning rate."""
    anneal_lr: bool = True
    """Linearly anneal the learning rate to zero over training."""
    gamma: float = 0.99
    """Discount."""
    gae_lambda: float = 0.95
    """GAE lambda."""
    ent_coef: float = 0.01
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value loss weight."""
    value_clip: float = 0.2
    """Value-function clipping range (PureJaxRL clips values like the policy); 0 disables."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip."""
    network: str = "mlp"
    """``mlp`` (flattened observations) or ``cnn`` (MinAtar torso)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes (for ``cnn``, the last is the dense layer after the conv)."""
    activation: str = "tanh"
    """``tanh`` or ``relu`` for the MLP."""
    normalize_obs: bool = False
    """Standardise observations by their running mean and variance (over every observation
    of every rollout so far, shared by the ``num_envs`` copies of a seed), as Brax's PPO
    does. Each update uses the statistics its rollout acted with, so the policy ratio starts
    at exactly 1; the rollout's observations enter the statistics after the update."""

    def __post_init__(self):
        check_config(self, ("num_envs", "rollout_len", "epochs", "minibatches", "lr"), {"network": ("mlp", "cnn"), "activation": ("tanh", "relu")})
        if (self.num_envs * self.rollout_len) % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide num_envs * "
                             f"rollout_len ({self.num_envs * self.rollout_len})")
        if not isinstance(self.normalize_obs, bool):
            raise ValueError(f"normalize_obs must be true or false, got {self.normalize_obs!r}")


# --- reference rules ---------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def ppo_clip(epsilon: float = 0.2) -> UpdateRule:
    """PPO-clip (Schulman et al. 2017) as a drift: ``relu((r - clip(r, 1-eps, 1+eps)) A)``."""

    def apply(meta_params, x: Inputs):
        del meta_params
        return nn.relu((x.ratio - jnp.clip(x.ratio, 1 - epsilon, 1 + epsilon)) * x.advantage)

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def dpo(alpha: float = 2.0, beta: float = 0.6) -> UpdateRule:
    """DPO's closed-form drift (Lu et al. 2022, eq. for Discovered Policy Optimisation).

    ``relu((r-1)A - alpha tanh((r-1)A / alpha))`` for ``A >= 0`` and
    ``relu(log(r)A - beta tanh(log(r)A / beta))`` for ``A < 0``.
    """

    def apply(meta_params, x: Inputs):
        del meta_params
        pos = (x.ratio - 1.0) * x.advantage
        neg = x.log_ratio * x.advantage
        return jnp.where(x.advantage >= 0,
                         nn.relu(pos - alpha * jnp.tanh(pos / alpha)),
                         nn.relu(neg - beta * jnp.tanh(neg / beta)))

    return UpdateRule(no_params, apply)


@functools.lru_cache(maxsize=None)
def null_drift() -> UpdateRule:
    """A control, not a rule to use: the drift ``(r - 1) A`` cancels the objective's ``r A``
    up to the constant ``A``, so the policy gets no gradient from the advantage at all; only
    the entropy bonus moves it (towards uniform) and the critic still learns. It is not a
    mirror drift (negative wherever ``(r - 1) A < 0``), and the family's check says so."""

    def apply(meta_params, x: Inputs):
        del meta_params
        return (x.ratio - 1.0) * x.advantage

    return UpdateRule(no_params, apply)


def lpo_features(x: Inputs) -> jax.Array:
    """LPO's 8 inputs: ``(1-r), (1-r)^2, log r, (log r)^2`` and each times ``A``."""
    one_minus_r = 1.0 - x.ratio
    base = jnp.stack([one_minus_r, one_minus_r**2, x.log_ratio, x.log_ratio**2], axis=-1)
    return jnp.concatenate([base, base * x.advantage[..., None]], axis=-1)


@functools.lru_cache(maxsize=None)
def lpo(hidden: int = 128, shift: float = 1e-4, epsilon: float = 0.2) -> UpdateRule:
    """LPO's drift network (Lu et al. 2022): ``relu(ppo_drift + f(features) - shift)``.

    ``f`` is one hidden layer of ``hidden`` tanh units without biases, so ``f = 0`` at
    ``r = 1`` where every feature vanishes; the small ``shift`` makes the drift flat around
    ``r = 1`` for small ``f`` (zero gradient there). The output layer starts at zero, so at
    initialisation the rule is PPO-clip up to ``shift``.
    """
    ppo = ppo_clip(epsilon)

    class DriftNet(nn.Module):
        @nn.compact
        def __call__(self, feats):
            h = nn.tanh(nn.Dense(hidden, use_bias=False)(feats))
            return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)(h)[..., 0]

    net = DriftNet()

    def init(rng):
        return net.init(rng, jnp.zeros((1, 8)))

    def apply(meta_params, x: Inputs):
        return nn.relu(ppo.apply({}, x) + net.apply(meta_params, lpo_features(x)) - shift)

    return UpdateRule(init, apply)


def _lpo_default_params(rule: UpdateRule):
    # The shipped metabench/params/lpo.npz (from `metabench discover lpo`); without that file
    # the rule runs at its initialisation, which is PPO-clip, and the record says so.
    return shipped_params("lpo", rule, "untrained: LPO at its PPO-clip initialisation")


REFERENCE_RULES = {
    "ppo_clip": RuleInfo("ppo_clip", "drift", ppo_clip, "PPO-clip drift, epsilon=0.2",
                         "Schulman et al. 2017, Proximal Policy Optimization Algorithms"),
    "dpo": RuleInfo("dpo", "drift", dpo, "Discovered Policy Optimisation, alpha=2, beta=0.6",
                    "Lu et al. 2022, Discovered Policy Optimisation"),
    "lpo": RuleInfo("lpo", "drift", lpo, "Learned Policy Optimisation drift network",
                    "Lu et al. 2022, Discovered Policy Optimisation",
                    default_params=_lpo_default_params),
    "null_drift": RuleInfo("null_drift", "drift", null_drift,
                           "control: the drift (r - 1) A cancels the policy gradient",
                           "metabench control", control=True),
}


# --- the inner loop ----------------------------------------------------------------------


class Batch(NamedTuple):
    """The learner's view of a rollout, flattened to ``[N, ...]``."""

    obs: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    advantage: jax.Array
    target: jax.Array


class RunnerState(NamedTuple):
    params: Any
    opt_state: Any
    env_state: Any
    obs: jax.Array
    env_params: Any
    episode_return: jax.Array
    rng: jax.Array
    obs_stats: RunningStats | None = None
    """Running observation statistics (``normalize_obs``), else None (no leaves)."""


def make_train(env, config: Config, rule: UpdateRule, *, total_timesteps: int,
               sample_params: Callable[[jax.Array], Any] | None = None,
               env_params: Any = None) -> Trainer:
    """PPO on ``env`` with ``rule`` as the drift; see :class:`Trainer` for the pieces."""
    sample_params, continuous, action_dim, low, high, obs_shape = env_info(
        env, sample_params, env_params)

    steps_per_update, num_updates = update_count(total_timesteps, config.num_envs,
                                                 config.rollout_len)
    minibatch_size = steps_per_update // config.minibatches

    network = nets.ActorCritic(action_dim=action_dim, continuous=continuous,
                               torso=config.network, hidden=config.hidden,
                               activation=config.activation)
    if config.anneal_lr:
        n_grad = num_updates * config.epochs * config.minibatches
        lr = optax.linear_schedule(config.lr, 0.0, n_grad)
    else:
        lr = config.lr
    optimiser = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                            optax.adam(lr, eps=1e-5))

    env_reset = jax.vmap(env.reset, in_axes=(0, None))
    norm = config.normalize_obs

    def see(stats, obs):
        """What the networks see of ``obs``: raw, or standardised by ``stats``."""
        return normalise_obs(stats, obs) if norm else obs

    def acting_apply(params_and_stats, obs):
        params, stats = params_and_stats
        return network.apply(params, see(stats, obs))

    # The shared rollout hands its params straight to apply: with normalisation they are the
    # pair (network params, statistics).
    rollout = actor_critic_rollout(env, acting_apply if norm else network.apply,
                                   config.num_envs, config.rollout_len, continuous, low, high)

    def init(rng) -> RunnerState:
        rng, k_net, k_env, k_params = jax.random.split(rng, 4)
        env_params = sample_params(k_params)
        params = network.init(k_net, jnp.zeros((1, *obs_shape)))
        obs, env_state = env_reset(jax.random.split(k_env, config.num_envs), env_params)
        return RunnerState(params, optimiser.init(params), env_state, obs, env_params,
                           jnp.zeros(config.num_envs), rng,
                           running_stats_init(obs_shape) if norm else None)

    def loss_fn(params, meta_params, t: Batch):
        adv, target = t.advantage, t.target
        out, value = network.apply(params, t.obs)
        logp = nets.log_prob(out, t.action, continuous)
        log_ratio = logp - t.log_prob
        ratio = jnp.exp(log_ratio)
        adv = normalise(adv)
        drift = rule.apply(meta_params, Inputs(ratio, log_ratio, adv))
        policy_objective = jnp.mean(ratio * adv - drift)
        if config.value_clip > 0:
            clipped = t.value + jnp.clip(value - t.value, -config.value_clip, config.value_clip)
            v_loss = 0.5 * jnp.mean(jnp.maximum((value - target) ** 2, (clipped - target) ** 2))
        else:
            v_loss = 0.5 * jnp.mean((value - target) ** 2)
        ent = jnp.mean(nets.entropy(out, continuous))
        loss = -policy_objective + config.vf_coef * v_loss - config.ent_coef * ent
        return loss, jnp.mean(drift)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: RunnerState, meta_params, i=None) -> tuple[RunnerState, Metrics]:
        del i  # PPO has no schedule beyond optax's own step count
        stats = state.obs_stats
        acting = (state.params, stats) if norm else state.params
        (env_state, obs, ep_ret, rng), traj, ret_sum, n_eps = rollout(
            acting, state.env_state, state.obs, state.env_params, state.episode_return,
            state.rng)
        # One critic-only pass over the true next observations: bootstraps truncations right.
        flat_final = see(stats, traj.final_obs.reshape((-1, *obs_shape)))
        next_value = network.apply(state.params, flat_final, method=network.value)
        next_value = next_value.reshape(traj.reward.shape)
        adv, target = truncated_gae(traj.reward, traj.value, next_value, traj.terminated,
                                    traj.truncated, config.gamma, config.gae_lambda)
        batch = Batch(see(stats, traj.obs), traj.action, traj.log_prob, traj.value, adv, target)
        flat = jax.tree_util.tree_map(lambda x: x.reshape((steps_per_update, *x.shape[2:])),
                                      batch)

        def epoch(c, key):
            params, opt_state = c
            perm = jax.random.permutation(key, steps_per_update)
            mbs = jax.tree_util.tree_map(
                lambda x: x[perm].reshape((config.minibatches, minibatch_size, *x.shape[1:])),
                flat)

            def minibatch(c, mb):
                params, opt_state = c
                (loss, drift), grads = grad_fn(params, meta_params, mb)
                updates, opt_state = optimiser.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), (loss, drift)

            return jax.lax.scan(minibatch, (params, opt_state), mbs)

        rng, k_epochs = jax.random.split(rng)
        (params, opt_state), (loss, drift) = jax.lax.scan(
            epoch, (state.params, state.opt_state), jax.random.split(k_epochs, config.epochs))
        if norm:
            stats = running_stats_update(stats, traj.obs.reshape((-1, *obs_shape)))
        new_state = RunnerState(params, opt_state, env_state, obs, state.env_params, ep_ret, rng,
                                stats)
        metrics = Metrics(returns_sum=jnp.sum(ret_sum), episodes=jnp.sum(n_eps),
                          loss=jnp.mean(loss), aux=jnp.mean(drift))
        return new_state, metrics

    return Trainer(init, step, num_updates, steps_per_update)


# --- conformance -------------------------------------------------------------------------


def mirror_grid(n_r: int = 41, n_a: int = 21) -> Inputs:
    """A grid of ratios in ``[0.2, 3]`` (including 1) crossed with advantages in ``[-3, 3]``."""
    r = np.unique(np.concatenate([np.geomspace(0.2, 3.0, n_r), [1.0]]))
    a = np.linspace(-3.0, 3.0, n_a)
    rr, aa = (x.ravel().astype(np.float32) for x in np.meshgrid(r, a))
    return Inputs(jnp.asarray(rr), jnp.log(jnp.asarray(rr)), jnp.asarray(aa))


def mirror_check(rule: UpdateRule, meta_params, tol: float = 1e-4) -> tuple[Check, ...]:
    """The mirror-learning laws on a grid: drift >= 0, drift(1, A) = 0, d drift / dr (1, A) = 0."""
    grid = mirror_grid()

    def drift_of(r, a):
        return rule.apply(meta_params, Inputs(r, jnp.log(r), a))

    values = np.asarray(drift_of(grid.ratio, grid.advantage))
    a = np.linspace(-3.0, 3.0, 21).astype(np.float32)
    ones = jnp.ones_like(a)
    at_one = np.asarray(drift_of(ones, jnp.asarray(a)))
    grad_r = np.asarray(jax.vmap(jax.grad(lambda r, x: drift_of(r[None], x[None])[0]))(
        ones, jnp.asarray(a)))
    worst_neg = float(values.min())
    return (
        Check("non_negative", worst_neg >= -tol, f"min drift on the grid {worst_neg:.3g}",
              required=False),
        Check("zero_at_ratio_one", float(np.abs(at_one).max()) <= tol,
              f"max |drift(1, A)| {float(np.abs(at_one).max()):.3g}", required=False),
        Check("zero_gradient_at_ratio_one", float(np.abs(grad_r).max()) <= tol,
              f"max |d drift/dr (1, A)| {float(np.abs(grad_r).max()):.3g}", required=False),
    )


def check(rule: UpdateRule, meta_params, name: str = "rule", batch: int = 64) -> CheckReport:
    """Finite outputs of the right shape and no recompilation on a second call (required), and
    mirror validity (reported as ``mirror_valid``)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    inputs = []
    for k1, k2 in ((keys[0], keys[1]), (keys[2], keys[3])):
        log_r = 0.3 * jax.random.normal(k1, (batch,))
        inputs.append(Inputs(jnp.exp(log_r), log_r, jax.random.normal(k2, (batch,))))

    def shape(outs):
        return (all(np.shape(o) == (batch,) for o in outs),
                f"expected ({batch},), got {np.shape(outs[0])}")

    def mirror(fn, outs, shape_ok):
        if not shape_ok:
            return []
        checks = mirror_check(rule, meta_params)
        valid = all(c.passed for c in checks)
        return [*checks, Check("mirror_valid", valid, "a valid mirror drift" if valid else
                               "not a valid mirror drift (reported, not required)",
                               required=False)]

    return check_rule("drift", name, rule, meta_params, inputs, shape, mirror)


FAMILY = register_family(Family(
    name="drift",
    description="PPO as mirror learning; the rule is the drift(ratio, advantage)",
    Inputs=Inputs,
    Config=Config,
    make_train=make_train,
    reference_rules=REFERENCE_RULES,
    check=check,
    baseline="ppo_clip",
))

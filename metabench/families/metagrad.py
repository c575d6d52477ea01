"""The meta-gradient family: an actor-critic whose return function adapts online.

Xu, van Hasselt and Silver 2018 ("Meta-Gradient Reinforcement Learning", NeurIPS) make the
return ``g_eta`` that an actor-critic learns from depend on meta-parameters ``eta`` (the
discount gamma and the bootstrapping lambda) and adapt ``eta`` while the agent trains: after
the agent updates ``theta -> theta'(eta)`` on one rollout, ``eta`` follows the gradient of a
meta-objective measured on the *next* rollout with a fixed discount ``gamma_bar``,

    d J'(tau', theta'(eta), eta_bar) / d eta
        = (g_eta_bar(tau') - v(s')) d log pi_theta'(a'|s') / d theta' . d theta'(eta) / d eta,

differentiating through the agent's whole optimiser step (gradient clipping and Adam
included). The rule is the return function ``apply(eta, Inputs) -> Outputs(g, eta_named)``
together with the initial values of its meta-parameters (``init``); the family adapts every
meta-parameter the return has a gradient in, so ``a2c_fixed`` (eta behind a stop-gradient) is
plain A2C and ``metagrad_gamma`` adapts gamma alone. The named values of ``eta`` are recorded
per update (``Metrics.traces``) and plotted on the leaderboard's submission pages.

Not done here: the paper also feeds ``eta`` to the agent's networks (conditioning the value
and policy on the return they are trained towards) and used IMPALA's V-trace on Atari.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metabench import nets
from metabench.families.base import (Check, CheckReport, Family, Trainer, actor_critic_rollout,
                                     check_config, check_rule, env_info, finite_tree,
                                     register_family, update_count)
from metabench.rl import truncated_gae
from metabench.rules import RuleInfo, UpdateRule
from metabench.types import Metrics


class Inputs(NamedTuple):
    """What a return function sees: one rollout, time-major ``[T, B]``."""

    reward: jax.Array
    """``r_{t+1}``."""
    value: jax.Array
    """``v(s_t)`` of the observation acted on (a constant: no gradient flows to the critic)."""
    next_value: jax.Array
    """``v(s_{t+1})`` of the true next observation, before any auto-reset (a constant)."""
    terminated: jax.Array
    """The episode ended in a terminal state after this step (no bootstrap)."""
    truncated: jax.Array
    """The episode was cut by a time limit after this step, in a non-terminal state
    (bootstrap from next_value). Never set together with ``terminated``: gymnax and
    gymnasium also report the time limit on a terminal last step, and the family clears it
    there, so a rule may bootstrap wherever ``truncated`` is set."""


class Outputs(NamedTuple):
    """A return function's result."""

    g: jax.Array
    """The return ``g_eta`` per step ``[T, B]``: the target of the critic and, minus the
    value, the advantage of the policy gradient."""
    eta: dict
    """Named scalars to record per update (e.g. ``{"gamma": ..., "lambda": ...}``)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """The actor-critic's fixed hyperparameters and the meta-objective's (defaults: small
    A2C settings that learn CartPole in 1.5e5 steps)."""

    num_envs: int = 16
    """Parallel environments per seed."""
    rollout_len: int = 16
    """Steps per environment between updates (one rollout is one agent update)."""
    lr: float = 1e-3
    """Adam learning rate of the agent."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip of the agent's update; 0 disables."""
    ent_coef: float = 0.01
    """Entropy bonus weight."""
    vf_coef: float = 0.5
    """Value loss weight."""
    meta_lr: float = 1e-2
    """Adam learning rate on the meta-parameters (their logits). Xu et al. 2018 used 0.001
    over 2e8 Atari frames; at this benchmark's 1e5-1e7 steps that barely moves eta."""
    gamma_bar: float = 0.99
    """Discount of the meta-objective's return."""
    lambda_bar: float = 1.0
    """Bootstrapping parameter of the meta-objective's return (Xu et al. 2018: 1)."""
    network: str = "mlp"
    """``mlp`` (flattened observations) or ``cnn`` (MinAtar torso)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden layer sizes (for ``cnn``, the last is the dense layer after the conv)."""
    activation: str = "tanh"
    """``tanh`` or ``relu`` for the MLP."""

    def __post_init__(self):
        check_config(self, ("num_envs", "rollout_len", "lr", "meta_lr"), {"network": ("mlp", "cnn"), "activation": ("tanh", "relu")})
        for name in ("gamma_bar", "lambda_bar"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


# --- reference rules: lambda-returns with squashed, optionally adapted, gamma and lambda ---


def lambda_return(x: Inputs, gamma: jax.Array, lambda_: jax.Array) -> jax.Array:
    """The truncation-aware lambda-return ``g`` (cut at episode ends) for any gamma, lambda."""
    _, g = truncated_gae(x.reward, x.value, x.next_value, x.terminated, x.truncated, gamma,
                         lambda_)
    return g


def _logit(p: float) -> float:
    return float(np.log(p) - np.log1p(-p))


def _squashed_return(gamma: float, lambda_: float, adapt: tuple[str, ...]) -> UpdateRule:
    if not (0.0 < gamma < 1.0 and 0.0 < lambda_ < 1.0):
        raise ValueError(f"gamma and lambda_ must be in (0, 1) (they are squashed by a "
                         f"sigmoid), got {gamma!r} and {lambda_!r}")

    def init(_):
        return {"gamma": jnp.float32(_logit(gamma)), "lambda": jnp.float32(_logit(lambda_))}

    def apply(meta_params, x: Inputs) -> Outputs:
        eta = {k: jax.nn.sigmoid(v) for k, v in meta_params.items()}
        # A frozen meta-parameter sits behind a stop-gradient: its meta-gradient is zero, so
        # the same agent runs plain A2C (Adam's step on a zero gradient is exactly zero).
        eta = {k: v if k in adapt else jax.lax.stop_gradient(v) for k, v in eta.items()}
        return Outputs(lambda_return(x, eta["gamma"], eta["lambda"]), eta)

    return UpdateRule(init, apply)


@functools.lru_cache(maxsize=None)
def a2c_fixed(gamma: float = 0.99, lambda_: float = 0.95) -> UpdateRule:
    """A2C: the lambda-return with gamma and lambda frozen at their initial values."""
    return _squashed_return(gamma, lambda_, ())


@functools.lru_cache(maxsize=None)
def metagrad_gamma(gamma: float = 0.99, lambda_: float = 0.95) -> UpdateRule:
    """The lambda-return with gamma adapted by meta-gradients (Xu et al. 2018), lambda fixed."""
    return _squashed_return(gamma, lambda_, ("gamma",))


@functools.lru_cache(maxsize=None)
def metagrad_gamma_lambda(gamma: float = 0.99, lambda_: float = 0.95) -> UpdateRule:
    """The lambda-return with gamma and lambda both adapted by meta-gradients."""
    return _squashed_return(gamma, lambda_, ("gamma", "lambda"))


@functools.lru_cache(maxsize=None)
def null_metagrad() -> UpdateRule:
    """A control, not a rule to use: the return is the critic's own value, ``g = v(s)``, so
    the advantage ``g - v`` is 0 and the critic's target is itself; the agent gets no signal
    from rewards (only the entropy bonus moves the policy, towards uniform)."""

    def apply(meta_params, x: Inputs) -> Outputs:
        del meta_params
        return Outputs(x.value, {})

    return UpdateRule(lambda _: {}, apply)


_XU = "Xu, van Hasselt and Silver 2018, Meta-Gradient Reinforcement Learning"
REFERENCE_RULES = {
    "a2c_fixed": RuleInfo("a2c_fixed", "metagrad", a2c_fixed,
                          "A2C with a fixed lambda-return (gamma 0.99, lambda 0.95)",
                          "Mnih et al. 2016, Asynchronous Methods for Deep RL"),
    "metagrad_gamma": RuleInfo("metagrad_gamma", "metagrad", metagrad_gamma,
                               "lambda-return with gamma adapted online by meta-gradients",
                               _XU),
    "metagrad_gamma_lambda": RuleInfo("metagrad_gamma_lambda", "metagrad",
                                      metagrad_gamma_lambda,
                                      "lambda-return with gamma and lambda adapted online", _XU),
    "null_metagrad": RuleInfo("null_metagrad", "metagrad", null_metagrad,
                              "control: the return is the critic's value, so no advantage",
                              "metabench control", control=True),
}


# --- the agent -----------------------------------------------------------------------------


class Batch(NamedTuple):
    """One rollout as the learner keeps it, time-major ``[T, B, ...]``."""

    obs: jax.Array
    action: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    value: jax.Array
    next_value: jax.Array

    def inputs(self) -> Inputs:
        return Inputs(self.reward, self.value, self.next_value, self.terminated,
                      self.truncated)


class Agent(NamedTuple):
    """The pure pieces of the agent, exposed so tests can differentiate through them."""

    network: Any
    optimiser: optax.GradientTransformation
    meta_optimiser: optax.GradientTransformation
    inner_update: Callable
    """``(params, opt_state, batch, eta_params) -> (params', opt_state', (loss, entropy, eta))``."""
    meta_loss: Callable
    """``(params', batch', advantage') -> -J'``: the meta-objective's policy-gradient surrogate
    on the next rollout; ``advantage'`` is ``g_eta_bar - v`` at the params that acted."""
    meta_gradient: Callable
    """``(prev_params, prev_opt_state, prev_batch, batch, eta_params) -> d(-J')/d eta``."""


class RunnerState(NamedTuple):
    params: Any
    opt_state: Any
    eta_delta: Any
    """The adapted offset of the meta-parameters from the rule's initial values."""
    meta_opt_state: Any
    prev_params: Any
    prev_opt_state: Any
    prev_batch: Batch
    env_state: Any
    obs: jax.Array
    env_params: Any
    episode_return: jax.Array
    rng: jax.Array


def make_agent(rule: UpdateRule, config: Config, action_dim: int, continuous: bool) -> Agent:
    network = nets.ActorCritic(action_dim=action_dim, continuous=continuous,
                               torso=config.network, hidden=config.hidden,
                               activation=config.activation)
    # eps_root keeps Adam's sqrt differentiable at a zero second moment (the meta-gradient
    # goes through it).
    adam = optax.adam(config.lr, eps=1e-5, eps_root=1e-12)
    optimiser = (optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)
                 if config.max_grad_norm > 0 else adam)
    meta_optimiser = optax.adam(config.meta_lr)

    def flat(x):
        return x.reshape((-1, *x.shape[2:]))

    def policy(params, batch: Batch):
        out, value = network.apply(params, flat(batch.obs))
        logp = nets.log_prob(out, flat(batch.action), continuous)
        return (logp.reshape(batch.reward.shape), value.reshape(batch.reward.shape),
                nets.entropy(out, continuous).reshape(batch.reward.shape))

    def loss_fn(params, batch: Batch, eta_params):
        out = rule.apply(eta_params, batch.inputs())
        logp, value, ent = policy(params, batch)
        # No stop-gradient: the advantage is already constant in theta (the rollout's values),
        # and d(grad_theta)/d eta must flow through it.
        adv = out.g - batch.value
        # The critic regresses on g_eta, which depends on eta: that is the second path by
        # which eta shapes theta' (the first is the advantage).
        v_loss = 0.5 * jnp.mean((value - out.g) ** 2)
        ent = jnp.mean(ent)
        loss = -jnp.mean(adv * logp) + config.vf_coef * v_loss - config.ent_coef * ent
        return loss, (ent, out.eta)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def inner_update(params, opt_state, batch, eta_params):
        (loss, (ent, eta)), grads = grad_fn(params, batch, eta_params)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, (loss, ent, eta)

    def meta_loss(params, batch, advantage):
        logp, _, _ = policy(params, batch)
        return -jnp.mean(advantage * logp)

    def meta_gradient(prev_params, prev_opt_state, prev_batch, batch, eta_params):
        g_bar = lambda_return(batch.inputs(), config.gamma_bar, config.lambda_bar)
        advantage = g_bar - batch.value

        def objective(eta):
            params, _, _ = inner_update(prev_params, prev_opt_state, prev_batch, eta)
            return meta_loss(params, batch, advantage)

        return jax.grad(objective)(eta_params)

    return Agent(network, optimiser, meta_optimiser, inner_update, meta_loss, meta_gradient)


def make_train(env, config: Config, rule: UpdateRule, *, total_timesteps: int,
               sample_params: Callable[[jax.Array], Any] | None = None,
               env_params: Any = None) -> Trainer:
    """The meta-gradient actor-critic on ``env`` with ``rule`` as its return function."""
    sample_params, continuous, action_dim, low, high, obs_shape = env_info(
        env, sample_params, env_params)
    steps_per_update, num_updates = update_count(total_timesteps, config.num_envs,
                                                 config.rollout_len)

    agent = make_agent(rule, config, action_dim, continuous)
    network = agent.network
    env_reset = jax.vmap(env.reset, in_axes=(0, None))
    rollout = actor_critic_rollout(env, network.apply, config.num_envs, config.rollout_len,
                                   continuous, low, high)
    eta_like = rule.init(jax.random.PRNGKey(0))

    def empty_batch() -> Batch:
        tb = (config.rollout_len, config.num_envs)
        zeros = jnp.zeros(tb)
        action = jnp.zeros(tb + (action_dim,)) if continuous else jnp.zeros(tb, jnp.int32)
        return Batch(jnp.zeros(tb + obs_shape), action, zeros, zeros.astype(bool),
                     zeros.astype(bool), zeros, zeros)

    def init(rng) -> RunnerState:
        rng, k_net, k_env, k_params = jax.random.split(rng, 4)
        env_params = sample_params(k_params)
        params = network.init(k_net, jnp.zeros((1, *obs_shape)))
        opt_state = agent.optimiser.init(params)
        delta = jax.tree_util.tree_map(jnp.zeros_like, eta_like)
        obs, env_state = env_reset(jax.random.split(k_env, config.num_envs), env_params)
        return RunnerState(params, opt_state, delta, agent.meta_optimiser.init(delta), params,
                           opt_state, empty_batch(), env_state, obs, env_params,
                           jnp.zeros(config.num_envs), rng)

    def step(state: RunnerState, meta_params, i) -> tuple[RunnerState, Metrics]:
        (env_state, obs, ep_ret, rng), traj, ret_sum, n_eps = rollout(
            state.params, state.env_state, state.obs, state.env_params, state.episode_return,
            state.rng)
        next_value = network.apply(state.params, traj.final_obs.reshape((-1, *obs_shape)),
                                   method=network.value).reshape(traj.reward.shape)
        # A terminal step on the time limit comes back with both flags set from gymnax and
        # gymnasium; `truncated` promises a bootstrap, so it is cleared where terminated.
        truncated = jnp.logical_and(traj.truncated, jnp.logical_not(traj.terminated))
        batch = Batch(traj.obs, traj.action, traj.reward, traj.terminated, truncated,
                      traj.value, next_value)

        def adapt(delta_and_opt):
            delta, meta_opt_state = delta_and_opt
            eta = jax.tree_util.tree_map(jnp.add, meta_params, delta)
            grads = agent.meta_gradient(state.prev_params, state.prev_opt_state,
                                        state.prev_batch, batch, eta)
            updates, meta_opt_state = agent.meta_optimiser.update(grads, meta_opt_state, delta)
            return optax.apply_updates(delta, updates), meta_opt_state

        # Update 0 has no previous rollout to differentiate through; `i` comes from the scan,
        # not the vmapped state, so this stays a real branch under vmap.
        delta, meta_opt_state = jax.lax.cond(i > 0, adapt, lambda x: x,
                                             (state.eta_delta, state.meta_opt_state))
        eta = jax.tree_util.tree_map(jnp.add, meta_params, delta)
        params, opt_state, (loss, ent, named) = agent.inner_update(state.params,
                                                                   state.opt_state, batch, eta)
        new_state = RunnerState(params, opt_state, delta, meta_opt_state, state.params,
                                state.opt_state, batch, env_state, obs, state.env_params, ep_ret,
                                rng)
        metrics = Metrics(returns_sum=jnp.sum(ret_sum), episodes=jnp.sum(n_eps), loss=loss,
                          aux=ent, traces={k: jnp.asarray(v, jnp.float32)
                                           for k, v in named.items()})
        return new_state, metrics

    return Trainer(init, step, num_updates, steps_per_update)


# --- conformance ---------------------------------------------------------------------------


def random_inputs(key: jax.Array, t: int = 16, b: int = 8) -> Inputs:
    """A rollout of random rewards and values with some terminations and truncations."""
    k = jax.random.split(key, 4)
    done = jax.random.uniform(k[3], (t, b))
    return Inputs(jax.random.normal(k[0], (t, b)), jax.random.normal(k[1], (t, b)),
                  jax.random.normal(k[2], (t, b)), done < 0.05, (done >= 0.05) & (done < 0.08))


def check(rule: UpdateRule, meta_params, name: str = "rule") -> CheckReport:
    """Required: runs, ``g`` of shape ``[T, B]``, finite, no recompilation, named scalars to
    record, finite meta-gradients of a scalar of ``g``. Reported: whether any meta-parameter
    is adapted at all (a non-zero meta-gradient)."""
    keys = jax.random.split(jax.random.PRNGKey(0), 2)

    def shape(outs):
        if not all(isinstance(o, Outputs) for o in outs):
            raise TypeError(f"apply must return metagrad.Outputs(g, eta), got "
                            f"{type(outs[0]).__name__}")
        return (all(np.shape(o.g) == (16, 8) for o in outs),
                f"g: expected (16, 8), got {np.shape(outs[0].g)}")

    def adapts(fn, outs, shape_ok):
        grads = jax.grad(lambda mp: jnp.sum(rule.apply(mp, random_inputs(keys[0])).g))(
            meta_params)
        named_ok = isinstance(outs[0].eta, dict) and all(
            np.shape(v) == () for v in outs[0].eta.values())
        norm = float(sum(np.sum(np.square(np.asarray(g)))
                         for g in jax.tree_util.tree_leaves(grads)) ** 0.5)
        return [Check("named_scalars", named_ok, f"eta is a dict of scalars: "
                      f"{sorted(outs[0].eta) if named_ok else '?'}"),
                Check("finite_meta_gradient", finite_tree(grads),
                      "d sum(g) / d meta_params is finite"),
                Check("adapts", norm > 0, f"|d sum(g) / d meta_params| = {norm:.3g}"
                      + ("" if norm > 0 else ": nothing is adapted (a fixed return)"),
                      required=False)]

    return check_rule("metagrad", name, rule, meta_params, [random_inputs(k) for k in keys],
                      shape, adapts, finite="g and eta on random inputs are finite")


FAMILY = register_family(Family(
    name="metagrad",
    description="actor-critic with an online-adapted return g_eta; the rule is the return "
                "function and its meta-parameters' initial values",
    Inputs=Inputs,
    Config=Config,
    make_train=make_train,
    reference_rules=REFERENCE_RULES,
    Outputs=Outputs,
    check=check,
    baseline="a2c_fixed",
    rule_vjp_order=2,
))

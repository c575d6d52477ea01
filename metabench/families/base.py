"""What every family provides, and the family registry."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metabench import nets
from metabench.rl import episode_returns
from metabench.rules import RuleInfo, UpdateRule
from metabench.types import Metrics, PRNGKey, PyTree, Transition


class Trainer(NamedTuple):
    """A family's inner loop for one env, config and rule, as pure jittable pieces.

    ``init(rng) -> state`` builds one seed's agent and env state; ``step(state, meta_params,
    i) -> (state, Metrics)`` is update ``i`` (rollout + learning). The harness maps ``init``
    over seeds with ``lax.map`` (a vmapped orthogonal initialiser can deadlock XLA's CPU thread
    pool) and vmaps chunks of ``step``; ``i`` comes from the scan, not the vmapped state, so
    schedules gated on it (learning starts, target copies) stay real branches under vmap
    instead of both sides being computed. ``train`` composes both for a single seed.
    """

    init: Callable[[PRNGKey], Any]
    step: Callable[[Any, PyTree, jax.Array], tuple[Any, Metrics]]
    num_updates: int
    steps_per_update: int

    def train(self, rng: PRNGKey, meta_params: PyTree) -> Metrics:
        state = self.init(rng)
        _, metrics = jax.lax.scan(lambda s, i: self.step(s, meta_params, i), state,
                                  jnp.arange(self.num_updates))
        return metrics


class Check(NamedTuple):
    """One conformance check. ``required`` checks gate submission; the others (e.g. mirror
    validity) are reported, since a rule outside a family's theory is still a rule."""

    name: str
    passed: bool
    detail: str
    required: bool = True


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """The result of a family's conformance check on a rule."""

    rule: str
    family: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.required)

    def get(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def format(self) -> str:
        lines = [f"conformance of {self.rule} ({self.family} family):"]
        for c in self.checks:
            mark = "PASS" if c.passed else ("FAIL" if c.required else "NO  ")
            lines.append(f"  [{mark}] {c.name}: {c.detail}")
        lines.append("conformance: " + ("passed" if self.passed else "FAILED"))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        mirror = next((c.passed for c in self.checks if c.name == "mirror_valid"), None)
        return {"passed": self.passed, "mirror_valid": mirror,
                "checks": [c._asdict() for c in self.checks]}


@dataclasses.dataclass(frozen=True)
class Family:
    """The slot a rule fills: its fixed inner-loop agent, contract, references and checks."""

    name: str
    """Registry name, e.g. ``drift``."""
    description: str
    """One line for ``metabench list families``."""
    Inputs: type
    """NamedTuple of what the rule is handed (the contract)."""
    Config: type
    """Frozen dataclass of the fixed agent hyperparameters a task sets."""
    make_train: Callable[..., Trainer]
    """``make_train(env, config, rule, *, total_timesteps, sample_params) -> Trainer``."""
    reference_rules: Mapping[str, RuleInfo]
    """Reference rules by name."""
    check: Callable[[UpdateRule, PyTree, str], CheckReport]
    """``check(rule, meta_params, name) -> CheckReport`` on random inputs."""
    baseline: str
    """The reference rule that probability of improvement is measured against."""
    Outputs: type | None = None
    """The NamedTuple a rule returns, where it returns more than one array (a submitted
    rule's exported function names it by ``metabench.<family>.Outputs``)."""
    rule_vjp_order: int = 1
    """How many times training differentiates through ``rule.apply`` in reverse mode: what
    a submitted rule's export must carry (2 where a meta-gradient runs through the rule
    while it is scored, as in metagrad)."""


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    if family.baseline not in family.reference_rules:
        raise ValueError(f"family {family.name!r}: baseline {family.baseline!r} is not one of "
                         f"its reference rules {sorted(family.reference_rules)}")
    _FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise KeyError(f"unknown family {name!r}; known families: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def families() -> list[str]:
    return sorted(_FAMILIES)


def find_rule(name: str) -> RuleInfo:
    """A reference rule by name across families, with close matches in the error."""
    rules = {r: f.reference_rules[r] for f in _FAMILIES.values() for r in f.reference_rules}
    if name not in rules:
        import difflib

        close = difflib.get_close_matches(name, list(rules), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown rule {name!r}{hint} (known: {', '.join(sorted(rules))})")
    return rules[name]


class EnvInfo(NamedTuple):
    """What an agent needs to know about an env before building its networks."""

    sample_params: Callable[[jax.Array], Any]
    """Per-seed env parameters (the fixed ones when the task gives no distribution)."""
    continuous: bool
    """A Box action space (Gaussian policy) rather than a Discrete one."""
    action_dim: int
    """Number of discrete actions, or the size of a continuous action."""
    low: Any
    """Lower action bound (continuous only, else None)."""
    high: Any
    """Upper action bound (continuous only, else None)."""
    obs_shape: tuple[int, ...]
    """Observation shape."""


def env_info(env, sample_params: Callable[[jax.Array], Any] | None = None,
             env_params: Any = None) -> EnvInfo:
    """Action and observation spaces of ``env``, probed with one draw of its parameters."""
    if sample_params is None:
        fixed = env.default_params if env_params is None else env_params
        sample_params = lambda _: fixed  # noqa: E731
    probe = sample_params(jax.random.PRNGKey(0))
    space = env.action_space(probe)
    continuous = not hasattr(space, "n")
    action_dim = int(np.prod(space.shape)) if continuous else int(space.n)
    low = jnp.asarray(space.low) if continuous else None
    high = jnp.asarray(space.high) if continuous else None
    return EnvInfo(sample_params, continuous, action_dim, low, high,
                   tuple(env.observation_space(probe).shape))


def actor_critic_rollout(env, apply: Callable, num_envs: int, length: int, continuous: bool,
                         low: Any = None, high: Any = None) -> Callable:
    """``rollout(params, env_state, obs, env_params, episode_return, rng) -> ((env_state, obs,
    episode_return, rng), Transition [T, B], returns_sum [T], episodes [T])``: ``length``
    steps of a stochastic policy on ``num_envs`` envs in one scan. ``apply(params, obs) ->
    (policy_out, value)``; the shared acting loop of the actor-critic families."""
    env_step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    def rollout_step(carry, _):
        params, env_state, obs, env_params, ep_ret, rng = carry
        rng, k_act, k_env = jax.random.split(rng, 3)
        out, value = apply(params, obs)
        action = nets.sample(k_act, out, continuous)
        logp = nets.log_prob(out, action, continuous)
        env_action = jnp.clip(action, low, high) if continuous else action
        next_obs, env_state, reward, term, trunc, info = env_step(
            jax.random.split(k_env, num_envs), env_state, env_action, env_params)
        reward = reward.astype(jnp.float32)
        done = jnp.logical_or(term, trunc)
        ep_ret, finished = episode_returns(ep_ret, reward, done)
        t = Transition(obs, action, logp, value, reward, term, trunc, info["final_observation"])
        return (params, env_state, next_obs, env_params, ep_ret, rng), (t, finished)

    def rollout(params, env_state, obs, env_params, ep_ret, rng):
        carry, (traj, (ret_sum, n_eps)) = jax.lax.scan(
            rollout_step, (params, env_state, obs, env_params, ep_ret, rng), None,
            length=length)
        _, env_state, obs, _, ep_ret, rng = carry
        return (env_state, obs, ep_ret, rng), traj, ret_sum, n_eps

    return rollout


def count_traces(fn: Callable) -> tuple[Callable, list[int]]:
    """Wraps ``fn`` so that each trace (compilation) bumps a counter; for recompile checks."""
    counter = [0]

    def wrapped(*args):
        counter[0] += 1
        return fn(*args)

    return wrapped, counter


def finite_tree(tree: Any) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree))




def check_rule(family: str, name: str, rule: UpdateRule, meta_params: PyTree,
               inputs: Sequence[Any], shape: Callable[[list], tuple[bool, str]],
               more: Callable[[Callable, list, bool], list[Check]] = lambda fn, outs, ok: [],
               finite: str = "outputs on random inputs are finite") -> CheckReport:
    """The conformance checks every family runs, with its own added: ``rule.apply``, jitted
    once, runs on each of ``inputs`` (two batches of the same shapes), ``shape(outs)`` says
    whether its outputs have the family's shapes, the outputs are finite, and the second call
    did not retrace. ``more(fn, outs, shape_ok)`` returns the family's own checks (gradients,
    mirror validity, ...); it may call the jitted ``fn`` again, on inputs of the same shapes.
    A submitted rule may fail in any way: an exception in ``apply``, ``shape`` or ``more``
    becomes one failed ``runs`` check, never a crash of the checker."""
    wrapped, traces = count_traces(rule.apply)
    fn = jax.jit(wrapped)
    try:
        outs = [jax.block_until_ready(fn(meta_params, x)) for x in inputs]
        shape_ok, shape_detail = shape(outs)
        extra = more(fn, outs, shape_ok)
    except Exception as e:  # noqa: BLE001 (any failure of submitted code is a result)
        return CheckReport(name, family, (Check("runs", False, f"{type(e).__name__}: {e}"),))
    return CheckReport(name, family, (
        Check("output_shape", shape_ok, shape_detail),
        Check("finite", all(finite_tree(o) for o in outs), finite),
        *extra,
        Check("no_recompilation", traces[0] == 1,
              f"traced {traces[0]} time(s) for two calls of the same shapes")))


def check_config(config: Any, positive: Sequence[str] = (),
                 choices: Mapping[str, Sequence[str]] | None = None) -> None:
    """The checks every family's Config makes in ``__post_init__``: its ``hidden`` sizes
    become a tuple of ints, the ``positive`` settings are > 0, each of ``choices`` names one
    of its options. Raises ValueError naming the setting, so a task file's mistake reads as
    the setting's name (the spec reader adds the file and key)."""
    if hasattr(config, "hidden"):
        object.__setattr__(config, "hidden", tuple(int(h) for h in config.hidden))
    for name in positive:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)!r}")
    for name, options in (choices or {}).items():
        if getattr(config, name) not in options:
            raise ValueError(f"{name} must be {', '.join(map(repr, options[:-1]))} or "
                             f"{options[-1]!r}, got {getattr(config, name)!r}")


def update_count(total_timesteps: int, num_envs: int, rollout_len: int = 1) -> tuple[int, int]:
    """``(env steps per update, number of updates)`` of a budget: ``num_envs * rollout_len``
    steps per update, whole updates only; a budget below one update is the task's mistake,
    said in its terms."""
    steps_per_update = int(num_envs) * int(rollout_len)
    num_updates = int(total_timesteps) // steps_per_update
    if num_updates < 1:
        per = (f"{steps_per_update} = num_envs x rollout_len" if rollout_len != 1
               else f"{steps_per_update} env steps")
        raise ValueError(f"total_timesteps ({total_timesteps}) is smaller than one update "
                         f"({per})")
    return steps_per_update, num_updates

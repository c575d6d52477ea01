"""A scripted controller for ``brax/reacher``: the measured reference level of the brax tasks.

Gymnasium's ``reward_threshold`` for Reacher (-3.75) is for 50-step episodes, and a return
does not scale with the episode length: once the fingertip is on the target, each further step
costs only the small remaining distance and control. So the brax tasks (200- and 1000-step
episodes) normalise reacher by this controller's mean return instead: a *strong measured
level, not an upper bound*, and not any update rule under test (it reads the arm's geometry
and the target from the observation and is never trained).

The controller is Jacobian-transpose operational-space control of the two-link arm: a virtual
spring-damper pulls the fingertip to the target, ``F = kp (target - tip) - kd v_tip``, mapped to
joint torques ``tau = J(theta)^T F`` and clipped to the action box. Its two gains are chosen by
a grid search (:data:`GAINS`) on the same env, and the best pair's mean return is the level.

``python -m metabench.envs.brax_oracle [--steps 200] [--episodes 256]`` prints the grid and
the level. Measured (2-core CPU, brax 0.14.2, spring physics, seed 0): 200-step episodes, best
gains kp 10, kd 8, mean return -26.68 over 256 episodes (PPO-clip on brax-transfer-v1-quick
reaches about the same at 3e5 steps). The controller closes most of the distance but settles
slowly; a better controller would raise the level, so it is not an upper bound.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LINKS = (0.1, 0.11)
"""Lengths of brax reacher's upper arm and of the forearm up to the fingertip (its XML: the
second body sits 0.1 along the first, the fingertip 0.11 along the second)."""

GAINS = tuple(itertools.product((2.0, 5.0, 10.0, 20.0), (1.0, 2.0, 4.0, 8.0, 16.0)))
"""``(kp, kd)`` pairs searched."""


def reacher_action(obs: jax.Array, kp: float, kd: float) -> jax.Array:
    """The controller's action for one reacher observation ``[cos q (2), sin q (2), target
    xy (2), tip velocity xy (2), tip - target xyz (3)]``."""
    c, s = obs[0:2], obs[2:4]
    q0 = jnp.arctan2(s[0], c[0])
    q01 = q0 + jnp.arctan2(s[1], c[1])
    l0, l1 = LINKS
    jac = jnp.array([[-l0 * jnp.sin(q0) - l1 * jnp.sin(q01), -l1 * jnp.sin(q01)],
                     [l0 * jnp.cos(q0) + l1 * jnp.cos(q01), l1 * jnp.cos(q01)]])
    force = -kp * obs[8:10] - kd * obs[6:8]
    return jnp.clip(jac.T @ force, -1.0, 1.0)


def reacher_returns(env: Any, params: Any, gains: jax.Array, *, episodes: int,
                    key: jax.Array) -> jax.Array:
    """Mean return of one episode per env copy, ``episodes`` copies, for each row of
    ``gains [G, 2]``: ``[G]``. Every copy plays exactly its first episode."""
    steps = int(params.max_steps_in_episode)

    def one(gain, k):
        obs, state = env.reset(k, params)

        def body(carry, k_t):
            obs, state, ret, live = carry
            a = reacher_action(obs, gain[0], gain[1])
            obs, state, r, term, trunc, _ = env.step(k_t, state, a, params)
            ret = ret + live * r
            live = live * (1.0 - jnp.maximum(term, trunc).astype(jnp.float32))
            return (obs, state, ret, live), None

        (_, _, ret, _), _ = jax.lax.scan(body, (obs, state, 0.0, 1.0),
                                         jax.random.split(k, steps))
        return ret

    keys = jax.random.split(key, episodes)
    per = jax.jit(jax.vmap(lambda g: jax.vmap(lambda k: one(g, k))(keys)))(gains)
    return jnp.mean(per, axis=1)


def level(steps: int = 200, episodes: int = 256, seed: int = 0) -> tuple[float, dict]:
    """``(best mean return, {(kp, kd): mean return})`` on ``brax/reacher`` with
    ``steps``-step episodes."""
    from metabench.envs import make

    env, params = make("brax/reacher", max_steps_in_episode=steps)
    gains = jnp.array(GAINS, dtype=jnp.float32)
    rets = np.asarray(reacher_returns(env, params, gains, episodes=episodes,
                                      key=jax.random.PRNGKey(seed)))
    table = {g: float(r) for g, r in zip(GAINS, rets)}
    return float(rets.max()), table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    best, table = level(a.steps, a.episodes, a.seed)
    for (kp, kd), r in table.items():
        print(f"kp {kp:5.1f} kd {kd:4.1f}  mean return {r:9.3f}")
    print(f"level ({a.episodes} episodes of {a.steps} steps, seed {a.seed}): {best:.3f}")


if __name__ == "__main__":
    main()

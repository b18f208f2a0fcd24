"""Fit a multi-head EinMix to a random linear target with optax, in pure functional JAX.

Run: ``python examples/regression.py`` (a few seconds on a laptop CPU).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import einmix_jax as em


def main(steps: int = 300, seed: int = 0) -> float:
    """Train ``'b (h c) -> b (h d)'`` to match a hidden target layer; return the final loss."""
    target_key, init_key, data_key = jax.random.split(jax.random.key(seed), 3)
    config = dict(weight_shape="h c d", bias_shape="h d", h=4, c=8, d=2)
    target, apply = em.init("b (h c) -> b (h d)", target_key, **config)
    params, _ = em.init("b (h c) -> b (h d)", init_key, **config)
    x = jax.random.normal(data_key, (256, 32))
    y = apply(target, x)

    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(params)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        params, opt_state, loss = step(params, opt_state)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.2e}")
    return float(loss)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    main(args.steps, args.seed)

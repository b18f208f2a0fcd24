"""Multi-head self-attention from functional EinMix layers, in pure JAX (``jit`` + ``vmap``).

The q/k/v and output projections are ``em.init`` layers: a params dict each and one pure
``apply``. Attention is written for one sequence and ``jax.vmap``-ed over the batch; the result is
checked against a plain ``jnp.einsum`` implementation of the whole batch with the same weights.

Run: ``python examples/attention_functional.py`` (a second or two on a laptop CPU).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

import einmix_jax as em

Params = dict[str, dict[str, jax.Array]]


def make_layers(key: jax.Array, dim: int, heads: int) -> tuple[Params, dict[str, em.EinMix]]:
    """Four EinMix layers: q, k, v (``t c -> h t d``) and the output (``h t d -> t c``)."""
    if dim % heads:
        raise ValueError(f"--dim {dim} is not divisible by --heads {heads}")
    head_dim = dim // heads
    params, layers = {}, {}
    for name, k in zip("qkv", jax.random.split(key, 3), strict=True):
        params[name], layers[name] = em.init(
            "t c -> h t d", k, weight_shape="c h d", bias_shape="h d", c=dim, h=heads, d=head_dim
        )
    params["o"], layers["o"] = em.init(
        "h t d -> t c",
        jax.random.fold_in(key, 3),
        weight_shape="h d c",
        bias_shape="c",
        h=heads,
        d=head_dim,
        c=dim,
    )
    return params, layers


def attend(layers: dict[str, em.EinMix], params: Params, x: jax.Array, causal: bool) -> jax.Array:
    """Self-attention over one sequence ``x`` of shape ``(t, c)``; returns ``(t, c)``."""
    q, k, v = (layers[n](params[n], x) for n in "qkv")  # each (h, t, d)
    scores = jnp.einsum("hsd,htd->hst", q, k) / math.sqrt(q.shape[-1])
    if causal:
        t = x.shape[0]
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    return layers["o"](params["o"], jnp.einsum("hst,htd->hsd", jax.nn.softmax(scores), v))


def reference(params: Params, x: jax.Array, causal: bool) -> jax.Array:
    """The same computation for a batch ``(b, t, c)``, written with ``jnp.einsum`` only."""

    def project(p: dict[str, jax.Array]) -> jax.Array:  # (b, t, c) -> (b, h, t, d)
        return jnp.einsum("btc,chd->bhtd", x, p["weight"]) + p["bias"][None, :, None, :]

    q, k, v = project(params["q"]), project(params["k"]), project(params["v"])
    scores = jnp.einsum("bhsd,bhtd->bhst", q, k) / math.sqrt(q.shape[-1])
    if causal:
        t = x.shape[1]
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
    out = jnp.einsum("bhst,bhtd->bhsd", jax.nn.softmax(scores), v)
    out = jnp.einsum("bhtd,hdc->btc", out, params["o"]["weight"])
    return out + params["o"]["bias"][None, None, :]


def main(
    batch: int = 4, seq: int = 16, dim: int = 64, heads: int = 8, causal: bool = True, seed: int = 0
) -> float:
    """Run EinMix attention and the einsum reference; print and return the max abs difference."""
    param_key, data_key = jax.random.split(jax.random.key(seed))
    params, layers = make_layers(param_key, dim, heads)
    x = jax.random.normal(data_key, (batch, seq, dim))

    # `layers` holds hashable EinMix objects: a static argument, so it is closed over here.
    @jax.jit
    def forward(params: Params, x: jax.Array) -> jax.Array:
        return jax.vmap(lambda xi: attend(layers, params, xi, causal))(x)

    y = forward(params, x)
    y_ref = jax.jit(reference, static_argnames="causal")(params, x, causal=causal)
    err = float(jnp.max(jnp.abs(y - y_ref)))
    scale = float(jnp.max(jnp.abs(y_ref)))
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"layers: q/k/v {layers['q']}, out {layers['o']}; {n_params} parameters")
    print(f"input {tuple(x.shape)} -> output {tuple(y.shape)} (causal={causal})")
    ok = err <= 1e-4 * max(scale, 1.0)
    print(f"max |einmix - einsum| = {err:.2e} (output scale {scale:.2f}): {'OK' if ok else 'FAIL'}")
    if not ok:
        raise SystemExit(1)
    return err


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch (default 4)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length (default 16)")
    parser.add_argument("--dim", type=int, default=64, help="model width c (default 64)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads h (default 8)")
    parser.add_argument(
        "--no-causal", dest="causal", action="store_false", help="attend to all positions"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    main(args.batch, args.seq, args.dim, args.heads, args.causal, args.seed)

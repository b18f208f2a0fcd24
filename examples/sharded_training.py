"""Train an MLP-Mixer block on a (2, 4) device mesh, sharded by axis name, and check it on 1 device.

Every EinMix weight axis has a name in its pattern, so one dict of rules shards the whole model:

    RULES = {"b": "data", "g": "model", "f": "model"}

``b`` (batch) is split over the mesh's ``data`` axis; the hidden axes of the token-mixing MLP
(``g``) and of the channel-mixing MLP (``f``) over ``model`` -- Megatron-style: the first layer of
each MLP is split on its output axis, the second on its input axis, so each MLP communicates once
(an all-reduce of the second layer's partial sums). Nothing else is written by hand:

* ``em.param_shardings(layer, RULES, mesh)`` gives each param's ``NamedSharding``, and
  ``jax.jit(init, out_shardings=...)`` creates the params already split (no device ever holds a
  full weight);
* ``em.with_out_sharding(layer, RULES)`` keeps each layer's output split by its axis names while
  ``jax.set_mesh(mesh)`` is active;
* the train step is a plain ``jax.jit``; XLA inserts the collectives.

The 8 devices are simulated on the CPU (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
set below before JAX starts). The same training then runs unsharded on one device, and the losses
and final params must agree. On a real cluster only the mesh changes: call
``jax.distributed.initialize()`` on every host first and build the mesh from ``jax.devices()``.

Run: ``python examples/sharded_training.py`` (a few seconds on a laptop CPU).
"""

from __future__ import annotations

import os

_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _FLAGS:  # must precede JAX's start
    os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import re  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import einmix_jax as em  # noqa: E402

BATCH, TOKENS, CHANNELS, TOKEN_HIDDEN, CHANNEL_HIDDEN, OUTPUTS = 16, 8, 16, 16, 32, 4
RULES = {"b": "data", "g": "model", "f": "model"}

Layers = dict[str, em.EinMix]
Params = dict[str, dict[str, jax.Array]]


def make_layers(rules: dict | None = None) -> Layers:
    """One Mixer block and a pooling head; with ``rules``, each output is kept sharded by name."""
    sizes = dict(t=TOKENS, c=CHANNELS)
    layers = {
        "token_up": em.layer("b t c -> b g c", weight_shape="t g", bias_shape="g", g=TOKEN_HIDDEN, **sizes),
        "token_down": em.layer("b g c -> b t c", weight_shape="g t", bias_shape="t c", g=TOKEN_HIDDEN, **sizes),
        "channel_up": em.layer("b t c -> b t f", bias_shape="f", f=CHANNEL_HIDDEN, **sizes),
        "channel_down": em.layer("b t f -> b t c", bias_shape="c", f=CHANNEL_HIDDEN, **sizes),
        # 't' is in neither the weight nor the output: the head sum-pools the tokens
        "head": em.layer("b t c -> b k", weight_shape="c k", bias_shape="k", c=CHANNELS, k=OUTPUTS),
    }  # fmt: skip
    if rules is not None:
        layers = {name: em.with_out_sharding(layer, rules) for name, layer in layers.items()}
    return layers


def init_params(layers: Layers, key: jax.Array) -> Params:
    keys = jax.random.split(key, len(layers))
    return {name: layer.init(k) for (name, layer), k in zip(layers.items(), keys, strict=True)}


def _norm(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def forward(layers: Layers, params: Params, x: jax.Array) -> jax.Array:
    """``x`` (b, t, c) -> (b, k): token mixing, channel mixing (both residual), pooled head."""

    def mlp(first: str, second: str, h: jax.Array) -> jax.Array:
        return layers[second](params[second], jax.nn.gelu(layers[first](params[first], h)))

    x = x + mlp("token_up", "token_down", _norm(x))
    x = x + mlp("channel_up", "channel_down", _norm(x))
    return layers["head"](params["head"], _norm(x)) / TOKENS


def make_step(layers: Layers, optimizer: optax.GradientTransformation):
    def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((forward(layers, params, x) - y) ** 2)

    @jax.jit
    def step(params: Params, state: optax.OptState, x: jax.Array, y: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def make_data(seed: int) -> tuple[jax.Array, jax.Array]:
    """Inputs and the targets of a random 'teacher' Mixer of the same shape."""
    layers = make_layers()

    @jax.jit
    def data(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        x_key, teacher_key = jax.random.split(key)
        x = jax.random.normal(x_key, (BATCH, TOKENS, CHANNELS))
        return x, forward(layers, init_params(layers, teacher_key), x)

    return data(jax.random.key(seed + 1))


def sharding_table(params: Params, mesh: jax.sharding.Mesh) -> str:
    rows = [("param", "shape", "PartitionSpec", "per device")]
    for layer, entries in params.items():
        for name, value in entries.items():
            block = value.sharding.shard_shape(value.shape)
            rows.append((f"{layer}.{name}", str(value.shape), str(value.sharding.spec), str(block)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def collective_counts(hlo: str) -> dict[str, int]:
    """How many of each collective op a compiled module runs, e.g. ``{'all-reduce': 3}``."""
    ops = re.findall(
        r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\(", hlo
    )
    return {op: ops.count(op) for op in sorted(set(ops))}


def train_sharded(steps: int, lr: float, seed: int, verbose: bool) -> tuple[list[float], Params]:
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    layers = make_layers(RULES)
    shardings = {name: em.param_shardings(layer, RULES, mesh) for name, layer in layers.items()}
    params = jax.jit(lambda k: init_params(layers, k), out_shardings=shardings)(
        jax.random.key(seed)
    )
    x, y = make_data(seed)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    y = jax.device_put(y, NamedSharding(mesh, P("data")))
    if verbose:
        print(f"mesh: {dict(mesh.shape)}, devices\n{np.vectorize(lambda d: d.id)(mesh.devices)}")
        print(f"rules: {RULES}\n\n{sharding_table(params, mesh)}\n")
    optimizer = optax.adam(lr)
    losses = []
    with jax.set_mesh(mesh):
        state = jax.jit(optimizer.init)(params)
        step = make_step(layers, optimizer)
        if verbose:
            hlo = step.lower(params, state, x, y).compile().as_text()
            print(f"collectives in the compiled train step: {collective_counts(hlo)}\n")
        for i in range(steps):
            params, state, loss = step(params, state, x, y)
            losses.append(float(loss))
            if verbose and (i % 5 == 0 or i == steps - 1):
                print(f"step {i:3d}  loss {losses[-1]:.6f}")
    return losses, params


def train_single(steps: int, lr: float, seed: int) -> tuple[list[float], Params]:
    layers = make_layers()
    params = jax.jit(lambda k: init_params(layers, k))(jax.random.key(seed))
    x, y = make_data(seed)
    optimizer = optax.adam(lr)
    state, step, losses = optimizer.init(params), make_step(layers, optimizer), []
    for _ in range(steps):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    return losses, params


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, verbose: bool = True) -> dict:
    args = parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(
            f"needs 8 devices, found {jax.device_count()}: JAX started before XLA_FLAGS"
        )
    losses, params = train_sharded(args.steps, args.lr, args.seed, verbose)
    single_losses, single_params = train_single(args.steps, args.lr, args.seed)
    np.testing.assert_allclose(losses, single_losses, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    if verbose:
        print(f"\n1 device: final loss {single_losses[-1]:.6f}; sharded and 1-device runs agree")
    return {"losses": losses, "single_losses": single_losses, "params": params}


if __name__ == "__main__":
    main()

"""The Flax layers' partitioning metadata on 8 simulated devices: Flax's own logical-axis flows
(``nn.get_partition_spec`` + ``nn.logical_to_mesh_sharding`` for linen, ``nnx.get_partition_spec``
and eager sharding for NNX) place the params as requested, and a sharded train step equals the
one-device run."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import einmix_jax as em

from .common import local_shape, make_mesh

LOGICAL = {"c": "embed", "f": "mlp"}
SIZES = {"c": 4, "f": 16}
OPTIMIZER = optax.sgd(0.1, momentum=0.9)
STEPS = 3


class LinenMLP(nn.Module):
    """Two EinMix layers, ``c -> f -> c``, with logical names ``embed`` and ``mlp``."""

    @nn.compact
    def __call__(self, x):
        up = em.linen.EinMix("b t c -> b t f", "c f", "f", sizes={"f": 16}, logical_axes=LOGICAL)
        down = em.linen.EinMix("b t f -> b t c", "f c", "c", sizes={"c": 4}, logical_axes=LOGICAL)
        return down(jax.nn.gelu(up(x)))


class NnxMLP(nnx.Module):
    """The same model in NNX."""

    def __init__(self, rngs: nnx.Rngs):
        self.up = em.nnx.EinMix(
            "b t c -> b t f",
            weight_shape="c f",
            bias_shape="f",
            logical_axes=LOGICAL,
            rngs=rngs,
            **SIZES,
        )
        self.down = em.nnx.EinMix(
            "b t f -> b t c",
            weight_shape="f c",
            bias_shape="c",
            logical_axes=LOGICAL,
            rngs=rngs,
            **SIZES,
        )

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


# (mesh shape, mesh axis names, axis type, logical rules, expected specs {layer: {param: spec}})
MEGATRON = {
    "up": {"weight": P(None, "model"), "bias": P("model")},
    "down": {"weight": P("model", None), "bias": P(None)},
}
CASES = {
    "megatron on (2, 4), auto": (
        (2, 4),
        ("data", "model"),
        AxisType.Auto,
        [("batch", "data"), ("mlp", "model"), ("embed", None)],
        MEGATRON,
    ),
    "megatron on (8,), explicit": (
        (8,),
        ("model",),
        AxisType.Explicit,
        [("mlp", "model")],
        MEGATRON,
    ),
    "embed over data too, on (2, 4), explicit": (
        (2, 4),
        ("data", "model"),
        AxisType.Explicit,
        [("mlp", "model"), ("embed", "data")],
        {
            "up": {"weight": P("data", "model"), "bias": P("model")},
            "down": {"weight": P("model", "data"), "bias": P("data")},
        },
    ),
}


def _data() -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (8, 3, 4)), jax.random.normal(ky, (8, 3, 4))


def _batch(mesh, rules, x):
    """``x`` split along the batch when the rules shard ``batch``."""
    return jax.device_put(x, NamedSharding(mesh, P(dict(rules).get("batch"))))


def _check_placed(value: jax.Array, mesh, spec: P) -> None:
    """``value`` is split as ``spec`` says: each device holds only its block."""
    assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), value.sharding
    assert {s.data.shape for s in value.addressable_shards} == {
        local_shape(value.shape, spec, mesh)
    }


def _linen_step(model: nn.Module):
    def step(params, opt_state, x, y):
        def loss_fn(params):
            return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


LINEN_NAMES = {"up": "EinMix_0", "down": "EinMix_1"}


@functools.cache
def linen_one_device() -> tuple[dict, list, dict]:
    """Initial params, losses and final params of the linen model on one device, no metadata."""
    model = LinenMLP()
    x, y = _data()
    params0 = nn.unbox(model.init(jax.random.key(0), x))["params"]
    step = jax.jit(_linen_step(model))
    params, state, losses = params0, OPTIMIZER.init(params0), []
    for _ in range(STEPS):
        params, state, loss = step(params, state, x, y)
        losses.append(loss)
    return params0, losses, params


@pytest.mark.parametrize("case", list(CASES))
def test_linen_init_sharded_by_logical_rules_and_train_step_matches_one_device(case):
    mesh_shape, names, axis_type, rules, expected = CASES[case]
    mesh = make_mesh(mesh_shape, names, axis_type)
    model = LinenMLP()
    x, y = _data()
    key = jax.random.key(0)

    abstract = jax.eval_shape(model.init, key, x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    variables = jax.jit(model.init, out_shardings=shardings)(key, x)

    params0, losses, params_end = linen_one_device()
    for layer, scope in LINEN_NAMES.items():
        for name, spec in expected[layer].items():
            box = variables["params"][scope][name]
            assert isinstance(box, nn.LogicallyPartitioned)
            assert box.value.sharding == shardings["params"][scope][name]
            _check_placed(box.value, mesh, spec)
            # drawn sharded under jit, against the eager draw on one device
            np.testing.assert_allclose(
                np.asarray(box.value), np.asarray(params0[scope][name]), rtol=1e-6, atol=1e-6
            )

    params = variables["params"]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        step = jax.jit(_linen_step(model), out_shardings=(shardings["params"], None, None))
        state = jax.jit(OPTIMIZER.init)(params)
        s_losses = []
        sx, sy = _batch(mesh, rules, x), _batch(mesh, rules, y)
        for _ in range(STEPS):
            params, state, loss = step(params, state, sx, sy)
            s_losses.append(loss)

    np.testing.assert_allclose(np.asarray(s_losses), np.asarray(losses), rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(nn.unbox(params)), params_end, rtol=1e-5, atol=1e-6)
    for layer, scope in LINEN_NAMES.items():
        for name, spec in expected[layer].items():
            _check_placed(params[scope][name].value, mesh, spec)


def _nnx_step(model: NnxMLP, optimizer: nnx.Optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def _lazy_sharding():
    """Params with sharding names left where they are drawn (Flax >= 0.12 places them eagerly)."""
    return nnx.use_eager_sharding(False)


@functools.cache
def nnx_one_device() -> tuple[dict, list, dict]:
    """Initial params, losses and final params of the NNX model on one device."""
    with _lazy_sharding():
        model = NnxMLP(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)
    params0 = jax.device_get(nnx.state(model, nnx.Param).to_pure_dict())
    x, y = _data()
    step = nnx.jit(_nnx_step)
    losses = [step(model, optimizer, x, y) for _ in range(STEPS)]
    return params0, losses, jax.device_get(nnx.state(model, nnx.Param).to_pure_dict())


def _full_rules(rules):
    """NNX maps each name by its own rule (no precedence): one rule per name, and none shared."""
    mentioned = {name for name, _ in rules}
    return [*rules, *((n, None) for n in sorted(set(LOGICAL.values()) - mentioned))]


@pytest.mark.parametrize("eager", [False, True], ids=["device_put of the state", "eager"])
@pytest.mark.parametrize(
    "case", ["megatron on (2, 4), auto", "embed over data too, on (2, 4), explicit"]
)
def test_nnx_state_sharded_by_logical_rules_and_train_step_matches_one_device(case, eager):
    mesh_shape, names, axis_type, rules, expected = CASES[case]
    mesh = make_mesh(mesh_shape, names, axis_type)
    params0, losses, params_end = nnx_one_device()
    x, y = _data()

    if eager:  # created under the mesh and rules: each Param is placed when drawn
        with jax.set_mesh(mesh), nn.logical_axis_rules(_full_rules(rules)):
            model = nnx.jit(lambda: NnxMLP(nnx.Rngs(0)))()
            optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)
    else:  # created unplaced, then moved by the shardings its sharding names give
        with _lazy_sharding():
            model = NnxMLP(nnx.Rngs(0))
        state = nnx.state(model)
        shardings = nn.logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, rules)
        nnx.update(model, jax.device_put(state, shardings))
        with _lazy_sharding():
            optimizer = nnx.Optimizer(model, OPTIMIZER, wrt=nnx.Param)

    for layer, specs in expected.items():
        for name, spec in specs.items():
            value = getattr(getattr(model, layer), name)[...]
            _check_placed(value, mesh, spec)
            if eager:  # drawn sharded under nnx.jit, against the eager draw on one device
                np.testing.assert_allclose(
                    np.asarray(value), params0[layer][name], rtol=1e-6, atol=1e-6
                )
            else:  # the same draw, moved
                np.testing.assert_array_equal(np.asarray(value), params0[layer][name])

    with jax.set_mesh(mesh):
        step = nnx.jit(_nnx_step)
        sx, sy = _batch(mesh, rules, x), _batch(mesh, rules, y)
        s_losses = [step(model, optimizer, sx, sy) for _ in range(STEPS)]

    np.testing.assert_allclose(np.asarray(s_losses), np.asarray(losses), rtol=1e-5)
    final = nnx.state(model, nnx.Param).to_pure_dict()
    chex.assert_trees_all_close(jax.device_get(final), params_end, rtol=1e-5, atol=1e-6)
    for layer, specs in expected.items():
        for name, spec in specs.items():
            _check_placed(final[layer][name], mesh, spec)

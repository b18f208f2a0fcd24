"""Params and outputs sharded by axis name on 8 simulated devices, checked against 1 device."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import einmix_jax as em

from .common import (
    MESHES,
    batch_sharding,
    collectives,
    local_shape,
    make_mesh,
    mlp,
    mlp_forward,
    train_step_fn,
)

AXIS_TYPES = [AxisType.Auto, AxisType.Explicit]


@pytest.mark.parametrize(
    ("mesh_shape", "names", "rules", "axis_type"),
    [(*case, AxisType.Auto) for case in MESHES] + [(*MESHES[-1], AxisType.Explicit)],
)
def test_init_creates_params_sharded(mesh_shape, names, rules, axis_type):
    mesh = make_mesh(mesh_shape, names, axis_type)
    for layer in mlp():
        shardings = em.param_shardings(layer, rules, mesh)
        init = jax.jit(layer.init, out_shardings=shardings).lower(jax.random.key(1)).compile()
        params = init(jax.random.key(1))
        expected = layer.init(jax.random.key(1))  # the same draw, on one device
        for name, value in params.items():
            assert value.sharding == shardings[name]
            local = local_shape(value.shape, shardings[name].spec, mesh)
            assert {s.data.shape for s in value.addressable_shards} == {local}
            # the sharded draw is another program: equal up to float rounding
            np.testing.assert_allclose(
                np.asarray(value), np.asarray(expected[name]), rtol=1e-6, atol=1e-6
            )
        # each device draws its own block: no collective moves a weight around
        assert collectives(init.as_text()) == []


def test_specs_follow_the_rules_on_both_meshes():
    up, down = mlp()
    rules = {"b": "data", "f": "model"}
    assert em.param_specs(up, rules) == {"weight": P(None, "model"), "bias": P("model")}
    assert em.param_specs(down, rules) == {"weight": P("model", None), "bias": P(None)}
    assert em.param_specs(up, {"f": "data"}, mesh=make_mesh((8,), ("data",), AxisType.Auto)) == {
        "weight": P(None, "data"),
        "bias": P("data"),
    }


OPTIMIZER = optax.sgd(0.1, momentum=0.9)


@functools.cache
def one_device_run() -> tuple[tuple, dict, list, dict]:
    """Data, initial params, the losses and the final params of 3 steps on one device."""
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (8, 2, 4))
    y = jax.random.normal(keys[1], (8, 2, 4))
    plain = mlp()
    params0 = {"up": plain[0].init(keys[2]), "down": plain[1].init(keys[3])}
    step = jax.jit(train_step_fn(plain, OPTIMIZER))
    params, state = params0, OPTIMIZER.init(params0)
    losses = []
    for _ in range(3):
        params, state, loss = step(params, state, x, y)
        losses.append(loss)
    return (x, y), params0, losses, params


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize(("mesh_shape", "names", "rules"), MESHES)
def test_train_step_matches_one_device(mesh_shape, names, rules, axis_type):
    mesh = make_mesh(mesh_shape, names, axis_type)
    optimizer = OPTIMIZER
    (x, y), params0, losses, params = one_device_run()

    sharded = mlp(rules)
    shardings = {
        "up": em.param_shardings(sharded[0], rules, mesh),
        "down": em.param_shardings(sharded[1], rules, mesh),
    }
    s_params = jax.device_put(params0, shardings)
    s_x = jax.device_put(x, batch_sharding(mesh, rules, 3))
    s_y = jax.device_put(y, batch_sharding(mesh, rules, 3))
    with jax.set_mesh(mesh):
        s_step = jax.jit(train_step_fn(sharded, optimizer))
        s_state = jax.jit(optimizer.init)(s_params)
        s_losses = []
        for _ in range(3):
            s_params, s_state, loss = s_step(s_params, s_state, s_x, s_y)
            s_losses.append(loss)

    np.testing.assert_allclose(np.asarray(s_losses), np.asarray(losses), rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(s_params), jax.device_get(params), rtol=1e-5, atol=1e-6
    )
    for layer in ("up", "down"):
        for name, value in s_params[layer].items():
            assert value.sharding.is_equivalent_to(shardings[layer][name], value.ndim), (
                layer,
                name,
                value.sharding,
            )


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_output_constraint_by_names(axis_type):
    mesh = make_mesh((2, 4), ("data", "model"), axis_type)
    rules = {"b": "data", "f": "model", "h": "model"}
    up = em.layer("b t c -> b t f", c=4, f=16)
    heads = em.layer("b t (h c) -> b t (h d)", weight_shape="h c d", h=4, c=2, d=3)
    for layer, channels in ((up, 4), (heads, 8)):
        x = jnp.arange(8 * 2 * channels, dtype=jnp.float32).reshape(8, 2, channels) / 64
        params = layer.init(jax.random.key(0))  # params and input replicated
        constrained = em.with_out_sharding(layer, rules)
        y_plain = layer(params, x)
        y_free = constrained(params, x)  # no mesh set: runs unconstrained
        with jax.set_mesh(mesh):
            y = constrained(params, x)
        expected = NamedSharding(mesh, P("data", None, "model"))
        assert y.sharding.is_equivalent_to(expected, y.ndim), y.sharding
        assert constrained != layer and hash(constrained) == hash(
            em.with_out_sharding(layer, rules)
        )
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_plain), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(y_free), np.asarray(y_plain), rtol=1e-5, atol=1e-6)


def test_output_constraint_with_a_partition_spec_and_unmentioned_axes():
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    layer = em.layer("b t c -> b t f", c=4, f=16)
    params = layer.init(jax.random.key(0))
    x = jax.device_put(jnp.ones((8, 2, 4)), NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        fixed = em.with_out_sharding(layer, P(None, None, "model"))(params, x)
        # 'b' is in no rule: it is left to the partitioner, which keeps the input's split
        open_b = em.with_out_sharding(layer, {"f": "model"})(params, x)
        # an explicit None replicates
        replicated_b = em.with_out_sharding(layer, {"b": None, "f": "model"})(params, x)
    assert fixed.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "model")), 3)
    assert open_b.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3)
    assert replicated_b.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "model")), 3)


def test_explicit_mesh_output_follows_the_names():
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Explicit)
    rules = {"b": "data", "f": "model"}
    up, down = mlp()
    params = {
        "up": jax.device_put(up.init(jax.random.key(0)), em.param_shardings(up, rules, mesh)),
        "down": jax.device_put(down.init(jax.random.key(1)), em.param_shardings(down, rules, mesh)),
    }
    x = jax.device_put(jnp.ones((8, 2, 4)), NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        hidden = up(params["up"], x)
        out = jax.jit(mlp_forward, static_argnums=0)((up, down), params, x)
    assert jax.typeof(hidden).sharding.spec == P("data", None, "model")
    assert jax.typeof(out).sharding.spec == P("data", None, None)
    expected = mlp_forward((up, down), jax.device_get(params), np.ones((8, 2, 4), np.float32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-6)


RULE_SETS = [
    {"h": "model", "b": "data"},
    [("c", "model"), ("d", "model"), ("h", "data")],
    [("d", ("data", "model")), ("h", "model")],
    [("h", None), ("h", "model"), ("c", "model")],
    {"z": "model"},
]


@pytest.mark.parametrize("rules", RULE_SETS)
def test_specs_equal_flax_logical_to_mesh_axes(rules):
    layer = em.layer(
        "b t (h c) -> b t (h d)", weight_shape="h c d", bias_shape="h d", h=8, c=4, d=8
    )
    logical = {"h": "heads", "c": "embed"}
    pairs = list(rules.items()) if isinstance(rules, dict) else rules
    renamed = [({"h": "heads", "c": "embed"}.get(k, k), v) for k, v in pairs]
    axes = em.param_axes(layer, logical_axes=logical)
    specs = em.param_specs(layer, renamed, logical_axes=logical)
    for name in ("weight", "bias"):
        assert specs[name] == nn.logical_to_mesh_axes(axes[name], renamed)
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    shardings = em.param_shardings(layer, renamed, mesh, logical_axes=logical)
    assert shardings == nn.logical_to_mesh_sharding(
        {k: P(*v) for k, v in axes.items()}, mesh, renamed
    )


@pytest.mark.parametrize(
    ("rules", "kwargs", "message"),
    [
        ({"f": "tensor"}, {}, r"rule 'f' -> 'tensor': mesh axis 'tensor' is not in the mesh "
         r"\(its axes: 'data'=2, 'model'=4\)"),
        ({"c": "model"}, {}, r"weight axis 'c' of length 6 cannot be sharded over mesh axes "
         r"'model'=4: 6 is not divisible by 4"),
        ({"f": ("data", "model")}, {}, r"weight axis 'f' of length 12 .* 'data'=2 \* 'model'=4: "
         r"12 is not divisible by 8"),
        ({"embed": "model"}, {"logical_axes": {"c": "embed"}},
         r"weight axis 'c' of length 6 .* \(rule 'embed' -> 'model' \(for axis 'c'\);"),
        ({"f": "model"}, {"logical_axes": {"q": "embed"}}, r"names axis 'q', which is not an axis"),
        ({"f": 3}, {}, r"rule for axis 'f': mesh axes must be"),
        ([("f",)], {}, r"each rule must be an \(axis name, mesh axes\) pair"),
    ],
)  # fmt: skip
def test_param_spec_errors_name_the_rule_and_the_mesh(rules, kwargs, message):
    layer = em.layer("b c -> b f", bias_shape="f", c=6, f=12)
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    with pytest.raises(em.EinMixError, match=message):
        em.param_specs(layer, rules, mesh=mesh, **kwargs)
    with pytest.raises(em.EinMixError, match=message):
        em.param_shardings(layer, rules, mesh, **kwargs)


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
@pytest.mark.parametrize(
    ("layer_kwargs", "out_sharding", "message"),
    [
        ({}, {"f": "tensor"}, r"mesh axis 'tensor' is not in the mesh .*pattern 'b t c -> b t f'"),
        ({}, {"b": "model"}, r"output axis 'b' of length 6 cannot be sharded over mesh axes "
         r"'model'=4"),
        ({}, P(None, None, "expert"), r"mesh axis 'expert' is not in the mesh"),
        ({}, P(None, None, None, None), r"has 4 entries but the output has 3 dimensions"),
        ({"pattern": "b t c -> b t (g f)", "g": 2}, {"f": "model"},
         r"output group \(g f\) can only be sharded by its leading axis 'g', but a rule maps "
         r"axis 'f' to 'model'"),
    ],
)  # fmt: skip
def test_output_constraint_errors(layer_kwargs, out_sharding, message, axis_type):
    kwargs = {"pattern": "b t c -> b t f", "c": 4, "f": 16, **layer_kwargs}
    layer = em.layer(kwargs.pop("pattern"), **kwargs)
    constrained = em.with_out_sharding(layer, out_sharding)
    mesh = make_mesh((2, 4), ("data", "model"), axis_type)
    with jax.set_mesh(mesh), pytest.raises(em.EinMixError, match=message):
        constrained(layer.init(jax.random.key(0)), jnp.ones((6, 2, 4)))


@pytest.mark.parametrize("axis_type", AXIS_TYPES)
def test_output_constraint_with_ellipsis_and_vmap(axis_type):
    mesh = make_mesh((2, 4), ("data", "model"), axis_type)
    plain = em.layer("... c -> ... d", c=4, d=8)
    layer = em.with_out_sharding(plain, {"d": "model"})
    params = layer.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 3, 4))
    expected = np.asarray(plain(params, x))
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        y = layer(params, x)  # '...' keeps the input's batch split, 'd' goes to 'model'
        y_vmapped = jax.vmap(layer, in_axes=(None, 0))(params, x)
    for out in (y, y_vmapped):
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)

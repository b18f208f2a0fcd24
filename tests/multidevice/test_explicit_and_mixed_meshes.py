"""Outputs on Explicit meshes and on meshes mixing Auto and Explicit axes.

1. On an Explicit mesh the output's spec follows the input's: a group's mesh axes go to the
   group's first axis only where they divide it (else the call would fail in JAX with "does not
   evenly divide the dimension size"), and a tuple entry credits the prefix that divides.
2. On a mesh mixing Auto and Explicit axes, ``with_out_sharding``'s rules (or partition spec)
   constrain the Auto axes as well as the Explicit ones, also under jit and in the gradient.

Values are checked against the same layer run on one device, unsharded (numpy arrays in, no mesh).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import einmix_jax as em

from .common import make_mesh


def _data(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), shape))


def _spec_divides(value: jax.Array) -> None:
    """Every dimension's block is whole: the spec is valid for the value's shape."""
    sharding = jax.typeof(value).sharding
    mesh_shape = dict(zip(sharding.mesh.axis_names, sharding.mesh.axis_sizes, strict=True))
    for length, entry in zip(value.shape, sharding.spec, strict=False):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        parts = int(np.prod([mesh_shape[a] for a in axes]))
        assert length % parts == 0, (value.shape, sharding.spec)


HEADS = em.layer("b (h c) -> b (h d)", weight_shape="h c d", h=2, c=8, d=3)


def test_group_input_split_finer_than_its_first_axis():
    """x's (h c) dimension split over 'model'=4 although h=2: the output (h d)=6 can't take 'model'."""
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Explicit)
    params = HEADS.init(jax.random.key(0))
    x = _data((8, 16))
    expected = np.asarray(HEADS(params, x))
    with jax.set_mesh(mesh):
        y = HEADS(params, jax.device_put(x, NamedSharding(mesh, P("data", "model"))))
    _spec_divides(y)
    assert jax.typeof(y).sharding.spec[0] == "data"  # the batch split is kept
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_group_input_split_that_divides_its_first_axis_is_credited():
    """(h c) with h=4 split over 'model'=4: each device holds one h, so the output keeps it."""
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Explicit)
    layer = em.layer("b (h c) -> b (h d)", weight_shape="h c d", h=4, c=2, d=3)
    params = layer.init(jax.random.key(0))
    x = _data((8, 8))
    expected = np.asarray(layer(params, x))
    with jax.set_mesh(mesh):
        y = layer(params, jax.device_put(x, NamedSharding(mesh, P("data", "model"))))
    assert jax.typeof(y).sharding.spec == P("data", "model")
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_tuple_entry_credits_the_prefix_that_divides():
    """(h c) over ('data', 'model') = 8 with h=2: 'data'=2 splits h, 'model' splits c."""
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Explicit)
    params = HEADS.init(jax.random.key(0))
    x = _data((8, 16))
    expected = np.asarray(HEADS(params, x))
    with jax.set_mesh(mesh):
        y = HEADS(params, jax.device_put(x, NamedSharding(mesh, P(None, ("data", "model")))))
    assert jax.typeof(y).sharding.spec == P(None, "data")
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_layer_chained_into_a_group_input():
    """'b e -> b f' (rule f -> model) feeds 'b (h c)': the same crash in ordinary use."""
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Explicit)
    first = em.layer("b e -> b f", e=4, f=16)
    params = (first.init(jax.random.key(0)), HEADS.init(jax.random.key(1)))
    x = _data((8, 4))
    expected = np.asarray(HEADS(params[1], first(params[0], x)))
    sharded_first = em.with_out_sharding(first, {"b": "data", "f": "model"})

    @jax.jit
    def forward(params, x):
        return HEADS(params[1], sharded_first(params[0], x))

    with jax.set_mesh(mesh):
        y = forward(params, jax.device_put(x, NamedSharding(mesh, P("data"))))
    _spec_divides(y)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_group_of_batch_split_finer_than_its_first_axis():
    """'(b e) c -> b d' with x's first dimension over 'data'=8 and b=2."""
    mesh = make_mesh((8,), ("data",), AxisType.Explicit)
    layer = em.layer("(b e) c -> b d", weight_shape="e c d", b=2, e=8, c=3, d=5)
    params = layer.init(jax.random.key(0))
    x = _data((16, 3))
    expected = np.asarray(layer(params, x))
    with jax.set_mesh(mesh):
        y = layer(params, jax.device_put(x, NamedSharding(mesh, P("data"))))
        y_jit = jax.jit(layer)(params, jax.device_put(x, NamedSharding(mesh, P("data"))))
    for out in (y, y_jit):
        _spec_divides(out)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


MIXED = [(AxisType.Explicit, AxisType.Auto), (AxisType.Auto, AxisType.Explicit)]


@pytest.mark.parametrize("axis_types", MIXED, ids=["data-explicit", "model-explicit"])
def test_mixed_mesh_constrains_the_auto_axes_too(axis_types):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=axis_types)
    layer = em.layer("b t c -> b t f", c=4, f=16)
    params = layer.init(jax.random.key(0))
    x = _data((8, 2, 4))
    expected = np.asarray(layer(params, x))
    sharded = em.with_out_sharding(layer, {"b": "data", "f": "model"})
    with jax.set_mesh(mesh):  # x and params replicated: only the rules can split the output
        y = sharded(params, x)
        y_jit = jax.jit(sharded)(params, x)
    explicit = "data" if axis_types[0] == AxisType.Explicit else "model"
    for out in (y, y_jit):
        assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3), (
            out.sharding
        )
        # the type carries the explicit axis only; the auto one is a constraint
        type_spec = jax.typeof(out).sharding.spec
        assert [e for e in type_spec if e is not None] == [explicit], type_spec
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_mixed_mesh_partition_spec_constrains_both_kinds():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=MIXED[0])
    layer = em.layer("b t c -> b t f", c=4, f=16)
    params = layer.init(jax.random.key(0))
    x = _data((8, 2, 4))
    expected = np.asarray(layer(params, x))
    with jax.set_mesh(mesh):
        y = em.with_out_sharding(layer, P("data", None, "model"))(params, x)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None, "model")), 3)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-6)


def test_mixed_mesh_gradient_matches_one_device():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=MIXED[0])
    layer = em.layer("b t c -> b t f", bias_shape="f", c=4, f=16)
    params = layer.init(jax.random.key(0))
    x = _data((8, 2, 4))
    sharded = em.with_out_sharding(layer, {"b": "data", "f": "model"})

    def loss(layer, params, x):
        return jnp.sum(jnp.tanh(layer(params, x)) ** 2)

    expected = jax.grad(loss, argnums=1)(layer, params, x)
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(
            sharded, params, jax.device_put(x, NamedSharding(mesh, P("data")))
        )
    for name in expected:
        np.testing.assert_allclose(
            np.asarray(grads[name]), np.asarray(expected[name]), rtol=1e-5, atol=1e-6
        )

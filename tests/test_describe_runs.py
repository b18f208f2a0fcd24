"""describe() shows the lowering that a call runs: measured planning, the Flax forms, a hook.

Each test records the lowering that ``execute`` receives while the layer is applied and compares
it with ``describe``'s, for decisions that plain planning would make differently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax import _measure
from einmix_jax._cache import LRU

from .cases import GROUPED, grouped_case, record_executed

PATTERN, WEIGHT, BIAS, SIZES = GROUPED


@pytest.fixture
def executed(monkeypatch):
    """The lowerings ``execute`` runs."""
    return record_executed(monkeypatch)


@pytest.fixture
def slowest_measured(monkeypatch):
    """Measured planning that picks the candidate the cost model ranks last among those timed."""
    monkeypatch.setattr(_measure, "_DECISIONS", LRU(_measure.DECISIONS))
    monkeypatch.setattr(_measure, "_fastest", lambda *args: args[5][-1].label)


def test_describe_inside_measured_planning_shows_the_measured_choice(executed, slowest_measured):
    layer, params, x, expected = grouped_case(0)
    planned = em.describe(layer, x.shape).lowering
    with em.measured_planning(top=3):
        y = layer(params, x)
        described = em.describe(layer, x).lowering
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert executed == [described]
    assert described != planned  # the measured pick is not the cost model's


def test_describe_of_a_flax_layer_shows_the_form_it_runs(executed):
    layer, params, x, expected = grouped_case(1)
    module = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=SIZES)
    y = module.apply({"params": params}, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert executed == [em.describe(module, x.shape).lowering]
    assert executed[0] == em.describe(layer, x.shape).lowering  # the functional choice
    assert executed[0].strategy == "block-diagonal"


def test_describe_of_a_flax_layer_with_a_hook_shows_x_as_given(executed):
    _, params, x, expected = grouped_case(2)
    module = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=SIZES, dot_general=jax.lax.dot_general)
    plain = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=SIZES)
    y = module.apply({"params": params}, x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert executed == [em.describe(module, x.shape).lowering]
    assert executed[0] != em.describe(plain, x.shape).lowering
    assert not [s for s in executed[0].steps if s.operand == "x" and s.op == "transpose"]


def test_describe_of_a_flax_layer_under_dot_general_cls_shows_x_as_given(executed):
    _, params, x, expected = grouped_case(3)

    class Dot:  # a contraction class, as Flax's fp8 ops are
        def __call__(self, *args, **kwargs):
            return jax.lax.dot_general(*args, **kwargs)

    module = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=SIZES, dot_general_cls=Dot)
    y = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert executed == [em.describe(module, x.shape).lowering]
    assert executed[0].x_dot_shape == (16, 4, 8, 4)  # x with nn.Dense's axes


def test_describe_of_an_nnx_layer_shows_the_form_it_runs(executed):
    from flax import nnx

    _, params, x, expected = grouped_case(4)
    module = em.nnx.EinMix(PATTERN, WEIGHT, BIAS, **SIZES, rngs=nnx.Rngs(0))
    module.set_params(params)
    np.testing.assert_allclose(module(x), expected, rtol=1e-5, atol=1e-5)
    assert executed == [em.describe(module, x.shape).lowering]


def test_describe_with_the_params_of_an_explicitly_sharded_weight_shows_no_packing(executed):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    layer, params, x, expected = grouped_case(5)
    mesh = jax.make_mesh((1,), ("model",), axis_types=(AxisType.Explicit,))
    sharded = {k: jax.device_put(v, NamedSharding(mesh, P("model"))) for k, v in params.items()}
    y = layer(sharded, x)  # no mesh set: the weight's type carries the mesh axis
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)
    assert executed == [em.describe(layer, x, params=sharded).lowering]
    assert em.describe(layer, x).strategy == "block-diagonal"  # unsharded, it would be packed
    assert executed[0].strategy != "block-diagonal"

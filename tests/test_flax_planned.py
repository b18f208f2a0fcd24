"""The Flax layers run the planner's choice, as the functional apply does, unless a tool may
intercept the contraction; the planner never packs a layer into more work than its batched GEMM
would cost at the full rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import einmix_jax as em
from einmix_jax import planning

from .cases import CASES, departing, normal, record_executed


@pytest.mark.parametrize("name", list(CASES))
def test_linen_and_nnx_run_the_functional_lowering(name, monkeypatch):
    case = CASES[name]
    params, layer = case.init(jax.random.key(0))
    x = normal(case.x_shape)
    ran = record_executed(monkeypatch)
    y_core = layer(params, x)
    sizes = {a: n for a, n in layer.plan.axes}
    linen = em.linen.EinMix(case.pattern, case.weight_shape, case.bias_shape, sizes=sizes)
    y_linen = linen.apply({"params": params}, x)
    module = em.nnx.EinMix(
        case.pattern, case.weight_shape, case.bias_shape, sizes=sizes, rngs=nnx.Rngs(0)
    )
    module.set_params(params)
    y_nnx = module(x)
    assert len(ran) == 3 and ran[0] == ran[1] == ran[2]
    assert ran[0] == planning.lower(layer.plan, tuple(x.shape))
    expected = case.reference(params, x)
    for y in (y_core, y_linen, y_nnx):
        np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-5)


def test_a_quantized_container_weight_is_used_as_stored():
    """A weight that is a tool's container (anything with a shape and a dtype) is never moved."""

    class Container:
        def __init__(self, value):
            self.value, self.shape, self.dtype = value, value.shape, value.dtype

    seen = []

    def dot_general(lhs, rhs, dims, **kwargs):
        seen.append(rhs)
        return jax.lax.dot_general(lhs, rhs.value, dims, **kwargs)

    layer = em.layer("b t c -> b u c", "t u", t=4, u=3)
    params = layer.init(jax.random.key(0))
    x = jnp.asarray(normal((2, 4, 5)))
    with departing():  # planned: weight first, transposed (a small gain on this shape)
        low = em.describe(layer, x.shape).lowering
        assert low.w_perm is not None  # the planner would move the weight
        hooked = layer.replace(dot_general=dot_general)
        # the planned form (as the functional apply and the Equinox layer run it) would
        # transpose it
        y = em._core.apply_traced(
            hooked, {"weight": Container(params["weight"])}, x, weight_as_stored=False
        )
    assert isinstance(seen[0], Container)
    np.testing.assert_allclose(y, layer(params, x), rtol=1e-5, atol=1e-6)


def test_many_narrow_groups_are_not_packed_into_more_work_than_their_batched_gemm():
    # 128 groups of 2 -> 4: packed, one GEMM would run 128x the layer's FLOPs
    layer = em.layer("b t (g c) -> b t (g d)", "g c d", "g d", g=128, c=2, d=4)
    shape = (16, 520, 256)
    choices = planning.candidates(layer.plan, shape, profile=planning.XLA_CPU)
    assert not [c for c in choices if c.kind == "block-diagonal"]
    # 8 groups of 4 -> 3: packing stays a candidate (and is chosen)
    few = em.layer("b t (g c) -> b t (g d)", "g c d", "g d", g=8, c=4, d=3)
    assert planning.lower(few.plan, (16, 4, 32), profile=planning.XLA_CPU).strategy == (
        "block-diagonal"
    )


@pytest.mark.parametrize("g", [2, 4, 8, 16, 32, 64, 128])
def test_a_packing_costs_at_most_the_batched_gemm_at_the_full_rate(g):
    layer = em.layer("b t (g c) -> b t (g d)", "g c d", "g d", g=g, c=2, d=4)
    shape = (8, 64, 2 * g)
    p = planning.XLA_CPU
    choices = planning.candidates(layer.plan, shape, profile=p)
    batched = choices[1]  # x first, the batched GEMM over g (after XLA's own N-d form)
    assert batched.kind == "x first" and "batch (g)" in batched.label
    fwd, _ = planning.terms(layer.plan, shape, batched)
    full_rate = p.seconds_of({**fwd, "narrow dot element": 0.0})
    packed = [c for c in choices if c.kind == "block-diagonal"]
    assert bool(packed) == (g < 128)  # 128x the FLOPs cost more than the batched GEMM
    for c in packed:
        packed_fwd, _ = planning.terms(layer.plan, shape, c)
        assert packed_fwd["flop"] == g * fwd["flop"]  # the zeros are multiplied too
        assert p.seconds_of({"flop": packed_fwd["flop"]}) <= full_rate

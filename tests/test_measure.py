"""Measured planning: inside ``measured_planning()`` the functional apply times its best
candidates once per configuration, keeps the fastest and computes the same values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax import _lower, _measure
from einmix_jax._cache import LRU
from tests.reference import reference_einmix

PATTERN, WEIGHT, BIAS = "b t (g c) -> b t (g d)", "g c d", "g d"
SIZES = dict(g=8, c=4, d=3)


@pytest.fixture
def measured(monkeypatch):
    """Count the measurements; start from no decisions."""
    calls = []
    fastest = _measure._fastest

    def counted(*args, **kwargs):
        calls.append(args[1])  # the input shape
        return fastest(*args, **kwargs)

    monkeypatch.setattr(_measure, "_fastest", counted)
    monkeypatch.setattr(_measure, "_DECISIONS", LRU(_measure.DECISIONS))
    return calls


def case(b: int, t: int = 4):
    layer = em.layer(PATTERN, WEIGHT, BIAS, **SIZES)
    rng = np.random.default_rng(b)
    params = {
        "weight": rng.normal(size=(8, 4, 3)).astype(np.float32),
        "bias": rng.normal(size=(8, 3)).astype(np.float32),
    }
    x = rng.normal(size=(b, t, 32)).astype(np.float32)
    sizes = dict(SIZES, b=b, t=t)
    args = (PATTERN, WEIGHT, BIAS, x, params["weight"], params["bias"], sizes)
    return layer, params, x, reference_einmix(*args)


def test_values_match_the_reference_and_each_configuration_is_measured_once(measured):
    layer, params, x, expected = case(32)
    with em.measured_planning(top=3):
        for _ in range(3):
            np.testing.assert_allclose(layer(params, x), expected, rtol=1e-5, atol=1e-5)
        other, params2, x2, expected2 = case(16)
        np.testing.assert_allclose(other(params2, x2), expected2, rtol=1e-5, atol=1e-5)
    assert measured == [(32, 4, 32), (16, 4, 32)]
    assert len(_measure._DECISIONS) == 2
    # the decision is one of those timed
    timed = _measure.shortlist(_lower.candidates(layer.plan, x.shape), 3)
    assert next(_measure._DECISIONS.values()) in {c.label for c in timed}


def test_under_jit_and_grad_the_gradients_match_the_reference(measured):
    layer, params, x, _ = case(24)
    ct = np.random.default_rng(5).normal(size=(24, 4, 24)).astype(np.float32)
    weight = params["weight"].astype(np.float64)
    xs = x.reshape(24, 4, 8, 4).astype(np.float64)
    ct4 = ct.reshape(24, 4, 8, 3)
    with em.measured_planning(top=2):
        grads = jax.jit(jax.grad(lambda p, x: jnp.vdot(layer(p, x), ct), (0, 1)))(params, x)
    assert measured == [(24, 4, 32)]
    g, gx = grads
    np.testing.assert_allclose(g["weight"], np.einsum("btgc,btgd->gcd", xs, ct4), rtol=1e-4)
    np.testing.assert_allclose(g["bias"], ct4.sum((0, 1)), rtol=1e-4)
    gx_ref = np.einsum("btgd,gcd->btgc", ct4, weight).reshape(x.shape)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-5)


def test_nothing_is_measured_outside_the_context_and_the_flax_layers_are_measured_in_it(
    measured,
):
    layer, params, x, expected = case(8)
    np.testing.assert_allclose(layer(params, x), expected, rtol=1e-5, atol=1e-5)
    linen = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=SIZES)
    variables = {"params": {k: jnp.asarray(v) for k, v in params.items()}}
    np.testing.assert_allclose(linen.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    assert measured == [] and len(_measure._DECISIONS) == 0
    assert not _measure.measuring()
    with em.measured_planning():  # a Flax layer plans as the functional apply does
        for _ in range(2):  # measured once
            y = linen.apply(variables, x)
            np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert measured == [x.shape] and len(_measure._DECISIONS) == 1


def test_symbolic_shapes_fall_back_to_the_cost_model(measured):
    layer, params, x, expected = case(8)
    (b,) = jax.export.symbolic_shape("b")
    with em.measured_planning():
        exported = jax.export.export(jax.jit(layer))(
            params, jax.ShapeDtypeStruct((b, 4, 32), jnp.float32)
        )
    np.testing.assert_allclose(exported.call(params, x), expected, rtol=1e-5, atol=1e-5)
    assert measured == []


def test_decisions_are_bounded(measured, monkeypatch):
    monkeypatch.setattr(_measure, "_DECISIONS", LRU(2))
    with em.measured_planning(top=2):
        for b in (2, 3, 4):
            layer, params, x, expected = case(b, t=2)
            np.testing.assert_allclose(layer(params, x), expected, rtol=1e-5, atol=1e-5)
    assert len(_measure._DECISIONS) == 2 and len(measured) == 3


def test_the_pick_is_the_lowest_measured_regret_and_a_loop_must_win_by_the_margin():
    plan = em.layer("b t c -> b u c", "t u", t=8, u=8).plan
    choices = _lower.candidates(plan, (64, 8, 64), loops=True)
    plain = next(c for c in choices if not c.candidate.loop)
    loop = next(c for c in choices if c.candidate.loop)
    assert _measure.pick([plain, loop], [(1.0, 2.0), (0.95, 2.2)]) is plain  # 1.05 < 1.1
    assert _measure.pick([plain, loop], [(1.0, 2.0), (0.5, 1.0)]) is loop
    # within the loop margin the plain form (which compiles faster) is kept
    margin = 1 + em.planning.profile().loop_margin / 2
    assert _measure.pick([plain, loop], [(margin, margin), (1.0, 1.0)]) is plain


def test_each_kind_of_candidate_is_timed():
    # token mixing: the cheapest of each kind (XLA's own, x first, weight first, broadcast,
    # loop), cheapest first, then the next cheapest up to top
    plan = em.layer("b t c -> b u c", "t u", t=196, u=256).plan
    choices = _lower.candidates(plan, (64, 196, 512), loops=True)
    kinds = _measure.shortlist(choices, 1)
    assert len(kinds) == 5 and [c.cost for c in kinds] == sorted(c.cost for c in kinds)
    assert "as einsum" in {c.kind for c in kinds}
    assert {(bool(c.candidate.loop), bool(c.candidate.bcast)) for c in kinds} == {
        (False, False),
        (False, True),
        (True, False),
    }
    assert {c.candidate.x_first for c in kinds if not c.candidate.loop} == {True, False}
    more = _measure.shortlist(choices, 7)
    assert len(more) == 7 and all(c in more for c in kinds)
    cheapest = sorted(choices, key=lambda c: c.cost)
    assert [c for c in cheapest if c in more][:2] == cheapest[:2]
    # a grouped layer with narrow groups: its block-diagonal packing is timed
    plan = em.layer("b t (g c) -> b t (g d)", "g c d", g=8, c=16, d=16).plan
    assert any(
        c.candidate.pack for c in _measure.shortlist(_lower.candidates(plan, (64, 8, 128)), 1)
    )


@pytest.mark.parametrize("top", [0, -1, 1.5, True, "2"])
def test_top_must_be_a_positive_int(top):
    match = r"measured_planning\(top=\.\.\.\) must be an int"
    with pytest.raises(em.EinMixError, match=match), em.measured_planning(top=top):
        pass

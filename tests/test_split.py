"""A split lowering: the forward pass runs inference's pick, every derivative runs training's.

Values, gradients (through the layer's linearity, against the numpy reference), ``jvp``, ``vmap``
and the compiled program's dots, for lowerings of two different candidates; and where the
planner splits.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax import planning

from .cases import CASES, normal


def _split_lowering(plan, shape):
    """XLA's own lowering forward, the last candidate (another form) differentiated."""
    choices = planning.candidates(plan, shape)
    forward, backward = (planning.build(plan, shape, c) for c in (choices[0], choices[-1]))
    assert forward != backward
    return dataclasses.replace(forward, backward=backward)


@pytest.mark.parametrize("name", list(CASES))
def test_a_split_lowering_computes_the_layer_and_its_derivatives(name: str):
    """<grad, d> equals <ct, reference(a + d) - reference(a)> for any direction d (the layer is
    affine), for x, the weight and the bias; jvp's tangent is the change of the linear part."""
    case = CASES[name]
    params, layer = case.init(jax.random.key(0))
    params = {n: normal(p.shape, seed=4 + i) for i, (n, p) in enumerate(params.items())}
    x = normal(case.x_shape)
    low = _split_lowering(layer.plan, case.x_shape)

    def apply(p, x):
        return planning.apply_lowering(low, p, x, layer)

    reference = case.reference(params, x)
    np.testing.assert_allclose(apply(params, x), reference, rtol=1e-5, atol=1e-5)
    ct = normal(reference.shape, seed=1)
    grads, grad_x = jax.grad(lambda p, x: jnp.vdot(apply(p, x), ct), argnums=(0, 1))(params, x)
    dx = normal(case.x_shape, seed=2)
    expected = np.vdot(ct, case.reference(params, x + dx) - reference)
    np.testing.assert_allclose(np.vdot(grad_x, dx), expected, rtol=1e-4, atol=1e-4)
    deltas = {n: normal(p.shape, seed=8 + i) for i, (n, p) in enumerate(params.items())}
    for n, d in deltas.items():
        expected = np.vdot(ct, case.reference({**params, n: params[n] + d}, x) - reference)
        np.testing.assert_allclose(np.vdot(grads[n], d), expected, rtol=1e-4, atol=1e-4)
    # forward mode, along (d weight, d bias, dx): the affine map's change, less the second order
    _, tangent = jax.jvp(apply, (params, x), (deltas, dx))
    moved = {n: params[n] + d for n, d in deltas.items()}
    second = case.reference(
        {**moved, "bias": 0 * params["bias"]} if "bias" in params else moved, dx
    )
    second -= case.reference(
        {**params, "bias": 0 * params["bias"]} if "bias" in params else params, dx
    )
    linear = case.reference(moved, x + dx) - reference - second
    np.testing.assert_allclose(tangent, linear, rtol=1e-4, atol=1e-4)


def test_a_split_lowering_under_vmap_and_grad_of_the_weight_only():
    case = CASES["token mixing"]
    params, layer = case.init(jax.random.key(0))
    xs = normal((3, *case.x_shape))
    low = _split_lowering(layer.plan, case.x_shape)
    ys = jax.vmap(lambda x: planning.apply_lowering(low, params, x, layer))(xs)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_allclose(y, case.reference(params, x), rtol=1e-5, atol=1e-5)
    ct = normal(ys.shape[1:], seed=1)
    # x not differentiated: its tangent is a symbolic zero, which the backward lowering skips
    grad = jax.grad(
        lambda w: jnp.vdot(planning.apply_lowering(low, {**params, "weight": w}, xs[0], layer), ct)
    )(params["weight"])
    dw = normal(params["weight"].shape, seed=2)
    expected = np.vdot(
        ct,
        case.reference({**params, "weight": params["weight"] + dw}, xs[0])
        - case.reference(params, xs[0]),
    )
    np.testing.assert_allclose(np.vdot(grad, dw), expected, rtol=1e-4, atol=1e-4)


def test_the_backward_lowering_s_own_forward_dot_is_not_computed():
    """Forward and backward compiled together: the forward dot and the two gradient dots."""
    case = CASES["token mixing"]
    params, layer = case.init(jax.random.key(0))
    x = normal(case.x_shape)
    low = _split_lowering(layer.plan, case.x_shape)

    def loss(p, x):
        return jnp.vdot(planning.apply_lowering(low, p, x, layer), jnp.ones(low.out_shape))

    hlo = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
    assert len(re.findall(r"= f32\[[^\]]*\][^ ]* dot\(", hlo)) == 3, hlo


def test_describe_shows_the_derivatives_lowering(monkeypatch):
    from einmix_jax import _apply

    from .cases import record_executed

    case = CASES["token mixing"]
    params, layer = case.init(jax.random.key(0))
    low = _split_lowering(layer.plan, case.x_shape)
    monkeypatch.setattr(_apply, "lower", lambda *args, **kwargs: low)
    executed = record_executed(monkeypatch)
    layer(params, normal(case.x_shape))
    described = em.describe(layer, case.x_shape)
    assert executed[0] == described.lowering == low
    text = str(described)
    assert f"derivatives (grad, jvp): those of the {low.backward.strategy!r} lowering:" in text
    assert all(f"    {step}" in text for step in low.backward.steps)


def test_the_planner_splits_only_where_the_forward_pick_is_clearly_faster():
    layer = em.layer("b t c -> b u c", "t u", "u", t=16, u=8)
    shape = (4, 16, 32)
    choices = planning.candidates(layer.plan, shape, profile=planning.EXAMPLE_PROFILE)
    forward = planning.choose_forward(choices)
    slow = max(choices, key=lambda c: c.fwd)  # training's pick, were it this one
    assert slow.fwd > 2 * forward.fwd
    low = planning.build(layer.plan, shape, slow)
    split = planning.split(layer.plan, shape, choices, slow, low)
    assert split == dataclasses.replace(planning.build(layer.plan, shape, forward), backward=low)
    # one pick for both passes: nothing to split
    own = planning.build(layer.plan, shape, forward)
    assert planning.split(layer.plan, shape, choices, forward, own) is own
    # a backend nobody has measured keeps one lowering, as it keeps XLA's own
    unmeasured = planning.candidates(layer.plan, shape, profile=planning.UNMEASURED)
    slow = max(unmeasured, key=lambda c: c.fwd)
    low = planning.build(layer.plan, shape, slow)
    assert planning.split(layer.plan, shape, unmeasured, slow, low) is low
    # a symbolic batch: the moves are not counted on concrete lengths, so no split
    (b,) = jax.export.symbolic_shape("b")
    symbolic = planning.candidates(layer.plan, (b, 16, 32), profile=planning.EXAMPLE_PROFILE)
    slow = max(symbolic, key=lambda c: c.fwd)
    low = planning.build(layer.plan, (b, 16, 32), slow)
    assert planning.split(layer.plan, (b, 16, 32), symbolic, slow, low) is low


def test_a_dot_general_hook_sees_one_contraction_training_s(monkeypatch):
    from einmix_jax import _apply

    case = CASES["token mixing"]
    seen = []

    def hook(lhs, rhs, *args, **kwargs):
        seen.append((lhs.shape, rhs.shape))
        return jax.lax.dot_general(lhs, rhs, *args, **kwargs)

    params, _ = case.init(jax.random.key(0))
    layer = em.layer(
        case.pattern, case.weight_shape, case.bias_shape, dot_general=hook, **case.axes
    )
    low = _split_lowering(layer.plan, case.x_shape)
    monkeypatch.setattr(_apply, "lower", lambda *args, **kwargs: low)
    _apply._COMPILED.clear()
    x = normal(case.x_shape)
    np.testing.assert_allclose(layer(params, x), case.reference(params, x), rtol=1e-5, atol=1e-5)
    assert seen == [low.backward.dot.arg[:2]]

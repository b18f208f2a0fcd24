"""``jax.export`` with symbolic dimensions for every axis the params don't fix, in every form.

The exported function is serialized, deserialized and called at two different batch (and time)
lengths; its values must equal ``apply``'s and the numpy reference's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import einmix_jax as em

from .cases import Case

pytest.importorskip("flatbuffers")  # jax.export's serialization needs it

# (case, symbolic input shape, two concrete input shapes)
CASES = {
    "linear, symbolic batch": (
        Case("b c -> b d", "c d", "d", dict(c=3, d=4), (2, 3)),
        "b, 3",
        [(2, 3), (5, 3)],
    ),
    "token mixing, symbolic batch and channels": (
        Case("b t c -> b u c", "t u", "u", dict(t=3, u=5), (2, 3, 4)),
        "b, 3, c",
        [(2, 3, 4), (6, 3, 7)],
    ),
    "token mixing, symbolic batch only": (
        Case("b t c -> b u c", "t u", "u", dict(t=3, u=5), (2, 3, 4)),
        "b, 3, 4",
        [(1, 3, 4), (64, 3, 4)],
    ),
    "ellipsis": (
        Case("... c -> ... d", "c d", "d", dict(c=3, d=4), (2, 5, 3)),
        "b, t, 3",
        [(2, 5, 3), (3, 1, 3)],
    ),
    "multi-head, symbolic batch and time": (
        Case("b t (h c) -> b t (h d)", "h c d", "h d", dict(h=2, c=3, d=4), (2, 3, 6)),
        "b, t, 6",
        [(2, 3, 6), (1, 7, 6)],
    ),
    "channels-first": (
        Case("b c h w -> b d h w", "c d", "d", dict(c=3, d=2), (2, 3, 4, 4)),
        "b, 3, h, w",
        [(2, 3, 4, 4), (3, 3, 2, 5)],
    ),
}


def _round_trip(fn, *args) -> jax.export.Exported:
    exported = jax.export.export(jax.jit(fn))(*args)
    return jax.export.deserialize(exported.serialize())


def _check(exported, call, case: Case, params: dict, shapes) -> None:
    for i, shape in enumerate(shapes):
        x = jax.random.normal(jax.random.key(i), shape)
        y = exported.call(*call(x))
        np.testing.assert_allclose(y, case.reference(params, np.asarray(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_functional_export(name: str):
    case, symbolic, shapes = CASES[name]
    params, apply = case.init(jax.random.key(0))
    x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(symbolic), jnp.float32)
    exported = _round_trip(apply, params, x_spec)
    _check(exported, lambda x: (params, x), case, params, shapes)
    for shape in shapes:  # and equal to apply itself
        x = jnp.ones(shape)
        np.testing.assert_allclose(exported.call(params, x), apply(params, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_linen_export(name: str):
    case, symbolic, shapes = CASES[name]
    module = em.linen.EinMix(case.pattern, case.weight_shape, case.bias_shape, sizes=case.axes)
    variables = module.init(jax.random.key(0), jnp.ones(shapes[0]))
    x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(symbolic), jnp.float32)
    exported = _round_trip(module.apply, variables, x_spec)
    _check(exported, lambda x: (variables, x), case, variables["params"], shapes)


@pytest.mark.parametrize("name", list(CASES))
def test_nnx_export(name: str):
    case, symbolic, shapes = CASES[name]
    layer = em.nnx.EinMix(
        case.pattern,
        weight_shape=case.weight_shape,
        bias_shape=case.bias_shape,
        rngs=nnx.Rngs(0),
        **case.axes,
    )
    graphdef, state = nnx.split(layer)
    pure = state.to_pure_dict()  # the serialized function takes plain dicts

    def forward(pure, x):
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(graphdef, state)(x)

    x_spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(symbolic), jnp.float32)
    exported = _round_trip(forward, pure, x_spec)
    _check(exported, lambda x: (pure, x), case, layer.get_params(), shapes)


def test_symbolic_lowering_is_deterministic_and_counts_a_symbolic_length_as_large():
    from einmix_jax import _lower

    case = CASES["token mixing, symbolic batch only"][0]
    plan = em.layer(case.pattern, weight_shape=case.weight_shape, **case.axes).plan
    b = jax.export.symbolic_shape("b")[0]
    symbolic = _lower.lower(plan, (b, 3, 4), loops=True)
    again = _lower._lower.__wrapped__(
        plan, (b, 3, 4), True, False, None, False, False, em.planning.profile()
    )
    assert symbolic == again
    assert symbolic.strategy != "loop"  # lax.map needs a static count
    # otherwise the decision of a batch of SYMBOLIC_LENGTH
    large = _lower.lower(plan, (_lower.SYMBOLIC_LENGTH, 3, 4), loops=False)
    decision = ("strategy", "x_perm", "w_perm", "y_perm", "x_first", "dimension_numbers")
    assert [getattr(symbolic, k) for k in decision] == [getattr(large, k) for k in decision]
    assert (symbolic.w_broadcast is None) == (large.w_broadcast is None)

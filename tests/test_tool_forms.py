"""The two forms a Flax layer may run under an interception tool, and the choice between them.

Under a tool that patches ``jnp.einsum`` as well as ``jax.lax.dot_general`` (qwix), a Flax layer
hands it the stored weight unchanged in one of two calls: ``lax.dot_general(x, weight)`` as
``nn.Dense`` calls it (``'as einsum'``), or ``jnp.einsum(x, weight)`` as einops' layer calls it
(``'jnp.einsum'``), costed like every other choice, once per layer (its x-only lengths costed as
large, so the tool sees the same op at every batch size). With a ``dot_general`` hook, only the
first. The ``jnp.einsum`` form is checked against the numpy reference, and under qwix against
einops' own layer under the same provider.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops.layers.flax import EinMix as EinopsEinMix

import einmix_jax as em
from einmix_jax import planning

from .cases import CASES, Case, jax_normal, normal

qwix = pytest.importorskip("qwix")

TOOL = dict(stored_weight=True, x_as_given=True, einsum=True)

#: (pattern, weight, bias, lengths, x shapes with different x-only lengths, the form chosen)
LAYERS = [
    ("t b c -> u b c", "t u", "u", dict(t=16, u=8), [(16, 1, 1), (16, 64, 32)], "jnp.einsum"),
    ("b t c -> b t d", "c d", "d", dict(c=16, d=8), [(1, 1, 16), (64, 32, 16)], "as einsum"),
    (
        "b t (h c) -> b t (h d)",
        "h c d",
        "h d",
        dict(h=2, c=8, d=4),
        [(1, 1, 16), (64, 32, 16)],
        "as einsum",
    ),
]


@pytest.mark.parametrize("layer", LAYERS, ids=[spec[0] for spec in LAYERS])
def test_the_form_under_a_tool_is_the_layer_s_at_every_batch(layer):
    pattern, weight_shape, bias_shape, lengths, shapes, form = layer
    plan = em.layer(pattern, weight_shape, bias_shape, **lengths).plan
    for shape in shapes:
        low = planning.lower(plan, shape, **TOOL, profile=planning.XLA_CPU)
        assert low.strategy == form, shape
        contraction = "einsum" if form == "jnp.einsum" else "dot_general"
        assert low.dot.op == contraction
        # never where nobody has measured the backend: nn.Dense's call there
        unmeasured = planning.lower(plan, shape, **TOOL, profile=planning.UNMEASURED)
        assert unmeasured.strategy == "as einsum"


def _jnp_einsum_lowering(plan, shape):
    choices = planning.candidates(plan, shape, **TOOL)
    assert [c.kind for c in choices] == ["as einsum", "jnp.einsum"]
    low = planning.build(plan, shape, choices[1])
    assert low.strategy == "jnp.einsum" and low.dot.op == "einsum"
    assert low.x_perm is None and low.w_perm is None  # x and the weight as they are
    return low


@pytest.mark.parametrize("name", list(CASES))
def test_the_jnp_einsum_form_computes_the_layer(name: str):
    """Values against the numpy reference; the gradients of x and of the weight by the layer's
    linearity: <grad, d> equals <ct, reference(a + d) - reference(a)> for any direction d."""
    case = CASES[name]
    params, layer = case.init(jax.random.key(0))
    x = normal(case.x_shape)
    low = _jnp_einsum_lowering(layer.plan, case.x_shape)
    y = planning.apply_lowering(low, params, x, layer)
    reference = case.reference(params, x)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)

    ct = normal(reference.shape, seed=1)

    def loss(p, x):
        return jnp.vdot(planning.apply_lowering(low, p, x, layer), ct)

    grads, grad_x = jax.grad(loss, argnums=(0, 1))(params, x)
    dx = normal(case.x_shape, seed=2)
    expected = np.vdot(ct, case.reference(params, x + dx) - reference)
    np.testing.assert_allclose(np.vdot(grad_x, dx), expected, rtol=1e-4, atol=1e-4)
    dw = normal(params["weight"].shape, seed=3)
    moved = {**params, "weight": np.asarray(params["weight"]) + dw}
    expected = np.vdot(ct, case.reference(moved, x) - reference)
    np.testing.assert_allclose(np.vdot(grads["weight"], dw), expected, rtol=1e-4, atol=1e-4)


def test_the_jnp_einsum_form_is_described_as_it_runs():
    layer = em.layer("t b c -> u b c", "t u", "u", t=16, u=8)
    low = _jnp_einsum_lowering(layer.plan, (16, 4, 2))
    text = "\n".join(str(s) for s in low.steps)
    assert "jnp.einsum('abc,ad->dbc', x (16, 4, 2), weight (16, 8)) -> (u=8, b=4, c=2)" in text
    assert low.dimension_numbers is None


# ------------------------------------------------------------------------------------------------
# Under qwix: the Flax layer against einops' own layer, which calls jnp.einsum of the same operands
# ------------------------------------------------------------------------------------------------

PATTERN, WEIGHT, BIAS, LENGTHS, X_SHAPE = "t b c -> u b c", "t u", "u", dict(t=16, u=8), (16, 3, 4)


class _Ours(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=LENGTHS, name="mix")(x)


class _Einops(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return EinopsEinMix(PATTERN, WEIGHT, BIAS, sizes=LENGTHS, name="mix")(x)


@pytest.fixture(autouse=True)
def _standard_promotion():
    """qwix's own arithmetic mixes int32 and float32: it needs JAX's standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _both(params: dict) -> tuple[dict, dict]:
    """Our variables and einops' (its bias stored broadcast against the output)."""
    ours = {"params": {"mix": params}}
    theirs = {"params": {"mix": {**params, "bias": params["bias"].reshape(8, 1, 1)}}}
    return ours, theirs


RULES = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_qat_runs_jnp_einsum_as_einops_layer_does(jit: bool):
    x = jax_normal(X_SHAPE)
    params = _Ours().init(jax.random.key(0), x)["params"]["mix"]
    ours, theirs = _both(params)
    plain = np.asarray(_Ours().apply(ours, x))
    outputs = []
    for module, variables in ((_Ours(), ours), (_Einops(), theirs)):
        qat = qwix.quantize_model(module, qwix.QtProvider(RULES))
        apply = jax.jit(qat.apply) if jit else qat.apply
        outputs.append(np.asarray(apply(variables, x)))
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    assert 0 < np.abs(outputs[0] - plain).max() < 0.05 * np.abs(plain).max()  # int8 rounding
    # a plain call afterwards runs the planner's choice, not the tool's trace
    np.testing.assert_allclose(_Ours().apply(ours, x), plain, rtol=1e-6, atol=1e-6)


def test_ptq_quantizes_as_einops_layer_does():
    x = jax_normal(X_SHAPE)
    params = _Ours().init(jax.random.key(0), x)["params"]["mix"]
    results = []
    for module, variables in zip((_Ours(), _Einops()), _both(params), strict=True):
        ptq = qwix.quantize_model(module, qwix.PtqProvider(RULES))
        abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
        quantized = qwix.quantize_params(variables["params"], abstract["params"])
        assert jnp.dtype(quantized["mix"]["weight"].array.qvalue.dtype) == jnp.int8
        results.append(np.asarray(ptq.apply({"params": quantized}, x)))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_lora_factors_and_formula_under_the_jnp_einsum_form():
    """qwix's LoRA einsum rule records its einsum on the module, which a linen module refuses
    once frozen (einops' own layer raises there); the layer keeps it and LoRA runs."""
    x = jax_normal(X_SHAPE)
    lora = qwix.apply_lora_to_model(_Ours(), qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0))
    variables = lora.init(jax.random.key(0), x)
    p = variables["params"]["mix"]
    assert jax.tree.map(jnp.shape, {k: v for k, v in p.items() if "lora" in k}) == {
        "weight_lora_a": (16, 2),  # A over the contracted t, B to u
        "weight_lora_b": (2, 8),
    }
    keys = iter(jax.random.split(jax.random.key(7), 2))
    p = {
        k: 0.3 * jax.random.normal(next(keys), v.shape) if "lora" in k else v for k, v in p.items()
    }
    y = lora.apply({"params": {"mix": p}}, x)
    a, b = (np.asarray(p[k], np.float64) for k in ("weight_lora_a", "weight_lora_b"))
    merged = {"weight": np.asarray(p["weight"], np.float64) + a @ b, "bias": p["bias"]}
    reference = Case(PATTERN, WEIGHT, BIAS, LENGTHS, X_SHAPE).reference(merged, x)
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)


def test_describe_under_a_tool_shows_the_call_that_runs():
    x = jax_normal(X_SHAPE)
    module = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=LENGTHS)
    assert em.describe(module, X_SHAPE).strategy != "jnp.einsum"  # no tool: the planner's
    strategies = []

    class _Describing(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            mix = em.linen.EinMix(PATTERN, WEIGHT, BIAS, sizes=LENGTHS, name="mix")
            strategies.append(em.describe(mix, x.shape).strategy)
            return mix(x)

    qat = qwix.quantize_model(_Describing(), qwix.QtProvider(RULES))
    qat.init(jax.random.key(0), x)
    assert strategies and set(strategies) == {"jnp.einsum"}
    hooked = dataclasses.replace(module, dot_general=jax.lax.dot_general)
    assert em.describe(hooked, X_SHAPE).strategy == "as einsum"  # a hook is a dot_general

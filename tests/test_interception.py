"""Tools that intercept the contraction: the Flax layers behave exactly as ``nn.Dense`` under them,
and the functional apply is never served a trace made under one.

Each check runs EinMix and Flax's own layer (the control) under the same tool and compares the two,
and the float results with the numpy reference.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.linen import fp8_ops

import einmix_jax as em

from .cases import jax_normal
from .reference import reference_einmix

qwix = pytest.importorskip("qwix")

RULES = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
STATIC = [
    qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8", act_static_scale=True)
]


@pytest.fixture(autouse=True)
def _standard_promotion():
    """qwix's and Flax's fp8 arithmetic mix dtypes: they need JAX's standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def _reference(params: dict, x, pattern: str, weight_shape: str, bias_shape, sizes) -> np.ndarray:
    return reference_einmix(
        pattern,
        weight_shape,
        bias_shape,
        np.asarray(x, np.float64),
        np.asarray(params["weight"], np.float64),
        None if "bias" not in params else np.asarray(params["bias"], np.float64),
        sizes,
    )


# ------------------------------------------------------------------------------------------------
# The functional apply: no tool sees inside it, in every order of calls
# ------------------------------------------------------------------------------------------------


def _inside(apply, params):
    class UsesApply(nn.Module):
        @nn.compact
        def __call__(self, x):
            return apply(params, x)

    return UsesApply()


@pytest.mark.parametrize("provider", ["qat", "ptq"])
@pytest.mark.parametrize("first", ["tool", "plain"])
def test_the_functional_apply_is_never_served_a_trace_made_under_a_tool(provider, first):
    params, apply = em.init("b c -> b d", jax.random.key(0), c=5, d=3)
    x = jax_normal((4, 5))
    reference = _reference(params, x, "b c -> b d", "c d", None, dict(c=5, d=3))
    make = {"qat": qwix.QtProvider, "ptq": qwix.PtqProvider}[provider]
    tool = qwix.quantize_model(_inside(apply, params), make(RULES))
    calls = {"tool": lambda: tool.apply({}, x), "plain": lambda: apply(params, x)}
    order = [first, "plain" if first == "tool" else "tool"]
    for name in [*order, *order]:
        # the docs' promise: no interception tool sees inside the functional apply
        np.testing.assert_allclose(calls[name](), reference, rtol=1e-5, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------------------------------------
# A hook's captures are freed with the layer
# ------------------------------------------------------------------------------------------------


class _Codebook:
    """Stands for a big table a hook closes over."""


@pytest.mark.parametrize("form", ["function", "partial", "sharded"])
def test_a_hooks_captures_are_freed_with_its_layer(form):
    table = _Codebook()
    alive = weakref.ref(table)

    def hook(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, table=table):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)

    if form == "partial":
        hook = functools.partial(hook, table=table)
    del table
    params, apply = em.init("b c -> b d", jax.random.key(0), c=4, d=3, dot_general=hook)
    if form == "sharded":
        mesh = jax.make_mesh((1,), ("data",))
        apply = em.with_out_sharding(apply, jax.sharding.NamedSharding(mesh, jax.P("data")).spec)
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(
        apply(params, x), np.ones((2, 4)) @ np.asarray(params["weight"]), rtol=1e-6, atol=1e-6
    )
    del hook, params, apply
    gc.collect()
    assert alive() is None


# ------------------------------------------------------------------------------------------------
# qwix on the Flax layers: exactly nn.Dense, static scales included
# ------------------------------------------------------------------------------------------------


class _Dense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, name="layer")(x)


class _Mix(nn.Module):
    weight_shape: str
    sizes: dict

    @nn.compact
    def __call__(self, x):
        return em.linen.EinMix(
            "b t c -> b t d", self.weight_shape, "d", sizes=self.sizes, name="layer"
        )(x)


def _pair(weight_shape: str, c: int, d: int, x_shape):
    """EinMix and the nn.Dense control with the same params (kernel = the weight as ``'c d'``)."""
    # tokens of different scale
    x = jax_normal(x_shape) * jnp.arange(1, x_shape[1] + 1)[None, :, None]
    ours = _Mix(weight_shape, dict(c=c, d=d))
    variables = ours.init(jax.random.key(0), x)
    weight = variables["params"]["layer"]["weight"]
    kernel = weight if weight_shape == "c d" else weight.T
    control_vars = {
        "params": {"layer": {"kernel": kernel, "bias": variables["params"]["layer"]["bias"]}}
    }
    return x, (ours, variables), (_Dense(d), control_vars)


SHAPES = {
    "square, merged x matches the weight": ("c d", 64, 64, (8, 8, 64)),
    "stored 'd c', (b t) = d": ("d c", 8, 6, (2, 3, 8)),
    "tokens of different scale": ("c d", 16, 4, (2, 5, 16)),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("rules", ["dynamic", "static"])
def test_qat_on_the_linen_layer_equals_nn_dense(name, rules):
    weight_shape, c, d, x_shape = SHAPES[name]
    x, (ours, ours_vars), (control, control_vars) = _pair(weight_shape, c, d, x_shape)
    provider = qwix.QtProvider(RULES if rules == "dynamic" else STATIC)
    results = []
    for model, variables in ((ours, ours_vars), (control, control_vars)):
        qat = qwix.quantize_model(model, provider)
        state = qat.init(jax.random.key(0), x)  # the static scales' statistics, if any
        params = {**state, "params": variables["params"]}
        y, updates = qat.apply(params, x, mutable=True)
        stats = jax.tree.map(jnp.shape, {k: v for k, v in updates.items() if k != "params"})
        results.append((np.asarray(y), stats))
    (y, stats), (y_control, stats_control) = results
    assert stats == stats_control
    np.testing.assert_allclose(y, y_control, rtol=1e-5, atol=1e-5 * np.abs(y_control).max())


@pytest.mark.parametrize("name", list(SHAPES))
def test_ptq_with_static_scales_on_the_linen_layer_equals_nn_dense(name):
    weight_shape, c, d, x_shape = SHAPES[name]
    x, (ours, ours_vars), (control, control_vars) = _pair(weight_shape, c, d, x_shape)
    results = []
    for model, variables in ((ours, ours_vars), (control, control_vars)):
        # calibrate the static scales with QAT, then convert, as qwix's docs do
        qat = qwix.quantize_model(model, qwix.QtProvider(STATIC))
        state = qat.init(jax.random.key(0), x)
        _, calibrated = qat.apply({**state, "params": variables["params"]}, x, mutable=True)
        ptq = qwix.quantize_model(model, qwix.PtqProvider(STATIC))
        abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
        quantized = qwix.quantize_params(
            variables["params"], abstract["params"], calibrated.get("quant_stats", {})
        )
        results.append(np.asarray(ptq.apply({"params": quantized}, x)))
    np.testing.assert_allclose(
        results[0], results[1], rtol=1e-5, atol=1e-5 * np.abs(results[1]).max()
    )


# ------------------------------------------------------------------------------------------------
# The hook's calling convention is Flax's; Flax's fp8 ops
# ------------------------------------------------------------------------------------------------


def _recording(calls: list):
    def hook(*args, **kwargs):
        calls.append((len(args), sorted(kwargs)))
        return jax.lax.dot_general(*args, **kwargs)

    return hook


@pytest.mark.parametrize("preferred", [None, jnp.float32])
def test_the_hook_is_called_as_flax_calls_it(preferred):
    x = jax_normal((2, 3, 4))
    ours, theirs = [], []
    em.linen.EinMix(
        "b t c -> b t d",
        sizes=dict(d=5),
        dot_general=_recording(ours),
        preferred_element_type=preferred,
    ).init(jax.random.key(0), x)
    nnx.Linear(
        4, 5, dot_general=_recording(theirs), preferred_element_type=preferred, rngs=nnx.Rngs(0)
    )(x)
    # nnx.Linear also passes out_sharding, which EinMix does not take
    assert ours == [(a, [k for k in kw if k != "out_sharding"]) for a, kw in theirs]


def test_a_partial_hooks_own_arguments_are_kept():
    hook = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
    x = jax_normal((2, 4)).astype(jnp.bfloat16)
    kwargs = dict(param_dtype=jnp.bfloat16, dot_general=hook)
    y = em.linen.EinMix("b c -> b d", sizes=dict(d=3), **kwargs).init_with_output(
        jax.random.key(0), x
    )[0]
    layer = em.nnx.EinMix("b c -> b d", c=4, d=3, rngs=nnx.Rngs(0), **kwargs)
    control = nnx.Linear(4, 3, param_dtype=jnp.bfloat16, dot_general=hook, rngs=nnx.Rngs(0))
    assert control(x).dtype == jnp.float32
    assert y.dtype == jnp.float32
    assert layer(x).dtype == jnp.float32


class _Fp8(nn.Module):
    """Two layers with Flax's fp8 op, as ``nn.Dense(dot_general_cls=...)`` takes it."""

    mix: bool
    op: type

    @nn.compact
    def __call__(self, x):
        for i, d in enumerate((8, 4)):
            if self.mix:
                layer = em.linen.EinMix(
                    "b t c -> b t d",
                    "c d",
                    "d",
                    sizes=dict(d=d),
                    dot_general_cls=self.op,
                    name=f"l{i}",
                )
            else:
                layer = nn.Dense(d, dot_general_cls=self.op, name=f"l{i}")
            x = layer(x)
            if i == 0:
                x = nn.relu(x)
        return x


def _to_dense(tree):
    """EinMix's variables renamed as nn.Dense's (``weight`` -> ``kernel``)."""
    if isinstance(tree, dict):
        return {("kernel" if k == "weight" else k): _to_dense(v) for k, v in tree.items()}
    return tree


def _fp8_train(model, variables, x, target, steps=3):
    """Flax's fp8 recipe: the ``_overwrite_with_gradient`` collection takes its gradient as its
    new value; the params take Adam's update."""
    tx = optax.adam(1e-2)
    params, owg = variables["params"], variables[fp8_ops.OVERWRITE_WITH_GRADIENT]
    opt = tx.init(params)
    losses = []

    @jax.jit
    def step(params, owg, opt):
        def loss(params, owg):
            y = model.apply({"params": params, fp8_ops.OVERWRITE_WITH_GRADIENT: owg}, x)
            return jnp.mean((y - target) ** 2)

        value, (g, g_owg) = jax.value_and_grad(loss, argnums=(0, 1))(params, owg)
        updates, opt = tx.update(g, opt)
        return value, optax.apply_updates(params, updates), g_owg, opt

    for _ in range(steps):
        value, params, owg, opt = step(params, owg, opt)
        losses.append(float(value))
    return losses, params, owg


@pytest.mark.parametrize("op", [fp8_ops.Fp8DirectDotGeneralOp, fp8_ops.Fp8DotGeneralOp])
def test_flax_fp8_training_gives_einmix_what_it_gives_nn_dense(op):
    x, target = jax_normal((2, 3, 16)), jax_normal((2, 3, 4), seed=2)
    with (
        pytest.warns(DeprecationWarning)
        if op is fp8_ops.Fp8DotGeneralOp
        else contextlib.nullcontext()
    ):
        ours = _Fp8(True, op)
        control = _Fp8(False, op)
        variables = ours.init(jax.random.key(0), x)
        results = [
            _fp8_train(ours, variables, x, target),
            _fp8_train(control, _to_dense(variables), x, target),
        ]
    (losses, params, owg), (c_losses, c_params, c_owg) = results
    np.testing.assert_allclose(losses, c_losses, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        _to_dense(params),
        c_params,
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), owg, c_owg)
    assert losses[-1] < losses[0]


def test_nnx_fp8_hook_gives_einmix_what_it_gives_nnx_linear():
    x = jax_normal((2, 3, 16))
    state = dict(
        lhs_scale=jnp.ones((1,)),
        rhs_scale=jnp.ones((1,)),
        grad_scale=jnp.ones((1,)),
        lhs_amax_history=jnp.zeros((16,)),
        rhs_amax_history=jnp.zeros((16,)),
        grad_amax_history=jnp.zeros((16,)),
    )

    def hook(lhs, rhs, dimension_numbers, precision=None, out_sharding=None, **kwargs):
        # nnx.Linear also passes out_sharding, which fp8_scaled_dot_general does not take
        return fp8_ops.fp8_scaled_dot_general(
            lhs, rhs, dimension_numbers, precision, **kwargs, **state
        )

    ours = em.nnx.EinMix(
        "b t c -> b t d", "c d", "d", c=16, d=4, dot_general=hook, rngs=nnx.Rngs(0)
    )
    control = nnx.Linear(16, 4, dot_general=hook, rngs=nnx.Rngs(0))
    control.kernel.set_value(ours.weight[...])
    control.bias.set_value(ours.bias[...])

    def loss(model):
        return jnp.sum(model(x) ** 2)

    y = ours(x)
    assert np.abs(np.asarray(y) - np.asarray(_plain(ours, x))).max() > 0  # fp8 rounding
    np.testing.assert_allclose(y, control(x), rtol=1e-5, atol=1e-5)
    g, g_control = nnx.grad(loss)(ours), nnx.grad(loss)(control)
    np.testing.assert_allclose(g["weight"][...], g_control["kernel"][...], rtol=1e-5, atol=1e-5)


def _plain(layer, x):
    return em.init("b t c -> b t d", jax.random.key(0), "c d", "d", c=16, d=4)[1](
        layer.get_params(), x
    )

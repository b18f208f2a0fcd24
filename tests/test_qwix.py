"""qwix (quantization and LoRA) on the Flax layers, exactly as on ``nn.Dense`` / ``nnx.Linear``.

qwix intercepts ``jax.lax.dot_general`` while a Flax module is traced and recognises a weight by
identity as the dot's second operand. Each test checks EinMix under a provider against the same
provider on Flax's own layer (the control) and against a computation by hand in numpy: int8
rounding visible in QAT, int8 weights with their per-channel (per-head) scales under PTQ, LoRA
factors for every weight and the LoRA formula, and LoRA fine-tuning that leaves the base frozen.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import einmix_jax as em

from .cases import Case, jax_normal

qwix = pytest.importorskip("qwix")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of layer from the README's five: a linen and an NNX form with the same lengths."""

    pattern: str
    weight_shape: str
    bias_shape: str | None
    sizes: dict[str, int]  #: every weight and bias length
    x_shape: tuple[int, ...]
    contracted: tuple[int, ...]  #: the weight's contracted dimensions (absmax taken over them)

    def linen(self) -> em.linen.EinMix:
        return em.linen.EinMix(self.pattern, self.weight_shape, self.bias_shape, sizes=self.sizes)

    def nnx(self, seed: int = 0) -> em.nnx.EinMix:
        return em.nnx.EinMix(
            self.pattern,
            weight_shape=self.weight_shape,
            bias_shape=self.bias_shape,
            rngs=nnx.Rngs(seed),
            **self.sizes,
        )

    def reference(self, params: dict, x: np.ndarray) -> np.ndarray:
        """The numpy reference (float64), as the core's tests compute it."""
        case = Case(self.pattern, self.weight_shape, self.bias_shape, self.sizes, self.x_shape)
        return case.reference(params, np.asarray(x))


KINDS = {
    "linear": Kind("b t c -> b t d", "c d", "d", dict(c=8, d=6), (2, 3, 8), (0,)),
    "token mixing": Kind("b (t c) -> b (u c)", "t u", "u", dict(t=4, u=5), (2, 12), (0,)),
    "multi-head": Kind(
        "b t (h c) -> b t (h d)", "h c d", "h d", dict(h=2, c=4, d=3), (2, 3, 8), (1,)
    ),
    "patch embedding": Kind(
        "b (h p1) (w p2) c -> b (h w) d",
        "p1 p2 c d",
        "d",
        dict(p1=2, p2=2, c=3, d=6),
        (2, 4, 4, 3),
        (0, 1, 2),
    ),
}
SCALE = Kind("b t c -> b t c", "c", None, dict(c=8), (2, 3, 8), ())  # no contraction


@pytest.fixture(autouse=True)
def _standard_promotion():
    """qwix's own arithmetic mixes int32 and float32: it needs JAX's standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        yield


RULES = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]


def _variables(kind: Kind) -> dict:
    return kind.linen().init(jax.random.key(0), jax_normal(kind.x_shape))


def _maybe_jit(f, jit: bool):
    return jax.jit(f) if jit else f


def _int8_error(y: np.ndarray) -> float:
    """A bound on int8 rounding of both operands: a few percent of the output's scale."""
    return 0.05 * float(np.abs(y).max())


class _Dense(nn.Module):
    """The control: ``nn.Dense`` applied as the linear kind's EinMix is."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(6, name="EinMix_0")(x)


class _Wrap(nn.Module):
    """An EinMix inside a user's module, as qwix sees models."""

    kind: Kind

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.kind.linen()(x)


def _dense_variables(params: dict) -> dict:
    """The linear kind's EinMix params as the control's variables (same kernel layout)."""
    return {"params": {"EinMix_0": {"kernel": params["weight"], "bias": params["bias"]}}}


# ------------------------------------------------------------------------------------------------
# QAT
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(KINDS))
def test_qat_linen_rounds_like_int8_and_grads_reach_the_weight(name: str, jit: bool):
    kind = KINDS[name]
    model = _Wrap(kind)
    x = jax_normal(kind.x_shape)
    variables = {"params": {"EinMix_0": _variables(kind)["params"]}}
    # a float call first: it must leave no cached float contraction behind
    y = np.asarray(_maybe_jit(model.apply, jit)(variables, x))
    qat = qwix.quantize_model(model, qwix.QtProvider(RULES))
    y_q = np.asarray(_maybe_jit(qat.apply, jit)(variables, x))
    reference = kind.reference(variables["params"]["EinMix_0"], np.asarray(x))
    np.testing.assert_allclose(y, reference, rtol=1e-5, atol=1e-5)
    assert 0 < np.abs(y_q - y).max() < _int8_error(y)

    grads = jax.grad(lambda v: jnp.sum(qat.apply(v, x) ** 2))(variables)
    for param, g in grads["params"]["EinMix_0"].items():
        assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), param


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_qat_linen_linear_equals_the_dense_control(jit: bool):
    kind = KINDS["linear"]
    x = jax_normal(kind.x_shape)
    variables = {"params": {"EinMix_0": _variables(kind)["params"]}}
    ours = qwix.quantize_model(_Wrap(kind), qwix.QtProvider(RULES))
    control = qwix.quantize_model(_Dense(), qwix.QtProvider(RULES))
    dense_vars = _dense_variables(variables["params"]["EinMix_0"])
    y_control = _maybe_jit(control.apply, jit)(dense_vars, x)
    y_ours = _maybe_jit(ours.apply, jit)(variables, x)
    assert np.abs(np.asarray(y_control) - np.asarray(_Dense().apply(dense_vars, x))).max() > 0
    np.testing.assert_allclose(y_ours, y_control, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# PTQ
# ------------------------------------------------------------------------------------------------


def _hand_scale(weight: np.ndarray, contracted: tuple[int, ...]) -> np.ndarray:
    """Symmetric int8 absmax scale per output channel (every non-contracted weight axis).

    qwix's symmetric int8 range is [-127.5, 127.5] (the top bucket is whole), rounded and clipped
    to [-128, 127].
    """
    return np.abs(weight).max(axis=contracted, keepdims=True) / np.float32(127.5)


def _check_int8(stored, weight: np.ndarray, contracted: tuple[int, ...]) -> None:
    qarray = stored.array
    assert jnp.dtype(qarray.qvalue.dtype) == jnp.int8
    scale = _hand_scale(weight, contracted)
    np.testing.assert_allclose(qarray.scale, scale, rtol=1e-6)
    scaled = weight / scale  # float32, as qwix computes it but by another program
    expected = np.clip(np.round(scaled), -128, 127)
    # a value at a rounding midpoint (k + 0.5, e.g. the one at -127.5) may round either way
    exact = np.abs(np.abs(scaled) % 1 - 0.5) > 1e-4
    np.testing.assert_array_equal(np.asarray(qarray.qvalue)[exact], expected[exact])
    assert np.all(np.abs(np.asarray(qarray.qvalue, np.float32) - expected) <= 1)


@pytest.mark.parametrize("name", list(KINDS))
def test_ptq_linen_stores_int8_weights_and_keeps_the_result(name: str):
    kind = KINDS[name]
    model = _Wrap(kind)
    x = jax_normal(kind.x_shape)
    variables = {"params": {"EinMix_0": _variables(kind)["params"]}}
    ptq = qwix.quantize_model(model, qwix.PtqProvider(RULES))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
    quantized = qwix.quantize_params(variables["params"], abstract["params"])
    weight = np.asarray(variables["params"]["EinMix_0"]["weight"])
    _check_int8(quantized["EinMix_0"]["weight"], weight, kind.contracted)
    y = np.asarray(model.apply(variables, x))
    for apply in (ptq.apply, jax.jit(ptq.apply)):
        y_q = np.asarray(apply({"params": quantized}, x))
        assert 0 < np.abs(y_q - y).max() < _int8_error(y)


def test_ptq_linen_linear_equals_the_dense_control():
    kind = KINDS["linear"]
    x = jax_normal(kind.x_shape)
    params = _variables(kind)["params"]
    results = []
    for module, variables in (
        (_Wrap(kind), {"params": {"EinMix_0": params}}),
        (_Dense(), _dense_variables(params)),
    ):
        ptq = qwix.quantize_model(module, qwix.PtqProvider(RULES))
        abstract = jax.eval_shape(ptq.init, jax.random.key(0), x)
        quantized = qwix.quantize_params(variables["params"], abstract["params"])
        results.append(ptq.apply({"params": quantized}, x))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------

LORA_RANK, LORA_ALPHA = 2, 2.0
#: LoRA factor shapes qwix gives each weight: A over the contracted axes (per batch axis, e.g. per
#: head), B to the weight's free axes.
LORA_SHAPES = {
    "linear": ((8, 2), (2, 6)),
    "token mixing": ((4, 2), (2, 5)),
    "multi-head": ((2, 4, 2), (2, 2, 3)),
    "patch embedding": ((12, 2), (2, 6)),  # A over the 2 * 2 * 3 contracted elements
}


def _lora_provider():
    return qwix.LoraProvider(module_path=".*", rank=LORA_RANK, alpha=LORA_ALPHA)


def _nonzero_factors(params: dict, seed: int = 7) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), 2))
    return {
        k: (0.3 * jax.random.normal(next(keys), v.shape) if "lora" in k else v)
        for k, v in params.items()
    }


def _lora_weight(name: str, p: dict) -> np.ndarray:
    """The effective weight ``W + (alpha / rank) A B``, by hand, per head where there are heads."""
    a, b = np.asarray(p["weight_lora_a"], np.float64), np.asarray(p["weight_lora_b"], np.float64)
    delta = {
        "multi-head": lambda: np.einsum("hcr,hrd->hcd", a, b),
        "patch embedding": lambda: (a @ b).reshape(2, 2, 3, 6),
    }.get(name, lambda: a @ b)()
    return np.asarray(p["weight"], np.float64) + LORA_ALPHA / LORA_RANK * delta


@pytest.mark.parametrize("name", list(KINDS))
def test_lora_linen_factors_for_every_weight_and_the_lora_formula(name: str):
    kind = KINDS[name]
    x = jax_normal(kind.x_shape)
    lora = qwix.apply_lora_to_model(_Wrap(kind), _lora_provider())
    params = lora.init(jax.random.key(0), x)["params"]["EinMix_0"]
    shapes = {k: tuple(v.shape) for k, v in params.items() if "lora" in k}
    assert shapes == dict(zip(["weight_lora_a", "weight_lora_b"], LORA_SHAPES[name], strict=True))
    params = _nonzero_factors(params)
    for apply in (lora.apply, jax.jit(lora.apply)):
        y = apply({"params": {"EinMix_0": params}}, x)
        expected = kind.reference({**params, "weight": _lora_weight(name, params)}, np.asarray(x))
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_lora_linen_fine_tuning_trains_only_the_factors():
    kind = KINDS["linear"]
    x = jax_normal((64, 3, 8))
    lora = qwix.apply_lora_to_model(_Wrap(kind), _lora_provider())
    params = lora.init(jax.random.key(0), x)["params"]
    base = params["EinMix_0"]
    shifted = {**base, "weight": base["weight"] + 0.5 * jnp.outer(jnp.ones(8), jnp.arange(6.0))}
    target = kind.reference(shifted, np.asarray(x))  # a rank-1 change of the weight to learn
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "lora" if "lora" in jax.tree_util.keystr(path) else "frozen", params
    )
    optimizer = optax.multi_transform(
        {"lora": optax.adam(0.05), "frozen": optax.set_to_zero()}, labels
    )

    def loss(p):
        return jnp.mean((lora.apply({"params": p}, x) - target) ** 2)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    state, first = optimizer.init(params), float(loss(params))
    trained = params
    for _ in range(60):
        trained, state, _ = step(trained, state)
    assert float(loss(trained)) < 0.1 * first
    for frozen in ("weight", "bias"):
        np.testing.assert_array_equal(trained["EinMix_0"][frozen], params["EinMix_0"][frozen])
    assert np.any(trained["EinMix_0"]["weight_lora_b"] != 0)


# ------------------------------------------------------------------------------------------------
# NNX
# ------------------------------------------------------------------------------------------------


class _NnxWrap(nnx.Module):
    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(x)


def _nnx_linear_control(layer: em.nnx.EinMix) -> _NnxWrap:
    dense = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    dense.kernel.set_value(layer.weight[...])
    dense.bias.set_value(layer.bias[...])
    return _NnxWrap(dense)


@pytest.mark.parametrize("name", list(KINDS))
def test_qat_nnx(name: str):
    kind = KINDS[name]
    x = jax_normal(kind.x_shape)
    model = _NnxWrap(kind.nnx())
    y = np.asarray(model(x))
    np.testing.assert_allclose(y, kind.reference(model.layer.get_params(), x), rtol=1e-5, atol=1e-5)
    qat = qwix.quantize_model(model, qwix.QtProvider(RULES), x)
    y_q = np.asarray(qat(x))
    assert 0 < np.abs(y_q - y).max() < _int8_error(y)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(qat, x), y_q, rtol=1e-6, atol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(qat)
    for g in jax.tree.leaves(grads):
        assert np.any(np.asarray(g) != 0)
    if name == "linear":
        control = qwix.quantize_model(_nnx_linear_control(model.layer), qwix.QtProvider(RULES), x)
        np.testing.assert_allclose(y_q, control(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(KINDS))
def test_ptq_nnx(name: str):
    kind = KINDS[name]
    x = jax_normal(kind.x_shape)
    layer = kind.nnx()
    weight = np.asarray(layer.weight[...])
    y = np.asarray(layer(x))
    ptq = qwix.quantize_model(_NnxWrap(layer), qwix.PtqProvider(RULES), x)
    _check_int8(ptq.layer.weight, weight, kind.contracted)
    for run in (ptq, lambda x: nnx.jit(lambda m, x: m(x))(ptq, x)):
        y_q = np.asarray(run(x))
        assert 0 < np.abs(y_q - y).max() < _int8_error(y)
    if name == "linear":
        control = qwix.quantize_model(_nnx_linear_control(kind.nnx()), qwix.PtqProvider(RULES), x)
        np.testing.assert_allclose(ptq(x), control(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(KINDS))
def test_lora_nnx(name: str):
    kind = KINDS[name]
    x = jax_normal(kind.x_shape)
    lora = qwix.apply_lora_to_model(_NnxWrap(kind.nnx()), _lora_provider(), x, rngs=nnx.Rngs(1))
    layer = lora.layer
    shapes = (tuple(layer.weight_lora_a.shape), tuple(layer.weight_lora_b.shape))
    assert shapes == LORA_SHAPES[name]
    assert isinstance(layer.weight_lora_a, nnx.LoRAParam)
    for factor, key in ((layer.weight_lora_a, 3), (layer.weight_lora_b, 4)):
        factor.set_value(0.3 * jax.random.normal(jax.random.key(key), factor.shape))
    params = {
        **layer.get_params(),
        "weight_lora_a": layer.weight_lora_a[...],
        "weight_lora_b": layer.weight_lora_b[...],
    }
    expected = kind.reference({**params, "weight": _lora_weight(name, params)}, np.asarray(x))
    np.testing.assert_allclose(lora(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The channel-wise scale: no contraction, runs under every provider
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["qat", "ptq", "lora"])
def test_channelwise_scale_runs_under_every_provider(provider: str):
    x = jax_normal(SCALE.x_shape)
    model = _Wrap(SCALE)
    variables = {"params": {"EinMix_0": _variables(SCALE)["params"]}}
    y = np.asarray(model.apply(variables, x))
    make = {
        "qat": lambda m: qwix.quantize_model(m, qwix.QtProvider(RULES)),
        "ptq": lambda m: qwix.quantize_model(m, qwix.PtqProvider(RULES)),
        "lora": lambda m: qwix.apply_lora_to_model(m, _lora_provider()),
    }[provider]
    wrapped = make(model)
    if provider == "ptq":
        abstract = jax.eval_shape(wrapped.init, jax.random.key(0), x)["params"]
        params = qwix.quantize_params(variables["params"], abstract)
    else:  # LoRA adds factors (B starts at zero) beside the weight
        params = wrapped.init(jax.random.key(0), x)["params"]
        params["EinMix_0"]["weight"] = variables["params"]["EinMix_0"]["weight"]
    got = np.asarray(wrapped.apply({"params": params}, x))
    assert np.abs(got - y).max() <= _int8_error(y)
    nnx_model = _NnxWrap(SCALE.nnx())
    y_nnx = np.asarray(nnx_model(x))
    make_nnx = {
        "qat": lambda m: qwix.quantize_model(m, qwix.QtProvider(RULES), x),
        "ptq": lambda m: qwix.quantize_model(m, qwix.PtqProvider(RULES), x),
        "lora": lambda m: qwix.apply_lora_to_model(m, _lora_provider(), x, rngs=nnx.Rngs(1)),
    }[provider]
    assert np.abs(np.asarray(make_nnx(nnx_model)(x)) - y_nnx).max() <= _int8_error(y_nnx)

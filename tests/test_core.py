"""The functional core against the numpy reference, under JAX's transforms, dtypes and caches."""

from __future__ import annotations

import functools
import gc
import weakref
from collections.abc import Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import einmix_jax as em
from einmix_jax import _core, _execute, _lower, _parse

from .cases import CASES, Case, normal
from .reference import default_weight_shape, reference_einmix


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_apply_matches_reference(case: Case):
    params, apply = case.init(jax.random.key(0))
    weight_shape = case.weight_shape
    if weight_shape is None:
        weight_shape = default_weight_shape(case.pattern)
    chex.assert_shape(params["weight"], tuple(case.axes[a] for a in weight_shape.split()))
    if case.bias_shape is None:
        assert set(params) == {"weight"}
    else:
        chex.assert_shape(params["bias"], tuple(case.axes[a] for a in case.bias_shape.split()))
    x = normal(case.x_shape)

    y = jax.jit(apply)(params, x)

    expected = case.reference(params, x)
    chex.assert_shape(y, expected.shape)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_apply_eagerly_equals_jit():
    case = CASES["multi-head"]
    params, apply = case.init(jax.random.key(1))
    x = normal(case.x_shape)
    chex.assert_trees_all_close(apply(params, x), jax.jit(apply)(params, x), rtol=1e-6, atol=1e-6)


# --- transforms ---------------------------------------------------------------------------


def test_vmap_over_inputs():
    case = CASES["multi-head"]
    params, apply = case.init(jax.random.key(0))
    xs = normal((3, *case.x_shape))
    ys = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(params, xs)
    expected = np.stack([case.reference(params, x) for x in xs])
    np.testing.assert_allclose(ys, expected, rtol=1e-5, atol=1e-5)


def test_ensemble_vmap_over_stacked_params():
    case = CASES["token mixing"]
    _, apply = case.init(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 4)
    stacked = jax.vmap(apply.init)(keys)
    chex.assert_shape(stacked["weight"], (4, 3, 5))
    x = normal(case.x_shape)
    ys = jax.jit(jax.vmap(apply, in_axes=(0, None)))(stacked, x)
    for i, key in enumerate(keys):
        member = apply.init(key)
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], stacked), member, rtol=1e-6, atol=1e-6
        )
        np.testing.assert_allclose(ys[i], case.reference(member, x), rtol=1e-5, atol=1e-5)
    # a different member per input as well
    xs = normal((4, *case.x_shape), seed=1)
    ys = jax.vmap(apply)(stacked, xs)
    for i in range(4):
        member = jax.tree.map(lambda a, i=i: a[i], stacked)
        np.testing.assert_allclose(ys[i], case.reference(member, xs[i]), rtol=1e-5, atol=1e-5)


def test_scan_over_stacked_layers():
    _, apply = em.init("b c -> b d", jax.random.key(0), bias_shape="d", c=4, d=4)
    stacked = jax.vmap(apply.init)(jax.random.split(jax.random.key(1), 3))
    x = normal((2, 4))

    def body(h, p):
        return jnp.tanh(apply(p, h)), None

    y, _ = jax.jit(lambda ps, x: lax.scan(body, x, ps))(stacked, x)

    expected = x.astype(np.float64)
    for i in range(3):
        w, b = np.asarray(stacked["weight"][i]), np.asarray(stacked["bias"][i])
        expected = np.tanh(
            reference_einmix("b c -> b d", "c d", "d", expected, w, b, {"c": 4, "d": 4})
        )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def _loss(apply):
    def loss(params, x):
        return jnp.sum(jnp.sin(apply(params, x)))

    return loss


def test_grad_of_plain_linear_matches_the_analytic_gradient():
    params, apply = em.init("b c -> b d", jax.random.key(0), bias_shape="d", c=3, d=2)
    x = normal((5, 3))
    grads = jax.jit(jax.grad(_loss(apply)))(params, x)
    w, b = np.asarray(params["weight"], np.float64), np.asarray(params["bias"], np.float64)
    upstream = np.cos(x @ w + b)  # d sum(sin(y)) / dy
    chex.assert_trees_all_close(
        grads, {"weight": x.T @ upstream, "bias": upstream.sum(0)}, rtol=1e-5, atol=1e-5
    )


def test_checkpoint_gives_the_same_value_and_grad():
    case = CASES["patch embedding"]
    params, apply = case.init(jax.random.key(0))
    x = normal(case.x_shape)
    loss = _loss(apply)
    plain = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    remat = jax.jit(jax.value_and_grad(jax.checkpoint(loss), argnums=(0, 1)))(params, x)
    chex.assert_trees_all_close(plain, remat, rtol=1e-6, atol=1e-6)


def test_eval_shape():
    case = CASES["patch embedding"]
    _, apply = case.init(jax.random.key(0))
    params = jax.eval_shape(apply.init, jax.random.key(0))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), params) == {
        "weight": ((2, 2, 3, 5), jnp.float32),
        "bias": ((5,), jnp.float32),
    }
    out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct(case.x_shape, jnp.float32))
    assert (out.shape, out.dtype) == ((2, 6, 5), jnp.float32)


@pytest.mark.parametrize(
    "name", ["multi-head", "token mixing", "ellipsis with bias", "input-only axis is summed"]
)
def test_check_grads_order_2_in_float64(name: str):
    case = CASES[name]
    with jax.enable_x64(True):
        params, apply = case.init(jax.random.key(0), param_dtype=jnp.float64)
        x = jnp.asarray(normal(case.x_shape, dtype=np.float64))
        assert apply(params, x).dtype == jnp.float64
        jax.test_util.check_grads(
            _loss(apply), (params, x), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6
        )


# --- dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "x_dtype", "param_dtype", "out_dtype"),
    [
        (dict(), np.float32, jnp.float32, jnp.float32),
        (dict(param_dtype=jnp.bfloat16), np.float32, jnp.bfloat16, jnp.float32),
        (dict(param_dtype=jnp.bfloat16), jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
        (dict(param_dtype=jnp.float16), np.float32, jnp.float16, jnp.float32),
        (dict(dtype=jnp.bfloat16), np.float32, jnp.float32, jnp.bfloat16),
        (dict(dtype="bfloat16", param_dtype="float32"), np.float32, jnp.float32, jnp.bfloat16),
        (dict(), np.int32, jnp.float32, jnp.float32),
        (dict(), np.uint8, jnp.float32, jnp.float32),
        (dict(param_dtype=jnp.bfloat16), np.int8, jnp.bfloat16, jnp.bfloat16),
        (dict(precision="highest"), np.float32, jnp.float32, jnp.float32),
        (dict(precision=lax.Precision.HIGHEST), np.float32, jnp.float32, jnp.float32),
        (dict(precision=["highest", "highest"]), np.float32, jnp.float32, jnp.float32),
        (dict(preferred_element_type=jnp.float32), np.float32, jnp.float32, jnp.float32),
    ],
)
def test_dtypes(options, x_dtype, param_dtype, out_dtype):
    case = CASES["multi-head"]
    params, apply = case.init(jax.random.key(0), **options)
    assert {k: v.dtype for k, v in params.items()} == {"weight": param_dtype, "bias": param_dtype}
    x = np.random.default_rng(0).integers(0, 4, size=case.x_shape).astype(x_dtype)
    y = jax.jit(apply)(params, x)
    assert y.dtype == out_dtype
    tol = 1e-5 if out_dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(
        np.asarray(y, np.float32), case.reference(params, x), rtol=tol, atol=tol
    )


def test_dtype_float64_under_x64():
    case = CASES["plain linear"]
    with jax.enable_x64(True):
        params, apply = case.init(jax.random.key(0), dtype=jnp.float64)
        x = normal(case.x_shape)
        y = apply(params, x)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, case.reference(params, x), rtol=1e-12, atol=1e-12)


# --- training -----------------------------------------------------------------------------


def test_optax_adam_fits_a_random_linear_target():
    pattern, sizes = "b (h c) -> b (h d)", dict(h=2, c=3, d=2)
    rng = np.random.default_rng(0)
    target_w, target_b = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 2))
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = reference_einmix(pattern, "h c d", "h d", x, target_w, target_b, sizes).astype(np.float32)

    params, apply = em.init(
        pattern, jax.random.key(0), weight_shape="h c d", bias_shape="h d", **sizes
    )
    optimizer = optax.adam(0.05)

    def loss(params):
        return jnp.mean(jnp.square(apply(params, x) - y))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        (params, _), losses = lax.scan(step, (params, optimizer.init(params)), length=400)
        return params, losses

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
        fitted, losses = train(params)
    assert losses[0] > 0.5
    assert loss(fitted) < 1e-4
    chex.assert_trees_all_close(fitted, {"weight": target_w, "bias": target_b}, atol=1e-2, rtol=0)


# --- caches -------------------------------------------------------------------------------


def test_plan_is_parsed_once_per_configuration():
    config = dict(weight_shape="c e", bias_shape="e", c=5, e=7)
    em.init("q c -> q e", jax.random.key(0), **config)
    before = _parse._parse_cached.cache_info()
    _, apply = em.init("q c -> q e", jax.random.key(1), **config)
    after = _parse._parse_cached.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
    assert apply.plan is em.layer("q c -> q e", **config).plan


@pytest.fixture
def traces(monkeypatch):
    """Count the traces of the functional apply (each one runs ``execute`` once), from empty."""
    calls = []
    real = _execute.execute

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(_execute, "execute", counting)
    _core._COMPILED.clear()
    return calls


def test_no_retrace_on_a_second_apply_with_the_same_shapes(traces):
    config = dict(weight_shape="c e", bias_shape="e", c=3, e=9)
    params, apply = em.init("q c -> q e", jax.random.key(0), **config)
    apply(params, normal((2, 3)))
    lowered = _lower._lower.cache_info()
    apply(params, normal((2, 3), seed=1))
    other_params, other = em.init("q c -> q e", jax.random.key(1), **config)  # an equal layer
    assert other == apply and hash(other) == hash(apply)
    other(other_params, normal((2, 3), seed=2))
    assert len(traces) == len(_core._COMPILED) == 1
    assert _lower._lower.cache_info().misses == lowered.misses
    apply(params, normal((4, 3)))  # a new input shape compiles once more
    assert len(traces) == len(_core._COMPILED) == 2


def _ones(key, shape, dtype):
    return jnp.ones(shape, dtype)


def test_layers_computing_the_same_thing_share_one_compile(traces):
    x = normal((2, 3))
    reference = None
    variants = [
        em.layer("b c -> b d", c=3, d=4),
        em.layer("b c -> b d", d=4, c=3),  # keyword order
        em.layer("  b   c ->b d ", c=3, d=4),  # pattern spacing
        em.layer("n k -> n m", k=3, m=4),  # renamed axes
        em.layer("b c -> b d", c=3, d=4, weight_init=_ones),  # another initializer
    ]
    params = variants[0].init(jax.random.key(0))
    for mix in variants:
        y = mix(params, x)
        reference = y if reference is None else reference
        np.testing.assert_array_equal(y, reference)
    assert len(traces) == len(_core._COMPILED) == 1
    assert variants[4] != variants[0]  # unequal layers (inits differ), one computation
    em.layer("b c -> b d", c=3, d=4, dtype=jnp.bfloat16)(params, x)  # another computation
    assert len(traces) == 2


def test_partial_hooks_built_per_call_do_not_retrace(traces):
    x = normal((2, 3))
    params = em.layer("b c -> b d", c=3, d=4).init(jax.random.key(0))
    for _ in range(5):
        hook = functools.partial(lax.dot_general, precision=lax.Precision.HIGHEST)
        em.layer("b c -> b d", c=3, d=4, dot_general=hook)(params, x)
    assert len(traces) == 1


def test_linen_partial_hook_applied_eagerly_compiles_nothing_of_ours(traces):
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            hook = functools.partial(lax.dot_general, precision=lax.Precision.HIGHEST)
            return em.linen.EinMix("b c -> b d", "c d", sizes={"d": 4}, dot_general=hook)(x)

    x = normal((2, 3))
    variables = Model().init(jax.random.key(0), x)
    for _ in range(10):
        Model().apply(variables, x)
    assert len(_core._COMPILED) == 0  # the Flax layers run inside the caller's trace, no jit


def test_a_deleted_layer_frees_what_its_initializer_captured(traces):
    class Big:
        data = np.zeros(1000)

    captured = Big()
    ref = weakref.ref(captured)

    def init(key, shape, dtype, big=captured):
        return jnp.full(shape, float(big.data[0]), dtype)

    mix = em.layer("b c -> b d", c=3, d=4, weight_init=init)
    params = mix.init(jax.random.key(0))
    mix(params, normal((2, 3)))
    jax.jit(mix)(params, normal((2, 3)))  # also under the user's jit
    del mix, init, captured
    gc.collect()
    assert ref() is None


def test_compiled_applies_are_bounded_least_recently_used_first(traces, monkeypatch):
    monkeypatch.setattr(_core._COMPILED, "maxsize", 3)
    x = normal((2, 3))
    layers = [em.layer("b c -> b d", c=3, d=d) for d in range(1, 6)]
    jitted = []
    for mix in layers:
        mix(mix.init(jax.random.key(0)), x)
        jitted.append(weakref.ref(list(_core._COMPILED.values())[-1]))
        assert len(_core._COMPILED) <= 3
    gc.collect()
    assert [ref() is None for ref in jitted] == [True, True, False, False, False]
    layers[2](layers[2].init(jax.random.key(0)), x)  # still compiled: no new trace
    assert len(traces) == 5


# --- equality -----------------------------------------------------------------------------


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _fill(key, shape, dtype, value=0.0):
    return jnp.full(shape, value, dtype)


@pytest.mark.parametrize("which", ["weight_init", "bias_init"])
def test_layers_that_differ_only_in_an_init_are_unequal(which):
    config = dict(bias_shape="d", c=3, d=4)
    zeros = em.layer("b c -> b d", **config, **{which: _zeros})
    ones = em.layer("b c -> b d", **config, **{which: _ones})
    assert zeros != ones and len({zeros, ones}) == 2
    assert zeros == em.layer("b c -> b d", **config, **{which: _zeros})
    assert hash(zeros) == hash(em.layer("b c -> b d", **config, **{which: _zeros}))
    # a layer is a static jit argument: each one must draw with its own init
    init = jax.jit(em.EinMix.init, static_argnums=0)
    entry = "weight" if which == "weight_init" else "bias"
    shape = zeros.param_shapes[entry]
    np.testing.assert_array_equal(init(zeros, jax.random.key(0))[entry], np.zeros(shape))
    np.testing.assert_array_equal(init(ones, jax.random.key(0))[entry], np.ones(shape))


def test_partial_inits_compare_by_function_and_arguments():
    def layer(init):
        return em.layer("b c -> b d", c=3, d=4, weight_init=init)

    half = layer(functools.partial(_fill, value=0.5))
    assert half == layer(functools.partial(_fill, value=0.5))
    assert hash(half) == hash(layer(functools.partial(_fill, value=0.5)))
    assert half != layer(functools.partial(_fill, value=2.0))
    assert half != layer(_fill)
    np.testing.assert_array_equal(half.init(jax.random.key(0))["weight"], np.full((3, 4), 0.5))
    # an unhashable argument: compared by identity, still hashable
    array_fill = functools.partial(_fill, value=jnp.ones(()))
    assert layer(array_fill) == layer(array_fill)
    assert layer(array_fill) != layer(functools.partial(_fill, value=jnp.ones(())))
    hash(layer(array_fill))


# --- params in any mapping ----------------------------------------------------------------


def test_params_in_any_mapping():
    from flax.core import FrozenDict

    case = CASES["multi-head"]
    params, apply = case.init(jax.random.key(0))
    x = normal(case.x_shape)
    expected = case.reference(params, x)
    for mapping in (FrozenDict(params), _ReadOnly(params)):
        np.testing.assert_allclose(apply(mapping, x), expected, rtol=1e-5, atol=1e-5)
    frozen = FrozenDict(params)  # a pytree, so it also passes through the user's jit
    np.testing.assert_allclose(jax.jit(apply)(frozen, x), expected, rtol=1e-5, atol=1e-5)


class _ReadOnly(Mapping):
    """A read-only mapping that is not a ``dict``."""

    def __init__(self, entries: dict):
        self._entries = dict(entries)

    def __getitem__(self, key):
        return self._entries[key]

    def __iter__(self):
        return iter(self._entries)

    def __len__(self):
        return len(self._entries)


def test_params_as_lists_of_numbers():
    apply = em.layer("b c -> b d", bias_shape="d", c=2, d=3)
    weight, bias = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [0.5, 0.0, -0.5]
    x = np.array([[1.0, 2.0]], np.float32)
    expected = reference_einmix(
        "b c -> b d", "c d", "d", x, np.array(weight), np.array(bias), {"c": 2, "d": 3}
    )
    for call in (apply, jax.jit(apply)):
        np.testing.assert_allclose(call({"weight": weight, "bias": bias}, x), expected)


# --- positional weight/bias shapes, repr ---------------------------------------------------


def test_weight_and_bias_shape_positional_as_in_einops_torch_layer():
    keyword = em.layer("b c -> b d", weight_shape="d c", bias_shape="d", c=3, d=4)
    assert em.layer("b c -> b d", "d c", "d", c=3, d=4) == keyword
    assert em.EinMix("b c -> b d", "d c", "d", c=3, d=4) == keyword
    params, apply = em.init("b c -> b d", jax.random.key(0), "d c", "d", c=3, d=4)
    assert apply == keyword
    assert jax.tree.map(jnp.shape, params) == {"weight": (4, 3), "bias": (4,)}


def _custom_dot(lhs, rhs, dims, precision=None, preferred_element_type=None):
    return lax.dot_general(lhs, rhs, dims, precision=precision)


REPR_LAYERS = {
    "plain": em.layer("b c -> b d", c=3, d=4),
    "bias": em.layer("b c -> b d", "d c", "d", c=3, d=4),
    "dtype": em.layer("b c -> b d", c=3, d=4, dtype=jnp.bfloat16),
    "param_dtype": em.layer("b c -> b d", c=3, d=4, param_dtype="float16"),
    "precision": em.layer("b c -> b d", c=3, d=4, precision="highest"),
    "precision enum": em.layer("b c -> b d", c=3, d=4, precision=lax.Precision.HIGH),
    "precision pair": em.layer("b c -> b d", c=3, d=4, precision=("highest", "default")),
    "preferred_element_type": em.layer("b c -> b d", c=3, d=4, preferred_element_type="float32"),
    "axis named like an option": em.layer("b c -> b dtype", sizes={"dtype": 4}, c=3),
    "out_sharding": em.with_out_sharding(em.layer("b c -> b d", c=3, d=4), {"b": "data"}),
    "out_sharding, logical": em.with_out_sharding(
        em.layer("b c -> b d", c=3, d=4), {"batch": "data"}, logical_axes={"b": "batch"}
    ),
}


@pytest.mark.parametrize("name", list(REPR_LAYERS))
def test_repr_pastes_back_into_an_equal_layer(name):
    mix = REPR_LAYERS[name]
    namespace = {
        "EinMix": em.EinMix,
        "with_out_sharding": em.with_out_sharding,
        "Precision": lax.Precision,
    }
    assert eval(repr(mix), namespace) == mix


def test_unequal_layers_never_print_the_same():
    base = dict(c=3, d=4)
    layers = [
        *REPR_LAYERS.values(),
        em.layer("b c -> b d", **base, dot_general=_custom_dot),
        em.layer("b c -> b d", **base, weight_init=_zeros),
        em.layer("b c -> b d", **base, weight_init=_ones),
        em.layer("b c -> b d", **base, weight_init=functools.partial(_fill, value=2.0)),
        em.layer("b c -> b d", "d c", "d", **base, bias_init=_zeros),
        em.layer("b c -> b d", "d c", "d", **base, bias_init=_ones),
    ]
    texts = [repr(mix) for mix in layers]
    assert len(set(layers)) == len(layers)
    assert len(set(texts)) == len(texts), texts
    for mix in layers:  # describe's header is the layer's repr
        assert str(em.describe(mix, (2, 3))).splitlines()[0] == repr(mix)


# --- axis names that are option names ------------------------------------------------------

OPTIONS = [
    "weight_shape",
    "bias_shape",
    "sizes",
    "param_dtype",
    "dtype",
    "precision",
    "preferred_element_type",
    "weight_init",
    "bias_init",
    "dot_general",
]


@pytest.mark.parametrize("name", OPTIONS)
def test_any_axis_name_through_sizes(name):
    params, apply = em.init(f"b {name} -> b d", jax.random.key(0), sizes={name: 3, "d": 2})
    assert jax.tree.map(jnp.shape, params) == {"weight": (3, 2)}
    x = normal((2, 3))
    expected = reference_einmix(
        "b c -> b d", "c d", None, x, np.asarray(params["weight"]), None, {"c": 3, "d": 2}
    )
    np.testing.assert_allclose(apply(params, x), expected, rtol=1e-5, atol=1e-5)
    described = em.describe(f"b c -> b {name}", (2, 3), sizes={name: 4})
    assert described.out_shape == (2, 4)


@pytest.mark.parametrize("name", OPTIONS)
def test_axis_length_given_as_an_option_says_to_use_sizes(name):
    message = rf"{name}=4.*sizes=\{{'{name}': 4\}}"
    with pytest.raises(em.EinMixError, match=message):
        em.layer(f"b c -> b {name}", c=3, **{name: 4})
    with pytest.raises(em.EinMixError, match=message):
        em.init(f"b c -> b {name}", jax.random.key(0), c=3, **{name: 4})


def test_axes_read_off_the_input_may_be_named_like_options():
    d = em.describe("b precision -> b d", (2, 3), d=4)
    assert d.layer.param_shapes == {"weight": (3, 4)}
    d = em.describe("b dtype -> b d", (2, 3), d=4)
    assert d.layer.param_shapes == {"weight": (3, 4)}


@pytest.mark.parametrize("name", ["plan", "out_sharding", "logical_axes", "rngs", "key", "pattern"])
def test_names_that_are_not_options_of_layer_and_init_are_plain_keywords(name):
    params, _ = em.init(f"b {name} -> b d", jax.random.key(0), d=2, **{name: 3})
    assert params["weight"].shape == (3, 2)
    assert em.layer(f"b c -> b {name}", c=2, **{name: 3}).param_shapes == {"weight": (2, 3)}


def test_a_length_given_twice_is_refused():
    with pytest.raises(em.EinMixError, match=r"axis 'c'.*given twice"):
        em.layer("b c -> b d", sizes={"c": 3}, c=3, d=4)


# --- dtypes: no integer computation ---------------------------------------------------------


@pytest.mark.parametrize("option", ["dtype", "param_dtype", "preferred_element_type"])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, bool, "int8"])
def test_integer_dtypes_are_refused_at_creation(option, dtype):
    with pytest.raises(em.EinMixError, match=rf"{option} must be a floating dtype"):
        em.layer("b c -> b d", c=3, d=4, **{option: dtype})


def test_integer_inputs_and_params_compute_in_the_default_float_exactly_under_x64():
    mix = em.layer("b c -> b d", c=1, d=1)
    with jax.enable_x64(True):
        x = np.array([[2**40 + 1]], np.int64)
        y = mix({"weight": np.array([[3]], np.int64)}, x)
        assert y.dtype == jnp.float64
        assert int(y[0, 0]) == 3 * (2**40 + 1)
        y = mix({"weight": np.array([[3.0]], np.float64)}, x)  # float64 params: float64
        assert y.dtype == jnp.float64 and int(y[0, 0]) == 3 * (2**40 + 1)
    y = mix({"weight": np.array([[3.0]], np.float32)}, np.array([[7]], np.int32))
    assert y.dtype == jnp.float32 and float(y[0, 0]) == 21.0

"""The NNX layer: equal to the functional core and to the numpy reference, its state, NNX
transforms, training with nnx.Optimizer, and params shared with the linen layer."""

from __future__ import annotations

import contextlib
import re

import chex
import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import einmix_jax as em
from einmix_jax.nnx import EinMix

from .cases import CASES, LOGICAL_CASES, Case, normal
from .reference import reference_einmix


def _random_params(layer: em.EinMix, seed: int = 1) -> dict[str, np.ndarray]:
    return {k: normal(s, seed=seed + i) for i, (k, s) in enumerate(layer.param_shapes.items())}


def _module(case: Case, rngs: nnx.Rngs | None = None, **options) -> EinMix:
    return EinMix(
        case.pattern,
        weight_shape=case.weight_shape,
        bias_shape=case.bias_shape,
        rngs=rngs or nnx.Rngs(0),
        **options,
        **case.axes,
    )


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_equals_functional_and_reference(case: Case):
    core = em.layer(
        case.pattern, weight_shape=case.weight_shape, bias_shape=case.bias_shape, **case.axes
    )
    # The params' shapes without drawing them; then load known values.
    module = nnx.eval_shape(lambda: _module(case))
    assert module.functional == core
    state = nnx.state(module, nnx.Param)
    assert jax.tree.map(jnp.shape, state.to_pure_dict()) == core.param_shapes
    params = _random_params(core)
    module.set_params(params)

    x = normal(case.x_shape)
    y = module(x)
    np.testing.assert_allclose(y, core(params, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, case.reference(params, x), rtol=1e-5, atol=1e-5)


def test_params_are_the_only_state():
    with_bias = EinMix("b c -> b d", weight_shape="c d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    assert isinstance(with_bias.weight, nnx.Param) and isinstance(with_bias.bias, nnx.Param)
    assert (with_bias.weight.shape, with_bias.bias.shape) == ((4, 3), (3,))
    assert set(nnx.state(with_bias).to_pure_dict()) == {"weight", "bias"}
    assert nnx.state(with_bias, nnx.Not(nnx.Param)).to_pure_dict() == {}

    no_bias = EinMix("b c -> b d", c=4, d=3, rngs=nnx.Rngs(0))
    assert no_bias.bias is None
    assert set(nnx.state(no_bias).to_pure_dict()) == {"weight"}
    assert jax.tree.map(jnp.shape, no_bias.get_params()) == {"weight": (4, 3)}


def test_params_drawn_by_the_core_initializers():
    layer = EinMix("b c -> b d", weight_shape="c d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    # the core's default: symmetric uniform, bound sqrt(3 / fan_in) (weight), sqrt(1 / fan_in) (bias)
    assert float(jnp.abs(layer.weight[...]).max()) <= np.sqrt(3 / 4)
    assert float(jnp.abs(layer.bias[...]).max()) <= np.sqrt(1 / 4)
    assert float(layer.weight[...].min()) < 0 < float(layer.weight[...].max())
    again = EinMix("b c -> b d", weight_shape="c d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(again.weight[...], layer.weight[...])  # reproducible

    def ramp(key, shape, dtype):
        return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape)

    custom = EinMix(
        "b c -> b d",
        bias_shape="d",
        weight_init=ramp,
        bias_init=jax.nn.initializers.ones,
        param_dtype=jnp.bfloat16,
        c=4,
        d=3,
        rngs=nnx.Rngs(0),
    )
    np.testing.assert_array_equal(custom.weight[...], np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(custom.bias[...], np.ones(3))
    assert custom.weight.dtype == custom.bias.dtype == jnp.bfloat16


def test_repr_shows_the_configuration():
    layer = EinMix(
        "b t c -> b t d", weight_shape="c d", bias_shape="d", c=64, d=128, rngs=nnx.Rngs(0)
    )
    assert (
        repr(layer) == "EinMix('b t c -> b t d', weight_shape='c d', bias_shape='d', c=64, d=128)"
    )
    options = EinMix("b c -> b d", c=2, d=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert repr(options) == "EinMix('b c -> b d', weight_shape='c d', c=2, d=3, dtype='bfloat16')"


def test_configuration_errors_name_the_axis():
    with pytest.raises(einops.EinopsError, match=r"'d'.*need a length"):
        EinMix("b c -> b d", c=4, rngs=nnx.Rngs(0))
    layer = EinMix("b c -> b d", c=4, d=3, rngs=nnx.Rngs(0))
    with pytest.raises(einops.EinopsError, match=r"axis 'c': expected 4, got 5"):
        layer(jnp.ones((2, 5)))


def test_get_and_set_params_round_trip():
    config = dict(weight_shape="h c d", bias_shape="h d", h=2, c=3, d=2)
    params, core = em.init("b (h c) -> b (h d)", jax.random.key(3), **config)
    layer = EinMix("b (h c) -> b (h d)", rngs=nnx.Rngs(0), **config)
    assert layer.functional == core
    layer.set_params(params)
    got = layer.get_params()
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])
    # the same dict as Flax's own conversion of the state
    jax.tree.map(np.testing.assert_array_equal, nnx.state(layer).to_pure_dict(), got)
    x = normal((4, 6))
    np.testing.assert_allclose(layer(x), core(params, x), rtol=1e-6, atol=1e-6)

    with pytest.raises(einops.EinopsError, match=re.escape("params['weight'] has shape (3, 2)")):
        layer.set_params({"weight": np.ones((3, 2)), "bias": np.ones((2, 2))})
    with pytest.raises(einops.EinopsError, match=r"expected \['bias', 'weight'\]"):
        layer.set_params({"weight": params["weight"]})


def test_split_merge_state_update_round_trip():
    layer = EinMix("b c -> b d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    x = normal((2, 4))
    graphdef, state = nnx.split(layer)
    merged = nnx.merge(graphdef, state)
    assert merged.functional == layer.functional
    np.testing.assert_array_equal(merged(x), layer(x))

    other = EinMix("b c -> b d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(1))
    assert not np.array_equal(other(x), layer(x))
    nnx.update(other, nnx.state(layer))
    np.testing.assert_array_equal(other(x), layer(x))


def test_jit_and_grad():
    layer = EinMix("b t (h c) -> b t (h d)", bias_shape="h d", h=2, c=2, d=3, rngs=nnx.Rngs(0))
    x = normal((2, 3, 4))

    @nnx.jit
    def forward(module, x):
        return module(x)

    np.testing.assert_allclose(
        forward(layer, x), layer.functional(layer.get_params(), x), rtol=1e-6, atol=1e-6
    )
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(layer)
    expected = jax.grad(lambda p: jnp.sum(layer.functional(p, x)))(layer.get_params())
    chex.assert_trees_all_close(grads.to_pure_dict(), expected, rtol=1e-6, atol=1e-6)


def _stack(n: int, seed: int = 0) -> EinMix:
    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return EinMix("b c -> b d", bias_shape="d", c=4, d=4, rngs=rngs)

    return create(nnx.Rngs(seed))


def _slice(params, i):
    return jax.tree.map(lambda p: p[i], params)


def test_vmap_creates_stacked_layers_and_applies_them():
    stack = _stack(3)
    params = stack.get_params()
    assert jax.tree.map(jnp.shape, params) == {"weight": (3, 4, 4), "bias": (3, 4)}
    assert not np.array_equal(params["weight"][0], params["weight"][1])  # one draw per layer

    x = normal((3, 2, 4))  # one batch per member

    @nnx.vmap(in_axes=(0, 0))
    def each(module, x):
        return module(x)

    y = each(stack, x)
    for i in range(3):
        np.testing.assert_allclose(
            y[i], stack.functional(_slice(params, i), x[i]), rtol=1e-6, atol=1e-6
        )


def test_vmap_over_the_batch_with_shared_params():
    layer = EinMix("t c -> t d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    x = normal((5, 2, 4))  # 5 sequences of 2 tokens

    @nnx.vmap(in_axes=(None, 0))
    def per_sequence(module, x):
        return module(x)

    np.testing.assert_allclose(
        per_sequence(layer, x),
        reference_einmix(
            "b t c -> b t d", "c d", "d", x, layer.weight[...], layer.bias[...], {"c": 4, "d": 3}
        ),
        rtol=1e-5,
        atol=1e-5,
    )


def test_scan_over_stacked_layers():
    stack = _stack(3, seed=1)
    x = normal((2, 4))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, module):
        return jnp.tanh(module(x))

    y = run(x, stack)
    params = stack.get_params()
    expected = x
    for i in range(3):
        expected = jnp.tanh(stack.functional(_slice(params, i), expected))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_optimizer_training_loss_falls():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    sizes = {"h": 2, "c": 3, "d": 2}
    target = reference_einmix(
        "b (h c) -> b (h d)",
        "h c d",
        "h d",
        x,
        rng.normal(size=(2, 3, 2)),
        rng.normal(size=(2, 2)),
        sizes,
    ).astype(np.float32)
    model = EinMix(
        "b (h c) -> b (h d)", weight_shape="h c d", bias_shape="h d", rngs=nnx.Rngs(0), **sizes
    )
    optimizer = nnx.Optimizer(model, optax.adam(5e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(jnp.square(m(x) - target)))(model)
        optimizer.update(model, grads)
        return loss

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
        losses = [float(step(model, optimizer)) for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0]
    assert set(nnx.state(model).to_pure_dict()) == {"weight", "bias"}


def test_dot_general_and_dtype_options():
    calls = []

    def doubled(lhs, rhs, dimension_numbers, **kwargs):
        calls.append((lhs.shape, rhs.shape))
        return 2 * jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    plain = EinMix("b c -> b d", c=4, d=3, rngs=nnx.Rngs(0))
    hooked = EinMix("b c -> b d", c=4, d=3, dot_general=doubled, rngs=nnx.Rngs(0))
    x = normal((2, 4))
    np.testing.assert_allclose(hooked(x), 2 * plain(x), rtol=1e-6, atol=1e-6)
    assert calls

    half = EinMix("b c -> b d", c=4, d=3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half.weight.dtype == jnp.float32
    y = half(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float32), x @ plain.weight[...], rtol=3e-2, atol=3e-2
    )


class _LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = em.linen.EinMix("b t c -> b t d", "c d", "d", sizes={"d": 6})(x)
        return em.linen.EinMix("b t (h c) -> b t (h d)", "h c d", "h d", sizes=dict(h=2, d=2))(
            jax.nn.relu(x)
        )


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.first = EinMix(
            "b t c -> b t d", weight_shape="c d", bias_shape="d", c=5, d=6, rngs=rngs
        )
        self.second = EinMix(
            "b t (h c) -> b t (h d)",
            weight_shape="h c d",
            bias_shape="h d",
            h=2,
            c=3,
            d=2,
            rngs=rngs,
        )

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


def test_linen_params_copied_into_nnx_give_equal_outputs():
    x = normal((2, 3, 5))
    variables = _LinenMLP().init(jax.random.key(7), x)
    model = _NnxMLP(nnx.Rngs(0))
    model.first.set_params(variables["params"]["EinMix_0"])
    model.second.set_params(variables["params"]["EinMix_1"])
    np.testing.assert_array_equal(model(x), _LinenMLP().apply(variables, x))

    # and back: the NNX params are linen variables as they are
    back = {"params": {"EinMix_0": model.first.get_params(), "EinMix_1": model.second.get_params()}}
    model.first.set_params(_random_params(model.first.functional, seed=9))
    np.testing.assert_array_equal(_LinenMLP().apply(back, x), _LinenMLP().apply(variables, x))
    back["params"]["EinMix_0"] = model.first.get_params()
    np.testing.assert_array_equal(_LinenMLP().apply(back, x), model(x))


def _lazy_sharding():
    """Flax >= 0.12 places Params that have sharding names when created; this turns that off."""
    use = getattr(nnx, "use_eager_sharding", None)
    return contextlib.nullcontext() if use is None else use(False)


def test_without_logical_axes_params_carry_no_sharding_names():
    layer = EinMix("b c -> b d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    assert layer.logical_axes is None
    specs = nnx.get_partition_spec(nnx.state(layer)).to_pure_dict()
    assert specs == {"weight": P(), "bias": P()}
    for param in (layer.weight, layer.bias):
        assert not {"out_sharding", "sharding_names", "sharding"} & set(param.get_metadata())


@pytest.mark.parametrize("name", list(LOGICAL_CASES))
def test_logical_axes_give_params_sharding_names(name):
    pattern, weight_shape, bias_shape, axes, x_shape, logical, names, rules = LOGICAL_CASES[name]

    def make(**options):
        return EinMix(
            pattern,
            weight_shape=weight_shape,
            bias_shape=bias_shape,
            rngs=nnx.Rngs(3),
            **options,
            **axes,
        )

    with _lazy_sharding():
        layer = make(logical_axes=logical)
    specs = nnx.get_partition_spec(nnx.state(layer))
    assert specs.to_pure_dict() == {k: P(*n) for k, n in names.items()}
    expected = {k: nn.logical_to_mesh_axes(n, rules) for k, n in names.items()}
    assert nn.logical_to_mesh(specs, rules).to_pure_dict() == expected

    # the same values and outputs as without metadata, and as the core with the same params
    plain = make()
    assert plain.logical_axes is None
    x = normal(x_shape)
    jax.tree.map(np.testing.assert_array_equal, layer.get_params(), plain.get_params())
    np.testing.assert_array_equal(layer(x), plain(x))
    np.testing.assert_allclose(
        layer(x), layer.functional(layer.get_params(), x), rtol=1e-6, atol=1e-6
    )


def test_logical_axes_place_params_under_a_mesh_and_survive_split_merge_and_jit():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    # NNX maps each name by its own rule, so give every name one
    rules = [("heads", "model"), ("embed", "data"), ("d", None)]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        layer = EinMix(
            "b (h c) -> b (h d)",
            weight_shape="h c d",
            bias_shape="h d",
            h=2,
            c=3,
            d=2,
            logical_axes={"h": "heads", "c": "embed"},
            rngs=nnx.Rngs(0),
        )
        assert nnx.get_partition_spec(nnx.state(layer)).to_pure_dict() == {
            "weight": P("model", "data", None),
            "bias": P("model", None),
        }
    if getattr(nnx, "using_eager_sharding", lambda: False)():  # Flax >= 0.12: placed when created
        assert layer.weight.sharding == NamedSharding(mesh, P("model", "data", None))
        assert layer.bias.sharding == NamedSharding(mesh, P("model", None))
    assert layer.logical_axes == (("h", "heads"), ("c", "embed"))
    assert repr(layer).endswith("d=2, logical_axes={'h': 'heads', 'c': 'embed'})")

    graphdef, state = nnx.split(layer)
    merged = nnx.merge(graphdef, state)
    assert merged.logical_axes == layer.logical_axes
    specs = nnx.get_partition_spec(nnx.state(merged)).to_pure_dict()
    assert specs == {"weight": P("heads", "embed", "d"), "bias": P("heads", "d")}
    x = normal((4, 6))
    expected = layer.functional(layer.get_params(), x)
    with jax.set_mesh(mesh):
        got = nnx.jit(lambda m, x: m(x))(merged, x)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_logical_axes_errors_name_the_argument():
    with pytest.raises(einops.EinopsError, match=r"logical_axes must be None, True or a dict"):
        EinMix("b c -> b d", c=4, d=3, logical_axes="embed", rngs=nnx.Rngs(0))
    with pytest.raises(einops.EinopsError, match=r"axis 'e', which is not an axis of this layer"):
        EinMix("b c -> b d", c=4, d=3, logical_axes={"e": "embed"}, rngs=nnx.Rngs(0))


def test_params_in_any_mapping():
    from flax.core import FrozenDict

    layer = EinMix("b c -> b d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(0))
    x = normal((2, 4))
    params = layer.get_params()
    expected = reference_einmix(
        "b c -> b d", "c d", "d", x, params["weight"], params["bias"], {"c": 4, "d": 3}
    )
    state = nnx.state(layer)
    np.testing.assert_allclose(layer.functional(state, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(layer.functional)(state, x), expected, rtol=1e-5, atol=1e-5)
    other = EinMix("b c -> b d", bias_shape="d", c=4, d=3, rngs=nnx.Rngs(1))
    other.set_params(FrozenDict(params))
    np.testing.assert_allclose(other(x), expected, rtol=1e-5, atol=1e-5)


def test_weight_and_bias_shape_positional_as_in_einops_torch_layer():
    layer = EinMix("b c -> b d", "d c", "d", c=3, d=4, rngs=nnx.Rngs(0))
    assert layer.functional == em.layer("b c -> b d", weight_shape="d c", bias_shape="d", c=3, d=4)
    assert (layer.weight.shape, layer.bias.shape) == ((4, 3), (4,))


@pytest.mark.parametrize("name", ["rngs", "logical_axes", "dtype", "weight_shape", "sizes"])
def test_any_axis_name_through_sizes(name):
    layer = EinMix(f"b c -> b {name}", sizes={name: 4}, c=3, rngs=nnx.Rngs(0))
    assert layer.weight.shape == (3, 4)
    x = normal((2, 3))
    expected = reference_einmix(
        "b c -> b d", "c d", None, x, layer.weight[...], None, {"c": 3, "d": 4}
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rngs", "logical_axes", "dtype", "precision", "weight_shape"])
def test_axis_length_given_as_an_option_says_to_use_sizes(name):
    options = {"rngs": nnx.Rngs(0), name: 4}
    with pytest.raises(em.EinMixError, match=rf"{name}=4.*sizes=\{{'{name}': 4\}}"):
        EinMix(f"b c -> b {name}", c=3, **options)


def test_repr_shows_custom_hooks_and_axes_named_like_options():
    def zeros(key, shape, dtype):
        return jnp.zeros(shape, dtype)

    layer = EinMix("b c -> b dtype", sizes={"dtype": 4}, c=3, weight_init=zeros, rngs=nnx.Rngs(0))
    text = repr(layer)
    assert "sizes={'dtype': 4, 'c': 3}" in text and f"weight_init={zeros!r}" in text

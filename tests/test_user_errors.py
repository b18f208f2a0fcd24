"""What a new user trips over: every bad argument is an EinMixError that says what to write, any
axis name works in every form, reprs paste back, and whole models' variables convert in one call."""

from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from einops.layers.flax import EinMix as EinopsEinMix
from flax import nnx

import einmix_jax as em
from einmix_jax import EinMix, EinMixError

from .reference import reference_einmix

eqx = pytest.importorskip("equinox")


# --- an axis named like a parameter --------------------------------------------------------------


@pytest.mark.parametrize("name", ["self", "pattern", "key"])
def test_an_axis_named_like_a_parameter_works_and_its_repr_pastes_back(name):
    pattern = f"b {name} -> b d"
    layer = EinMix(pattern, d=2, **{name: 3})
    assert layer.param_shapes == {"weight": (3, 2)}
    assert eval(repr(layer), {"EinMix": EinMix}) == layer
    module = em.nnx.EinMix(pattern, d=2, rngs=nnx.Rngs(0), **{name: 3})
    assert module.weight.shape == (3, 2)
    if name != "key":  # the Equinox layer's own argument: its length goes in sizes
        assert em.eqx.EinMix(pattern, d=2, key=jax.random.key(0), **{name: 3}).weight.shape == (
            3,
            2,
        )
    sized = em.eqx.EinMix(pattern, sizes={name: 3, "d": 2}, key=jax.random.key(0))
    assert sized.weight.shape == (3, 2)


def test_the_nnx_repr_pastes_back_with_an_axis_named_self():
    module = em.nnx.EinMix("b self -> b d", self=3, d=2, rngs=nnx.Rngs(0))
    text = repr(module)
    assert text.startswith("EinMix(")
    again = eval(text[:-1] + ", rngs=nnx.Rngs(0))", {"EinMix": em.nnx.EinMix, "nnx": nnx})
    assert again.weight.shape == (3, 2)


# --- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [None, 0, "abc", jnp.zeros((2,), jnp.float32), jax.random.split(jax.random.key(0), 3)],
    ids=["None", "int", "str", "float array", "batch of keys"],
)
def test_a_bad_key_is_an_einmix_error_naming_key(key):
    with pytest.raises(EinMixError, match=r"key must be .*jax\.random\.key") as info:
        em.init("b c -> b d", key, c=3, d=2)
    assert isinstance(info.value, einops.EinopsError)
    with pytest.raises(EinMixError, match=r"key must be .*jax\.random\.key"):
        em.eqx.EinMix("b c -> b d", c=3, d=2, key=key)


def test_legacy_and_new_style_keys_both_work():
    for key in (jax.random.key(0), jax.random.PRNGKey(0)):
        params, _ = em.init("b c -> b d", key, c=3, d=2)
        assert params["weight"].shape == (3, 2)


def test_an_integer_key_for_the_equinox_layer_says_a_key_is_needed():
    with pytest.raises(EinMixError, match=r"jax\.random\.key\(42\)") as info:
        em.eqx.EinMix("b c -> b d", c=3, d=2, key=42)
    assert "axis named 'key'" not in str(info.value)


# --- text arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: em.init(["b c -> b d"], jax.random.key(0), c=3, d=2),
        lambda: em.layer(["b c -> b d"], c=3, d=2),
        lambda: em.nnx.EinMix(["b c -> b d"], c=3, d=2, rngs=nnx.Rngs(0)),
        lambda: em.eqx.EinMix(["b c -> b d"], c=3, d=2, key=jax.random.key(0)),
    ],
    ids=["init", "layer", "nnx", "eqx"],
)
def test_a_pattern_given_as_a_list_is_an_einmix_error(make):
    with pytest.raises(EinMixError, match="pattern must be a string"):
        make()


@pytest.mark.parametrize("value", [3, b"c d"])
def test_linen_text_arguments_of_the_wrong_type_are_einmix_errors_when_built(value):
    with pytest.raises(EinMixError, match=r"weight_shape(=3 is not a valid| must be a string)"):
        em.linen.EinMix("b c -> b d", weight_shape=value, sizes=dict(d=2))
    with pytest.raises(EinMixError, match=r"bias_shape(=3 is not a valid| must be a string)"):
        em.linen.EinMix("b c -> b d", "c d", bias_shape=value, sizes=dict(d=2))


def test_parentheses_are_refused_in_bias_shape_as_in_weight_shape():
    with pytest.raises(EinMixError, match="parentheses"):
        em.layer("b c -> b d", "c d", "(d)", c=3, d=2)
    with pytest.raises(EinMixError, match="parentheses"):
        em.layer("b c -> b d", "(c) d", c=3, d=2)


def test_linen_axis_lengths_as_keywords_say_to_use_sizes():
    with pytest.raises(EinMixError, match=r"sizes=\{'d': 4\}"):
        em.linen.EinMix("b c -> b d", d=4)


# --- the Equinox module's repr -------------------------------------------------------------------


def test_the_equinox_repr_shows_the_module_and_its_arrays():
    layer = em.eqx.EinMix("b c -> b d", "c d", "d", c=4, d=3, key=jax.random.key(0))
    text = repr(layer)
    assert "f32[4,3]" in text and "f32[3]" in text
    assert text.startswith("eqx.EinMix(")
    linear = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    assert "f32[3,4]" in repr(linear)  # the control prints its arrays the same way


# --- whole models' variables ---------------------------------------------------------------------


class _Theirs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = EinopsEinMix("b t c -> b t f", "c f", "f", sizes=dict(c=6, f=8), name="up")(x)
        x = nn.LayerNorm(name="norm")(nn.gelu(x))
        return EinopsEinMix("b t f -> b t c", "f c", "c", sizes=dict(f=8, c=6), name="down")(x)


class _Ours(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = em.linen.EinMix("b t c -> b t f", "c f", "f", sizes=dict(c=6, f=8), name="up")(x)
        x = nn.LayerNorm(name="norm")(nn.gelu(x))
        return em.linen.EinMix("b t f -> b t c", "f c", "c", sizes=dict(f=8, c=6), name="down")(x)


def _nonzero(tree):
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(tree))))
    return jax.tree.map(lambda v: jax.random.normal(next(keys), v.shape), tree)


def test_a_whole_einops_model_converts_in_one_call():
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    saved = {"params": _nonzero(_Theirs().init(jax.random.key(0), x)["params"])}
    converted = em.linen.from_einops(saved, _Theirs(), x)
    np.testing.assert_allclose(
        _Ours().apply(converted, x), _Theirs().apply(saved, x), rtol=1e-5, atol=1e-5
    )
    assert converted["params"]["norm"] == saved["params"]["norm"]  # other layers pass through
    assert converted["params"]["up"]["bias"].shape == (8,)


class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="up")(x)
        return nn.DenseGeneral((2, 3), name="heads")(nn.gelu(x))


class _Mixes(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = em.linen.EinMix("b t c -> b t f", "c f", "f", sizes=dict(f=8), name="up")(x)
        heads = em.linen.EinMix("b t f -> b t h d", "f h d", "h d", sizes=dict(h=2, d=3))
        return heads.copy(name="heads")(nn.gelu(x))


def test_a_whole_model_of_flax_layers_converts_in_one_call():
    x = jax.random.normal(jax.random.key(1), (2, 3, 6))
    saved = {"params": _nonzero(_Dense().init(jax.random.key(0), x)["params"])}
    converted = em.linen.from_flax(saved, _Dense(), x)
    assert set(converted["params"]["heads"]) == {"weight", "bias"}
    y = _Mixes().apply(converted, x)
    np.testing.assert_allclose(y, _Dense().apply(saved, x), rtol=1e-5, atol=1e-5)
    # and against the numpy reference for the first layer
    up = converted["params"]["up"]
    first = reference_einmix(
        "b t c -> b t f",
        "c f",
        "f",
        np.asarray(x),
        np.asarray(up["weight"]),
        np.asarray(up["bias"]),
        dict(c=6, f=8),
    )
    np.testing.assert_allclose(
        em.linen.EinMix("b t c -> b t f", "c f", "f", sizes=dict(f=8)).apply({"params": up}, x),
        first,
        rtol=1e-5,
        atol=1e-5,
    )

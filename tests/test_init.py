"""Initialisation: the default symmetric LeCun-uniform rule, keys, vmap, custom initializers."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "axes", "fan_in"),
    [
        ("b c -> b d", "c d", "d", dict(c=64, d=512), 64),
        ("b c -> b d", "d c", "d", dict(c=16, d=2048), 16),
        # the head axis is in the output, so only c counts
        ("b t (h c) -> b t (h d)", "h c d", "h d", dict(h=8, c=16, d=256), 16),
        ("b t c -> b u c", "t u", "u", dict(t=32, u=1024), 32),
        ("b (h p) (w q) c -> b (h w) d", "p q c d", "d", dict(p=2, q=2, c=3, d=4096), 12),
        # every weight axis is in the output: fan_in is 1
        ("t b c -> t b c", "c", "c", dict(c=32768), 1),
    ],
)
def test_default_init_statistics(pattern, weight_shape, bias_shape, axes, fan_in):
    params, _ = em.init(
        pattern, jax.random.key(0), weight_shape=weight_shape, bias_shape=bias_shape, **axes
    )
    w, b = np.asarray(params["weight"], np.float64), np.asarray(params["bias"], np.float64)
    assert w.size >= 32768
    bound = math.sqrt(3.0 / fan_in)
    assert np.all(np.abs(w) <= bound)
    assert w.min() < -0.99 * bound and w.max() > 0.99 * bound  # symmetric, reaching both ends
    assert abs(w.mean()) < 0.02 * bound
    assert abs((w < 0).mean() - 0.5) < 0.02
    np.testing.assert_allclose(w.std(), bound / math.sqrt(3), rtol=0.02)
    np.testing.assert_allclose(w.var() * fan_in, 1.0, rtol=0.04)  # variance 1 / fan_in

    bias_bound = math.sqrt(1.0 / fan_in)
    assert np.all(np.abs(b) <= bias_bound)
    assert b.min() < 0 < b.max()
    if b.size >= 1024:
        assert b.min() < -0.95 * bias_bound and b.max() > 0.95 * bias_bound
        np.testing.assert_allclose(b.std(), bias_bound / math.sqrt(3), rtol=0.1)


def test_scalar_weight_is_within_bound():
    weights = jax.vmap(lambda k: em.init("b c -> b c", k, weight_shape="", c=3)[0]["weight"])(
        jax.random.split(jax.random.key(0), 512)
    )
    assert weights.shape == (512,)
    assert np.all(np.abs(weights) <= math.sqrt(3)) and weights.min() < 0 < weights.max()


def test_same_key_same_params_other_key_other_params():
    config = dict(weight_shape="h c d", bias_shape="h d", h=2, c=3, d=4)
    first, _ = em.init("b (h c) -> b (h d)", jax.random.key(3), **config)
    again, _ = em.init("b (h c) -> b (h d)", jax.random.key(3), **config)
    other, _ = em.init("b (h c) -> b (h d)", jax.random.key(4), **config)
    chex.assert_trees_all_equal(first, again)
    assert not np.allclose(first["weight"], other["weight"])
    assert not np.allclose(first["bias"], other["bias"])


def test_weight_and_bias_use_independent_keys():
    params, _ = em.init("b c -> b d", jax.random.key(0), bias_shape="d", c=1, d=64)
    # same shape and bound (fan_in 1 -> bias bound 1, weight bound sqrt(3)): not proportional
    ratio = np.asarray(params["weight"][0]) / np.asarray(params["bias"])
    assert np.ptp(ratio) > 0.1


def test_typed_and_legacy_keys():
    config = dict(bias_shape="d", c=3, d=4)
    typed, _ = em.init("b c -> b d", jax.random.key(7), **config)
    legacy, _ = em.init("b c -> b d", jax.random.PRNGKey(7), **config)
    chex.assert_trees_all_equal(typed, legacy)  # the same key data
    assert typed["weight"].shape == (3, 4) and typed["bias"].shape == (4,)


@pytest.mark.parametrize("make_keys", [jax.random.key, jax.random.PRNGKey], ids=["typed", "legacy"])
def test_vmap_of_init_equals_init_key_by_key(make_keys):
    config = dict(weight_shape="h c d", bias_shape="d h", h=2, c=3, d=4)
    keys = jax.random.split(make_keys(0), 3)

    stacked = jax.vmap(lambda k: em.init("b (h c) -> b (h d)", k, **config)[0])(keys)

    chex.assert_shape(stacked["weight"], (3, 2, 3, 4))
    chex.assert_shape(stacked["bias"], (3, 4, 2))
    for i, key in enumerate(keys):
        one, _ = em.init("b (h c) -> b (h d)", key, **config)
        # the batched draw is another program than the one-key draw: equal up to float rounding
        chex.assert_trees_all_close(
            jax.tree.map(lambda a, i=i: a[i], stacked), one, rtol=1e-6, atol=1e-6
        )


def test_init_under_jit_equals_eager():
    mix = em.layer("b c -> b d", bias_shape="d", c=3, d=4)
    key = jax.random.key(0)
    # one compiled program against the eager ops: equal up to float rounding
    chex.assert_trees_all_close(jax.jit(mix.init)(key), mix.init(key), rtol=1e-6, atol=1e-6)


def test_init_weight_and_init_bias():
    mix = em.layer("b c -> b d", bias_shape="d", c=3, d=4)
    key = jax.random.key(0)
    weight_key, bias_key = jax.random.split(key)
    chex.assert_trees_all_equal(
        mix.init(key), {"weight": mix.init_weight(weight_key), "bias": mix.init_bias(bias_key)}
    )


def test_custom_initializers():
    params, _ = em.init(
        "b c -> b d",
        jax.random.key(0),
        bias_shape="d",
        weight_init=jax.nn.initializers.normal(stddev=10.0),
        bias_init=jax.nn.initializers.constant(0.25),
        c=64,
        d=64,
    )
    assert 8 < float(jnp.std(params["weight"])) < 12
    chex.assert_trees_all_equal(params["bias"], jnp.full((64,), 0.25, jnp.float32))


def test_custom_initializer_receives_shape_and_param_dtype():
    seen = []

    def weight_init(key, shape, dtype):
        seen.append((shape, dtype))
        return jnp.ones(shape, dtype)

    params, _ = em.init(
        "b (h c) -> b (h d)",
        jax.random.key(0),
        weight_shape="d h c",
        weight_init=weight_init,
        param_dtype=jnp.bfloat16,
        h=2,
        c=3,
        d=4,
    )
    assert seen == [((4, 2, 3), jnp.bfloat16)]
    chex.assert_trees_all_equal(params, {"weight": jnp.ones((4, 2, 3), jnp.bfloat16)})


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16, jnp.float16, "bfloat16"])
def test_param_dtype(param_dtype):
    params, _ = em.init(
        "b c -> b d", jax.random.key(0), bias_shape="d", param_dtype=param_dtype, c=8, d=256
    )
    expected = jnp.dtype(param_dtype)
    assert params["weight"].dtype == expected and params["bias"].dtype == expected
    w = np.asarray(params["weight"], np.float32)
    bound = math.sqrt(3 / 8)
    assert np.all(np.abs(w) <= bound * (1 + 1e-2)) and w.min() < 0 < w.max()


def test_param_dtype_float64_under_x64():
    with jax.enable_x64(True):
        params, _ = em.init("b c -> b d", jax.random.key(0), param_dtype=jnp.float64, c=8, d=4)
        assert params["weight"].dtype == jnp.float64

"""The Equinox layer against the numpy reference and the functional core, under Equinox's transforms."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import einmix_jax as em

from .cases import CASES, Case, jax_normal
from .reference import reference_einmix

eqx = pytest.importorskip("equinox")


def _layer(case: Case, key: jax.Array | None = None, **options) -> em.eqx.EinMix:
    return em.eqx.EinMix(
        case.pattern,
        case.weight_shape,
        case.bias_shape,
        key=jax.random.key(0) if key is None else key,
        sizes=case.axes,  # a mapping: also for an axis named 'key'
        **options,
    )


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_functional_apply_and_reference(case: Case):
    layer = _layer(case)
    params, apply = case.init(jax.random.key(0))  # same key: same params
    chex.assert_trees_all_equal(layer.params, params)
    x = jax_normal(case.x_shape)
    y = eqx.filter_jit(layer)(x)
    np.testing.assert_allclose(y, apply(params, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, case.reference(params, np.asarray(x)), rtol=1e-5, atol=1e-5)
    arrays = [leaf for leaf in jax.tree.leaves(layer) if eqx.is_array(leaf)]
    assert len(arrays) == len(params)  # weight and bias are the only array leaves


def test_no_bias_is_none_and_options_are_static():
    layer = em.eqx.EinMix(
        "b c -> b d", "c d", c=4, d=3, key=jax.random.key(0), param_dtype=jnp.bfloat16
    )
    assert layer.bias is None
    assert layer.weight.dtype == jnp.bfloat16
    assert jax.tree.leaves(layer) == [layer.weight]
    # the functional layer's arguments (less the key), then the arrays, as Equinox prints them
    assert repr(layer) == f"eqx.{repr(layer.functional)[:-1]}, weight=bf16[4,3])"
    assert repr(layer).startswith("eqx.EinMix('b c -> b d', 'c d', c=4, d=3")


def test_params_round_trip_and_checked():
    case = CASES["multi-head"]
    layer = _layer(case)
    params, _ = case.init(jax.random.key(5))
    moved = layer.with_params(params)
    chex.assert_trees_all_equal(moved.params, params)
    assert moved.functional == layer.functional
    with pytest.raises(em.EinMixError, match=r"params\['weight'\] has shape \(3, 3, 4\)"):
        layer.with_params({**params, "weight": jnp.zeros((3, 3, 4))})


def test_lengths_as_keywords_or_sizes():
    by_keyword = em.eqx.EinMix("b c -> b d", c=4, d=3, key=jax.random.key(0))
    by_mapping = em.eqx.EinMix("b c -> b d", sizes={"c": 4, "d": 3}, key=jax.random.key(0))
    assert by_keyword.functional == by_mapping.functional


def test_errors_name_the_users_axis():
    with pytest.raises(em.EinMixError, match=r"weight axes 'd' need a length"):
        em.eqx.EinMix("b c -> b d", c=4, key=jax.random.key(0))
    layer = em.eqx.EinMix("b c -> b d", c=4, d=3, key=jax.random.key(0))
    with pytest.raises(em.EinMixError, match=r"axis 'c': expected 4, got 5"):
        layer(jnp.ones((2, 5)))


def test_filter_grad_and_value_and_grad_match_the_functional_gradient():
    case = CASES["token mixing"]
    layer = _layer(case)
    x = jax_normal(case.x_shape)

    def loss(model, x):
        return jnp.sum(jnp.sin(model(x)))

    grads = eqx.filter_jit(eqx.filter_grad(loss))(layer, x)
    value, grads2 = eqx.filter_value_and_grad(loss)(layer, x)
    expected_value, expected = jax.value_and_grad(
        lambda p: jnp.sum(jnp.sin(layer.functional(p, x)))
    )(layer.params)
    chex.assert_trees_all_close(grads.params, expected, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads2.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6, atol=1e-6)


def test_filter_vmap_ensemble_over_keys_and_over_the_batch():
    case = CASES["plain linear"]
    keys = jax.random.split(jax.random.key(0), 3)
    ensemble = eqx.filter_vmap(lambda k: _layer(case, k))(keys)
    assert ensemble.weight.shape == (3, 4, 3)
    x = jax_normal(case.x_shape)
    ys = eqx.filter_vmap(lambda m, x: m(x), in_axes=(eqx.if_array(0), None))(ensemble, x)
    for i, key in enumerate(keys):
        member = _layer(case, key)
        np.testing.assert_allclose(ys[i], case.reference(member.params, np.asarray(x)), 1e-5, 1e-5)
    single = em.eqx.EinMix("t c -> t d", "c d", "d", c=4, d=3, key=jax.random.key(1))
    per_example = eqx.filter_vmap(single)(x)  # over the batch: one (t, c) slice each
    p = {k: np.asarray(v, np.float64) for k, v in single.params.items()}
    expected = np.asarray(x, np.float64) @ p["weight"] + p["bias"]
    np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-5)


def test_serialise_and_deserialise_leaves(tmp_path):
    case = CASES["patch embedding"]
    layer = _layer(case, jax.random.key(3))
    path = tmp_path / "layer.eqx"
    eqx.tree_serialise_leaves(path, layer)
    skeleton = _layer(case, jax.random.key(0))
    restored = eqx.tree_deserialise_leaves(path, skeleton)
    chex.assert_trees_all_equal(restored.params, layer.params)
    x = jax_normal(case.x_shape)
    np.testing.assert_array_equal(restored(x), layer(x))


def test_optax_training_fits_a_linear_target():
    case = CASES["multi-head"]
    model = _layer(case)
    target = _layer(case, jax.random.key(9))
    x = jax_normal((64, 3, 6))
    y = case.reference(target.params, np.asarray(x))
    optimizer = optax.adam(0.05)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    @eqx.filter_jit
    def step(m, state):
        value, grads = eqx.filter_value_and_grad(loss)(m)
        updates, state = optimizer.update(grads, state, m)
        return eqx.apply_updates(m, updates), state, value

    first = float(loss(model))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
        for _ in range(150):
            model, state, _ = step(model, state)
    assert float(loss(model)) < 1e-3 * first


@pytest.mark.parametrize("name", ["dtype", "key", "sizes", "weight_shape", "precision"])
def test_any_axis_name_through_sizes(name):
    layer = em.eqx.EinMix(f"b c -> b {name}", sizes={"c": 4, name: 3}, key=jax.random.key(0))
    assert layer.weight.shape == (4, 3)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    expected = reference_einmix(
        "b c -> b d", "c d", None, x, np.asarray(layer.weight), None, {"c": 4, "d": 3}
    )
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["dtype", "key", "precision"])
def test_axis_length_given_as_an_option_says_to_use_sizes(name):
    options = {"key": jax.random.key(0), name: 3}
    with pytest.raises(em.EinMixError, match=rf"{name}=3.*sizes=\{{'{name}': 3\}}"):
        em.eqx.EinMix(f"b c -> b {name}", c=4, **options)

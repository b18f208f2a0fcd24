"""The collectives XLA compiles for sharded EinMix layers, read off the optimised HLO.

Each case states which communication the sharding implies -- and, as importantly, which it must
avoid: no weight is ever all-gathered whole.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import einmix_jax as em

from .common import collectives, compiled_text, make_mesh, mesh_groups, mlp, mlp_forward
from .common import train_step_fn as make_step

B, T = 8, 2  # batch and tokens; the (2, 4) mesh splits the batch in 2
MLP_RULES = {"b": "data", "f": "model"}


def _put(mesh, layer, rules, seed):
    shardings = em.param_shardings(layer, rules, mesh)
    return jax.device_put(layer.init(jax.random.key(seed)), shardings)


def _input(mesh, shape, spec):
    return jax.device_put(jnp.ones(shape), NamedSharding(mesh, spec))


def _full_weight_shapes(*layers) -> set[tuple[int, ...]]:
    return {layer.param_shapes["weight"] for layer in layers}


def _assert_no_weight_gathered(found, *layers):
    full = _full_weight_shapes(*layers)
    for op, shapes, _ in found:
        assert not (op == "all-gather" and full & set(shapes)), (op, shapes)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_megatron_mlp_forward_all_reduces_once_over_model(axis_type):
    mesh = make_mesh((2, 4), ("data", "model"), axis_type)
    up, down = mlp(MLP_RULES)
    params = {"up": _put(mesh, up, MLP_RULES, 0), "down": _put(mesh, down, MLP_RULES, 1)}
    x = _input(mesh, (B, T, 4), P("data"))
    with jax.set_mesh(mesh):
        found = collectives(compiled_text(lambda p, x: mlp_forward((up, down), p, x), params, x))
    # the hidden layer stays split over 'model'; the only communication is summing the second
    # layer's partial outputs -- one local output block (B/2 * T * c) -- across 'model'
    assert [(op, groups) for op, _, groups in found] == [("all-reduce", mesh_groups(mesh, "model"))]
    assert [math.prod(s) for s in found[0][1]] == [B // 2 * T * 4]


def test_megatron_train_step_reduces_gradients_as_shards():
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    up, down = mlp(MLP_RULES)
    params = {"up": _put(mesh, up, MLP_RULES, 0), "down": _put(mesh, down, MLP_RULES, 1)}
    x = _input(mesh, (B, T, 4), P("data"))
    optimizer = optax.sgd(0.1)
    with jax.set_mesh(mesh):
        state = jax.jit(optimizer.init)(params)
        found = collectives(compiled_text(make_step((up, down), optimizer), params, state, x, x))
    model, data = mesh_groups(mesh, "model"), mesh_groups(mesh, "data")
    assert {op for op, _, _ in found} == {"all-reduce"}
    assert {frozenset(groups) for _, _, groups in found} == {frozenset(model), frozenset(data)}
    # gradients are summed over 'data' block by block: each weight gradient is its 1/4 block
    data_shapes = {s for _, shapes, groups in found if groups == data for s in shapes}
    assert {(4, 4)} <= data_shapes and not _full_weight_shapes(up, down) & data_shapes
    _assert_no_weight_gathered(found, up, down)


def test_second_layer_split_on_its_output_gathers_the_hidden_layer():
    """The control: shard the wrong axis of the second layer and an all-gather appears."""
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    up, down = mlp()
    params = {
        "up": _put(mesh, up, MLP_RULES, 0),
        "down": _put(mesh, down, {"b": "data", "c": "model"}, 1),
    }
    x = _input(mesh, (B, T, 4), P("data"))
    with jax.set_mesh(mesh):
        found = collectives(compiled_text(lambda p, x: mlp_forward((up, down), p, x), params, x))
    gathers = [(shapes, groups) for op, shapes, groups in found if op == "all-gather"]
    assert gathers, found
    assert all(groups == mesh_groups(mesh, "model") for _, groups in gathers)


HEADS = dict(weight_shape="h c d", bias_shape="h d", h=4, c=2, d=3)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_heads_split_over_model_need_no_communication(axis_type):
    mesh = make_mesh((2, 4), ("data", "model"), axis_type)
    rules = {"b": "data", "h": "model"}
    heads = em.with_out_sharding(em.layer("b t (h c) -> b t (h d)", **HEADS), rules)
    params = _put(mesh, heads, rules, 0)
    x = _input(mesh, (B, T, 8), P("data", None, "model"))  # (h c) split by heads
    with jax.set_mesh(mesh):
        assert collectives(compiled_text(heads.__call__, params, x)) == []
        grads = collectives(
            compiled_text(lambda p, x: jax.grad(lambda p: heads(p, x).sum())(p), params, x)
        )
    # the weight gradient is summed over the batch split only, one head per device
    assert grads and all(
        op == "all-reduce" and groups == mesh_groups(mesh, "data") for op, _, groups in grads
    )
    assert {math.prod(s) for _, shapes, _ in grads for s in shapes} <= {1 * 2 * 3, 1 * 3}


def test_token_mixing_with_channels_split_needs_no_communication():
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    rules = {"b": "data", "c": "model"}
    mix = em.with_out_sharding(em.layer("b t c -> b u c", weight_shape="t u", t=8, u=8), rules)
    params = _put(mesh, mix, rules, 0)
    assert params["weight"].sharding.spec == P(None, None)  # 't u' is replicated
    x = _input(mesh, (B, 8, 16), P("data", None, "model"))
    with jax.set_mesh(mesh):
        assert collectives(compiled_text(mix.__call__, params, x)) == []


def test_token_mixing_with_tokens_split_sums_partial_outputs():
    mesh = make_mesh((2, 4), ("data", "model"), AxisType.Auto)
    rules = {"b": "data", "t": "model"}
    mix = em.with_out_sharding(em.layer("b t c -> b u c", weight_shape="t u", t=8, u=8), rules)
    params = _put(mesh, mix, rules, 0)
    x = _input(mesh, (B, 8, 16), P("data", "model"))
    with jax.set_mesh(mesh):
        found = collectives(compiled_text(mix.__call__, params, x))
    assert [(op, groups) for op, _, groups in found] == [("all-reduce", mesh_groups(mesh, "model"))]
    assert [math.prod(s) for s in found[0][1]] == [B // 2 * 8 * 16]  # the local output block
    _assert_no_weight_gathered(found, mix)

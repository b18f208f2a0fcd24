"""The linen layer: equal to the functional core and to the numpy reference, size inference, Flax
transforms, training, hashing, and parity with ``einops.layers.flax.EinMix``."""

from __future__ import annotations

import re

import einops
import einops.layers.flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import einmix_jax as em
from einmix_jax.linen import EinMix, from_einops

from .cases import CASES, LOGICAL_CASES, Case, normal
from .reference import reference_einmix, tokens


def sizes_not_in_input(case: Case) -> dict[str, int]:
    """``case.axes`` less the lengths the input determines (the last one of each input group)."""
    groups: list[list[str]] = []
    inside = False
    for token in tokens(case.pattern.split("->")[0]):
        if token == "(":
            groups.append([])
            inside = True
        elif token == ")":
            inside = False
        elif token not in ("1", "..."):
            if inside:
                groups[-1].append(token)
            else:
                groups.append([token])
    sizes = dict(case.axes)
    for group in groups:
        if group and all(a in sizes for a in group):
            del sizes[group[-1]]
    return sizes


def test_sizes_not_in_input():
    assert sizes_not_in_input(CASES["multi-head"]) == {"h": 2, "d": 4}
    assert sizes_not_in_input(CASES["composed batch on the left"]) == {"t": 3, "d": 2}
    assert sizes_not_in_input(CASES["input length given and used"]) == {"d": 3}


def _shapes(tree):
    return jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype)), tree)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_equals_functional_and_reference(case: Case):
    x = normal(case.x_shape)
    layer = EinMix(case.pattern, case.weight_shape, case.bias_shape, sizes=case.axes)
    core = em.layer(
        case.pattern, weight_shape=case.weight_shape, bias_shape=case.bias_shape, **case.axes
    )
    f32 = jnp.dtype(jnp.float32)
    expected_shapes = {"params": {k: (s, f32) for k, s in core.param_shapes.items()}}
    assert _shapes(jax.eval_shape(layer.init, jax.random.key(0), x)) == expected_shapes
    # Only the lengths the input can't give; the rest are read off x.
    inferred = EinMix(
        case.pattern, case.weight_shape, case.bias_shape, sizes=sizes_not_in_input(case)
    )
    assert _shapes(jax.eval_shape(inferred.init, jax.random.key(0), x)) == expected_shapes

    params = {k: normal(s, seed=i + 1) for i, (k, s) in enumerate(core.param_shapes.items())}
    y = layer.apply({"params": params}, x)
    np.testing.assert_allclose(y, core(params, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, case.reference(params, x), rtol=1e-5, atol=1e-5)


def test_params_drawn_by_the_core_initializers():
    x = normal((2, 5, 4))
    layer = EinMix("b t c -> b t d", "c d", "d", sizes={"d": 3})
    assert layer.functional(x.shape) == em.layer(
        "b t c -> b t d", weight_shape="c d", bias_shape="d", d=3, c=4
    )
    params = layer.init(jax.random.key(3), x)["params"]
    # the core's default: symmetric uniform, bound sqrt(3 / fan_in) (weight), sqrt(1 / fan_in) (bias)
    assert float(jnp.abs(params["weight"]).max()) <= np.sqrt(3 / 4)
    assert float(jnp.abs(params["bias"]).max()) <= np.sqrt(1 / 4)
    assert float(params["weight"].min()) < 0 < float(params["weight"].max())

    def ramp(key, shape, dtype):
        return jnp.arange(np.prod(shape), dtype=dtype).reshape(shape)

    custom = layer.clone(weight_init=ramp, bias_init=jax.nn.initializers.ones)
    params = custom.init(jax.random.key(3), x)["params"]
    np.testing.assert_array_equal(params["weight"], np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(params["bias"], np.ones(3))


def test_size_inference_leaves_free_axes_free():
    layer = EinMix("b t (h c) -> b t (h d)", "h c d", "h d", sizes={"h": 2, "d": 3})
    variables = layer.init(jax.random.key(0), jnp.ones((1, 4, 10)))
    assert jax.tree.map(jnp.shape, variables["params"]) == {"weight": (2, 5, 3), "bias": (2, 3)}
    for shape in [(3, 7, 10), (1, 1, 10)]:  # any batch and time length
        assert layer.apply(variables, jnp.ones(shape)).shape == (*shape[:2], 6)


def test_size_errors_name_the_axis():
    layer = EinMix("b t c -> b t d", "c d", "d", sizes={"c": 5, "d": 3})
    with pytest.raises(einops.EinopsError, match=r"axis 'c': expected 5, got 4"):
        layer.init(jax.random.key(0), jnp.ones((2, 3, 4)))
    missing = EinMix("b t c -> b t d", "c d", "d")
    with pytest.raises(einops.EinopsError, match=r"'d'"):
        missing.init(jax.random.key(0), jnp.ones((2, 3, 4)))
    groups = EinMix("b (h c) -> b (h d)", "h c d", sizes={"d": 2})
    with pytest.raises(einops.EinopsError, match=r"'h', 'c'"):
        groups.init(jax.random.key(0), jnp.ones((2, 6)))
    with pytest.raises(einops.EinopsError, match=r"axis 'd': length must be a positive integer"):
        EinMix("b c -> b d", "c d", sizes={"d": 0})  # refused when the module is built
    # A trained layer fed an input with another feature length: the stored weight fixes 'c'.
    for logical in (None, True):
        layer = EinMix("b (h c) -> b (h d)", "h c d", sizes={"h": 3, "d": 2}, logical_axes=logical)
        variables = layer.init(jax.random.key(0), jnp.ones((2, 6)))
        with pytest.raises(einops.EinopsError, match=r"group \(h c\): expected 6 = 3 \* 2, got 9"):
            layer.apply(variables, jnp.ones((2, 9)))


def test_hashable_cloneable_static():
    layer = EinMix("b c -> b d", "c d", "d", {"d": 3})
    same = EinMix("b c -> b d", "c d", "d", sizes={"d": 3})
    assert hash(layer) == hash(same) and layer == same
    assert layer.clone() == layer and hash(layer.clone()) == hash(layer)
    assert layer.clone(sizes={"d": 4}) != layer
    assert layer.sizes == {"d": 3}
    assert repr(layer) == "EinMix('b c -> b d', 'c d', 'd', sizes={'d': 3})"
    assert repr(EinMix("b c -> b d", sizes={"d": 3}, dtype=jnp.bfloat16)) == (
        "EinMix('b c -> b d', sizes={'d': 3}, dtype='bfloat16')"
    )
    with pytest.raises(TypeError):
        hash(einops.layers.flax.EinMix("b c -> b d", "c d", sizes={"c": 2, "d": 3}))

    x = jnp.ones((2, 4))
    variables = layer.init(jax.random.key(0), x)
    apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    # one compiled program against the eager ops: equal up to float rounding
    np.testing.assert_allclose(
        apply(layer, variables, x), layer.apply(variables, x), rtol=1e-6, atol=1e-6
    )


class _CompactMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = EinMix("b t c -> b t d", "c d", "d", sizes={"d": 6})(x)
        return EinMix("b t (h c) -> b t (h d)", "h c d", "h d", sizes=dict(h=2, d=2))(
            jax.nn.relu(x)
        )


class _SetupMLP(nn.Module):
    def setup(self):
        self.first = EinMix("b t c -> b t d", "c d", "d", sizes={"d": 6})
        self.second = EinMix("b t (h c) -> b t (h d)", "h c d", "h d", sizes=dict(h=2, d=2))

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


@pytest.mark.parametrize("parent", [_CompactMLP, _SetupMLP])
def test_compact_and_setup_parents(parent):
    x = normal((2, 3, 5))
    variables = parent().init(jax.random.key(0), x)
    params = variables["params"]
    assert sorted(params) == (
        ["EinMix_0", "EinMix_1"] if parent is _CompactMLP else ["first", "second"]
    )
    first, second = (params[k] for k in sorted(params))
    assert jax.tree.map(jnp.shape, second) == {"weight": (2, 3, 2), "bias": (2, 2)}
    core1 = em.layer("b t c -> b t d", weight_shape="c d", bias_shape="d", c=5, d=6)
    core2 = em.layer(
        "b t (h c) -> b t (h d)", weight_shape="h c d", bias_shape="h d", h=2, c=3, d=2
    )
    # linen runs the weight as stored, the core its planner's lowering (the 'h c d' weight packed
    # block-diagonally): two programs, equal up to float rounding
    np.testing.assert_allclose(
        parent().apply(variables, x),
        core2(second, jax.nn.relu(core1(first, x))),
        rtol=1e-5,
        atol=1e-6,
    )


def test_scan_stacked_layers():
    class Step(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return jnp.tanh(EinMix("b c -> b d", "c d", "d", sizes={"d": 4})(x)), None

    stack = nn.scan(Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()
    x = normal((2, 4))
    variables = stack.init(jax.random.key(0), x, None)
    params = variables["params"]["EinMix_0"]
    assert jax.tree.map(jnp.shape, params) == {"weight": (3, 4, 4), "bias": (3, 4)}
    assert not np.array_equal(params["weight"][0], params["weight"][1])  # one draw per layer
    y, _ = stack.apply(variables, x, None)
    core = em.layer("b c -> b d", weight_shape="c d", bias_shape="d", c=4, d=4)
    expected = x
    for i in range(3):
        expected = jnp.tanh(core(jax.tree.map(lambda p, i=i: p[i], params), expected))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_vmap_per_member_params():
    members = nn.vmap(
        EinMix,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": 0},
        split_rngs={"params": True},
    )("b c -> b d", "c d", "d", sizes={"d": 2})
    x = normal((3, 4, 5))  # 3 members, batch 4, 5 features
    variables = members.init(jax.random.key(0), x)
    params = variables["params"]
    assert jax.tree.map(jnp.shape, params) == {"weight": (3, 5, 2), "bias": (3, 2)}
    y = members.apply(variables, x)
    core = em.layer("b c -> b d", weight_shape="c d", bias_shape="d", c=5, d=2)
    for i in range(3):
        np.testing.assert_allclose(
            y[i], core(jax.tree.map(lambda p, i=i: p[i], params), x[i]), rtol=1e-6, atol=1e-6
        )


def test_vmap_shared_params_reads_sizes_off_one_example():
    per_example = nn.vmap(
        EinMix,
        in_axes=0,
        out_axes=0,
        variable_axes={"params": None},
        split_rngs={"params": False},
    )("t c -> t d", "c d", "d", sizes={"d": 2})
    x = normal((3, 4, 5))  # 3 examples of 4 tokens, 5 features
    shapes = jax.tree.map(jnp.shape, jax.eval_shape(per_example.init, jax.random.key(0), x))
    assert shapes == {"params": {"weight": (5, 2), "bias": (2,)}}  # not stacked: shared
    params = {"weight": normal((5, 2), seed=1), "bias": normal((2,), seed=2)}
    np.testing.assert_allclose(
        per_example.apply({"params": params}, x),
        reference_einmix(
            "b t c -> b t d", "c d", "d", x, params["weight"], params["bias"], {"d": 2}
        ),
        rtol=1e-5,
        atol=1e-5,
    )


def test_remat_and_grad():
    plain = EinMix("b (h c) -> b (h d)", "h c d", "h d", sizes={"h": 2, "d": 3})
    remat = nn.remat(EinMix)("b (h c) -> b (h d)", "h c d", "h d", sizes={"h": 2, "d": 3})
    x = normal((4, 6))
    variables = {"params": {"weight": normal((2, 3, 3), seed=1), "bias": normal((2, 3), seed=2)}}
    assert _shapes(jax.eval_shape(remat.init, jax.random.key(0), x)) == _shapes(variables)

    def loss_and_grad(module):
        return jax.value_and_grad(lambda v: jnp.sum(jnp.square(module.apply(v, x))))

    assert "remat" in str(jax.make_jaxpr(loss_and_grad(remat))(variables))  # jax.checkpoint
    assert "remat" not in str(jax.make_jaxpr(loss_and_grad(plain))(variables))
    both = jax.jit(lambda v: (loss_and_grad(plain)(v), loss_and_grad(remat)(v)))
    expected, got = both(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), expected, got)


def test_tabulate():
    table = nn.tabulate(
        _CompactMLP(), jax.random.key(0), console_kwargs={"width": 200, "force_terminal": False}
    )(jnp.ones((1, 3, 5)))
    assert "EinMix_1" in table
    assert "weight: float32[2,3,2]" in table  # the second layer's weight 'h c d'
    assert "float32[1,3,6]" in table  # the first layer's output, the second's input
    assert "Total Parameters: 52" in table  # 5*6 + 6 + 2*3*2 + 2*2


def test_dtypes():
    x = normal((2, 4))
    layer = EinMix(
        "b c -> b d", "c d", "d", sizes={"d": 3}, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
    )
    variables = layer.init(jax.random.key(0), x)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    y = layer.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    w, b = (np.asarray(variables["params"][k], np.float32) for k in ("weight", "bias"))
    np.testing.assert_allclose(
        np.asarray(y, np.float32), np.asarray(x) @ w + b, rtol=3e-2, atol=3e-2
    )


def test_dot_general_injection():
    calls = []

    def doubled(lhs, rhs, dimension_numbers, **kwargs):
        calls.append((lhs.shape, rhs.shape))
        return 2 * jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    x = normal((2, 4))
    plain = EinMix("b c -> b d", "c d", sizes={"d": 3})
    hooked = plain.clone(dot_general=doubled)
    variables = plain.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        hooked.apply(variables, x), 2 * plain.apply(variables, x), rtol=1e-6, atol=1e-6
    )
    assert calls  # the core's one contraction went through the hook


def test_training_loss_falls():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    target_w, target_b = rng.normal(size=(2, 3, 2)), rng.normal(size=(2, 2))
    sizes = {"h": 2, "c": 3, "d": 2}
    target = reference_einmix("b (h c) -> b (h d)", "h c d", "h d", x, target_w, target_b, sizes)
    model = EinMix("b (h c) -> b (h d)", "h c d", "h d", sizes={"h": 2, "d": 2})
    params = model.init(jax.random.key(0), x)["params"]
    tx = optax.adam(5e-2)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(
                jnp.square(model.apply({"params": p}, x) - target.astype(np.float32))
            )
        )(params)
        updates, state = tx.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    losses = []
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float scalars
        for _ in range(40):
            params, state, loss = step(params, state)
            losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0]


EINOPS_CASES = [
    "plain linear",
    "weight order d c",
    "mix the first axis",
    "multi-head",
    "heads first in x, last in output",
    "composition on both sides",
    "patch embedding",
    "ellipsis with bias",
    "multi-axis bias, order differs from output",
    "bias over a composed output",
    "unitary anonymous axes 1",
]


@pytest.mark.parametrize("name", EINOPS_CASES)
def test_einops_parity_through_converter(name):
    case = CASES[name]
    x = normal(case.x_shape)
    theirs = einops.layers.flax.EinMix(case.pattern, case.weight_shape, case.bias_shape, case.axes)
    ours = EinMix(case.pattern, case.weight_shape, case.bias_shape, case.axes)
    with jax.numpy_rank_promotion("allow"):  # einops adds a bias of lower rank under '...'
        shapes = jax.eval_shape(theirs.init, jax.random.key(0), x)["params"]
        # random values (einops' bias init is all positive), so a wrong re-layout can't pass
        saved = {"params": {k: normal(a.shape, seed=i) for i, (k, a) in enumerate(shapes.items())}}
        expected = theirs.apply(saved, x)
    for layer in (ours, theirs):  # either layer describes the configuration
        converted = from_einops(saved, layer)
        assert jax.tree.map(jnp.shape, converted) == {
            "params": ours.functional(x.shape).param_shapes
        }
        np.testing.assert_allclose(ours.apply(converted, x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        from_einops(saved["params"], ours)["weight"], saved["params"]["weight"]
    )


def test_converter_rejects_wrong_shapes():
    layer = EinMix("b t c -> b t d", "c d", "d", sizes={"c": 4, "d": 3})
    with pytest.raises(
        einops.EinopsError, match=re.escape("einops bias has shape (3,), expected (1, 1, 3)")
    ):
        from_einops({"weight": np.ones((4, 3)), "bias": np.ones(3)}, layer)
    with pytest.raises(einops.EinopsError, match=re.escape("einops weight has shape (3, 4)")):
        from_einops({"weight": np.ones((3, 4)), "bias": np.ones((1, 1, 3))}, layer)
    with pytest.raises(einops.EinopsError, match=r"expected \['bias', 'weight'\]"):
        from_einops({"weight": np.ones((4, 3))}, layer)


def test_without_logical_axes_params_are_plain_arrays():
    layer = EinMix("b t c -> b t d", "c d", "d", sizes={"d": 3})
    assert layer.logical_axes is None
    assert layer == layer.clone(logical_axes=None) == layer.clone(logical_axes=False)
    x = normal((2, 5, 4))
    variables = layer.init(jax.random.key(0), x)
    leaves = jax.tree.leaves(variables, is_leaf=nn.meta.is_axis_metadata)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == 2
    assert nn.meta.unbox(variables) == variables


@pytest.mark.parametrize("name", list(LOGICAL_CASES))
def test_logical_axes_box_params_with_the_pattern_names(name):
    pattern, weight_shape, bias_shape, axes, x_shape, logical, names, rules = LOGICAL_CASES[name]
    x = normal(x_shape)
    plain = EinMix(pattern, weight_shape, bias_shape, sizes=axes)
    boxed = plain.clone(logical_axes=logical)
    variables = boxed.init(jax.random.key(2), x)

    params = variables["params"]
    assert set(params) == set(names)
    for param, box in params.items():
        assert isinstance(box, nn.LogicallyPartitioned) and box.names == names[param]
    specs = nn.get_partition_spec(variables)["params"]
    assert specs == {k: P(*n) for k, n in names.items()}
    expected = {k: nn.logical_to_mesh_axes(n, rules) for k, n in names.items()}
    assert nn.logical_to_mesh(nn.get_partition_spec(variables), rules)["params"] == expected
    with nn.logical_axis_rules(rules):
        assert nn.logical_to_mesh(nn.get_partition_spec(variables))["params"] == expected
    # the functional core's specs for the same names and rules agree with Flax's
    core = plain.functional(x.shape)
    renamed = None if logical is True else logical
    assert em.param_specs(core, rules, logical_axes=renamed) == expected

    # unboxed, they are the params the layer draws without metadata, and outputs are unchanged
    unboxed = nn.unbox(variables)
    reference = plain.init(jax.random.key(2), x)
    assert jax.tree.structure(unboxed) == jax.tree.structure(reference)
    jax.tree.map(np.testing.assert_array_equal, unboxed, reference)
    y = plain.apply(reference, x)
    np.testing.assert_array_equal(boxed.apply(variables, x), y)
    np.testing.assert_array_equal(boxed.apply(unboxed, x), y)
    np.testing.assert_allclose(core(unboxed["params"], x), y, rtol=1e-6, atol=1e-6)


def test_logical_axes_keep_the_module_hashable():
    layer = EinMix("b c -> b d", "c d", "d", sizes={"d": 3}, logical_axes={"c": "embed"})
    same = EinMix("b c -> b d", "c d", "d", sizes={"d": 3}, logical_axes={"c": "embed"})
    assert hash(layer) == hash(same) and layer == same
    assert layer.clone(logical_axes={"c": "mlp"}) != layer
    assert layer.clone(logical_axes=True) == layer.clone(logical_axes={})
    assert layer.clone(logical_axes=True) != layer.clone(logical_axes=None)
    assert repr(layer) == (
        "EinMix('b c -> b d', 'c d', 'd', sizes={'d': 3}, logical_axes={'c': 'embed'})"
    )
    x = jnp.ones((2, 4))
    variables = layer.init(jax.random.key(0), x)
    apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    # one compiled program against the eager ops: equal up to float rounding
    np.testing.assert_allclose(
        apply(layer, variables, x), layer.apply(variables, x), rtol=1e-6, atol=1e-6
    )


def test_logical_axes_errors_name_the_argument():
    with pytest.raises(einops.EinopsError, match=r"logical_axes must be None, True or a dict"):
        EinMix("b c -> b d", sizes={"d": 3}, logical_axes="embed")
    x = jnp.ones((2, 4))
    unknown = EinMix("b c -> b d", sizes={"d": 3}, logical_axes={"e": "embed"})
    with pytest.raises(einops.EinopsError, match=r"axis 'e', which is not an axis of this layer"):
        unknown.init(jax.random.key(0), x)
    clash = EinMix("b c -> b d", sizes={"d": 3}, logical_axes={"c": "x", "d": "x"})
    with pytest.raises(einops.EinopsError, match=r"'c', 'd' to the same logical name 'x'"):
        clash.init(jax.random.key(0), x)


def test_logical_axes_under_scan_gain_the_layer_axis():
    class Step(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            layer = EinMix("b c -> b d", "c d", "d", sizes={"d": 4}, logical_axes={"c": "embed"})
            return jnp.tanh(layer(x)), None

    stack = nn.scan(
        Step,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=3,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )()
    x = normal((2, 4))
    variables = stack.init(jax.random.key(0), x, None)
    specs = nn.get_partition_spec(variables)["params"]["EinMix_0"]
    assert specs == {"weight": P("layers", "embed", "d"), "bias": P("layers", "d")}
    y, _ = stack.apply(variables, x, None)
    params = nn.unbox(variables)["params"]["EinMix_0"]
    core = em.layer("b c -> b d", weight_shape="c d", bias_shape="d", c=4, d=4)
    expected = x
    for i in range(3):
        expected = jnp.tanh(core(jax.tree.map(lambda p, i=i: p[i], params), expected))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_params_move_to_the_functional_form_in_any_mapping():
    import flax

    layer = EinMix("b c -> b d", "c d", "d", sizes={"d": 3})
    x = normal((2, 4))
    functional = em.layer("b c -> b d", bias_shape="d", c=4, d=3)
    flax.config.update("flax_return_frozendict", True)
    try:
        variables = layer.init(jax.random.key(0), x)
    finally:
        flax.config.update("flax_return_frozendict", False)
    params = variables["params"]
    expected = reference_einmix(
        "b c -> b d", "c d", "d", x, params["weight"], params["bias"], {"c": 4, "d": 3}
    )
    np.testing.assert_allclose(functional(params, x), expected, rtol=1e-5, atol=1e-5)
    # boxed params (logical_axes) move too: the boxes are unwrapped
    boxed = layer.clone(logical_axes=True).init(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(functional(boxed, x), expected, rtol=1e-5, atol=1e-5)


def test_parenthesised_weight_axes_are_refused():
    for weight_shape in ("c (d)", "(c) d"):
        layer = EinMix("b c -> b d", weight_shape, sizes={"d": 3})
        with pytest.raises(em.EinMixError, match=r"parentheses .*weight_shape"):
            layer.init(jax.random.key(0), jnp.ones((2, 4)))


FIELDS = [
    "pattern",
    "weight_shape",
    "bias_shape",
    "sizes",
    "dtype",
    "param_dtype",
    "precision",
    "weight_init",
    "bias_init",
    "dot_general",
    "preferred_element_type",
    "logical_axes",
]


@pytest.mark.parametrize("name", FIELDS)
def test_axes_named_like_fields(name):
    x = normal((2, 3))
    read = EinMix(f"b {name} -> b d", sizes={"d": 4})  # read off the input
    given = EinMix(f"b c -> b {name}", sizes={name: 4})  # given in sizes
    for layer in (read, given):
        variables = layer.init(jax.random.key(0), x)
        weight = variables["params"]["weight"]
        assert weight.shape == (3, 4)
        expected = reference_einmix("b c -> b d", "c d", None, x, weight, None, {"c": 3, "d": 4})
        np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (dict(sizes=[("d", 3)]), r"sizes must be a mapping"),
        (dict(sizes={"d": "3"}), r"axis 'd': length must be a positive integer"),
        (dict(sizes={"d": 0}), r"axis 'd': length must be a positive integer"),
        (dict(dtype="garbage"), r"dtype must be a floating dtype"),
        (dict(param_dtype=jnp.int32), r"param_dtype must be a floating dtype"),
        (dict(precision="garbage"), r"precision .*'garbage'"),
        (dict(weight_init=3.0), r"weight_init must be a callable"),
        (dict(dot_general="dot"), r"dot_general must be a callable"),
    ],
)
def test_invalid_fields_raise_at_construction(options, match):
    with pytest.raises(em.EinMixError, match=match):
        EinMix("b c -> b d", **{"sizes": {"d": 3}, **options})


def test_sizes_none_is_no_sizes():
    layer = EinMix("b c -> b d", sizes=None)
    assert layer == EinMix("b c -> b d") and hash(layer) == hash(EinMix("b c -> b d"))


def test_shape_errors_are_the_functional_forms():
    x = normal((2, 3, 4))
    # a bias axis read off the input at init, then another length at apply
    layer = EinMix("b t c -> b t d", "c d", "t d", sizes={"d": 2})
    variables = layer.init(jax.random.key(0), x)
    with pytest.raises(em.EinMixError, match=r"axis 't': expected 3, got 5"):
        layer.apply(variables, normal((2, 5, 4)))
    params = variables["params"]
    functional = em.layer("b t c -> b t d", "c d", "t d", t=3, c=4, d=2)
    cases = {
        "weight of the wrong rank": (
            {**params, "weight": params["weight"].reshape(-1)},
            r"params\['weight'\] has shape \(8,\), expected \(4, 2\) for 'c d'",
        ),
        "missing bias": (
            {"weight": params["weight"]},
            r"params has entries \['weight'\], expected \['bias', 'weight'\]",
        ),
        "extra params": (
            {**params, "scale": params["bias"]},
            r"params has entries \['bias', 'scale', 'weight'\]",
        ),
    }
    for bad, match in cases.values():
        with pytest.raises(em.EinMixError, match=match):
            functional(bad, x)
        with pytest.raises(em.EinMixError, match=match):
            layer.apply({"params": bad}, x)

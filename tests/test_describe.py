"""``em.describe``: its figures against independent formulas, and its steps replayed in numpy.

The replay is the strong check: the listed reshapes, sums, transposes, broadcasts, the one
``dot_general`` and the bias add are executed with numpy exactly as printed, and must give the
reference EinMix output (einops.rearrange + np.einsum, tests/reference.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax._describe import Description
from tests.reference import default_weight_shape, flat_axes, reference_einmix

# (pattern, weight_shape, bias_shape, lengths given to the layer, input shape, every axis length)
CASES = [
    ("b t c -> b t d", "c d", "d", dict(c=4, d=3), (2, 5, 4), dict(b=2, t=5, c=4, d=3)),
    (
        "b t (h c) -> b t (h d)",
        "h c d",
        "h d",
        dict(h=2, c=4, d=3),
        (2, 3, 8),
        dict(b=2, t=3, h=2, c=4, d=3),
    ),
    (
        "b h t c -> b h t d",
        "h c d",
        None,
        dict(h=2, c=4, d=3),
        (2, 2, 5, 4),
        dict(b=2, h=2, t=5, c=4, d=3),
    ),
    ("b t c -> b u c", "t u", "u", dict(t=4, u=6), (3, 4, 5), dict(b=3, t=4, u=6, c=5)),
    ("b t c -> b u c", "t u", None, dict(t=10, u=12), (64, 10, 6), dict(b=64, t=10, u=12, c=6)),
    (
        "b (h p1) (w p2) c -> b h w d",
        "p1 p2 c d",
        "d",
        dict(p1=2, p2=2, c=3, d=5),
        (2, 4, 6, 3),
        dict(b=2, h=2, p1=2, w=3, p2=2, c=3, d=5),
    ),
    ("b t c -> b t c", "c", "c", dict(c=4), (2, 3, 4), dict(b=2, t=3, c=4)),
    ("b t c -> b d", "c d", None, dict(c=3, d=2), (2, 4, 3), dict(b=2, t=4, c=3, d=2)),
    ("c b -> d b", "c d", "d", dict(c=3, d=4), (3, 5), dict(b=5, c=3, d=4)),
    ("b h c -> b h d", "h c d", "d h", dict(h=3, c=4, d=2), (2, 3, 4), dict(b=2, h=3, c=4, d=2)),
    ("b 1 c -> b d", "c d", "d", dict(c=3, d=2), (2, 1, 3), dict(b=2, c=3, d=2)),
    ("b (h w) c -> b h w", "c", "w", dict(c=3, w=2), (2, 6, 3), dict(b=2, h=3, w=2, c=3)),
    ("b t c -> b d", "c d", "d", dict(c=3, d=2), (1, 4, 3), dict(b=1, t=4, c=3, d=2)),  # one row
    ("b t c -> b t d", "c d", "d", dict(c=3, d=2), (1, 1, 3), dict(b=1, t=1, c=3, d=2)),
]
IDS = [f"{c[0]}|{c[1]}|{c[2]}|{c[4]}" for c in CASES]


def np_dot_general(lhs: np.ndarray, rhs: np.ndarray, dims) -> np.ndarray:
    """``lax.dot_general``'s documented semantics, in numpy (batch, lhs free, rhs free)."""
    (lhs_k, rhs_k), (lhs_b, rhs_b) = dims
    lhs_ids = list(range(lhs.ndim))
    rhs_ids = list(range(lhs.ndim, lhs.ndim + rhs.ndim))
    for i, j in zip(lhs_k + lhs_b, rhs_k + rhs_b, strict=True):
        rhs_ids[j] = lhs_ids[i]
    out = (
        [lhs_ids[i] for i in lhs_b]
        + [lhs_ids[i] for i in range(lhs.ndim) if i not in lhs_k + lhs_b]
        + [rhs_ids[j] for j in range(rhs.ndim) if j not in rhs_k + rhs_b]
    )
    return np.einsum(lhs, lhs_ids, rhs, rhs_ids, out)


def replay(d: Description, x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Run the described steps with numpy; check every step's printed shape on the way."""
    arrays = {"x": x, "weight": w, "bias": b}

    def run(step, a: np.ndarray) -> np.ndarray:
        if step.op == "reshape":
            return a.reshape(step.arg)
        if step.op == "sum":
            return a.sum(axis=step.arg)
        if step.op == "transpose":
            return np.transpose(a, step.arg)
        if step.op == "broadcast":
            return np.broadcast_to(a, step.arg)
        if step.op == "copy":  # the weight written out before the dot: the same values
            return a
        if step.op == "pack":  # the groups on the diagonal: a[..., k, ..., k', ...] = 0 off it
            kx, ky = step.labels.index(f"{step.note}.k"), step.labels.index(f"{step.note}.k'")
            eye = np.eye(step.arg).reshape(
                [step.arg if i in (kx, ky) else 1 for i in range(len(step.labels))]
            )
            return np.expand_dims(a, ky) * eye
        raise AssertionError(step.op)

    for step in d.before:
        arrays[step.operand] = run(step, arrays[step.operand])
        assert arrays[step.operand].shape == step.shape, str(step)
        assert len(step.labels) == len(step.shape), str(step)
    lhs_shape, rhs_shape, dims = d.contraction.arg
    lhs, rhs = (arrays["x"], arrays["weight"])
    if d.contraction.operand == "weight":
        lhs, rhs = rhs, lhs
    if d.loop is None:
        assert (lhs.shape, rhs.shape) == (lhs_shape, rhs_shape)
    if d.loop is None:
        y = np_dot_general(lhs, rhs, dims)
    else:  # lax.map over x's first dimension, results stacked
        assert (lhs if d.contraction.operand == "x" else rhs).shape[0] == d.loop
        if d.contraction.operand == "x":
            y = np.stack([np_dot_general(xi, rhs, dims) for xi in lhs])
        else:
            y = np.stack([np_dot_general(lhs, xi, dims) for xi in rhs])
    assert y.shape == d.contraction.shape
    assert len(d.contraction.labels) == len(y.shape)
    for step in d.after:
        if step.op == "add":
            y = y + arrays["bias"].reshape(step.arg)
        elif step.operand == "bias":
            arrays["bias"] = run(step, arrays["bias"])
            continue
        else:
            y = run(step, y)
        assert y.shape == step.shape, str(step)
        assert len(step.labels) == len(step.shape), str(step)
    return y


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "given", "x_shape", "sizes"), CASES, ids=IDS
)
def test_replayed_steps_compute_einmix(pattern, weight_shape, bias_shape, given, x_shape, sizes):
    mix = em.layer(pattern, weight_shape=weight_shape, bias_shape=bias_shape, **given)
    d = em.describe(mix, x_shape)
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape)
    w = rng.normal(size=[sizes[a] for a in weight_shape.split()])
    b = None if bias_shape is None else rng.normal(size=[sizes[a] for a in bias_shape.split()])
    expected = reference_einmix(pattern, weight_shape, bias_shape, x, w, b, sizes)
    got = replay(d, x, w, b)
    assert d.out_shape == expected.shape == got.shape
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # and the layer itself returns that shape
    params = mix.init(jax.random.key(0))
    assert mix(params, jnp.ones(x_shape)).shape == expected.shape


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "given", "x_shape", "sizes"), CASES, ids=IDS
)
def test_flax_layers_under_interception_keep_the_weight_as_stored_and_compute_einmix(
    pattern, weight_shape, bias_shape, given, x_shape, sizes
):
    from flax import nnx

    lengths = {a: sizes[a] for a in weight_shape.split() + (bias_shape or "").split()}
    module = em.nnx.EinMix(
        pattern,
        weight_shape=weight_shape,
        bias_shape=bias_shape,
        dot_general=jax.lax.dot_general,  # a hook: the contraction may be intercepted
        rngs=nnx.Rngs(0),
        **lengths,
    )
    d = em.describe(module, x_shape)
    assert d.strategy == "as einsum"
    assert not [s for s in d.before if s.operand == "x" and s.op == "transpose"]  # x as given
    assert not [s for s in d.before if s.operand == "weight"]  # the weight goes in untouched
    assert d.contraction.operand == "x"  # ... as the second operand
    assert d.contraction.arg[1] == module.weight.shape
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape)
    w = rng.normal(size=[sizes[a] for a in weight_shape.split()])
    b = None if bias_shape is None else rng.normal(size=[sizes[a] for a in bias_shape.split()])
    expected = reference_einmix(pattern, weight_shape, bias_shape, x, w, b, sizes)
    np.testing.assert_allclose(replay(d, x, w, b), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "given", "x_shape", "sizes"), CASES, ids=IDS
)
def test_counts_match_independent_formulas(
    pattern, weight_shape, bias_shape, given, x_shape, sizes
):
    d = em.describe(pattern, x_shape, weight_shape=weight_shape, bias_shape=bias_shape, **given)
    left, right = (flat_axes(side) for side in pattern.split("->"))
    w_axes = weight_shape.split()
    kept = {a for a in left if a in w_axes or a in right} | set(w_axes)
    summed = [a for a in left if a not in kept]
    # einsum FLOPs: one multiply and one add per point of the joint index space
    dot_flops = 2 * math.prod(sizes[a] for a in kept)
    sum_adds = math.prod(x_shape) - math.prod(x_shape) // math.prod(sizes[a] for a in summed)
    out_size = math.prod(sizes[a] for a in right)
    bias_adds = out_size if bias_shape else 0
    n_params = math.prod(sizes[a] for a in w_axes)
    if bias_shape:
        n_params += math.prod(sizes[a] for a in bias_shape.split())
    assert d.dot_flops == dot_flops
    assert d.flops == dot_flops + sum_adds + bias_adds
    assert d.param_count == n_params
    assert math.prod(d.out_shape) == out_size
    text = str(d)
    assert f"= {n_params:,}" in text
    assert f"FLOPs per call: {dot_flops + sum_adds + bias_adds:,}" in text
    assert f"output {d.out_shape}" in text
    assert f"dimension_numbers={d.contraction.arg[2]}" in text
    assert repr(d) == text


def test_rearranges_are_the_moving_steps():
    for pattern, weight_shape, bias_shape, given, x_shape, _ in CASES:
        d = em.describe(pattern, x_shape, weight_shape=weight_shape, bias_shape=bias_shape, **given)
        moving = [s for s in d.before + d.after if s.op in ("transpose", "broadcast", "pack")]
        assert list(d.rearranges) == moving
        text = str(d)
        assert ("no transpose or broadcast" in text) == (not moving)
        for s in moving:
            assert str(s) in text


def test_plain_linear_is_one_dot_and_free_reshapes():
    d = em.describe("b t c -> b t d", (4, 7, 16), d=8)
    assert d.rearranges == ()
    assert [s.op for s in d.before] == ["reshape"]
    assert d.contraction.shape == (28, 8)
    assert [s.op for s in d.after] == ["reshape"]
    assert "no transpose or broadcast" in str(d)


def test_a_one_row_layer_moves_nothing():
    # it runs with a unit batch dimension (see test_lower): the weight is reshaped, not broadcast
    d = em.describe("b t c -> b d", (1, 16, 1536), weight_shape="c d", c=1536, d=3072)
    assert d.strategy == "broadcast batch" and d.rearranges == ()
    assert d.before[-1].labels == ("b", "c", "d") and "(b c)" not in str(d)
    assert "no transpose or broadcast" in str(d)


def test_every_form_of_the_layer_gives_the_same_description():
    from flax import nnx

    pattern, kw, x = (
        "b t (h c) -> b t (h d)",
        dict(weight_shape="h c d", bias_shape="h d"),
        jnp.ones((2, 3, 8)),
    )
    _, functional = em.init(pattern, jax.random.key(0), **kw, h=2, c=4, d=3)
    forms = [
        em.describe(functional, x.shape),
        em.describe(functional, x),  # anything with a .shape
        em.describe(functional, jax.ShapeDtypeStruct(x.shape, x.dtype)),
        em.describe(pattern, x.shape, **kw, h=2, d=3),  # c read off the input
        em.describe(em.linen.EinMix(pattern, **kw, sizes=dict(h=2, d=3)), x.shape),
        em.describe(em.nnx.EinMix(pattern, **kw, rngs=nnx.Rngs(0), h=2, c=4, d=3), x.shape),
    ]
    first = forms[0]
    for d in forms[1:]:
        assert d.layer.param_shapes == first.layer.param_shapes
        assert (d.lowering, d.before, d.contraction, d.after) == (
            first.lowering,
            first.before,
            first.contraction,
            first.after,
        )
    # every form, the Flax layers' included, runs (and describes) the planner's choice
    from einmix_jax import _lower

    assert first.lowering == _lower.lower(functional.plan, x.shape)
    assert first.strategy != "weight as stored"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: em.describe(em.layer("b c -> b d", c=3, d=2), (5, 3), d=2), "pattern string"),
        (lambda: em.describe(object(), (5, 3)), "got object"),
        (lambda: em.describe("b c -> b d", (5, 4), c=3, d=2), r"axis 'c': expected 3, got 4"),
        (lambda: em.describe("b c -> b d", (5, 3, 1), d=2), "rank 3, expected 2"),
        (lambda: em.describe("b t (h c) -> b t d", (2, 3, 8), d=2), "cannot determine"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises(em.EinMixError, match=message):
        call()


def test_default_weight_shape_is_described():
    d = em.describe("b t c -> b u c", (2, 4, 3), u=5)  # weight 't u' inferred, t read off x
    assert d.layer.plan.weight_shape == default_weight_shape("b t c -> b u c")
    assert d.layer.param_shapes == {"weight": (4, 5)}


LOOP_CASES = [
    (
        "b t c -> b u c",
        "t u",
        "u",
        dict(t=128, u=136),
        (2, 128, 128),
        dict(b=2, t=128, u=136, c=128),
    ),
    (
        "b c h w -> b d h w",
        "c d",
        "d",
        dict(c=128, d=136),
        (2, 128, 8, 16),
        dict(b=2, c=128, d=136, h=8, w=16),
    ),
]


def forced(monkeypatch, which):
    """Make describe() show the first candidate ``which`` accepts (another planner decision)."""
    from einmix_jax import _apply, _lower

    def lower(plan, shape, stored_weight=False, **kwargs):
        choices = _lower.candidates(plan, shape, True)
        return _lower.build(plan, shape, next(c for c in choices if which(c.candidate)))

    monkeypatch.setattr(_apply, "lower", lower)


def check_replay(d, pattern, weight_shape, bias_shape, x_shape, sizes):
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape)
    w = rng.normal(size=[sizes[a] for a in weight_shape.split()])
    b = rng.normal(size=[sizes[a] for a in bias_shape.split()])
    expected = reference_einmix(pattern, weight_shape, bias_shape, x, w, b, sizes)
    np.testing.assert_allclose(replay(d, x, w, b), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "given", "x_shape", "sizes"), LOOP_CASES
)
def test_loop_lowering_is_described_and_replayed(
    monkeypatch, pattern, weight_shape, bias_shape, given, x_shape, sizes
):
    forced(monkeypatch, lambda c: c.loop)
    mix = em.layer(pattern, weight_shape=weight_shape, bias_shape=bias_shape, **given)
    d = em.describe(mix, x_shape)
    assert d.loop == sizes["b"]
    assert f"lax.map over (b={sizes['b']}) of" in str(d)
    check_replay(d, pattern, weight_shape, bias_shape, x_shape, sizes)
    left, right = (flat_axes(side) for side in pattern.split("->"))
    assert d.dot_flops == 2 * math.prod(sizes[a] for a in {*left, *right})


PACKING_CASES = [
    # (pattern, weight_shape, bias_shape, x_shape, every length, k): all k groups in one block
    ("b t (g c) -> b t (g d)", "g c d", "g d", (2, 3, 32), dict(b=2, t=3, g=8, c=4, d=2), 8),
    ("b t (g c) -> b t (g d)", "g c d", "g d", (2, 3, 256), dict(b=2, t=3, g=64, c=4, d=2), 64),
    ("b (g c) -> b (d g)", "c d g", "d", (5, 12), dict(b=5, g=4, c=3, d=2), 4),
]


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "x_shape", "sizes", "k"), PACKING_CASES
)
def test_block_diagonal_packing_is_described_and_replayed(
    monkeypatch, pattern, weight_shape, bias_shape, x_shape, sizes, k
):
    forced(monkeypatch, lambda c: c.pack is not None and c.pack[1] == k)
    axes = {a: sizes[a] for a in weight_shape.split()}
    d = em.describe(em.layer(pattern, weight_shape, bias_shape, **axes), x_shape)
    assert d.strategy == "block-diagonal"
    pack = next(s for s in d.before if s.op == "pack")
    assert f"weight: pack {k} groups of g block-diagonally" in str(pack)
    assert pack in d.rearranges and str(pack) in str(d)
    check_replay(d, pattern, weight_shape, bias_shape, x_shape, sizes)
    left, right = (flat_axes(side) for side in pattern.split("->"))
    flops = 2 * math.prod(sizes[a] for a in {*left, *right})
    assert (d.dot_flops, d.executed_dot_flops) == (flops, k * flops)  # the zeros multiplied too
    assert f"(runs {k * flops:,} FLOPs" in str(d)


@pytest.mark.parametrize(
    "x_shape", [(-2, 3), (2.5, 3), "23", 23, (True, 3), (2, None), None, {2: 3}]
)
def test_the_shape_must_be_a_tuple_of_non_negative_integers(x_shape):
    mix = em.layer("b c -> b d", c=3, d=2)
    with pytest.raises(em.EinMixError, match=r"x_shape must be a tuple of non-negative integers"):
        em.describe(mix, x_shape)
    with pytest.raises(em.EinMixError, match=r"x_shape must be a tuple of non-negative integers"):
        em.describe("b c -> b d", x_shape, d=2)


def test_numpy_integers_and_an_empty_batch_are_shapes():
    mix = em.layer("b c -> b d", c=3, d=2)
    assert em.describe(mix, (np.int64(0), 3)).out_shape == (0, 2)
    assert em.describe(mix, [4, np.int32(3)]).out_shape == (4, 2)


def test_every_strategy_is_documented():
    from einmix_jax import _lower

    strategies = set()
    for pattern, weight_shape, bias_shape, given, x_shape, _ in CASES + LOOP_CASES:
        mix = em.layer(pattern, weight_shape, bias_shape, **given)
        strategies.add(em.describe(mix, x_shape).strategy)
        for stored_weight in (False, True):  # every candidate, the Flax layers' form
            for c in _lower.candidates(mix.plan, x_shape, True, stored_weight):
                strategies.add(_lower.build(mix.plan, x_shape, c).strategy)
    assert {
        "as einsum",
        "loop",
        "block-diagonal",
        "weight as stored",
        "broadcast batch",
    } <= strategies
    for strategy in strategies:
        assert f"'{strategy}'" in Description.strategy.__doc__

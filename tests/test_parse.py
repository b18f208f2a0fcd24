"""Parsing and validation: plans without arrays, and one table of (arguments, error, message)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import einmix_jax as em
from einmix_jax._parse import infer_weight_shape, param_sizes_from_input, parse

from .reference import default_weight_shape

# --- plans, no arrays ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "weight_axes"),
    [
        ("b t c -> b t d", "c d"),
        ("b t c -> b u c", "t u"),
        ("b t (h c) -> b t (h d)", "c d"),
        ("b (h ph) (w pw) c -> b (h w) d", "ph pw c d"),
        ("... c -> ... d", "c d"),
        ("b c -> d b", "c d"),
        ("b 1 c -> b () d", "c d"),
    ],
)
def test_inferred_weight_axes(pattern: str, weight_axes: str):
    assert infer_weight_shape(pattern) == weight_axes == default_weight_shape(pattern)


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "axes", "weight_sizes", "bias_sizes", "fan_in"),
    [
        ("b c -> b d", "c d", "d", dict(c=3, d=4), (3, 4), (4,), 3),
        ("b c -> b d", "d c", None, dict(c=3, d=4), (4, 3), None, 3),
        ("b t (h c) -> b t (h d)", "h c d", "d h", dict(h=2, c=3, d=5), (2, 3, 5), (5, 2), 3),
        ("b t c -> b u c", "t u", "u", dict(t=6, u=2), (6, 2), (2,), 6),
        ("b (h p) (w q) c -> b (h w) d", "p q c d", "d", dict(p=2, q=3, c=4, d=5),
         (2, 3, 4, 5), (5,), 24),
        ("t b c -> t b c", "c", "c", dict(c=7), (7,), (7,), 1),
        ("b c -> b c", "", None, dict(c=7), (), None, 1),
        ("b c -> b c r", "r", None, dict(r=2), (2,), None, 1),
        ("b key -> b pattern", "key pattern", None, dict(key=2, pattern=3), (2, 3), None, 2),
    ],
)  # fmt: skip
def test_plan(pattern, weight_shape, bias_shape, axes, weight_sizes, bias_sizes, fan_in):
    plan = parse(pattern, weight_shape, bias_shape, tuple(axes.items()))
    assert plan.weight_axes == tuple(weight_shape.split())
    assert plan.weight_sizes == weight_sizes
    assert plan.bias_sizes == bias_sizes
    assert plan.fan_in == fan_in
    hash(plan)  # a static jit argument must be hashable
    assert parse(pattern, weight_shape, bias_shape, tuple(axes.items())) is plan  # cached


def test_layer_repr_and_param_shapes():
    mix = em.layer("b t (h c) -> b t (h d)", weight_shape="h c d", bias_shape="h d", h=2, c=3, d=4)
    assert repr(mix) == "EinMix('b t (h c) -> b t (h d)', 'h c d', 'h d', h=2, c=3, d=4)"
    assert mix.param_shapes == {"weight": (2, 3, 4), "bias": (2, 4)}


def test_axis_lengths_accept_numpy_integers():
    mix = em.layer("b c -> b d", c=np.int64(3), d=np.int32(2))
    assert mix.param_shapes == {"weight": (3, 2)}


def test_lengths_of_input_only_axes_are_accepted_then_enforced():
    params, apply = em.init("b c -> b d", jax.random.key(0), b=2, c=3, d=4)
    assert apply(params, np.ones((2, 3), np.float32)).shape == (2, 4)
    with pytest.raises(einops.EinopsError, match=r"axis 'b': expected 2, got 5"):
        apply(params, np.ones((5, 3), np.float32))


@pytest.mark.parametrize(
    ("pattern", "weight_shape", "bias_shape", "axes", "x_shape", "expected"),
    [
        ("b t (h c) -> b t (h d)", "h c d", None, dict(h=2, d=5), (7, 3, 8), dict(h=2, d=5, c=4)),
        ("b t c -> b t d", None, "d", dict(d=5), (7, 3, 8), dict(d=5, c=8)),
        ("b t c -> b u c", None, None, dict(u=2), (7, 3, 8), dict(u=2, t=3)),
        ("... c -> ... d", "c d", "d", dict(d=5), (7, 3, 8), dict(d=5, c=8)),
    ],
)
def test_param_sizes_from_input(pattern, weight_shape, bias_shape, axes, x_shape, expected):
    sizes = param_sizes_from_input(pattern, weight_shape, bias_shape, tuple(axes.items()), x_shape)
    assert dict(sizes) == expected


# --- the error table ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bad:
    """``em.init(pattern, key, **kwargs)``; then, if ``x_shape`` is set, ``apply(edit(params), x)``."""

    pattern: object
    kwargs: dict
    match: str
    x_shape: tuple[int, ...] | None = None
    edit: Callable[[dict], object] | None = None


LINEAR = dict(weight_shape="c d", c=4, d=3)
HEADS = dict(weight_shape="h c d", bias_shape="h d", h=2, c=3, d=4)

BAD = {
    # einops' own rules
    "unknown axis on the right": Bad("b c -> b e", LINEAR, r"'e'.*output side"),
    "ellipsis on the left only": Bad("b ... c -> b d", LINEAR, r"'\.\.\.' must be on both sides"),
    "ellipsis on the right only": Bad("b c -> ... d", LINEAR, r"'\.\.\.' must be on both sides"),
    "ellipsis in the weight": Bad(
        "b ... c -> b ... d", dict(weight_shape="... c d", c=4, d=3), r"'\.\.\.'.*weight_shape"
    ),
    "parenthesised ellipsis on the left": Bad(
        "b (... c) -> b ... d", LINEAR, r"'\.\.\.' cannot be in parentheses on the input side"
    ),
    "non-unitary anonymous axis on the left": Bad(
        "b 2 c -> b d", LINEAR, r"numeric axes.*input side"
    ),
    "non-unitary anonymous axis on the right": Bad(
        "b c -> b 2 d", LINEAR, r"numeric axes.*output side"
    ),
    "two anonymous axes on the right": Bad("b c -> b 2 3 d", LINEAR, r"numeric axes.*output side"),
    "anonymous axis with an inferred weight": Bad(
        "b 2 c -> b d", dict(c=4, d=3), r"numeric axes.*input side"
    ),
    "anonymous axis in the weight": Bad(
        "b c -> b d", dict(weight_shape="c 2 d", c=4, d=3), r"numeric axes.*weight_shape"
    ),
    "parentheses in the weight": Bad(
        "b c -> b d", dict(weight_shape="(c d)", c=4, d=3), r"parentheses .*weight_shape"
    ),
    "parenthesised axis in the weight": Bad(
        "b c -> b d", dict(weight_shape="c (d)", c=4, d=3), r"parentheses .*weight_shape 'c \(d\)'"
    ),
    "parenthesised first axis in the weight": Bad(
        "b c -> b d", dict(weight_shape="(c) d", c=4, d=3), r"parentheses .*weight_shape '\(c\) d'"
    ),
    "1 in the weight": Bad(
        "b c -> b d", dict(weight_shape="c 1 d", c=4, d=3), r"'1' are not allowed in weight_shape"
    ),
    "weight axis without a length": Bad(
        "b c -> b d", dict(weight_shape="c d", c=4), r"weight axes 'd' need a length.*d=\.\.\."
    ),
    "length for an unused axis": Bad(
        "b c -> b d", dict(LINEAR, z=5), r"lengths given for axes 'z'"
    ),
    "redundant weight axis": Bad(
        "b c -> b d", dict(weight_shape="c d e", c=4, d=3, e=2), r"weight axes 'e' are in neither"
    ),
    "bias axis missing from the output": Bad(
        "b c -> b d", dict(LINEAR, bias_shape="c"), r"bias axes 'c' are not in the output"
    ),
    "bias axis without a length": Bad(
        "b c -> b d", dict(LINEAR, bias_shape="b d"), r"bias axes 'b' need a length.*b=\.\.\."
    ),
    "bias axis before the ellipsis": Bad(
        "b ... c -> d ... b",
        dict(LINEAR, bias_shape="d"),
        r"bias axis 'd' stands before '\.\.\.'",
    ),
    "bias axis before a parenthesised ellipsis": Bad(
        "b ... c -> (d ...) b",
        dict(LINEAR, bias_shape="d"),
        r"bias axis 'd' stands before '\.\.\.'",
    ),
    "non-string bias shape": Bad(
        "b c -> b d", dict(LINEAR, bias_shape=["d"]), r"bias_shape must be a string.*\['d'\]"
    ),
    "ellipsis in the bias": Bad(
        "b ... c -> b ... d", dict(LINEAR, bias_shape="... d"), r"bias_shape must list axis names"
    ),
    "parentheses in the bias": Bad(
        "b c -> b (d e)",
        dict(weight_shape="c d e", bias_shape="(d e)", c=4, d=3, e=2),
        r"bias_shape must list axis names",
    ),
    "anonymous axes in the bias": Bad(
        "b c -> b d", dict(LINEAR, bias_shape="2 3"), r"bias_shape must list axis names"
    ),
    "duplicate axis on the left": Bad("b b c -> b d", LINEAR, r"input side.*duplicate.*\"b\""),
    "duplicate axis in the weight": Bad(
        "b c -> b d", dict(weight_shape="c c d", c=4, d=3), r"weight_shape.*duplicate.*\"c\""
    ),
    "invalid axis name": Bad("b c_ -> b d", dict(d=3), r"input side 'b c_ '.*c_"),
    "unbalanced parentheses": Bad("b (c -> b d", LINEAR, r"input side 'b \(c '"),
    # ours
    "no arrow": Bad("b c b d", LINEAR, r"pattern 'b c b d' must contain exactly one '->'"),
    "two arrows": Bad("b c -> b d -> b", LINEAR, r"exactly one '->'"),
    "non-string pattern": Bad(3, LINEAR, r"pattern must be a string.*got 3"),
    "None pattern": Bad(None, LINEAR, r"pattern must be a string.*got None"),
    "non-string weight shape": Bad(
        "b c -> b d", dict(weight_shape=("c", "d"), c=4, d=3), r"weight_shape must be a string"
    ),
    "nothing to infer the weight from": Bad(
        "t b c -> t b c", dict(c=4), r"cannot infer the weight axes.*pass weight_shape"
    ),
    "zero length": Bad("b c -> b d", dict(LINEAR, c=0), r"axis 'c': length must be a positive"),
    "negative length": Bad("b c -> b d", dict(LINEAR, d=-3), r"axis 'd': length must be a pos"),
    "float length": Bad("b c -> b d", dict(LINEAR, c=2.0), r"axis 'c': .* got 2\.0"),
    "string length": Bad("b c -> b d", dict(LINEAR, c="4"), r"axis 'c': .* got '4'"),
    "bool length": Bad("b c -> b d", dict(LINEAR, c=True), r"axis 'c': .* got True"),
    "None length": Bad("b c -> b d", dict(LINEAR, c=None), r"axis 'c': .* got None"),
    # options: each named, at creation
    "integer param_dtype": Bad(
        "b c -> b d", dict(LINEAR, param_dtype=np.int32), r"param_dtype must be a floating dtype"
    ),
    "bool param_dtype": Bad(
        "b c -> b d", dict(LINEAR, param_dtype=bool), r"param_dtype must be a floating dtype"
    ),
    "None param_dtype": Bad(
        "b c -> b d", dict(LINEAR, param_dtype=None), r"param_dtype must be a floating dtype"
    ),
    "garbage dtype": Bad(
        "b c -> b d", dict(LINEAR, dtype="garbage"), r"dtype must be a floating dtype.*'garbage'"
    ),
    "integer dtype": Bad(
        "b c -> b d", dict(LINEAR, dtype="int32"), r"dtype must be a floating dtype.*int32"
    ),
    "garbage preferred_element_type": Bad(
        "b c -> b d",
        dict(LINEAR, preferred_element_type="garbage"),
        r"preferred_element_type must be a floating dtype",
    ),
    "garbage precision": Bad(
        "b c -> b d", dict(LINEAR, precision="garbage"), r"precision .*'garbage'"
    ),
    "unhashable precision": Bad(
        "b c -> b d", dict(LINEAR, precision={"a": 1}), r"precision .*\{'a': 1\}"
    ),
    "precision of three": Bad(
        "b c -> b d", dict(LINEAR, precision=("highest",) * 3), r"precision .*'highest'"
    ),
    "weight_init not callable": Bad(
        "b c -> b d", dict(LINEAR, weight_init=0.5), r"weight_init must be a callable.*0\.5"
    ),
    "bias_init not callable": Bad(
        "b c -> b d", dict(LINEAR, bias_shape="d", bias_init="zeros"), r"bias_init must be a"
    ),
    "dot_general not callable": Bad(
        "b c -> b d", dict(LINEAR, dot_general="dot"), r"dot_general must be a callable.*'dot'"
    ),
    "sizes not a mapping": Bad(
        "b c -> b d", dict(weight_shape="c d", sizes=[("c", 4)], d=3), r"sizes must be a mapping"
    ),
    "sizes with a non-string key": Bad(
        "b c -> b d", dict(sizes={1: 4}, c=4, d=3), r"sizes .*axis names.*1"
    ),
    "weight_init returning ints": Bad(
        "b c -> b d",
        dict(LINEAR, weight_init=lambda k, s, d: jnp.ones(s, jnp.int32)),
        r"weight_init returned dtype int32, expected float32",
    ),
    "weight_init returning strings": Bad(
        "b c -> b d",
        dict(LINEAR, weight_init=lambda k, s, d: "zeros"),
        r"weight_init must return an array.*'zeros'",
    ),
    # lengths XLA can't index
    "length 2**62": Bad(
        "b c -> b d", dict(c=2**62, d=2), r"axis 'c': length 2\*\*62 is too large.*2\*\*56"
    ),
    "product 2**62": Bad(
        "b c -> b d", dict(c=2**31, d=2**31), r"weight.*2\*\*62 elements.*too large"
    ),
    "length 2**63": Bad("b c -> b d", dict(c=2**63, d=2), r"too large"),
    "length 2**64": Bad("b c -> b d", dict(c=2**64, d=2), r"too large"),
    "input example too large": Bad(
        "b t c -> b t d", dict(t=2**40, c=2**20, d=2), r"input.*too large"
    ),
    "bias too large": Bad(
        "b t c -> b (t d)", dict(t=2**50, c=1, d=2**10, bias_shape="t d"), r"too large"
    ),
    # at apply, while tracing
    "wrong rank": Bad(
        "b t c -> b t d",
        LINEAR,
        r"input of shape \(2, 4\) has rank 2, expected 3 \(pattern 'b t c -> b t d'",
        x_shape=(2, 4),
    ),
    "rank too low for the ellipsis": Bad(
        "b ... c -> b ... d", LINEAR, r"rank 1, expected at least 2", x_shape=(4,)
    ),
    "contradicting length": Bad(
        "b t c -> b t d",
        LINEAR,
        r"axis 'c': expected 4, got 5 in input shape \(2, 3, 5\) \(pattern 'b t c -> b t d'",
        x_shape=(2, 3, 5),
    ),
    "contradicting composed length": Bad(
        "b t (h c) -> b t (h d)",
        HEADS,
        r"group \(h c\): expected 6 = 2 \* 3, got 7 in input shape \(2, 3, 7\)",
        x_shape=(2, 3, 7),
    ),
    "composed group that doesn't divide": Bad(
        "b (t c) -> b t d",
        LINEAR,
        r"group \(t c\) of length 7 is not divisible by the known 4 to give axis 't'",
        x_shape=(2, 7),
    ),
    "undeterminable lengths": Bad(
        "b (h w) c -> b h w d",
        LINEAR,
        r"cannot determine the lengths of axes 'h', 'w' in group \(h w\).*pattern",
        x_shape=(2, 6, 4),
    ),
    "unit axis that isn't 1": Bad(
        "b () c -> b d", LINEAR, r"axis '1': expected length 1, got 3", x_shape=(2, 3, 4)
    ),
    "weight of the wrong shape": Bad(
        "b c -> b d",
        LINEAR,
        r"params\['weight'\] has shape \(3, 4\), expected \(4, 3\) for 'c d'",
        x_shape=(2, 4),
        edit=lambda p: {"weight": p["weight"].T},
    ),
    "bias of the wrong shape": Bad(
        "b t (h c) -> b t (h d)",
        HEADS,
        r"params\['bias'\] has shape \(4, 2\), expected \(2, 4\) for 'h d'",
        x_shape=(2, 3, 6),
        edit=lambda p: {**p, "bias": p["bias"].T},
    ),
    "missing bias": Bad(
        "b t (h c) -> b t (h d)",
        HEADS,
        r"params has entries \['weight'\], expected \['bias', 'weight'\]",
        x_shape=(2, 3, 6),
        edit=lambda p: {"weight": p["weight"]},
    ),
    "unexpected entry": Bad(
        "b c -> b d",
        LINEAR,
        r"params has entries \['scale', 'weight'\]",
        x_shape=(2, 4),
        edit=lambda p: {**p, "scale": p["weight"]},
    ),
    "params not a dict": Bad(
        "b c -> b d",
        LINEAR,
        r"params must be a mapping .*with a 'weight' entry, got list",
        x_shape=(2, 4),
        edit=lambda p: [p["weight"]],
    ),
}


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_errors(bad: Bad):
    if bad.x_shape is None:
        with pytest.raises(einops.EinopsError, match=bad.match) as info:
            em.init(bad.pattern, jax.random.key(0), **bad.kwargs)
    else:
        params, apply = em.init(bad.pattern, jax.random.key(0), **bad.kwargs)
        if bad.edit is not None:
            params = bad.edit(params)
        with pytest.raises(einops.EinopsError, match=bad.match) as info:
            jax.jit(apply)(params, np.ones(bad.x_shape, np.float32))
        with pytest.raises(einops.EinopsError, match=bad.match):
            apply(params, np.ones(bad.x_shape, np.float32))
    assert isinstance(info.value, em.EinMixError)
    if isinstance(bad.pattern, str) and bad.x_shape is not None:
        assert f"pattern {bad.pattern!r}" in str(info.value)


def test_weight_init_of_the_wrong_shape():
    with pytest.raises(einops.EinopsError, match=r"weight_init returned shape \(3,\), expected"):
        em.init("b c -> b d", jax.random.key(0), weight_init=lambda k, s, d: np.zeros(3), **LINEAR)


def test_weight_init_returning_a_list_is_read_as_an_array():
    mix = em.layer("b c -> b d", weight_init=lambda k, s, d: [[1, 2], [3, 4]], c=2, d=2)
    weight = mix.init(jax.random.key(0))["weight"]
    assert weight.dtype == np.float32
    np.testing.assert_array_equal(weight, [[1.0, 2.0], [3.0, 4.0]])


def test_bad_params_at_apply_name_the_entry():
    apply = em.layer("b c -> b d", c=2, d=2)
    with pytest.raises(em.EinMixError, match=r"params\['weight'\] must be an array of numbers"):
        apply({"weight": [[1.0, None], [2.0, 3.0]]}, np.ones((1, 2), np.float32))


def test_init_bias_without_a_bias():
    mix = em.layer("b c -> b d", **LINEAR)
    with pytest.raises(einops.EinopsError, match="has no bias"):
        mix.init_bias(jax.random.key(0))

"""Property tests: random valid configurations match the reference; random invalid ones raise
``EinopsError`` and nothing else."""

from __future__ import annotations

import keyword
import math

import einops
import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import einmix_jax as em

from .reference import default_weight_shape, flat_axes, reference_einmix, tokens


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


NAME = st.from_regex(r"[a-z][a-z0-9]{0,3}", fullmatch=True).filter(
    lambda name: not keyword.iskeyword(name) and name != "axis"
)
ROLES = ("batch", "contracted", "x free", "w free", "summed")  # see einmix_jax/_lower.py


def _groups(draw, names: list[str]) -> list[list[str]]:
    """Split ``names`` into consecutive groups (each is parenthesised when it has several)."""
    groups: list[list[str]] = []
    for name in names:
        if groups and draw(st.integers(0, 2)) == 0:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _text(groups: list[list[str]]) -> str:
    return " ".join(g[0] if len(g) == 1 else f"({' '.join(g)})" for g in groups)


@st.composite
def valid_configs(draw) -> dict:
    """A random valid EinMix configuration, an input shape and a seed."""
    names = draw(st.lists(NAME, min_size=1, max_size=6, unique=True))
    roles = {n: draw(st.sampled_from(ROLES)) for n in names}
    ellipsis = draw(st.booleans())
    if not ellipsis:  # keep both sides non-empty
        roles[names[0]] = "batch"
    x_axes = draw(st.permutations([n for n in names if roles[n] != "w free"]))
    out_axes = draw(
        st.permutations([n for n in names if roles[n] in ("batch", "x free", "w free")])
    )
    w_axes = draw(
        st.permutations([n for n in names if roles[n] in ("batch", "contracted", "w free")])
    )
    sizes = {n: draw(st.integers(1, 4)) for n in names}

    left = _groups(draw, list(x_axes))
    right = _groups(draw, list(out_axes))
    for side in (left, right):  # unit axes, '1' or '()'
        for _ in range(draw(st.integers(0, 1))):
            side.insert(draw(st.integers(0, len(side))), [draw(st.sampled_from(["1", "()"]))])
    ellipsis_shape: tuple[int, ...] = ()
    if ellipsis:
        ellipsis_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        left.insert(draw(st.integers(0, len(left))), ["..."])
        at = draw(st.integers(0, len(right)))
        if at < len(right) and right[at][0] not in ("1", "()") and draw(st.booleans()):
            right[at].insert(draw(st.integers(0, len(right[at]))), "...")  # (... d) on the right
        else:
            right.insert(at, ["..."])
    pattern = f"{_text(left)} -> {_text(right)}"

    flat_out = flat_axes(_text(right))
    after = flat_out[flat_out.index("...") + 1 :] if ellipsis else flat_out
    bias_axes = None
    if after and draw(st.booleans()):
        bias_axes = draw(
            st.permutations(draw(st.lists(st.sampled_from(after), min_size=1, unique=True)))
        )

    # lengths: every weight and bias axis; others optional, at most one unknown per input group
    needed = set(w_axes) | set(bias_axes or ())
    axes = {}
    for group in left:
        unknown = draw(
            st.sampled_from([None, *(a for a in group if a in sizes and a not in needed)])
        )
        axes.update({a: sizes[a] for a in group if a in sizes and a != unknown})
    axes.update({a: sizes[a] for a in w_axes if a not in axes})
    axes.update({a: sizes[a] for a in needed if a not in axes})

    weight_shape: str | None = " ".join(w_axes)
    if default_weight_shape(pattern).split() == list(w_axes) and w_axes and draw(st.booleans()):
        weight_shape = None
    x_shape = []
    for group in left:
        if group == ["..."]:
            x_shape.extend(ellipsis_shape)
        else:
            x_shape.append(math.prod(sizes.get(a, 1) for a in group))
    return dict(
        pattern=pattern,
        weight_shape=weight_shape,
        bias_shape=None if bias_axes is None else " ".join(bias_axes),
        axes=axes,
        x_shape=tuple(x_shape),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_against_reference(config: dict, params: dict, apply: em.EinMix, x: np.ndarray):
    y = apply(params, x)
    bias = params.get("bias")
    expected = reference_einmix(
        config["pattern"],
        config["weight_shape"],
        config["bias_shape"],
        x,
        np.asarray(params["weight"]),
        None if bias is None else np.asarray(bias),
        config["axes"],
    )
    assert y.shape == expected.shape, (y.shape, expected.shape)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@_settings(40)
@given(valid_configs())
def test_valid_configurations_match_the_reference(config: dict):
    params, apply = em.init(
        config["pattern"],
        jax.random.key(config["seed"]),
        weight_shape=config["weight_shape"],
        bias_shape=config["bias_shape"],
        **config["axes"],
    )
    x = np.random.default_rng(config["seed"]).normal(size=config["x_shape"]).astype(np.float32)
    _check_against_reference(config, params, apply, x)


TOKENS = ["a", "b", "cc", "d1", "key", "...", "(", ")", "()", "1", "2", "->", "_", "a_"]
SIDE = st.lists(st.sampled_from([t for t in TOKENS if t != "->"]), max_size=5).map(" ".join)
PATTERN = st.one_of(
    st.tuples(SIDE, SIDE).map(" -> ".join),
    st.lists(st.sampled_from(TOKENS), max_size=7).map(" ".join),
    st.sampled_from([3, None, b"a -> b", ("a", "b")]),
)
BAD_LENGTH = st.sampled_from([0, -1, 2.5, "2", True, None])
LENGTH = st.one_of(st.integers(1, 3), BAD_LENGTH)


@st.composite
def arbitrary_configs(draw) -> dict:
    """Arguments drawn from a small token soup: nearly always invalid."""
    axes = draw(st.dictionaries(st.sampled_from(["a", "b", "cc", "d1", "key", "pattern"]), LENGTH))
    return dict(
        pattern=draw(PATTERN),
        weight_shape=draw(st.one_of(st.none(), SIDE, st.just(["a"]))),
        bias_shape=draw(st.one_of(st.none(), SIDE, st.sampled_from([3, ["a"]]))),
        axes=axes,
        x_shape=None,
        x_dims=draw(st.lists(st.integers(1, 3), max_size=3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _edit_tokens(draw, text: str) -> str:
    """``text`` with one token deleted, inserted or replaced."""
    toks = tokens(text.replace("->", " -> "))
    at = draw(st.integers(0, len(toks)))
    new = draw(st.sampled_from([*TOKENS, *toks] if toks else TOKENS))
    how = draw(st.sampled_from(["insert", "delete", "replace"]))
    if how == "insert" or at == len(toks):
        toks.insert(at, new)
    elif how == "delete":
        del toks[at]
    else:
        toks[at] = new
    return " ".join(toks)


@st.composite
def mutated_configs(draw) -> dict:
    """A valid configuration with one random change: sometimes still valid, mostly not."""
    config = dict(draw(valid_configs()), x_dims=[])
    axes, x_shape = dict(config["axes"]), list(config["x_shape"])
    names = sorted(axes)
    how = draw(
        st.sampled_from(
            ["drop length", "bad length", "other length", "new length", "x dim", "x rank",
             "pattern", "weight", "bias"]
        )
    )  # fmt: skip
    if how == "drop length" and names:
        del axes[draw(st.sampled_from(names))]
    elif how == "bad length" and names:
        axes[draw(st.sampled_from(names))] = draw(BAD_LENGTH)
    elif how == "other length" and names:
        axes[draw(st.sampled_from(names))] = draw(st.integers(1, 5))
    elif how == "new length":
        axes[draw(st.sampled_from(["zz", "key", "pattern", *flat_axes(config["pattern"])]))] = 2
    elif how == "x dim" and x_shape:
        x_shape[draw(st.integers(0, len(x_shape) - 1))] = draw(st.integers(1, 6))
    elif how == "x rank":
        if x_shape and draw(st.booleans()):
            del x_shape[draw(st.integers(0, len(x_shape) - 1))]
        else:
            x_shape.insert(draw(st.integers(0, len(x_shape))), draw(st.integers(1, 3)))
    elif how == "pattern":
        config["pattern"] = _edit_tokens(draw, config["pattern"])
    elif how == "weight":
        config["weight_shape"] = _edit_tokens(draw, config["weight_shape"] or "")
    elif how == "bias":
        config["bias_shape"] = _edit_tokens(draw, config["bias_shape"] or "")
    return dict(config, axes=axes, x_shape=tuple(x_shape))


def _plausible_shape(config: dict) -> tuple[int, ...]:
    """An input shape that fits the input side where the lengths are known (else random)."""
    dims = iter(config["x_dims"])
    shape = []
    groups, depth = [], 0
    for t in tokens(config["pattern"].split("->")[0]):
        if t == "(":
            depth += 1
            groups.append([])
        elif t == ")":
            depth -= 1
        elif depth:
            groups[-1].append(t)
        else:
            groups.append([t])
    for group in groups:
        if group == ["..."]:
            shape.extend(config["x_dims"][:1])
        elif all(a == "1" or a in config["axes"] for a in group):
            shape.append(math.prod(1 if a == "1" else config["axes"][a] for a in group))
        else:
            shape.append(next(dims, 2))
    return tuple(shape)


@_settings(150)
@given(st.one_of(arbitrary_configs(), mutated_configs()))
def test_arbitrary_configurations_raise_only_einops_errors(config: dict):
    try:
        params, apply = em.init(
            config["pattern"],
            jax.random.key(config["seed"]),
            weight_shape=config["weight_shape"],
            bias_shape=config["bias_shape"],
            **config["axes"],
        )
    except einops.EinopsError:
        return
    assert all(type(n) is int for n in config["axes"].values())
    shapes = [config["x_shape"]] if config["x_shape"] is not None else []
    shapes += [_plausible_shape(config), tuple(config["x_dims"])]
    for x_shape in shapes:
        x = np.random.default_rng(config["seed"]).normal(size=x_shape).astype(np.float32)
        try:
            apply(params, x)
        except einops.EinopsError:
            continue
        _check_against_reference(config, params, apply, x)

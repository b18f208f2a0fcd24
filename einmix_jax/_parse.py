"""Parsing: pattern, weight shape, bias shape and axis lengths -> a validated, hashable ``Plan``.

Nothing here touches arrays or JAX. Every rule of einops' EinMix mixin is checked once, when the
plan is built, and plans are cached on their (hashable) arguments.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Mapping
from typing import Any

from einops import EinopsError
from einops.parsing import ParsedExpression

from ._errors import EinMixError, axes_list, describe_call
from ._options import pass_length

ELLIPSIS = "…"  # einops' internal name for '...'

#: The most elements a param, or one example of the input or output, may have: ``2**56``. XLA
#: computes extents and byte sizes in int64, and initialising a param draws random bits of up to
#: 16 bytes per element, so ``2**56`` keeps every such count 8 times below ``2**63``; beyond it
#: XLA aborts the process ("overflow in static extent product") rather than raising.
MAX_ELEMENTS = 2**56


def _count(n: int) -> str:
    return f"2**{n.bit_length() - 1}" if n > 1 and n & (n - 1) == 0 else f"{n:,}"


def check_extent(what: str, n: int, context: str) -> None:
    """Refuse an array (or one example) of ``n`` elements that XLA could not index.

    Example:
        >>> check_extent('weight (2**31, 2**31)', 2**62, "pattern 'b c -> b d'")
        Traceback (most recent call last):
        ...
        einmix_jax._errors.EinMixError: weight (2**31, 2**31) has 2**62 elements: too large for XLA to index (EinMix allows at most 2**56 elements per param or example) (pattern 'b c -> b d')
    """
    if n > MAX_ELEMENTS:
        raise EinMixError(
            f"{what} has {_count(n)} elements: too large for XLA to index (EinMix allows at most "
            f"2**56 elements per param or example) ({context})"
        )


#: A group of an expression: a tuple of axis names (may hold ELLIPSIS), or ELLIPSIS alone for a
#: bare ``...``.
Group = tuple[str, ...] | str


@dataclasses.dataclass(frozen=True)
class Plan:
    """A parsed, validated EinMix configuration; hashable, so it can be a static jit argument.

    Example:
        >>> plan = parse('b t (h c) -> b t (h d)', 'h c d', 'h d', (('h', 2), ('c', 3), ('d', 4)))
        >>> plan.weight_axes, plan.weight_sizes, plan.bias_sizes, plan.fan_in
        (('h', 'c', 'd'), (2, 3, 4), (2, 4), 3)
    """

    pattern: str
    weight_shape: str
    bias_shape: str | None
    axes: tuple[tuple[str, int], ...]  #: lengths the user gave, in the order given
    left: tuple[Group, ...]  #: input composition
    right: tuple[Group, ...]  #: output composition
    weight_axes: tuple[str, ...]
    bias_axes: tuple[str, ...] | None  #: None when there is no bias
    weight_sizes: tuple[int, ...]
    bias_sizes: tuple[int, ...] | None
    fan_in: int  #: product of the weight axes absent from the output

    @property
    def sizes(self) -> dict[str, int]:
        """The lengths known without looking at an input."""
        return dict(self.axes)

    def context(self) -> str:
        """The configuration in the user's words, for error messages."""
        return describe_call(self.pattern, self.weight_shape, self.bias_shape)

    def __repr__(self) -> str:
        args = [repr(self.pattern), repr(self.weight_shape)]
        if self.bias_shape is not None:
            args.append(repr(self.bias_shape))
        args += [f"{name}={length}" for name, length in self.axes]
        return f"EinMix({', '.join(args)})"


def _composition(expr: ParsedExpression) -> tuple[Group, ...]:
    return tuple(g if isinstance(g, str) else tuple(g) for g in expr.composition)


def _parse_expression(text: str, what: str) -> ParsedExpression:
    try:
        return ParsedExpression(text)
    except EinopsError as e:
        raise EinMixError(f"cannot parse {what} {text!r}: {e}") from None


def infer_weight_shape(pattern: str) -> str:
    """The default weight axes: axes only in the input, then axes only in the output.

    Example:
        >>> infer_weight_shape('b t c -> b t d'), infer_weight_shape('b t c -> b u c')
        ('c d', 't u')
    """
    left_text, right_text = _split_pattern(pattern)
    left = _parse_expression(left_text, "input side")
    right = _parse_expression(right_text, "output side")
    # str only: numeric axes are not weight axes (parse() rejects them with a clear message)
    in_order = [
        a for g in left.composition if not isinstance(g, str) for a in g if isinstance(a, str)
    ]
    out_order = [
        a for g in right.composition if not isinstance(g, str) for a in g if isinstance(a, str)
    ]
    axes = [a for a in in_order if a not in right.identifiers and a != ELLIPSIS]
    axes += [a for a in out_order if a not in left.identifiers and a != ELLIPSIS]
    if not axes:
        raise EinMixError(
            f"cannot infer the weight axes of {pattern!r}: no axis is only in the input or only in "
            "the output; pass weight_shape='...' naming the weight's axes"
        )
    return " ".join(axes)


def _split_pattern(pattern: object) -> tuple[str, str]:
    if not isinstance(pattern, str):
        raise EinMixError(f"pattern must be a string like 'b c -> b d', got {pattern!r}")
    if pattern.count("->") != 1:
        raise EinMixError(
            f"pattern {pattern!r} must contain exactly one '->' between input and output axes"
        )
    left, right = pattern.split("->")
    return left, right


def normalize_axes(axes: Mapping[str, Any], context: str) -> tuple[tuple[str, int], ...]:
    """Check that every axis length is a positive integer; return them as a hashable tuple.

    Example:
        >>> normalize_axes({'c': 3}, "pattern 'b c -> b d'")
        (('c', 3),)
    """
    out = []
    for name, length in axes.items():
        try:
            value = operator.index(length)
        except TypeError:
            value = None
        if value is None or isinstance(length, bool) or value <= 0:
            raise EinMixError(
                f"axis {name!r}: length must be a positive integer, got {length!r} ({context})"
            )
        if value > MAX_ELEMENTS:
            raise EinMixError(
                f"axis {name!r}: length {_count(value)} is too large for XLA to index (EinMix "
                f"allows at most 2**56 elements per param or example) ({context})"
            )
        out.append((name, value))
    return tuple(out)


def parse(
    pattern: str,
    weight_shape: str | None,
    bias_shape: str | None,
    axes: tuple[tuple[str, int], ...],
) -> Plan:
    """Validate a configuration and build its plan (cached on the hashable arguments).

    ``weight_shape=None`` infers the weight axes (see :func:`infer_weight_shape`).

    Example:
        >>> parse('b c -> b d', None, 'd', (('c', 3), ('d', 4))).weight_shape
        'c d'
    """
    check_texts(pattern, weight_shape, bias_shape)
    return _parse_cached(pattern, weight_shape, bias_shape, axes)


def check_texts(pattern: object, weight_shape: object, bias_shape: object) -> None:
    """The pattern is a string (or a parsed ``Plan``), ``weight_shape`` and ``bias_shape`` strings
    or None: every form checks this first, before anything hashes or parses them.

    Example:
        >>> check_texts(['b c -> b d'], None, None)
        Traceback (most recent call last):
        ...
        einmix_jax._errors.EinMixError: pattern must be a string like 'b c -> b d', got ['b c -> b d']
    """
    if not isinstance(pattern, (str, Plan)):
        raise EinMixError(f"pattern must be a string like 'b c -> b d', got {pattern!r}")
    text = pattern if isinstance(pattern, str) else pattern.pattern
    for name, value in (("weight_shape", weight_shape), ("bias_shape", bias_shape)):
        if isinstance(value, int) and not isinstance(value, bool):  # a length for such an axis
            raise EinMixError(
                f"{name}={value!r} is not a valid {name} option: to give the length of an axis "
                f"named {name!r}, pass sizes={{{name!r}: {value!r}}} (pattern {text!r})"
            )
    if weight_shape is not None and not isinstance(weight_shape, str):
        raise EinMixError(
            f"weight_shape must be a string naming the weight axes (e.g. 'c d') or None, got "
            f"{weight_shape!r} (pattern {text!r})"
        )
    if bias_shape is not None and not isinstance(bias_shape, str):
        raise EinMixError(
            f"bias_shape must be a string naming the bias axes (e.g. 'd') or None, got "
            f"{bias_shape!r} ({describe_call(text, weight_shape, None)})"
        )


@functools.lru_cache(maxsize=1024)
def _parse_cached(
    pattern: str,
    weight_shape: str | None,
    bias_shape: str | None,
    axes: tuple[tuple[str, int], ...],
) -> Plan:
    left_text, right_text = _split_pattern(pattern)
    if weight_shape is None:
        weight_shape = infer_weight_shape(pattern)
    ctx = describe_call(pattern, weight_shape, bias_shape)
    left = _parse_expression(left_text, "input side")
    right = _parse_expression(right_text, "output side")
    weight = _parse_expression(weight_shape, "weight_shape")
    lengths = dict(axes)

    unknown = {
        a
        for a in right.identifiers - left.identifiers - weight.identifiers
        if isinstance(a, str) and a != ELLIPSIS  # numbers and '...' have checks of their own
    }
    if unknown:
        raise EinMixError(
            f"axes {axes_list(unknown)} on the output side are neither in the input nor in the "
            f"weight ({ctx})"
        )
    if weight.has_ellipsis:
        raise EinMixError(
            f"'...' is not allowed in weight_shape: its shape must be explicit ({ctx})"
        )
    if left.has_ellipsis != right.has_ellipsis:
        raise EinMixError(f"'...' must be on both sides of the pattern or on neither ({ctx})")
    if left.has_ellipsis_parenthesized:
        raise EinMixError(f"'...' cannot be in parentheses on the input side ({ctx})")
    for expr, what in ((left, "input side"), (right, "output side"), (weight, "weight_shape")):
        if expr.has_non_unitary_anonymous_axes:
            raise EinMixError(
                f"numeric axes other than 1 are not allowed in EinMix ({what}; {ctx}); name the "
                "axis and pass its length instead"
            )
    if (
        "(" in weight_shape
        or ")" in weight_shape
        or any(not isinstance(g, str) and len(g) != 1 for g in weight.composition)
    ):
        raise EinMixError(f"parentheses and '1' are not allowed in weight_shape ({ctx})")
    weight_axes = tuple(g[0] for g in weight.composition)

    missing = [a for a in weight_axes if a not in lengths]
    if missing:
        raise EinMixError(
            f"weight axes {axes_list(missing)} need a length: pass e.g. {pass_length(missing[0])} "
            f"({ctx})"
        )
    unused = set(lengths) - left.identifiers - weight.identifiers
    if unused:
        raise EinMixError(
            f"lengths given for axes {axes_list(unused)} that are neither in the input nor in the "
            f"weight ({ctx})"
        )
    redundant = weight.identifiers - left.identifiers - right.identifiers
    if redundant:
        raise EinMixError(
            f"weight axes {axes_list(redundant)} are in neither side of the pattern ({ctx})"
        )

    bias_axes = bias_sizes = None
    if bias_shape is not None:
        bias = _parse_expression(bias_shape, "bias_shape")
        if (
            "(" in bias_shape
            or ")" in bias_shape
            or bias.has_ellipsis
            or bias.has_non_unitary_anonymous_axes
            or any(len(g) != 1 for g in bias.composition)
        ):
            raise EinMixError(
                f"bias_shape must list axis names only, without '...', parentheses or '1' ({ctx})"
            )
        bias_axes = tuple(g[0] for g in bias.composition)
        absent = bias.identifiers - right.identifiers
        if absent:
            raise EinMixError(f"bias axes {axes_list(absent)} are not in the output ({ctx})")
        unsized = bias.identifiers - set(lengths)
        if unsized:
            raise EinMixError(
                f"bias axes {axes_list(unsized)} need a length: pass e.g. "
                f"{pass_length(sorted(unsized)[0])} ({ctx})"
            )
        seen_bias_axis = None
        for group in right.composition:
            for axis in [group] if isinstance(group, str) else group:
                if axis == ELLIPSIS and seen_bias_axis is not None:
                    raise EinMixError(
                        f"bias axis {seen_bias_axis!r} stands before '...' in the output; bias "
                        f"axes must come after the ellipsis ({ctx})"
                    )
                if axis in bias.identifiers:
                    seen_bias_axis = axis
        bias_sizes = tuple(lengths[a] for a in bias_axes)

    weight_sizes = tuple(lengths[a] for a in weight_axes)

    def shape_text(sizes: tuple[int, ...]) -> str:
        return "(" + ", ".join(_count(n) for n in sizes) + ("," if len(sizes) == 1 else "") + ")"

    check_extent(f"the weight {shape_text(weight_sizes)}", math.prod(weight_sizes), ctx)
    if bias_sizes is not None:
        check_extent(f"the bias {shape_text(bias_sizes)}", math.prod(bias_sizes), ctx)
    for side, expr in (("input", left), ("output", right)):
        known = [a for a in expr.identifiers if a in lengths]
        check_extent(
            f"one {side} example (axes {axes_list(known)})",
            math.prod(lengths[a] for a in known),
            ctx,
        )

    return Plan(
        pattern=pattern,
        weight_shape=weight_shape,
        bias_shape=bias_shape,
        axes=axes,
        left=_composition(left),
        right=_composition(right),
        weight_axes=weight_axes,
        bias_axes=bias_axes,
        weight_sizes=weight_sizes,
        bias_sizes=bias_sizes,
        fan_in=math.prod(lengths[a] for a in weight_axes if a not in right.identifiers),
    )


def param_sizes_from_input(
    pattern: str,
    weight_shape: str | None,
    bias_shape: str | None,
    axes: tuple[tuple[str, int], ...],
    x_shape: tuple[int, ...],
) -> tuple[tuple[str, int], ...]:
    """``axes`` completed with the weight and bias lengths that an input of ``x_shape`` fixes.

    Only the axes the params need are read off the input, so batch-like axes stay free. This is
    how the Flax layers infer sizes at init, as ``nn.Dense`` reads its input features.

    Example:
        >>> param_sizes_from_input('b t (h c) -> b t (h d)', 'h c d', None, (('h', 2), ('d', 5)), (7, 3, 8))
        (('h', 2), ('d', 5), ('c', 4))
    """
    left_text, _ = _split_pattern(pattern)
    if weight_shape is None:
        weight_shape = infer_weight_shape(pattern)
    ctx = describe_call(pattern, weight_shape, bias_shape)
    left = _composition(_parse_expression(left_text, "input side"))
    sizes, _ = read_sizes(left, dict(axes), tuple(x_shape), ctx)
    needed = set(_parse_expression(weight_shape, "weight_shape").identifiers)
    if isinstance(bias_shape, str):
        needed |= _parse_expression(bias_shape, "bias_shape").identifiers
    given = dict(axes)
    return axes + tuple((a, n) for a, n in sizes.items() if a in needed and a not in given)


def read_sizes(
    left: tuple[Group, ...], known: dict[str, int], x_shape: tuple[int, ...], ctx: str
) -> tuple[dict[str, int], int]:
    """Check ``x_shape`` against the input composition ``left``; infer the unknown lengths.

    Returns ``known`` completed with every axis the input determines, and the ellipsis rank.
    Raises ``EinMixError`` naming the axis on a wrong rank, a contradicting length or a group
    whose lengths can't be determined. ``ctx`` is appended to messages.
    """
    sizes = dict(known)
    n_named = sum(1 for g in left if g != ELLIPSIS)
    has_ellipsis = ELLIPSIS in left
    if (len(x_shape) != n_named) if not has_ellipsis else (len(x_shape) < n_named):
        expected = f"at least {n_named}" if has_ellipsis else str(n_named)
        raise EinMixError(
            f"input of shape {x_shape} has rank {len(x_shape)}, expected {expected} ({ctx})"
        )
    n_ellipsis = len(x_shape) - n_named
    dims = iter(x_shape)
    for group in left:
        if group == ELLIPSIS:
            for _ in range(n_ellipsis):
                next(dims)
            continue
        length = next(dims)
        unknown = [a for a in group if a not in sizes]
        known_product = math.prod(sizes[a] for a in group if a in sizes)
        where = f"in input shape {x_shape} ({ctx})"
        if not group:
            if length != 1:
                raise EinMixError(f"axis '1': expected length 1, got {length} {where}")
        elif not unknown:
            if known_product != length:
                name = f"axis {group[0]!r}" if len(group) == 1 else f"group ({' '.join(group)})"
                detail = "" if len(group) == 1 else f" = {' * '.join(str(sizes[a]) for a in group)}"
                raise EinMixError(f"{name}: expected {known_product}{detail}, got {length} {where}")
        elif len(unknown) == 1:
            if length % known_product:
                raise EinMixError(
                    f"group ({' '.join(group)}) of length {length} is not divisible by the "
                    f"known {known_product} to give axis {unknown[0]!r} {where}"
                )
            sizes[unknown[0]] = length // known_product
        else:
            raise EinMixError(
                f"cannot determine the lengths of axes {', '.join(map(repr, unknown))} in group "
                f"({' '.join(group)}) of length {length}: pass all but one of them {where}"
            )
    return sizes, n_ellipsis


def resolve_sizes(plan: Plan, x_shape: tuple[int, ...]) -> tuple[dict[str, int], int]:
    """Read every axis length off the plan and the input shape; return them and the ellipsis rank.

    The axes ``...`` stands for are named ``'...0'``, ``'...1'``, ... (see :func:`expand_groups`).

    Example:
        >>> plan = parse('(b t) c -> b t d', 'c d', None, (('t', 3), ('c', 4), ('d', 2)))
        >>> resolve_sizes(plan, (6, 4))
        ({'t': 3, 'c': 4, 'd': 2, 'b': 2}, 0)
    """
    sizes, n_ellipsis = read_sizes(plan.left, plan.sizes, x_shape, plan.context())
    if n_ellipsis:
        start = plan.left.index(ELLIPSIS)
        sizes.update((f"...{i}", x_shape[start + i]) for i in range(n_ellipsis))
    return sizes, n_ellipsis


def expand_groups(groups: tuple, n_ellipsis: int) -> list[tuple[str, ...]]:
    """Groups with '...' replaced by its axes; a bare '...' becomes one group per axis."""
    names = tuple(f"...{i}" for i in range(n_ellipsis))
    out: list[tuple[str, ...]] = []
    for g in groups:
        if g == ELLIPSIS:
            out.extend((n,) for n in names)
        else:
            out.append(tuple(n for a in g for n in (names if a == ELLIPSIS else (a,))))
    return out

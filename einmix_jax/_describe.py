"""Introspection: ``describe(layer, x_shape)`` -- what one EinMix call does, step by step.

Everything here is read off the ``Lowering`` that ``apply`` executes (``lower(plan, x_shape)``);
nothing is planned twice. The steps are listed in the order ``_core.execute`` runs them, with the
axis names of every dimension, so a surprising pattern can be traced to the reshape, transpose
or broadcast that it costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ._core import EinMix, layer
from ._errors import EinMixError, describe_call
from ._lower import Lowering, expand_groups, lower
from ._options import index, merge_sizes
from ._parse import ELLIPSIS, normalize_axes, param_sizes_from_input

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Step:
    """One shape operation: ``operand`` (``'x'``, ``'weight'``, ``'y'`` or ``'bias'``) goes
    through ``op`` (``'reshape'``, ``'sum'``, ``'transpose'``, ``'broadcast'``, ``'pack'``,
    ``'dot_general'`` or ``'add'``) with argument ``arg`` (a shape, axes, a permutation, a group
    count or dimension numbers) and comes out with ``shape``, whose dimensions hold the axes
    ``labels``."""

    operand: str
    op: str
    arg: Any
    shape: Shape
    labels: tuple[str, ...]
    note: str = ""  #: e.g. the names of the axes a sum removes

    def __str__(self) -> str:
        dims = _dims(self.labels, self.shape)
        if self.op == "reshape":
            return f"{self.operand}: reshape to {dims}"
        if self.op == "sum":
            return f"{self.operand}: sum over {self.note} (dims {self.arg}) -> {dims}"
        if self.op == "transpose":
            return f"{self.operand}: transpose {self.arg} -> {dims}"
        if self.op == "broadcast":
            return f"{self.operand}: broadcast to {dims}"
        if self.op == "pack":
            return (
                f"{self.operand}: pack {self.arg} groups of {self.note} block-diagonally "
                f"(zero off the diagonal) -> {dims}"
            )
        if self.op == "add":
            return f"y: add bias reshaped to {_dims(self.labels, self.arg)}"
        raise AssertionError(self.op)


@dataclasses.dataclass(frozen=True, repr=False)
class Description:
    """What one call of an EinMix layer does for one input shape; ``print`` it for a summary.

    Attributes:
        layer: the functional layer described.
        x_shape: the input shape.
        lowering: the shape-only plan that ``apply`` executes.
        before: steps on ``x`` and on the weight before the contraction.
        contraction: the one ``lax.dot_general`` (its ``arg`` is ``(lhs_shape, rhs_shape,
            dimension_numbers)``, its ``operand`` says which of x and the weight is the lhs).
            With ``loop``, the dot runs once per slice of x's first dimension (``lax.map``):
            ``arg`` is one iteration's, ``shape`` the stacked result's.
        after: steps on the contraction's result (and the bias add) to the output.
        out_shape: the output shape.
        param_count: number of weight and bias entries.
        dot_flops: ``2 * multiply-adds`` of the contraction (the layer's, whatever the lowering).
        flops: ``dot_flops`` plus the additions of the bias and of any axis summed away.
        executed_dot_flops: what the ``dot_general`` runs: ``dot_flops``, or ``k`` times that
            with ``k`` groups packed block-diagonally (the zeros are multiplied too).
    """

    layer: EinMix
    x_shape: Shape
    lowering: Lowering
    before: tuple[Step, ...]
    contraction: Step
    loop: int | None  #: iterations of ``lax.map`` around the dot; None: a single dot
    after: tuple[Step, ...]
    out_shape: Shape
    param_count: int
    dot_flops: int
    flops: int
    executed_dot_flops: int  #: what the dot computes: more than dot_flops when block-diagonal

    @property
    def strategy(self) -> str:
        """The lowering picked: ``'x first'``, ``'w first'``, ``'broadcast batch'``, ``'loop'``,
        ``'block-diagonal'`` or (the Flax layers) ``'weight as stored'``."""
        return self.lowering.strategy

    @property
    def rearranges(self) -> tuple[Step, ...]:
        """The transposes, broadcasts and packings (the steps that move data; reshapes are free)."""
        moves = ("transpose", "broadcast", "pack")
        return tuple(s for s in self.before + self.after if s.op in moves)

    def __str__(self) -> str:
        shapes = self.layer.param_shapes
        params = " + ".join(f"{name} {shape}" for name, shape in shapes.items())
        extra = self.flops - self.dot_flops
        lhs, rhs, dims = self.contraction.arg
        names = ("x", "weight") if self.contraction.operand == "x" else ("weight", "x")
        lines = [
            f"{self.layer!r}",
            f"  input {self.x_shape} -> output {self.out_shape}",
            f"  params: {params} = {self.param_count:,}",
            f"  FLOPs per call: {self.flops:,}"
            + (f" (dot_general {self.dot_flops:,} + adds {extra:,})" if extra else ""),
            "  before the contraction:",
            *(f"    {s}" for s in self.before or ["(nothing: operands used as laid out)"]),
            f"  contraction ({self.strategy}):",
            *(
                [f"    lax.map over {_dims(self.contraction.labels[:1], (self.loop,))} of"]
                if self.loop is not None
                else []
            ),
            f"    lax.dot_general({names[0]} {lhs}, {names[1]} {rhs},",
            f"                    dimension_numbers={dims})",
            f"    -> {_dims(self.contraction.labels, self.contraction.shape)}",
            *(
                [f"    (runs {self.executed_dot_flops:,} FLOPs: the zeros off the diagonal too)"]
                if self.executed_dot_flops != self.dot_flops
                else []
            ),
            "  after the contraction:",
            *(f"    {s}" for s in self.after or ["(nothing: the result is the output)"]),
        ]
        moved = self.rearranges
        lines.append(
            f"  data moved by transposes/broadcasts: {sum(math.prod(s.shape) for s in moved):,}"
            " elements"
            if moved
            else "  no transpose or broadcast: only free reshapes around one dot_general"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:  # the summary, also in a REPL
        return str(self)


def describe(
    layer_or_pattern: Any,
    x_shape: Any,
    /,
    weight_shape: str | None = None,
    bias_shape: str | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
    **axes: int,
) -> Description:
    """Describe what one EinMix call does for an input of ``x_shape``; ``print`` the result.

    Args:
        layer_or_pattern: a functional layer (from :func:`einmix_jax.layer` or
            :func:`einmix_jax.init`), a ``einmix_jax.linen.EinMix``, ``einmix_jax.nnx.EinMix`` or
            ``einmix_jax.eqx.EinMix`` module (a Flax layer is described with the lowering it
            runs: the weight as stored, see ``einmix_jax._lower``), or a pattern string (then ``weight_shape``, ``bias_shape`` and ``axes`` as
            for :func:`einmix_jax.layer`; weight and bias lengths the input fixes may be left out).
        x_shape: the input shape, a tuple of non-negative integers, or anything with a
            ``.shape`` (an array, a ``jax.ShapeDtypeStruct``).
        weight_shape: only with a pattern string: the weight's axes.
        bias_shape: only with a pattern string: the bias's axes.
        sizes: only with a pattern string: axis lengths as a mapping, for any axis name (also
            one named like an argument).
        **axes: only with a pattern string: axis lengths.

    Example:
        >>> d = em.describe('b t c -> b t d', (2, 5, 4), bias_shape='d', d=3)
        >>> d.out_shape, d.param_count, d.flops  # 2*(2*5*4*3) for the dot, 2*5*3 for the bias
        ((2, 5, 3), 15, 270)
        >>> print(d)
        EinMix('b t c -> b t d', 'c d', 'd', d=3, c=4)
          input (2, 5, 4) -> output (2, 5, 3)
          params: weight (4, 3) + bias (3,) = 15
          FLOPs per call: 270 (dot_general 240 + adds 30)
          before the contraction:
            x: reshape to ((b t)=10, c=4)
          contraction (x first):
            lax.dot_general(x (10, 4), weight (4, 3),
                            dimension_numbers=(((1,), (0,)), ((), ())))
            -> ((b t)=10, d=3)
          after the contraction:
            y: reshape to (b=2, t=5, d=3)
            y: add bias reshaped to (b=1, t=1, d=3)
          no transpose or broadcast: only free reshapes around one dot_general
    """
    shape = _shape(x_shape)
    if isinstance(layer_or_pattern, str):
        context = describe_call(layer_or_pattern, weight_shape, bias_shape)
        given = normalize_axes(merge_sizes(sizes, axes, context), context)
        completed = param_sizes_from_input(layer_or_pattern, weight_shape, bias_shape, given, shape)
        mix = layer(layer_or_pattern, weight_shape, bias_shape, sizes=dict(completed))
        weight_as_stored = False
    else:
        if weight_shape is not None or bias_shape is not None or sizes is not None or axes:
            raise EinMixError(
                "weight_shape, bias_shape and axis lengths go with a pattern string; "
                f"{type(layer_or_pattern).__name__} already carries them"
            )
        mix = _functional(layer_or_pattern, shape)
        # the Flax layers run the lowering that hands dot_general the weight as stored
        weight_as_stored = bool(getattr(type(layer_or_pattern), "weight_as_stored", False))
    return _describe(mix, shape, weight_as_stored)


def _shape(x_shape: Any) -> Shape:
    """``x_shape`` (or its ``.shape``) as a tuple of non-negative ints, else an ``EinMixError``."""
    shape = getattr(x_shape, "shape", x_shape)
    if isinstance(shape, (tuple, list)):
        dims = [index(n) for n in shape]
        if all(n is not None and n >= 0 for n in dims):
            return tuple(n for n in dims if n is not None)
    raise EinMixError(
        f"x_shape must be a tuple of non-negative integers (or an array), got {x_shape!r}"
    )


def _functional(obj: Any, x_shape: Shape) -> EinMix:
    """The functional layer behind a functional, linen or NNX EinMix."""
    if isinstance(obj, EinMix):
        return obj
    functional = getattr(obj, "functional", None)
    if isinstance(functional, EinMix):  # nnx: an attribute
        return functional
    if callable(functional):  # linen: sizes may be read off the input
        mix = functional(x_shape)
        if isinstance(mix, EinMix):
            return mix
    raise EinMixError(
        "describe() takes an EinMix layer (einmix_jax.layer/init, einmix_jax.linen.EinMix or "
        f"einmix_jax.nnx.EinMix) or a pattern string, got {type(obj).__name__}"
    )


def _dims(labels: tuple[str, ...], shape: Shape) -> str:
    dims = [a if a == "1" else f"{a}={n}" for a, n in zip(labels, shape, strict=True)]
    return "(" + ", ".join(dims) + ")"


def _label(run: list[str]) -> str:
    return "1" if not run else run[0] if len(run) == 1 else "(" + " ".join(run) + ")"


def _group(names: list[str], shape: Shape, sizes: dict[str, int]) -> tuple[str, ...]:
    """Labels for ``shape``, whose dimensions merge consecutive runs of ``names`` (display only)."""
    if [sizes[a] for a in names] == list(shape):
        return tuple(names)
    runs: list[list[str]] = []
    i = 0
    for n in shape:
        run, product = [], 1
        if n == 1 and i < len(names) and sizes[names[i]] == 1:
            run.append(names[i])  # a unit dimension takes the next unit axis
            i += 1
        while i < len(names) and product < n:
            run.append(names[i])
            product *= sizes[names[i]]
            i += 1
        while i < len(names) and sizes[names[i]] == 1 and len(names) - i > len(shape) - len(runs):
            run.append(names[i])  # a unit axis that the later dimensions can spare
            i += 1
        runs.append(run)
    runs[-1] += names[i:]
    return tuple(_label(r) for r in runs)


def _permuted(names: list[str], perm: tuple[int, ...] | None) -> list[str]:
    return names if perm is None else [names[p] for p in perm]


def _describe(mix: EinMix, x_shape: Shape, weight_as_stored: bool = False) -> Description:
    """Read the steps of ``_core.execute`` off the lowering, labelling dimensions by axis."""
    # the Flax layers keep x as given when a hook may intercept the contraction (see lower)
    as_given = weight_as_stored and mix.dot_general is not None
    if as_given:
        low = lower(mix.plan, x_shape, stored_weight=True, x_as_given=True)
    else:
        low = lower(mix.plan, x_shape, stored_weight=weight_as_stored)
    x_axes, w_axes, out_axes = (list(a) for a in low.flat_axes)
    sizes = dict(zip(x_axes, low.x_flat_shape, strict=True))
    sizes.update(zip(out_axes, low.out_flat_shape, strict=True))
    sizes.update(zip(mix.plan.weight_axes, mix.plan.weight_sizes, strict=True))

    def shape_of(names: list[str]) -> Shape:
        return tuple(sizes[a] for a in names)

    def step(operand: str, op: str, arg: Any, names: list[str], shape: Shape | None = None) -> Step:
        shape = shape_of(names) if shape is None else shape
        return Step(operand, op, arg, shape, _group(names, shape, sizes))

    before: list[Step] = []
    # x: split groups, sum axes away, transpose, merge into the dot's operand
    names, current = x_axes, x_shape
    if low.x_flat_shape != current:
        before.append(step("x", "reshape", low.x_flat_shape, names))
    if low.sum_axes:
        names = [a for i, a in enumerate(x_axes) if i not in low.sum_axes]
        summed = " ".join(x_axes[i] for i in low.sum_axes)
        before.append(dataclasses.replace(step("x", "sum", low.sum_axes, names), note=summed))
    if low.x_perm is not None:
        names = _permuted(names, low.x_perm)
        before.append(step("x", "transpose", low.x_perm, names))
    current = before[-1].shape if before else x_shape
    if low.x_dot_shape != current:
        before.append(step("x", "reshape", low.x_dot_shape, names, low.x_dot_shape))
    x_labels = _group(names, low.x_dot_shape, sizes)
    x_order = names

    # the weight: transpose, broadcast along the x-only batch axes, merge into the dot's operand
    names, current = w_axes, mix.plan.weight_sizes
    if low.w_pack is not None:  # k groups on the diagonal of one block
        eye, at = low.w_pack
        pack = step("weight", "pack", eye[at], w_axes)
        before.append(dataclasses.replace(pack, note=w_axes[at].split(".")[0]))
        current = pack.shape
    if low.w_perm is not None:
        names = _permuted(names, low.w_perm)
        before.append(step("weight", "transpose", low.w_perm, names))
        current = before[-1].shape
    if low.w_broadcast is not None:
        unit, full = low.w_broadcast
        lead = x_order[: len(unit) - 2]
        labels = (*lead, *_group([a for a in names if a not in lead], unit[-2:], sizes))
        before.append(Step("weight", "reshape", unit, unit, labels))
        if full != unit:  # along axes of length 1 the reshape is all there is
            before.append(Step("weight", "broadcast", full, full, labels))
        names, current = [*lead, *(a for a in names if a not in lead)], full
    if low.w_dot_shape != current:
        before.append(step("weight", "reshape", low.w_dot_shape, names, low.w_dot_shape))
    w_labels = _group(names, low.w_dot_shape, sizes)

    # the contraction
    loop = low.x_dot_shape[0] if getattr(low, "loop", False) else None
    x_dot, x_dot_labels = low.x_dot_shape, x_labels
    if loop is not None:  # one iteration of lax.map sees x without its first dimension
        x_dot, x_dot_labels = x_dot[1:], x_dot_labels[1:]
    lhs, rhs, lhs_labels, rhs_labels = x_dot, low.w_dot_shape, x_dot_labels, w_labels
    if not low.x_first:
        lhs, rhs, lhs_labels, rhs_labels = rhs, lhs, rhs_labels, lhs_labels
    (lhs_k, rhs_k), (lhs_b, rhs_b) = low.dimension_numbers
    order = (
        [(0, i) for i in lhs_b]
        + [(0, i) for i in range(len(lhs)) if i not in lhs_k + lhs_b]
        + [(1, i) for i in range(len(rhs)) if i not in rhs_k + rhs_b]
    )
    dot_shape = tuple((lhs, rhs)[side][i] for side, i in order)
    dot_labels = tuple((lhs_labels, rhs_labels)[side][i] for side, i in order)
    dot_flops = 2 * math.prod(dot_shape) * math.prod(lhs[i] for i in lhs_k)
    if loop is not None:  # results stacked in front
        dot_shape, dot_labels, dot_flops = (
            (loop, *dot_shape),
            (x_labels[0], *dot_labels),
            dot_flops * loop,
        )
    packed_flops = dot_flops
    if low.w_pack is not None:  # the layer's FLOPs; the dot also multiplies the zeros
        dot_flops //= low.w_pack[0][low.w_pack[1]]
    operands = "x" if low.x_first else "weight"
    dims = (lhs, rhs, low.dimension_numbers)
    contraction = Step(operands, "dot_general", dims, dot_shape, dot_labels)

    # after: split merged dimensions, transpose to the output order, add the bias, merge groups
    after: list[Step] = []
    names = out_axes
    if low.y_perm is not None:
        names = [""] * len(out_axes)
        for i, p in enumerate(low.y_perm):
            names[p] = out_axes[i]
    if low.y_split_shape != dot_shape:
        after.append(step("y", "reshape", low.y_split_shape, names, low.y_split_shape))
    current = low.y_split_shape
    if low.bias_shape is not None:  # added in the dot's order, before the transpose
        bias_axes = list(mix.plan.bias_axes or ())
        if low.bias_perm is not None:
            bias_axes = _permuted(bias_axes, low.bias_perm)
            after.append(step("bias", "transpose", low.bias_perm, bias_axes))
        after.append(Step("bias", "add", low.bias_shape, low.y_split_shape, tuple(names)))
    if low.y_perm is not None:
        after.append(step("y", "transpose", low.y_perm, out_axes))
        current = after[-1].shape
    if low.out_flat_shape != current:
        after.append(step("y", "reshape", low.out_flat_shape, out_axes, low.out_flat_shape))
    if low.out_shape != low.out_flat_shape:
        n_ellipsis = len(x_shape) - sum(1 for g in mix.plan.left if g != ELLIPSIS)
        groups = tuple(_label(list(g)) for g in expand_groups(mix.plan.right, n_ellipsis))
        after.append(Step("y", "reshape", low.out_shape, low.out_shape, groups))

    sum_adds = 0
    if low.sum_axes:
        kept = [n for i, n in enumerate(low.x_flat_shape) if i not in low.sum_axes]
        sum_adds = math.prod(low.x_flat_shape) - math.prod(kept)
    bias_adds = math.prod(low.out_shape) if low.bias_shape is not None else 0
    return Description(
        layer=mix,
        x_shape=x_shape,
        lowering=low,
        before=tuple(before),
        contraction=contraction,
        loop=loop,
        after=tuple(after),
        out_shape=low.out_shape,
        param_count=sum(math.prod(s) for s in mix.param_shapes.values()),
        dot_flops=dot_flops,
        flops=dot_flops + sum_adds + bias_adds,
        executed_dot_flops=packed_flops,
    )

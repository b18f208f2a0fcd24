"""The planner's output: a :class:`Lowering`, one EinMix call for one input shape as a list of steps.

Each :class:`Step` is one shape operation on one operand (``'x'``, ``'weight'``, ``'y'`` or
``'bias'``): a reshape, a sum, a transpose, a block-diagonal pack, a broadcast, a copy, the dot
(``'dot_general'``; ``'loop'``: one dot per slice of x's first dimension; ``'einsum'``: one
``jnp.einsum`` call of x and the weight) or the bias add, with
its argument, the operand's shape after it and the axis names of its dimensions.
``_execute.execute`` runs the steps in order and ``describe`` prints them: the two read the same
list, so what is shown is what runs.

Example:
    >>> import einmix_jax as em
    >>> low = em.planning.lower(em.layer('b c -> b d', bias_shape='d', c=4, d=3).plan, (2, 4))
    >>> for step in low.steps:
    ...     print(step)
    lax.dot_general(x (2, 4), weight (4, 3), dimension_numbers=(((1,), (0,)), ((), ()))) -> (b=2, d=3)
    y: add bias reshaped to (b=1, d=3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

Shape = tuple[int, ...]
Perm = tuple[int, ...] | None  # None: no transpose
DimensionNumbers = tuple[
    tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]
]


#: the ops of a contraction step
CONTRACTIONS = ("dot_general", "loop", "einsum")


@dataclasses.dataclass(frozen=True)
class Step:
    """One shape operation: ``operand`` goes through ``op`` with ``arg`` and comes out ``shape``.

    ``arg`` is a shape (``'reshape'``, ``'broadcast'``), the summed dimensions (``'sum'``), a
    permutation (``'transpose'``), the group count (``'pack'``), ``None`` (``'copy'``),
    ``(lhs_shape, rhs_shape, dimension_numbers)`` (``'dot_general'``, ``'loop'``: one iteration's;
    the ``operand`` of a dot names its left operand, ``'x'`` or ``'weight'``), ``(x_shape,
    weight_shape, subscripts)`` (``'einsum'``: ``jnp.einsum`` of x and the weight) or the bias's
    broadcast shape (``'add'``). ``labels`` name the axes of each dimension of ``shape``.

    Example:
        >>> print(Step('x', 'transpose', (1, 0), (3, 2), ('c', 'b')))
        x: transpose (1, 0) -> (c=3, b=2)
    """

    operand: str
    op: str
    arg: Any
    shape: Shape
    labels: tuple[str, ...] = dataclasses.field(compare=False)
    note: str = dataclasses.field(default="", compare=False)  #: e.g. the axes a sum removes
    #: what only execution needs: the pack's (group, copy) dimensions, the add's common view
    detail: tuple = ()

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
        if self.op == "copy":
            return f"{self.operand}: write out transposed before the dot -> {dims}"
        if self.op == "add":
            return f"y: add bias reshaped to {_dims(self.labels, self.arg)}"
        lhs, rhs, numbers = self.arg
        if self.op == "einsum":
            return f"jnp.einsum({numbers!r}, x {lhs}, weight {rhs}) -> {dims}"
        first, second = ("x", "weight") if self.operand == "x" else ("weight", "x")
        loop = f"lax.map over {self.labels[0]}={self.shape[0]} of " if self.op == "loop" else ""
        return (
            f"{loop}lax.dot_general({first} {lhs}, {second} {rhs}, dimension_numbers={numbers})"
            f" -> {dims}"
        )


@dataclasses.dataclass(frozen=True)
class Lowering:
    """One EinMix call for one input shape: the :class:`Step` list that ``apply`` runs.

    The properties read single facts off the steps (``x_perm``: x's transpose, or ``None``).
    """

    x_shape: Shape
    w_shape: Shape  #: the weight as stored
    steps: tuple[Step, ...]
    out_shape: Shape
    #: 'as einsum', 'jnp.einsum', 'x first', 'w first', 'broadcast batch', 'loop',
    #: 'block-diagonal' or 'weight as stored'
    strategy: str
    #: x, w, out axis names, for describe(); not compared: lowerings that differ only in names
    #: compute the same thing (and share one compiled apply)
    flat_axes: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] = dataclasses.field(
        compare=False
    )
    #: the lowering whose derivative the backward pass runs, where the forward pass's fastest
    #: lowering and training's differ (``_lower.split``); None: this one's own derivative
    backward: Lowering | None = None

    def _find(self, operand: str, op: str) -> Step | None:
        return next((s for s in self.steps if s.operand == operand and s.op == op), None)

    def _arg(self, operand: str, op: str) -> Any:
        step = self._find(operand, op)
        return None if step is None else step.arg

    @property
    def dot(self) -> Step:
        """The contraction step (``'dot_general'``, ``'loop'`` or ``'einsum'``)."""
        return next(s for s in self.steps if s.op in CONTRACTIONS)

    @property
    def x_perm(self) -> Perm:
        return self._arg("x", "transpose")

    @property
    def w_perm(self) -> Perm:
        return self._arg("weight", "transpose")

    @property
    def y_perm(self) -> Perm:
        return self._arg("y", "transpose")

    @property
    def sum_axes(self) -> tuple[int, ...]:
        return self._arg("x", "sum") or ()

    @property
    def x_dot_shape(self) -> Shape:
        """x as the dot takes it (with the loop's dimension in front)."""
        return _last_shape(self._before_dot("x"), self.x_shape)

    @property
    def w_dot_shape(self) -> Shape:
        return _last_shape(self._before_dot("weight"), self.w_shape)

    @property
    def w_broadcast(self) -> tuple[Shape, Shape] | None:
        """The weight reshaped to the first shape and broadcast to the second, or ``None``."""
        steps = self._before_dot("weight")
        at = next((i for i, s in enumerate(steps) if s.op == "broadcast"), None)
        return None if at is None else (steps[at - 1].arg, steps[at].arg)

    @property
    def x_first(self) -> bool:
        return self.dot.operand == "x"

    @property
    def loop(self) -> bool:
        return self.dot.op == "loop"

    @property
    def w_copy(self) -> bool:
        return self._find("weight", "copy") is not None

    @property
    def dimension_numbers(self) -> DimensionNumbers | None:
        """The dot's dimension numbers; None where the contraction is a ``jnp.einsum`` call."""
        return None if self.dot.op == "einsum" else self.dot.arg[2]

    def _before_dot(self, operand: str) -> list[Step]:
        end = self.steps.index(self.dot)
        return [s for s in self.steps[:end] if s.operand == operand and s.op != "copy"]


def _last_shape(steps: Sequence[Step], default: Shape) -> Shape:
    return steps[-1].shape if steps else default


def _dims(labels: tuple[str, ...], shape: Shape) -> str:
    dims = [a if a == "1" else f"{a}={n}" for a, n in zip(labels, shape, strict=True)]
    return "(" + ", ".join(dims) + ")"


def label(run: Sequence[str]) -> str:
    """One dimension's label: its axis, ``(a b)`` for merged axes, ``1`` for none."""
    return "1" if not run else run[0] if len(run) == 1 else "(" + " ".join(run) + ")"


def group(names: Sequence[str], shape: Shape, sizes: dict[str, Any]) -> tuple[str, ...]:
    """Labels for ``shape``, whose dimensions merge consecutive runs of ``names``."""
    names = list(names)
    if [sizes[a] for a in names] == list(shape):
        return tuple(names)
    runs: list[list[str]] = []
    i = 0
    for n in shape:
        run, product = [], 1
        if n == 1 and i < len(names) and sizes[names[i]] == 1:
            run.append(names[i])  # a unit dimension takes the next unit axis
            i += 1
        while i < len(names) and product != n:  # (no order on symbolic lengths: equality)
            run.append(names[i])
            product *= sizes[names[i]]
            i += 1
        while i < len(names) and sizes[names[i]] == 1 and len(names) - i > len(shape) - len(runs):
            run.append(names[i])  # a unit axis that the later dimensions can spare
            i += 1
        runs.append(run)
    runs[-1] += names[i:]
    return tuple(label(r) for r in runs)


def permuted(names: list[str], perm: Perm) -> list[str]:
    return names if perm is None else [names[p] for p in perm]


@dataclasses.dataclass(frozen=True)
class Parts:
    """What ``_lower.build`` decides, from which :func:`assemble` writes the steps."""

    x_shape: Shape
    x_axes: list[str]  #: the flat input's axes (groups split)
    w_axes: list[str]  #: the weight's axes (with the packed copy axis, when packed)
    w_shape: Shape  #: the weight as stored
    out_axes: list[str]
    out_groups_labels: tuple[str, ...]
    sizes: dict[str, Any]
    bias_axes: list[str] | None
    x_flat_shape: Shape
    sum_axes: tuple[int, ...]
    x_perm: Perm
    x_dot_shape: Shape
    w_pack: tuple[Shape, int] | None  #: the identity's shape, and where the copy axis goes
    w_perm: Perm
    w_broadcast: tuple[Shape, Shape] | None
    w_dot_shape: Shape
    w_copy: bool
    x_first: bool
    loop: bool
    dimension_numbers: DimensionNumbers
    y_split_shape: Shape
    bias_perm: Perm
    bias_shape: Shape | None
    bias_view: tuple[Shape, Shape] | None
    y_perm: Perm
    out_flat_shape: Shape
    out_shape: Shape
    strategy: str
    #: the ``jnp.einsum`` subscripts, where the contraction is that call (the ``'jnp.einsum'``
    #: form: x and the weight as they are, the result in the output's order); None: a dot
    einsum: str | None = None


def assemble(p: Parts) -> Lowering:
    """The labelled steps of ``p``, in the order ``execute`` runs them."""
    sizes = p.sizes

    def step(operand: str, op: str, arg: Any, names: list[str], shape: Shape | None = None) -> Step:
        shape = tuple(sizes[a] for a in names) if shape is None else shape
        return Step(operand, op, arg, shape, group(names, shape, sizes))

    steps: list[Step] = []
    # x: split groups, sum axes away, transpose, merge into the dot's operand
    names, current = p.x_axes, p.x_shape
    if p.x_flat_shape != current:
        steps.append(step("x", "reshape", p.x_flat_shape, names))
    if p.sum_axes:
        names = [a for i, a in enumerate(p.x_axes) if i not in p.sum_axes]
        summed = " ".join(p.x_axes[i] for i in p.sum_axes)
        steps.append(dataclasses.replace(step("x", "sum", p.sum_axes, names), note=summed))
    if p.x_perm is not None:
        names = permuted(names, p.x_perm)
        steps.append(step("x", "transpose", p.x_perm, names))
    current = steps[-1].shape if steps else p.x_shape
    if p.x_dot_shape != current:
        steps.append(step("x", "reshape", p.x_dot_shape, names, p.x_dot_shape))
    x_labels = group(names, p.x_dot_shape, sizes)
    x_order = names

    # the weight: pack, transpose, broadcast along the x-only batch axes, merge, copy
    names, current = p.w_axes, p.w_shape
    if p.w_pack is not None:  # k groups on the diagonal of one block
        eye, at = p.w_pack
        k_axes = tuple(i for i, n in enumerate(eye) if n != 1)
        pack = step("weight", "pack", eye[at], p.w_axes)
        steps.append(
            dataclasses.replace(pack, note=p.w_axes[at].split(".")[0], detail=(k_axes, at))
        )
        current = pack.shape
    if p.w_perm is not None:
        names = permuted(names, p.w_perm)
        steps.append(step("weight", "transpose", p.w_perm, names))
        current = steps[-1].shape
    if p.w_broadcast is not None:
        unit, full = p.w_broadcast
        lead = x_order[: len(unit) - 2]
        labels = (*lead, *group([a for a in names if a not in lead], unit[-2:], sizes))
        steps.append(Step("weight", "reshape", unit, unit, labels))
        if full != unit:  # along axes of length 1 the reshape is all there is
            steps.append(Step("weight", "broadcast", full, full, labels))
        names, current = [*lead, *(a for a in names if a not in lead)], full
    if p.w_dot_shape != current:
        steps.append(step("weight", "reshape", p.w_dot_shape, names, p.w_dot_shape))
    w_labels = group(names, p.w_dot_shape, sizes)
    if p.w_copy:
        steps.append(Step("weight", "copy", None, p.w_dot_shape, w_labels))

    # the contraction
    if p.einsum is not None:  # x, then the weight, as einops' layer calls it
        dot_shape = tuple(sizes[a] for a in p.out_axes)
        args = (p.x_dot_shape, p.w_dot_shape, p.einsum)
        steps.append(Step("x", "einsum", args, dot_shape, tuple(p.out_axes)))
    else:
        x_dot, x_dot_labels = p.x_dot_shape, x_labels
        if p.loop:  # one iteration of lax.map sees x without its first dimension
            x_dot, x_dot_labels = x_dot[1:], x_dot_labels[1:]
        lhs, rhs, lhs_labels, rhs_labels = x_dot, p.w_dot_shape, x_dot_labels, w_labels
        if not p.x_first:
            lhs, rhs, lhs_labels, rhs_labels = rhs, lhs, rhs_labels, lhs_labels
        (lhs_k, rhs_k), (lhs_b, rhs_b) = p.dimension_numbers
        order = (
            [(0, i) for i in lhs_b]
            + [(0, i) for i in range(len(lhs)) if i not in lhs_k + lhs_b]
            + [(1, i) for i in range(len(rhs)) if i not in rhs_k + rhs_b]
        )
        dot_shape = tuple((lhs, rhs)[side][i] for side, i in order)
        dot_labels = tuple((lhs_labels, rhs_labels)[side][i] for side, i in order)
        if p.loop:  # results stacked in front
            dot_shape, dot_labels = (p.x_dot_shape[0], *dot_shape), (x_labels[0], *dot_labels)
        operand = "x" if p.x_first else "weight"
        op = "loop" if p.loop else "dot_general"
        steps.append(Step(operand, op, (lhs, rhs, p.dimension_numbers), dot_shape, dot_labels))

    # after: split merged dimensions, add the bias, transpose to the output order, merge groups
    names = p.out_axes
    if p.y_perm is not None:
        names = [""] * len(p.out_axes)
        for i, q in enumerate(p.y_perm):
            names[q] = p.out_axes[i]
    if p.y_split_shape != dot_shape:
        steps.append(step("y", "reshape", p.y_split_shape, names, p.y_split_shape))
    current = p.y_split_shape
    if p.bias_shape is not None:  # added in the dot's order, before the transpose
        assert p.bias_axes is not None and p.bias_view is not None
        bias_axes = p.bias_axes
        if p.bias_perm is not None:
            bias_axes = permuted(bias_axes, p.bias_perm)
            steps.append(step("bias", "transpose", p.bias_perm, bias_axes))
        add = Step("bias", "add", p.bias_shape, p.y_split_shape, tuple(names), detail=p.bias_view)
        steps.append(add)
    if p.y_perm is not None:
        steps.append(step("y", "transpose", p.y_perm, p.out_axes))
        current = steps[-1].shape
    if p.out_flat_shape != current:
        steps.append(step("y", "reshape", p.out_flat_shape, p.out_axes, p.out_flat_shape))
    if p.out_shape != p.out_flat_shape:
        steps.append(Step("y", "reshape", p.out_shape, p.out_shape, p.out_groups_labels))
    return Lowering(
        x_shape=p.x_shape,
        w_shape=p.w_shape,
        steps=tuple(steps),
        out_shape=p.out_shape,
        strategy=p.strategy,
        flat_axes=(tuple(p.x_axes), tuple(p.w_axes), tuple(p.out_axes)),
    )


def dot_flops(low: Lowering) -> int:
    """``2 * multiply-adds`` of the lowering's dot (all iterations; zeros of a packing too)."""
    lhs, _, numbers = low.dot.arg
    if low.dot.op == "einsum":  # the x subscripts in neither the output: contracted
        x_letters, rest = numbers.split(",")
        out = rest.split("->")[1]
        lhs_k = tuple(i for i, a in enumerate(x_letters) if a not in out)
    else:
        ((lhs_k, _), _) = numbers
    return 2 * math.prod(low.dot.shape) * math.prod(lhs[i] for i in lhs_k)

"""Planning: for a plan and an input shape, decide how ``apply`` runs (the lowering).

This is the one place that decides the contraction. The result, a ``Lowering``, is a list of
shape-only steps (reshape, sum, transpose, broadcast, one ``lax.dot_general``, bias add) that
``_core`` executes verbatim. Axes are integer ids from here on, so there is no limit on their number.

The rule. Every axis of the flattened input ``x``, weight ``w`` and output falls in one class:

* ``B`` (batch): in x, w and the output -- a batch dimension of the dot;
* ``K`` (contracted): in x and w, not in the output;
* ``F`` (x-free): in x only (and the output); ``G`` (w-free): in w only (and the output);
* ``S``: in x only and not in the output -- summed away before the dot.

Both operands are brought to a canonical 3-d form ``(batch, rows, contracted)`` /
``(batch, contracted, cols)`` with runs of axes that stay adjacent merged into one dimension
(free reshapes), so XLA sees a plain batched GEMM in the forward and the backward pass and never
materialises an N-d transposed gradient. ``K`` and ``F`` keep the input's memory order and ``G``
the output's, so ``x`` is only transposed when its layout really forbids a GEMM view. Three
candidate lowerings are costed by the elements they move (transposes of x, of the output, of
the weight, and weight broadcasts), and the cheapest is taken (ties go to the first):

1. x first: ``x -> (B, F, K) @ w -> (B, K, G)`` gives ``(B, F, G)``;
2. w first: ``w -> (B, G, K) @ x -> (B, K, F)`` gives ``(B, G, F)``;
3. broadcast batch: when x is laid out ``(P, K, Q)`` with ``Q`` a run of x-free axes after the
   contracted ones, the x-free axes in ``P`` become batch dimensions of the dot and the weight is
   broadcast along them: ``w -> (P, G, K) @ x -> (P, K, Q)`` gives ``(P, G, Q)`` with no
   transpose of x or of the output (token mixing ``'b t c -> b u c'`` is the typical case).
"""

from __future__ import annotations

import dataclasses
import functools
import math

from ._parse import ELLIPSIS, Plan, read_sizes

Perm = tuple[int, ...] | None  # None: no transpose
DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]


@dataclasses.dataclass(frozen=True)
class Lowering:
    """Shape-only steps that compute one EinMix for one input shape (see the module docstring)."""

    x_flat_shape: tuple[int, ...]  #: input with groups split, unit axes dropped
    sum_axes: tuple[int, ...]  #: axes of the flat input summed before the dot
    x_perm: Perm
    x_dot_shape: tuple[int, ...]
    w_perm: Perm
    w_dot_shape: tuple[int, ...]
    #: strategy 3: reshape the weight to the first shape (unit axes), broadcast to the second
    w_broadcast: tuple[tuple[int, ...], tuple[int, ...]] | None
    x_first: bool  #: x is the dot's left operand (else the weight is)
    dimension_numbers: DimensionNumbers
    y_split_shape: tuple[int, ...]  #: dot result with merged dimensions split again
    y_perm: Perm  #: to the flat output order
    out_flat_shape: tuple[int, ...]  #: the output with groups split
    bias_perm: Perm
    bias_shape: tuple[int, ...] | None  #: bias reshaped to broadcast against the flat output
    out_shape: tuple[int, ...]
    strategy: str  #: 'x first', 'w first' or 'broadcast batch'
    flat_axes: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]  #: x, w, out axis names


def resolve_sizes(plan: Plan, x_shape: tuple[int, ...]) -> tuple[dict[str, int], int]:
    """Read every axis length off the plan and the input shape; return them and the ellipsis rank.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('(b t) c -> b t d', 'c d', None, (('t', 3), ('c', 4), ('d', 2)))
        >>> resolve_sizes(plan, (6, 4))
        ({'t': 3, 'c': 4, 'd': 2, 'b': 2}, 0)
    """
    return read_sizes(plan.left, plan.sizes, x_shape, plan.context())


def _expand(groups: tuple, n_ellipsis: int) -> list[tuple[str, ...]]:
    """Groups with '...' replaced by its axes; a bare '...' becomes one group per axis."""
    names = tuple(f"...{i}" for i in range(n_ellipsis))
    out: list[tuple[str, ...]] = []
    for g in groups:
        if g == ELLIPSIS:
            out.extend((n,) for n in names)
        else:
            out.append(tuple(n for a in g for n in (names if a == ELLIPSIS else (a,))))
    return out


def _perm(src: list[str], dst: list[str], sizes: dict[str, int]) -> Perm:
    """The transpose taking axis order ``src`` to ``dst``; None if only unit axes move."""
    perm = tuple(src.index(a) for a in dst)
    moving = [p for p in perm if sizes[src[p]] != 1]
    return None if moving == sorted(moving) else perm


@functools.lru_cache(maxsize=4096)
def lower(plan: Plan, x_shape: tuple[int, ...]) -> Lowering:
    """Decide the lowering of ``plan`` for an input of ``x_shape`` (cached).

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b u c', 't u', None, (('t', 3), ('u', 5)))
        >>> low = lower(plan, (2, 3, 4))
        >>> low.strategy, low.x_perm, low.y_perm
        ('broadcast batch', None, None)
    """
    sizes, n_ellipsis = resolve_sizes(plan, x_shape)
    x_axes = [a for g in _expand(plan.left, n_ellipsis) for a in g]
    out_groups = _expand(plan.right, n_ellipsis)
    out_axes = [a for g in out_groups for a in g]
    w_axes = list(plan.weight_axes)
    for i in range(n_ellipsis):
        sizes[f"...{i}"] = x_shape[plan.left.index(ELLIPSIS) + i]

    in_w, in_out = set(w_axes), set(out_axes)
    summed = [a for a in x_axes if a not in in_w and a not in in_out]
    x_kept = [a for a in x_axes if a not in summed]
    batch = [a for a in x_kept if a in in_w and a in in_out]
    contracted = [a for a in x_kept if a in in_w and a not in in_out]
    x_free = [a for a in x_kept if a not in in_w]
    w_free = [a for a in out_axes if a in in_w and a not in set(x_axes)]

    def size(axes: list[str]) -> int:
        return math.prod(sizes[a] for a in axes)

    def moved(src: list[str], dst: list[str]) -> int:
        return 0 if _perm(src, dst, sizes) is None else size(src)

    # (name, x order, weight order, dot-result order, x blocks, weight blocks, broadcast axes)
    candidates = [
        ("x first", batch + x_free + contracted, batch + contracted + w_free,
         batch + x_free + w_free, [batch, x_free, contracted], [batch, contracted, w_free], []),
        ("w first", batch + contracted + x_free, batch + w_free + contracted,
         batch + w_free + x_free, [batch, contracted, x_free], [batch, w_free, contracted], []),
    ]  # fmt: skip
    if contracted:
        first = x_kept.index(contracted[0])
        lead, trail = x_kept[:first], x_kept[first + len(contracted) :]
        if (
            x_kept[first : first + len(contracted)] == contracted
            and trail
            and all(a in x_free for a in trail)
            and any(a in x_free for a in lead)
        ):
            w_lead = [a for a in lead if a in in_w]
            candidates.append(
                ("broadcast batch", x_kept, w_lead + w_free + contracted, lead + w_free + trail,
                 [lead, contracted, trail], [lead, w_free, contracted],
                 [a for a in lead if a not in in_w])
            )  # fmt: skip

    def cost(candidate: tuple) -> int:
        _, x_order, w_order, y_order, _, _, bcast = candidate
        return (
            moved(x_kept, x_order)
            + moved(y_order, out_axes)
            + moved(w_axes, w_order)
            + (size(bcast) * size(w_axes) if bcast else 0)
        )

    strategy, x_order, w_order, y_order, x_blocks, w_blocks, bcast = min(candidates, key=cost)
    x_first = strategy == "x first"
    if not batch and not bcast:  # plain 2-d GEMM
        x_blocks, w_blocks = x_blocks[1:], w_blocks[1:]
        dims: DimensionNumbers = (((1,), (0,)), ((), ()))
    else:
        dims = (((2,), (1,)), ((0,), (0,)))
    w_broadcast = None
    if bcast:  # weight (B'..., G, K) -> unit axes where x has broadcast axes -> broadcast
        tail = (size(w_free), size(contracted))
        w_broadcast = (
            tuple(sizes[a] if a in in_w else 1 for a in x_blocks[0]) + tail,
            tuple(sizes[a] for a in x_blocks[0]) + tail,
        )
    x_perm = _perm(x_kept, x_order, sizes)
    w_perm = _perm(w_axes, w_order, sizes)
    x_dot_shape = tuple(size(b) for b in x_blocks)
    w_dot_shape = tuple(size(b) for b in w_blocks)
    y_perm = _perm(y_order, out_axes, sizes)
    bias_perm, bias_shape = None, None
    if plan.bias_axes is not None:
        bias_axes = list(plan.bias_axes)
        in_bias = set(bias_axes)
        bias_perm = _perm(bias_axes, [a for a in out_axes if a in in_bias], sizes)
        bias_shape = tuple(sizes[a] if a in in_bias else 1 for a in out_axes)
    out_shape = tuple(math.prod(sizes[a] for a in g) for g in out_groups)
    return Lowering(
        x_flat_shape=tuple(sizes[a] for a in x_axes),
        sum_axes=tuple(x_axes.index(a) for a in summed),
        x_perm=x_perm,
        x_dot_shape=x_dot_shape,
        w_perm=w_perm,
        w_dot_shape=w_dot_shape,
        w_broadcast=w_broadcast,
        x_first=x_first,
        dimension_numbers=dims,
        y_split_shape=tuple(sizes[a] for a in y_order),
        y_perm=y_perm,
        out_flat_shape=tuple(sizes[a] for a in out_axes),
        bias_perm=bias_perm,
        bias_shape=bias_shape,
        out_shape=out_shape,
        strategy=strategy,
        flat_axes=(tuple(x_axes), tuple(w_axes), tuple(out_axes)),
    )

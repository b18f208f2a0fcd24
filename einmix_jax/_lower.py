"""Planning: for a plan, an input shape and a backend profile, decide how ``apply`` runs.

This is the one place that decides the contraction. The result, a :class:`~._lowering.Lowering`,
is a list of shape-only steps (reshape, sum, transpose, pack, broadcast, copy, one
``lax.dot_general`` or a loop of them, bias add) that ``_execute.execute`` runs and ``describe``
prints. Axes are integer ids from here on, so there is no limit on their number. What a backend
costs and which forms it has come from a :class:`~._profile.Profile`, passed in (default: the
one in use, :func:`einmix_jax.planning.profile`) and part of every cached decision's key.

The rule. Every axis of the flattened input ``x``, weight ``w`` and output falls in one class:

* ``B`` (batch): in x, w and the output -- a batch dimension of the dot;
* ``K`` (contracted): in x and w, not in the output;
* ``F`` (x-free): in x only (and the output); ``G`` (w-free): in w only (and the output);
* ``S``: in x only and not in the output -- summed away before the dot.

Both operands are brought to a canonical 2-d or 3-d GEMM form, ``(batch, rows, contracted)`` @
``(batch, contracted, cols)`` (or the weight first), with runs of axes that stay adjacent merged
into one dimension (free reshapes), so XLA sees a plain (batched) GEMM in the forward and in the
backward pass and never materialises an N-d transposed gradient. ``K`` and ``F`` keep the
input's memory order and ``G`` the output's, so ``x`` is only transposed when its layout really
forbids a GEMM view.

XLA's own lowering first. The first candidate, ``'as einsum'``, is what ``jnp.einsum`` (and so
einops' layer) runs: x (groups split, summed axes summed) and the weight as stored go into one
N-d ``lax.dot_general``, and only its result is transposed to the output. Its forward is XLA's
canonical GEMM form of that dot, the ``x first`` candidate with no outer axes below, which
spells the same dot with adjacent axes merged (free reshapes) and whose backward dots are 2-d;
the N-d dot's backward makes XLA write out x- and output-sized operands wherever x has several
row or contracted dimensions (:func:`_as_given_terms`). :func:`choose` keeps the cheaper of these
two spellings of XLA's lowering unless another candidate is predicted faster by more than the
profile's ``depart_margin`` (fitted by ``benchmarks/calibrate.py`` on measured regret; None on a
backend nobody has measured: never).

The candidates. Let ``O`` be the leading run of x's axes before its first contracted axis (``B``
and ``F`` axes). For every split ``O = outer + rest`` (``outer`` may be empty) the ``outer`` axes
stay in front, in x's order, in x, in the dot result and so in the output:

* an ``F`` axis in ``outer`` is either a loop axis (where the profile has loops, the leading
  ``F`` axes of ``outer`` may be iterated over with ``lax.map``, one GEMM per slice, no
  transpose) or a batch dimension of the dot along which the weight is broadcast;
* a ``B`` axis is a batch dimension of the dot (the weight is transposed to put it first);
* the other axes form the GEMM, either *x first*, ``x -> (D, F, K) @ w -> (D, K, G)`` giving
  ``(D, F, G)``, or *w first*, ``w -> (D, G, K) @ x -> (D, K, F)`` giving ``(D, G, F)``, where ``D``
  are the dot's batch dimensions. The right operand may also be used as ``(D, N, K)`` (the
  dimension numbers say so, nothing moves), so a weight stored ``'d c'`` or an input whose
  contracted axes come last needs no transpose; the left operand keeps ``K`` last (where the
  profile asks for it, a transposed weight on the left is written out before the dot: a copy
  step).

``outer = []`` gives the two plain forms. The bias is added to the dot result before it is
transposed to the output order, so the add fuses into that transpose and the bias gradient is
summed from the output gradient in the layout the backward dots use anyway.

Block-diagonal packing. Where the profile has packings, a grouped layer (a batch axis ``g`` in
x, the weight and the output) whose per-group GEMM is narrow (fewer than ``pack_below``
contracted or weight-only elements) is also tried with its ``k`` groups packed into one
block-diagonal weight (:func:`_packed`): ``k`` times the FLOPs, but one GEMM at the machine's rate
instead of a batch of tiny ones. The packed weight is built inside the jitted function from the
weight as declared, so its gradient flows back to the declared params.

The cost: predicted seconds. A candidate's forward and backward passes are counted term by term
(:data:`~._profile.TERMS`, :func:`_terms`): the FLOPs of its dots (the backward pass has two, for
the gradients of x and of the weight); the elements each dot reads and writes, per matrix of a
batched dot; the number of matrices; the elements a transpose, a weight broadcast (forward: the
copy; backward: the sum of the per-slice weight gradients) or a packing moves, mirrored in the
backward pass; of those, the elements of x and of the result that a dot with x on the left
moves with a stride (its contracted axes brought minor, and back: with the weight first, x's
rows would move whole); the elements a loop copies in and out (and, backward, the weight
gradient it accumulates per iteration); the loop's iterations; and, where the profile says so, the transposed
weight gradient of a dot with one row and no batch dimension. Each count is exact; the seconds
per unit come from the profile. Each candidate's cost is its predicted regret (:func:`regrets`),
so that neither inference nor training pays for the other; :func:`choose` departs from XLA's
lowering for the lowest of them only by the margin. Ties go to the first (XLA's N-d form, then no
outer axes, x first, no operand used as ``(D, N, K)``).

Two picks. :func:`choose` is training's pick (the regret of both passes); :func:`choose_forward`
is the forward pass's own, by its predicted forward seconds alone. Where the forward pick is
clearly faster (by the margin, and by more than the moves of x and the weight that training's
pick still needs in its backward pass), :func:`lower` returns the forward pick's lowering with
training's as its ``backward`` (:func:`split`): the forward pass runs the one and every
derivative the other's (a ``custom_jvp``: the layer is affine, so the two are the same function).
Inference then does not pay for training's layout, nor training for inference's.

Typical results: a plain linear layer is one 2-d GEMM between free reshapes; multi-head
``'b t (h c) -> b t (h d)'`` moves rows of ``c`` to ``(h, b t, c)`` and back; token mixing
``'b t c -> b u c'`` keeps ``b`` outer and runs ``(u, t) @ (t, c)`` per ``b``, with no transpose of
x or of the output; patch embedding transposes x once to ``(b h w, ph pw c)``, keeping the
contracted axes in memory order so the weight is used as stored.

The weight as stored. With ``lower(..., stored_weight=True)`` there is one candidate, with no
cost to compare: the weight is the right operand of ``jax.lax.dot_general`` exactly as stored,
with N-d dimension numbers, and only x and the result move (see :func:`_stored_weight_order`),
for any call whose weight is a tool's container. With ``x_as_given`` too it is the ``'as einsum'``
form (:func:`_x_as_given_order`): a Flax layer runs it while a tool intercepts the contraction
(qwix's quantization and LoRA need the stored param itself, and x with ``nn.Dense``'s axes).
Under a tool that patches ``jnp.einsum`` too (``lower(..., einsum=True)``), the same operands
may instead go to ``jnp.einsum`` (``'jnp.einsum'``, einops' call: it runs the dot with the weight
first, up to 11x faster forward where x's contracted axes are not its minor ones), chosen like a
departure (by more than the margin), once per layer: the x-only axes are costed as large
(:func:`_tool_axes`), because a tool keys its rules and state by the op it sees. Every other
call, the Flax layers' included, keeps every candidate.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import string
from collections.abc import Callable

from ._lowering import DimensionNumbers, Lowering, Parts, Perm, assemble, label
from ._parse import Plan, expand_groups, resolve_sizes
from ._profile import TERMS, Profile, profile

__all__ = [
    "TERMS",
    "Choice",
    "Lowering",
    "build",
    "candidates",
    "choose",
    "choose_forward",
    "lower",
    "split",
    "terms",
]

#: The length a symbolic dimension (``jax.export.symbolic_shape``) counts as when costs are
#: compared: large, so the decision for a symbolic batch is the one for a big batch, and the same
#: every time.
SYMBOLIC_LENGTH = 1 << 16


@dataclasses.dataclass(frozen=True)
class _Candidate:
    loop: list[str]  #: x-only axes iterated over, in front of everything
    dot_batch: list[str]  #: batch dimensions of the dot (the x-only ones broadcast the weight)
    bcast: list[str]
    x_first: bool
    rhs_t: bool  #: the right operand is laid out (batch, free, contracted)
    x_order: list[str]
    w_order: list[str]
    y_order: list[str]  #: order of the stacked dot results
    x_blocks: list[list[str]]
    w_blocks: list[list[str]]
    pack: tuple[str, int] | None = None  #: (batch axis, k): see :func:`_packed`
    #: x and the weight go into one N-d dot as they are: XLA's own lowering of the layer, as
    #: ``jnp.einsum`` (and so einops' layer) runs it (see :func:`_x_as_given_order`)
    as_given: bool = False

    @property
    def kind(self) -> str:
        """'as einsum', 'jnp.einsum', 'loop', 'block-diagonal', 'broadcast batch', 'x first' or
        'w first'."""
        if self.as_given:
            return "as einsum" if self.x_first else "jnp.einsum"
        if self.loop:
            return "loop"
        if self.pack:
            return "block-diagonal"
        if self.bcast:
            return "broadcast batch"
        return "x first" if self.x_first else "w first"


def _perm(src: list[str], dst: list[str], sizes: dict[str, int]) -> Perm:
    """The transpose taking axis order ``src`` to ``dst``; None if only unit axes move."""
    perm = tuple(src.index(a) for a in dst)
    moving = [p for p in perm if sizes[src[p]] != 1]
    return None if moving == sorted(moving) else perm


@dataclasses.dataclass(frozen=True)
class _Axes:
    """The axis classes of one plan and input shape (see the module docstring)."""

    sizes: dict[str, int]
    cost_sizes: dict[str, int]  #: a symbolic length counts as SYMBOLIC_LENGTH
    x_axes: list[str]
    out_groups: list[tuple[str, ...]]
    out_axes: list[str]
    w_axes: list[str]
    summed: list[str]
    x_kept: list[str]
    batch: list[str]
    contracted: list[str]
    x_free: list[str]
    w_free: list[str]
    bias_axes: list[str] | None
    #: (batch axis, k): its k groups packed into one block-diagonal weight (see :func:`_packed`)
    pack: tuple[str, int] | None = None

    def size(self, axes: list[str]) -> int:
        return math.prod(self.sizes[a] for a in axes)

    def cost_size(self, axes: list[str]) -> int:
        return math.prod(self.cost_sizes[a] for a in axes)


def _classify(plan: Plan, x_shape: tuple[int, ...]) -> _Axes:
    sizes, n_ellipsis = resolve_sizes(plan, x_shape)
    x_axes = [a for g in expand_groups(plan.left, n_ellipsis) for a in g]
    out_groups = expand_groups(plan.right, n_ellipsis)
    out_axes = [a for g in out_groups for a in g]
    w_axes = list(plan.weight_axes)
    in_w, in_out = set(w_axes), set(out_axes)
    summed = [a for a in x_axes if a not in in_w and a not in in_out]
    x_kept = [a for a in x_axes if a not in summed]
    # Costs are compared as integers: a symbolic length (jax.export) counts as SYMBOLIC_LENGTH.
    cost_sizes = {a: n if isinstance(n, int) else SYMBOLIC_LENGTH for a, n in sizes.items()}
    return _Axes(
        sizes=sizes,
        cost_sizes=cost_sizes,
        x_axes=x_axes,
        out_groups=out_groups,
        out_axes=out_axes,
        w_axes=w_axes,
        summed=summed,
        x_kept=x_kept,
        batch=[a for a in x_kept if a in in_w and a in in_out],
        contracted=[a for a in x_kept if a in in_w and a not in in_out],
        x_free=[a for a in x_kept if a not in in_w],
        w_free=[a for a in out_axes if a in in_w and a not in set(x_axes)],
        bias_axes=None if plan.bias_axes is None else list(plan.bias_axes),
    )


def _packings(ax: _Axes, pack_below: int) -> list[tuple[str, int]]:
    """(batch axis, k) for every block-diagonal packing worth costing (see :func:`_packed`).

    When the per-group GEMM is narrow (but more than a scale or a sum: at least 2 contracted and
    2 weight-only elements), each batch axis of known length with all its groups in one GEMM.
    (Fewer groups per block would keep a batch dimension in front, which costs a transpose of x
    and of the output, and ran no faster than the batched GEMM: see benchmarks/REGRET.md.)
    """
    width = min(ax.cost_size(ax.contracted), ax.cost_size(ax.w_free))
    if width < 2 or width >= pack_below:  # no GEMM (a scale or a sum per group), or wide
        return []
    return [(g, n) for g in ax.batch if isinstance(n := ax.sizes[g], int) and n >= 2]


def _packed(ax: _Axes, g: str, k: int) -> _Axes:
    """The axes of the same layer with the ``k`` groups of batch axis ``g`` packed block-diagonally.

    ``g`` becomes ``g.k``, a contracted axis, in x, and ``g.k'``, a weight-only axis, in the
    output; the weight gains ``g.k'`` and is zero off its diagonal ``g.k == g.k'`` (built inside the
    jitted function, so its gradient flows to the weight as declared). ``'b t (g c) -> b t (g d)'``
    becomes one ``(b t, g c) @ (g c, g d)`` GEMM with neither x nor the output moved: ``g`` times
    the FLOPs, at the machine's GEMM rate.
    """
    kx, ky = f"{g}.k", f"{g}.k'"

    def sub(axes: list[str], new: str) -> list[str]:
        return [new if a == g else a for a in axes]

    extra = {kx: k, ky: k}
    out_groups = [tuple(sub(list(grp), ky)) for grp in ax.out_groups]
    out_axes = [a for grp in out_groups for a in grp]
    x_axes, x_kept = sub(ax.x_axes, kx), sub(ax.x_kept, kx)
    w_axes = sub(ax.w_axes, kx)
    # g.k' goes before the first weight-only axis that follows g in the output (usually where the
    # x-first GEMM wants it, so the packed weight needs no transpose)
    after_g = [a for a in out_axes[out_axes.index(ky) + 1 :] if a in ax.w_free]
    w_axes.insert(w_axes.index(after_g[0]) if after_g else len(w_axes), ky)
    in_w, in_out, in_x = set(w_axes), set(out_axes), set(x_axes)
    return _Axes(
        sizes={**ax.sizes, **extra},
        cost_sizes={**ax.cost_sizes, **extra},
        x_axes=x_axes,
        out_groups=out_groups,
        out_axes=out_axes,
        w_axes=w_axes,
        summed=ax.summed,
        x_kept=x_kept,
        batch=[a for a in x_kept if a in in_w and a in in_out],
        contracted=[a for a in x_kept if a in in_w and a not in in_out],
        x_free=ax.x_free,
        w_free=[a for a in out_axes if a in in_w and a not in in_x],
        bias_axes=None if ax.bias_axes is None else sub(ax.bias_axes, ky),
        pack=(g, k),
    )


def _enumerate(
    ax: _Axes, loops: bool, outer_axes: bool = True, loop_min_rows: int = 0
) -> list[_Candidate]:
    """Every candidate, in tie-breaking order (no outer axes and x first come first), no repeats.

    ``outer_axes=False``: only the forms with no outer axes (those of a packed layer); a loop
    only where each iteration's GEMM has ``loop_min_rows`` rows on the x side.
    """
    in_w = set(ax.w_axes)
    sizes, x_kept, contracted = ax.sizes, ax.x_kept, ax.contracted
    # The leading run of x's axes that are not contracted: candidates for outer dimensions.
    n_outer = next((i for i, a in enumerate(x_kept) if a in contracted), len(x_kept))
    candidates: list[_Candidate] = []
    for k in range(n_outer + 1 if outer_axes else 1):  # x_kept[:k] stay in front (k = 0: ties)
        outer = x_kept[:k]
        # loops run over leading x-only axes of known length (lax.map needs a static count)
        free_run = next(
            (i for i, a in enumerate(outer) if a in in_w or not isinstance(sizes[a], int)),
            len(outer),
        )
        for n_loop in sorted({0, free_run if loops else 0}):
            loop = outer[:n_loop]
            dot_batch = outer[n_loop:] + [a for a in ax.batch if a not in outer]
            bcast = [a for a in dot_batch if a not in in_w]
            if loop and bcast:
                continue  # no weight broadcast inside a loop
            rows = [a for a in ax.x_free if a not in outer]
            if loop and ax.cost_size(rows) < loop_min_rows:
                continue  # each iteration would be (a batch of) matrix-vector products
            w_batch = [a for a in dot_batch if a in in_w]
            for x_first, rhs_t in itertools.product((True, False), (False, True)):
                # lhs (D, M, K) @ rhs (D, K, N), or (D, N, K) when rhs_t (the dot's dimension
                # numbers absorb that orientation at no cost; the lhs keeps K last)
                x_in = [rows, contracted] if x_first or rhs_t else [contracted, rows]
                w_in = [ax.w_free, contracted] if not x_first or rhs_t else [contracted, ax.w_free]
                y_inner = rows + ax.w_free if x_first else ax.w_free + rows
                c = _Candidate(
                    loop=loop,
                    dot_batch=dot_batch,
                    bcast=bcast,
                    x_first=x_first,
                    rhs_t=rhs_t,
                    x_order=loop + dot_batch + x_in[0] + x_in[1],
                    w_order=w_batch + w_in[0] + w_in[1],
                    y_order=loop + dot_batch + y_inner,
                    x_blocks=[dot_batch, *x_in],
                    w_blocks=[dot_batch, *w_in],
                    pack=ax.pack,
                )
                if c not in candidates:  # an outer batch axis may repeat an earlier candidate
                    candidates.append(c)
    return candidates


def _terms(
    ax: _Axes, c: _Candidate, p: Profile | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """The candidate's count of each of :data:`TERMS` in the forward and in the backward pass.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b t d', 'c d', None, (('c', 4), ('d', 3)))
        >>> ax = _classify(plan, (2, 5, 4))
        >>> fwd, bwd = _terms(ax, _enumerate(ax, loops=False)[0], em.planning.EXAMPLE_PROFILE)
        >>> fwd['flop'], bwd['flop'], fwd['dot element'], fwd['moved element']
        (240, 480, 82, 0)
    """
    p = profile() if p is None else p
    if c.as_given:
        return _as_given_terms(ax, p, c.x_first)
    cs, sizes = ax.cost_size, ax.sizes
    outer = set(c.loop) | set(c.dot_batch)
    steps = cs(c.loop) if c.loop else 1
    d, k, n = cs(c.dot_batch), cs(ax.contracted), cs(ax.w_free)
    m = cs([a for a in ax.x_free if a not in outer])
    x_size, y_size, w_size = cs(ax.x_kept), cs(ax.out_axes), cs(ax.w_axes)

    def moved(src: list[str], dst: list[str], size: int) -> int:
        return 0 if _perm(src, dst, sizes) is None else size

    moves = (
        (ax.x_kept, c.x_order, x_size),
        (c.y_order, ax.out_axes, y_size),
        (ax.w_axes, c.w_order, w_size),
    )
    transposes = sum(moved(*m) for m in moves)

    def strided(src: list[str], dst: list[str], size: int) -> int:
        """A transpose that changes the minor (last long) axis: elements read or written with a
        stride, not in contiguous rows."""
        long_src, long_dst = ([a for a in o if sizes[a] != 1] for o in (src, dst))
        same_minor = long_src[-1:] == long_dst[-1:]
        return 0 if same_minor or _perm(src, dst, sizes) is None else size

    # x on the left with its contracted axes brought minor, and the result's transpose back
    # (with the weight first, x's rows move whole: XLA:CPU times these 1.3-5x apart)
    strides = sum(strided(*m) for m in moves[:2]) if c.x_first else 0
    # the broadcast copy (forward) and the sum of the per-slice weight gradients (backward);
    # along axes of length 1 it is a reshape
    bcast = d * k * n if c.bcast and cs(c.bcast) > 1 else 0
    # one row and no batch dimension: the weight-gradient dot is an outer product, written
    # transposed and copied (where the profile says so; a unit batch dimension avoids it)
    one_row = p.one_row_copy and m == 1 and not c.dot_batch
    outer_product = 2 * steps * k * n if one_row else 0
    pack = w_size if c.pack else 0  # the packed weight written; its gradient masked and summed
    loop_io = x_size + y_size if c.loop else 0
    io = cs(ax.x_axes) + y_size
    elements = steps * d * (m * k + k * n + m * n)
    flop = 2 * steps * d * m * k * n
    fwd = {
        "flop": flop,
        "batched flop": flop if d > 1 else 0,
        "dot element": elements,
        "narrow dot element": elements * max(0.0, p.narrow / max(1, min(k, n)) - 1),
        "dot": steps * d,
        "moved element": transposes + bcast + pack,
        "large moved element": _large(p, *(moved(*m) for m in moves), bcast, pack),
        "strided element": strides,
        "loop element": loop_io,
        "loop step": steps if c.loop else 0,
        "io element": io,
    }
    bwd = {  # the two dots of the gradients, the same moves mirrored
        "flop": 2 * fwd["flop"],
        "batched flop": 2 * fwd["batched flop"],
        "dot element": 2 * fwd["dot element"],
        "narrow dot element": 2 * fwd["narrow dot element"],
        "dot": 2 * fwd["dot"],
        "moved element": fwd["moved element"] + outer_product,
        "large moved element": fwd["large moved element"] + _large(p, outer_product),
        "strided element": strides,
        "loop element": loop_io + (steps * d * k * n if c.loop else 0),  # + the dw accumulation
        "loop step": fwd["loop step"],
        "io element": 2 * io,
    }
    return fwd, bwd


def _as_given_terms(
    ax: _Axes, p: Profile, x_first: bool = True
) -> tuple[dict[str, float], dict[str, float]]:
    """The terms of XLA's own lowering (x and the weight into one N-d dot as they are).

    XLA brings the forward dot's operands to its canonical GEMM layout, so its forward is that
    of the cheaper canonical form with the same operand order and no outer axes (x first for
    ``lax.dot_general(x, w)``; w first for ``jnp.einsum``, which puts the weight first). Its
    backward dots are the transposes of an N-d dot: unless the dot already is a canonical GEMM
    (x in ``(batch, rows, contracted)`` order, at most one dimension of length > 1 per class),
    they contract or produce
    several dimensions at once, and XLA writes out x- and output-sized operands to canonicalize
    them (tests/test_lower.py counts them in the optimized HLO; benchmarks/REGRET.md times them:
    up to 1.9x the canonical form's forward+backward), which the canonical form's 2-d dots do not
    need.
    """
    fwd, bwd = min(
        (_terms(ax, e, p) for e in _enumerate(ax, False, outer_axes=False) if e.x_first == x_first),
        key=lambda t: p.seconds_of(t[0]) + p.seconds_of(t[1]),
    )

    def long(axes: list[str]) -> list[str]:
        return [a for a in axes if ax.sizes[a] != 1]

    classes = (ax.batch, ax.x_free, ax.contracted, ax.w_free)
    canonical = long(ax.x_kept) == long(ax.batch) + long(ax.x_free) + long(ax.contracted)
    gemm = min(ax.cost_size(ax.contracted), ax.cost_size(ax.w_free)) > 1
    if gemm and (not canonical or any(len(long(c)) > 1 for c in classes)):
        written = (ax.cost_size(ax.x_kept), ax.cost_size(ax.out_axes))
        bwd = {
            **bwd,
            "moved element": bwd["moved element"] + sum(written),
            "large moved element": bwd["large moved element"] + _large(p, *written),
        }
    return fwd, bwd


def _label(c: _Candidate, stored_weight: bool = False) -> str:
    """A short name: 'x first', 'w first, rhs (D,N,K)', 'loop over b', 'broadcast over b', ..."""
    if c.as_given:
        return c.kind
    if stored_weight:
        return "weight as stored"
    parts = ["x first" if c.x_first else "w first"]
    if c.rhs_t:
        parts.append("rhs (D,N,K)")
    if c.loop:
        parts.append(f"loop over {' '.join(c.loop)}")
    if c.dot_batch:
        parts.append(f"batch ({' '.join(c.dot_batch)})")
    if c.bcast:
        parts.append(f"broadcast over {' '.join(c.bcast)}")
    if c.pack:
        parts.append(f"{c.pack[1]} of {c.pack[0]} packed block-diagonal")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True, eq=False)
class Choice:
    """One candidate lowering the planner considers, with its cost; :func:`build` makes it."""

    label: str  #: e.g. 'x first', 'w first, rhs (D,N,K)', 'loop over b', 'broadcast over b'
    #: the predicted regret (:func:`regrets` of the predicted times); the planner takes the
    #: first of the lowest
    cost: float
    candidate: _Candidate
    stored_weight: bool = False
    fwd: float = 0.0  #: predicted seconds of the forward pass
    fwd_bwd: float = 0.0  #: ... and of the forward and backward passes
    profile: Profile | None = None  #: the profile it was costed with (None: the one in use)

    @property
    def kind(self) -> str:
        """'as einsum', 'x first', 'w first', 'broadcast batch', 'loop', 'block-diagonal' or
        (a tool's container) 'weight as stored'."""
        c = self.candidate
        return "weight as stored" if self.stored_weight and not c.as_given else c.kind


def regrets(times: list[tuple[float, float]], loops: list[bool], loop_margin: float) -> list[float]:
    """The regret rule, for predicted and measured times alike: each candidate's larger ratio of
    its forward time to the fastest one's and of its forward+backward time to the fastest one's,
    so that neither inference nor training pays for the other; a loop's times ``1 + loop_margin``
    (it compiles two to three times slower than one dot).

    Example:
        >>> [round(r, 3) for r in regrets([(1.0, 3.0), (0.95, 3.3)], [False, False], 0.05)]
        [1.053, 1.1]
    """
    best_fwd = min(t[0] for t in times) or 1.0
    best_fb = min(t[1] for t in times) or 1.0
    return [
        max(f / best_fwd, fb / best_fb) * (1 + loop_margin if loop else 1)
        for (f, fb), loop in zip(times, loops, strict=True)
    ]


def candidates(
    plan: Plan,
    x_shape: tuple[int, ...],
    loops: bool | None = None,
    stored_weight: bool = False,
    packs: bool | None = None,
    x_as_given: bool = False,
    einsum: bool = False,
    *,
    profile: Profile | None = None,
) -> list[Choice]:
    """Every lowering :func:`lower` chooses from, in its tie-breaking order, with its cost.

    ``lower(plan, x_shape, loops, stored_weight, packs)`` is ``build`` of :func:`choose` of
    these; the first is XLA's own lowering, ``'as einsum'``. With ``stored_weight`` there is one,
    the weight as stored, at cost 1 (with ``x_as_given``, ``'as einsum'``: the form a Flax layer
    runs under an interception tool, ``nn.Dense``'s call; with ``einsum`` too, also
    ``'jnp.einsum'``, einops' call, both costed for a large input: see :func:`_tool_axes`).
    ``loops`` and ``packs`` allow the loops and the block-diagonal packings; ``None``: as the profile says (by default
    the one in use for this backend and device count).

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b u c', 't u', None, (('t', 196), ('u', 256)))
        >>> choices = candidates(plan, (64, 196, 512), profile=em.planning.EXAMPLE_PROFILE)
        >>> for c in choices:  # predicted regret, forward and forward+backward seconds
        ...     if 'rhs' not in c.label:
        ...         print(f'{c.label:38} {c.cost:4.2f} {c.fwd * 1e3:5.1f} ms {c.fwd_bwd * 1e3:5.1f} ms')
        as einsum                              1.53  27.9 ms  80.3 ms
        x first                                1.53  27.9 ms  71.5 ms
        w first                                1.34  24.5 ms  64.7 ms
        x first, batch (b), broadcast over b   1.67  30.4 ms  77.0 ms
        w first, batch (b), broadcast over b   1.00  18.2 ms  52.8 ms
        x first, loop over b                   2.20  38.2 ms  94.7 ms
        w first, loop over b                   1.50  26.1 ms  70.5 ms
        >>> choose(choices).label
        'w first, batch (b), broadcast over b'
    """
    p = _profile_of(profile)
    loops = p.loops if loops is None else loops
    packs = p.packs if packs is None else packs
    ax = _classify(plan, x_shape)
    costed = ax
    if stored_weight:
        order = _x_as_given_order(ax) if x_as_given else _stored_weight_order(ax)
        found = [(ax, order)]
        if x_as_given and einsum and len(ax.sizes) <= len(string.ascii_letters):
            found.append((ax, _x_as_given_order(ax, x_first=False)))
            costed = _tool_axes(ax)
    else:  # XLA's own lowering first: the one kept unless another is clearly faster (choose)
        found = [(ax, _x_as_given_order(ax))]
        found += [(ax, c) for c in _enumerate(ax, loops, loop_min_rows=p.loop_min_rows)]
        batched = _full_rate_seconds(ax, found[1][1], p)
        for g, k in _packings(ax, p.pack_below) if packs else []:
            packed = _packed(ax, g, k)
            forms = _enumerate(packed, loops=False, outer_axes=False)
            kept = [c for c in forms if c.x_first or p.packed_w_first]
            # never more work than the batched GEMM it replaces would cost at the full rate
            if kept and p.seconds_of({"flop": _terms(packed, kept[0], p)[0]["flop"]}) <= batched:
                found += [(packed, c) for c in kept]
    times = []
    for axes, c in found:
        fwd, bwd = _terms(costed if axes is ax else axes, c, p)
        times.append((p.seconds_of(fwd), p.seconds_of(fwd) + p.seconds_of(bwd)))
    costs = regrets(times, [bool(c.loop) for _, c in found], p.loop_margin)
    return [
        Choice(
            _label(c, stored_weight),
            cost,
            c,
            stored_weight,
            f,
            fb,
            p,
        )
        for (_, c), (f, fb), cost in zip(found, times, costs, strict=True)
    ]


def _tool_axes(ax: _Axes) -> _Axes:
    """``ax`` with every x-only axis at :data:`SYMBOLIC_LENGTH`: the lengths the two forms a
    tool may see (``lax.dot_general`` and ``jnp.einsum``) are costed with.

    A tool keys what it keeps by the op it intercepts (qwix: a rule's ``op_names``, the
    ``dot_general0`` or ``einsum0`` in the names of static scales), so a layer must give it the
    same op at every call: at calibration and when serving, at any batch size or sequence
    length. Only the weight's lengths are fixed for a layer (its params have them); the x-only
    axes are costed as large, as a symbolic batch is, so the choice is the layer's own.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b t d', 'c d', None, (('c', 4), ('d', 3)))
        >>> _tool_axes(_classify(plan, (2, 1, 4))).sizes
        {'c': 4, 'd': 3, 'b': 65536, 't': 65536}
    """
    long = {a: SYMBOLIC_LENGTH for a in [*ax.x_free, *ax.summed]}
    return dataclasses.replace(ax, sizes={**ax.sizes, **long}, cost_sizes={**ax.cost_sizes, **long})


def _large(p: Profile, *sizes: int) -> int:
    """The elements of the arrays among ``sizes`` larger than ``p.large_array`` (beyond the
    caches: the ``large moved element`` term).

    Example:
        >>> _large(em.planning.XLA_CPU, 1 << 24, 10)
        16777216
    """
    return sum(n for n in sizes if n > p.large_array)


def _full_rate_seconds(ax: _Axes, c: _Candidate, p: Profile) -> float:
    """The predicted forward seconds of ``c`` were its GEMMs as fast per element as wide ones:
    what a block-diagonal packing, which only removes the narrowness, may cost at most."""
    fwd, _ = _terms(ax, c, p)
    return p.seconds_of({**fwd, "narrow dot element": 0.0, "batched flop": 0.0})


def _profile_of(p: Profile | None) -> Profile:
    """``p``, else the profile in use."""
    return profile() if p is None else p


def terms(
    plan: Plan, x_shape: tuple[int, ...], choice: Choice
) -> tuple[dict[str, float], dict[str, float]]:
    """The cost model's terms of one of :func:`candidates`' choices, forward and backward.

    ``benchmarks/calibrate.py`` fits a profile's seconds to measured times with these.
    """
    return _terms(_axes_of(plan, x_shape, choice), choice.candidate, choice.profile)


def _axes_of(plan: Plan, x_shape: tuple[int, ...], choice: Choice) -> _Axes:
    """The axes a choice is made of: the layer's, or its packed layer's."""
    ax = _classify(plan, x_shape)
    return _packed(ax, *choice.candidate.pack) if choice.candidate.pack else ax


def choose(choices: list[Choice]) -> Choice:
    """The planner's pick: XLA's own lowering (the 'as einsum' candidate) unless the first of the
    cheapest is predicted faster by more than the profile's ``depart_margin``.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b t d', 'c d', None, (('c', 64), ('d', 64)))
        >>> choose(candidates(plan, (8, 1, 64), profile=em.planning.EXAMPLE_PROFILE)).kind
        'as einsum'
        >>> choose(candidates(plan, (8, 16, 64), profile=em.planning.EXAMPLE_PROFILE)).kind  # the
        ... # same dot with (b t) merged: XLA's backward of the N-d dot writes out x and y
        'x first'
    """
    return _depart(choices, lambda c: c.cost)


def _depart(choices: list[Choice], cost: Callable[[Choice], float]) -> Choice:
    """The cheapest of XLA's own lowerings by ``cost``, unless the cheapest of all is cheaper by
    more than the profile's ``depart_margin``."""
    best = min(choices, key=cost)
    xla = [c for c in choices if _xla_form(c.candidate)]
    if not xla:  # a stored-weight form: the one there is
        return best
    given = min(xla, key=cost)
    margin = _profile_of(best.profile).depart_margin
    return given if margin is None or cost(given) <= cost(best) * (1 + margin) else best


def choose_forward(choices: list[Choice]) -> Choice:
    """The forward pass's own pick, for inference: XLA's own lowering unless a candidate's
    predicted forward seconds are lower by more than the profile's ``depart_margin`` (a loop's
    count ``1 + loop_margin`` times, as in :func:`regrets`).

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b u c', 't u', None, (('t', 196), ('u', 256)))
        >>> choices = candidates(plan, (64, 196, 512), profile=em.planning.EXAMPLE_PROFILE)
        >>> choose_forward(choices).label
        'w first, batch (b), broadcast over b'
    """
    loop_margin = _profile_of(choices[0].profile).loop_margin
    return _depart(choices, lambda c: c.fwd * (1 + loop_margin if c.candidate.loop else 1))


def split(
    plan: Plan, x_shape: tuple[int, ...], choices: list[Choice], chosen: Choice, low: Lowering
) -> Lowering:
    """``low`` (of ``chosen``, the pick for training), or, where the forward pass has a clearly
    faster pick of its own, that one's lowering with ``backward=low``: the forward pass runs it
    and the backward pass differentiates ``low`` (``_execute`` says so with a ``custom_jvp``), so
    that neither inference nor training pays for the other.

    Split only where the forward pick is predicted faster than ``chosen``'s forward by more than
    the depart margin, and by more than the moves of x and the weight that ``low`` makes before
    its dot (its backward pass needs them still); never on a backend nobody has measured or for
    a symbolic input shape (the moves are counted on concrete lengths).

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b t d', 'c d', None, (('c', 64), ('d', 64)))
        >>> choices = candidates(plan, (8, 16, 64), profile=em.planning.EXAMPLE_PROFILE)
        >>> chosen = choose(choices)
        >>> low = build(plan, (8, 16, 64), chosen)
        >>> split(plan, (8, 16, 64), choices, chosen, low) is low  # one pick for both passes
        True
    """
    p = _profile_of(chosen.profile)
    margin = p.depart_margin
    if margin is None or not all(isinstance(n, int) for n in x_shape):
        return low
    fwd = choose_forward(choices)
    if fwd is chosen or fwd.fwd * (1 + margin) >= chosen.fwd:
        return low
    end = low.steps.index(low.dot)
    moves = ("transpose", "broadcast", "pack")
    moved = [math.prod(s.shape) for s in low.steps[:end] if s.op in moves]
    cost = {"moved element": sum(moved), "large moved element": _large(p, *moved)}
    if fwd.fwd + p.seconds_of(cost) >= chosen.fwd:
        return low
    return dataclasses.replace(build(plan, x_shape, fwd), backward=low)


def _xla_form(c: _Candidate) -> bool:
    """Whether ``c`` is XLA's own lowering: x and the weight as given in one N-d dot, or the
    canonical GEMM form XLA makes of it (x first, no outer axes: the same forward dot, with
    adjacent axes merged by free reshapes, and 2-d dots in the backward pass). Under a tool, the
    ``lax.dot_general`` that ``nn.Dense`` calls; ``jnp.einsum``'s weight-first dot departs."""
    return c.x_first and not (c.loop or c.bcast or c.pack)


def lower(
    plan: Plan,
    x_shape: tuple[int, ...],
    loops: bool | None = None,
    stored_weight: bool = False,
    packs: bool | None = None,
    x_as_given: bool = False,
    einsum: bool = False,
    *,
    profile: Profile | None = None,
) -> Lowering:
    """Decide the lowering of ``plan`` for an input of ``x_shape`` (cached, by profile too).

    ``loops`` allows the loop candidates (see the module docstring) and ``packs`` the
    block-diagonal packings (``None``: as the profile says). ``stored_weight`` asks for the one
    lowering in which the weight is the dot's right operand exactly as stored (see
    :func:`_stored_weight_order`), as a tool's container needs it; ``x_as_given`` also keeps x's
    axes as they are (:func:`_x_as_given_order`), as a Flax layer runs under an interception tool,
    and ``einsum`` lets it be ``jnp.einsum``'s call instead where that is predicted faster by more
    than the profile's ``depart_margin`` (for a tool that patches ``jnp.einsum`` too). The same
    as ``build(plan, x_shape, choose(candidates(...)))``, with the forward pass's own pick in
    front where :func:`split` splits.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t c -> b u c', 't u', None, (('t', 196), ('u', 256)))
        >>> low = lower(plan, (64, 196, 512), profile=em.planning.EXAMPLE_PROFILE)
        >>> low.strategy, low.x_perm, low.y_perm, low.x_dot_shape, low.w_dot_shape
        ('broadcast batch', None, None, (64, 196, 512), (64, 256, 196))
        >>> low.w_broadcast
        ((1, 256, 196), (64, 256, 196))
    """
    p = _profile_of(profile)
    return _lower(plan, x_shape, loops, stored_weight, packs, x_as_given, einsum, p)


@functools.lru_cache(maxsize=4096)
def _lower(
    plan: Plan,
    x_shape: tuple[int, ...],
    loops: bool | None,
    stored_weight: bool,
    packs: bool | None,
    x_as_given: bool,
    einsum: bool,
    p: Profile,
) -> Lowering:
    choices = candidates(plan, x_shape, loops, stored_weight, packs, x_as_given, einsum, profile=p)
    chosen = choose(choices)
    low = build(plan, x_shape, chosen)
    return low if stored_weight else split(plan, x_shape, choices, chosen, low)


def build(plan: Plan, x_shape: tuple[int, ...], choice: Choice) -> Lowering:
    """The :class:`Lowering` of one of :func:`candidates`' choices, for ``execute`` and ``describe``."""
    ax = _axes_of(plan, x_shape, choice)
    best, stored_weight = choice.candidate, choice.stored_weight
    sizes, size, w_axes, out_axes = ax.sizes, ax.size, ax.w_axes, ax.out_axes
    in_w = set(w_axes)
    x_order, w_order, y_order, x_first = best.x_order, best.w_order, best.y_order, best.x_first
    x_blocks, w_blocks = best.x_blocks, best.w_blocks
    rhs_k = 2 if best.rhs_t else 1
    dims: DimensionNumbers
    if stored_weight or best.as_given:
        dims = _stored_weight_dims(best, w_axes)
    elif not best.dot_batch:  # plain 2-d GEMM
        x_blocks, w_blocks = x_blocks[1:], w_blocks[1:]
        dims = (((1,), (rhs_k - 1,)), ((), ()))
    else:
        dims = (((2,), (rhs_k,)), ((0,), (0,)))
    if best.loop:
        x_blocks = [best.loop, *x_blocks]
    w_broadcast = None
    if best.bcast:  # weight (batch..., K/G, G/K) -> unit axes where the dot has x-only axes
        tail = tuple(size(b) for b in w_blocks[1:])
        w_broadcast = (
            tuple(sizes[a] if a in in_w else 1 for a in best.dot_batch) + tail,
            tuple(sizes[a] for a in best.dot_batch) + tail,
        )
    w_perm = _perm(w_axes, w_order, sizes)
    bias_perm, bias_shape = None, None
    if ax.bias_axes is not None:
        bias_axes = ax.bias_axes
        in_bias = set(bias_axes)
        bias_perm = _perm(bias_axes, [a for a in y_order if a in in_bias], sizes)
        bias_shape = tuple(sizes[a] if a in in_bias else 1 for a in y_order)
    w_pack = None
    if best.pack:  # the identity's shape, and where g.k' goes
        g, k = best.pack
        eye = tuple(k if a in (f"{g}.k", f"{g}.k'") else 1 for a in w_axes)
        w_pack = (eye, w_axes.index(f"{g}.k'"))
    y_split_shape = tuple(sizes[a] for a in y_order)
    p = _profile_of(choice.profile)
    named = _classify(plan, x_shape) if best.pack else ax  # the output's groups, as declared
    parts = Parts(
        x_shape=tuple(x_shape),
        x_axes=ax.x_axes,
        w_axes=w_axes,
        w_shape=plan.weight_sizes,
        out_axes=out_axes,
        out_groups_labels=tuple(label(g) for g in named.out_groups),
        sizes=sizes,
        bias_axes=ax.bias_axes,
        x_flat_shape=tuple(sizes[a] for a in ax.x_axes),
        sum_axes=tuple(ax.x_axes.index(a) for a in ax.summed),
        x_perm=_perm(ax.x_kept, x_order, sizes),
        x_dot_shape=tuple(size(b) for b in x_blocks),
        w_pack=w_pack,
        w_perm=w_perm,
        w_broadcast=w_broadcast,
        w_dot_shape=tuple(size(b) for b in w_blocks),
        w_copy=p.w_copy and not x_first and w_perm is not None and w_broadcast is None,
        x_first=x_first,
        loop=bool(best.loop),
        dimension_numbers=dims,
        y_split_shape=y_split_shape,
        bias_perm=bias_perm,
        bias_shape=bias_shape,
        bias_view=None if bias_shape is None else _bias_view(y_split_shape, bias_shape),
        y_perm=_perm(y_order, out_axes, sizes),
        out_flat_shape=tuple(sizes[a] for a in out_axes),
        out_shape=tuple(math.prod(sizes[a] for a in g) for g in ax.out_groups),
        strategy=choice.kind,
        einsum=_einsum_spec(best, w_axes) if best.as_given and not x_first else None,
    )
    return assemble(parts)


def _einsum_spec(c: _Candidate, w_axes: list[str]) -> str:
    """The ``jnp.einsum`` subscripts of the ``'jnp.einsum'`` form: x's axes, the weight's, the
    output's, one letter per axis.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('t b c -> u b c', 't u', None, (('t', 3), ('u', 2)))
        >>> _einsum_spec(_x_as_given_order(_classify(plan, (3, 4, 5)), x_first=False), ['t', 'u'])
        'abc,ad->dbc'
    """
    axes = list(dict.fromkeys([*c.x_order, *w_axes, *c.y_order]))
    assert len(axes) <= len(string.ascii_letters), "candidates() offers it up to 52 axes"
    letter = dict(zip(axes, string.ascii_letters, strict=False))

    def word(names: list[str]) -> str:
        return "".join(letter[a] for a in names)

    return f"{word(c.x_order)},{word(w_axes)}->{word(c.y_order)}"


def _stored_weight_order(ax: _Axes) -> _Candidate:
    """The lowering with the weight as the dot's right operand, untouched (for a container).

    Tools that intercept ``jax.lax.dot_general`` while a Flax module is traced (qwix's
    quantization and LoRA) recognise a weight only when the stored param itself is the second
    operand; they also hand over quantized containers that cannot be transposed or reshaped. So
    the dot takes the weight's dimensions where they are, as N-d dimension numbers, and x is
    brought to ``(batch..., rows, contracted...)``: the batch and contracted axes one dimension
    each, in the weight's order, and every x-only axis merged into one ``rows`` dimension (left
    unmerged, the backward pass's weight-gradient dot contracts over several dimensions, which
    runs slower: see benchmarks/REGRET.md). The dot gives ``(batch..., rows, w-only...)``, transposed to
    the output order afterwards.
    """
    w_axes, x_free, contracted, batch = ax.w_axes, ax.x_free, ax.contracted, ax.batch
    in_x = set(batch) | set(contracted)
    b_w = [a for a in w_axes if a in batch]
    k_w = [a for a in w_axes if a in contracted]
    g_w = [a for a in w_axes if a not in in_x]
    return _Candidate(
        loop=[],
        dot_batch=b_w,
        bcast=[],
        x_first=True,
        rhs_t=False,
        x_order=b_w + x_free + k_w,
        w_order=list(w_axes),
        y_order=b_w + x_free + g_w,
        x_blocks=[*([a] for a in b_w), *([x_free] if x_free else []), *([a] for a in k_w)],
        w_blocks=[[a] for a in w_axes],
    )


def _x_as_given_order(ax: _Axes, x_first: bool = True) -> _Candidate:
    """The stored-weight form with x's axes as they are: nothing moves before the dot.

    The Flax layers run it while a tool intercepts the contraction: x reaches the dot with the
    axes ``nn.Dense`` would give it (groups split, summed axes summed, each axis its own
    dimension, in x's order), so the tool's view of x is ``nn.Dense``'s. qwix takes its batch
    axes (``act_batch_axes``, per-token static scales) by position, and finds a weight by shape
    when its identity is lost: a merged ``((b t), c)`` view of x can have the weight's shape.
    The dot gives ``(batch..., x-only..., w-only...)``, transposed to the output order afterwards.
    ``x_first=False``: the same operands in ``jnp.einsum`` (x, then the weight), which gives the
    output order itself and runs it as ``lax.dot_general(weight, x)``, as einops' layer does.

    Example:
        >>> from ._parse import parse
        >>> plan = parse('b t (h c) -> b t (h d)', 'h c d', None, (('h', 2), ('c', 3), ('d', 4)))
        >>> low = build(plan, (5, 7, 6), candidates(plan, (5, 7, 6), stored_weight=True,
        ...                                          x_as_given=True)[0])
        >>> low.x_perm, low.x_dot_shape, low.dimension_numbers
        (None, (5, 7, 2, 3), (((3,), (1,)), ((2,), (0,))))
    """
    batch = [a for a in ax.x_kept if a in set(ax.batch)]
    in_x = set(ax.batch) | set(ax.contracted)
    dot_order = batch + ax.x_free + [a for a in ax.w_axes if a not in in_x]
    return _Candidate(
        loop=[],
        dot_batch=batch,
        bcast=[],
        x_first=x_first,
        rhs_t=False,
        x_order=list(ax.x_kept),
        w_order=list(ax.w_axes),
        y_order=dot_order if x_first else list(ax.out_axes),
        x_blocks=[[a] for a in ax.x_kept],
        w_blocks=[[a] for a in ax.w_axes],
        as_given=True,
    )


def _stored_weight_dims(c: _Candidate, w_axes: list[str]) -> DimensionNumbers:
    """Dimension numbers of :func:`_stored_weight_order`'s dot: x's blocks against w's axes."""
    batch = [(i, w_axes.index(b[0])) for i, b in enumerate(c.x_blocks) if b[0] in c.dot_batch]
    contracted = [
        (i, w_axes.index(b[0]))
        for i, b in enumerate(c.x_blocks)
        if len(b) == 1 and b[0] in w_axes and b[0] not in c.dot_batch
    ]
    return (
        (tuple(i for i, _ in contracted), tuple(j for _, j in contracted)),
        (tuple(i for i, _ in batch), tuple(j for _, j in batch)),
    )


def _bias_view(
    shape: tuple[int, ...], bias_shape: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``shape`` and ``bias_shape`` with runs of bias / broadcast dimensions merged.

    The bias is added on this coarsest view (usually the dot result's own shape), so that XLA
    reuses one layout of the output gradient for the bias gradient and the backward dots.
    """
    view: list[list[int]] = []  # [y length, bias length] per merged dimension
    for n, m in zip(shape, bias_shape, strict=True):
        if n == 1:
            continue
        if view and (view[-1][1] == 1) == (m == 1):
            view[-1] = [view[-1][0] * n, view[-1][1] * m]
        else:
            view.append([n, m])
    return tuple(v[0] for v in view), tuple(v[1] for v in view)

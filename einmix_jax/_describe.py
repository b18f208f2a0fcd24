"""Introspection: ``describe(layer, x_shape)`` -- what one EinMix call does, step by step.

The steps are the :class:`~einmix_jax.planning.Lowering`'s own, from the function every call
takes its lowering from (``_apply.lowering_for``: measured planning, the Flax layers' form and
the sharding rules included), listed in the order ``execute`` runs them, with the axis names of
every dimension, so a surprising pattern can be traced to the reshape, transpose or broadcast
that it costs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ._apply import form_of, lowering_for, runs_sharded
from ._errors import EinMixError, describe_call
from ._layer import EinMix, layer
from ._lowering import CONTRACTIONS, Lowering, Step, dot_flops
from ._options import index, merge_sizes
from ._params import check_params
from ._parse import normalize_axes, param_sizes_from_input

#: A shape: a tuple of ints.
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True, repr=False)
class Description:
    """What one call of an EinMix layer does for one input shape; ``print`` it for a summary.

    Attributes:
        layer: the functional layer described.
        x_shape: the input shape.
        lowering: the shape-only plan that ``apply`` executes (its ``backward``: the lowering
            whose derivative the backward pass runs, where training's pick differs).
        before: steps on ``x`` and on the weight before the contraction (a ``'copy'`` step: the
            weight is written out, transposed, before the dot).
        contraction: the one ``lax.dot_general`` (its ``arg`` is ``(lhs_shape, rhs_shape,
            dimension_numbers)``, its ``operand`` says which of x and the weight is the lhs).
            With ``loop`` (op ``'loop'``), the dot runs once per slice of x's first dimension
            (``lax.map``): ``arg`` is one iteration's, ``shape`` the stacked result's.
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
        """The lowering picked: ``'as einsum'`` (XLA's own lowering, one N-d
        ``lax.dot_general`` of x and the weight as given; a Flax layer's under an interception
        tool, as ``nn.Dense`` calls it), ``'jnp.einsum'`` (a Flax layer's under a tool that
        patches ``jnp.einsum``, where einops' call is predicted faster), ``'x first'``, ``'w first'``,
        ``'broadcast batch'``, ``'loop'``, ``'block-diagonal'`` or ``'weight as stored'`` (a
        weight that is a tool's container)."""
        return self.lowering.strategy

    @property
    def rearranges(self) -> tuple[Step, ...]:
        """The transposes, broadcasts and packings (the steps that move data; reshapes are free)."""
        moves = ("transpose", "broadcast", "pack")  # a copy writes out a transpose counted here
        return tuple(s for s in self.before + self.after if s.op in moves)

    def __str__(self) -> str:
        shapes = self.layer.param_shapes
        params = " + ".join(f"{name} {shape}" for name, shape in shapes.items())
        extra = self.flops - self.dot_flops
        lhs, rhs, dims = self.contraction.arg
        names = ("x", "weight") if self.contraction.operand == "x" else ("weight", "x")
        if self.contraction.op == "einsum":  # the jnp.einsum call, x first (its subscripts)
            call = [f"    jnp.einsum({dims!r}, x {lhs}, weight {rhs})"]
        else:
            call = [
                f"    lax.dot_general({names[0]} {lhs}, {names[1]} {rhs},",
                f"                    dimension_numbers={dims})",
            ]
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
            *call,
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
        backward = self.lowering.backward
        if backward is not None:  # the forward pass is inference's pick, this one training's
            lines.append(f"  derivatives (grad, jvp): those of the {backward.strategy!r} lowering:")
            lines += [f"    {s}" for s in backward.steps]
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
    params: Mapping[str, Any] | None = None,
    **axes: int,
) -> Description:
    """Describe what one EinMix call does for an input of ``x_shape``; ``print`` the result.

    Args:
        layer_or_pattern: a functional layer (from :func:`einmix_jax.layer` or
            :func:`einmix_jax.init`), a ``einmix_jax.linen.EinMix``, ``einmix_jax.nnx.EinMix`` or
            ``einmix_jax.eqx.EinMix`` module (a Flax layer is described with the lowering it
            runs: the planner's choice, or, while a tool intercepts the contraction, the weight
            as stored), or a pattern string (then ``weight_shape``, ``bias_shape`` and ``axes`` as
            for :func:`einmix_jax.layer`; weight and bias lengths the input fixes may be left out).
        x_shape: the input shape, a tuple of non-negative integers, or anything with a
            ``.shape`` (an array, a ``jax.ShapeDtypeStruct``).
        weight_shape: only with a pattern string: the weight's axes.
        bias_shape: only with a pattern string: the bias's axes.
        sizes: only with a pattern string: axis lengths as a mapping, for any axis name (also
            one named like an argument).
        params: the params the layer is called with (optional): a weight whose type carries
            mesh axes (explicit sharding) is not packed block-diagonally, so its lowering can
            differ from an unsharded weight's.
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
        form = "planned"
    else:
        if weight_shape is not None or bias_shape is not None or sizes is not None or axes:
            raise EinMixError(
                "weight_shape, bias_shape and axis lengths go with a pattern string; "
                f"{type(layer_or_pattern).__name__} already carries them"
            )
        mix = _functional(layer_or_pattern, shape)
        # a Flax layer hands dot_general the weight as stored while a tool may intercept it
        weight_as_stored = bool(getattr(type(layer_or_pattern), "weight_as_stored", False))
        if getattr(layer_or_pattern, "dot_general_cls", None) is not None:
            mix = mix.replace(dot_general=layer_or_pattern.dot_general_cls)  # a hook, as it runs
        form = form_of(mix, weight_as_stored)
    dtype = getattr(x_shape, "dtype", None) or jnp.float32
    x = jax.ShapeDtypeStruct(shape, dtype)
    weight: Any = jax.ShapeDtypeStruct(mix.plan.weight_sizes, mix.param_dtype)
    has_bias = mix.plan.bias_sizes is not None
    if params is not None:
        weight, _ = check_params(mix, params)
    low = lowering_for(mix, x, weight, has_bias, form, measure=not runs_sharded(mix))
    return _describe(mix, shape, low)


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


def _describe(mix: EinMix, x_shape: Shape, low: Lowering) -> Description:
    """The description of ``low``: its steps split around the contraction, and the counts."""
    at = low.steps.index(low.dot)
    dot = low.dot
    flops = dot_flops(low)
    packed_flops = flops
    pack = next((s for s in low.steps if s.op == "pack"), None)
    if pack is not None:  # the layer's FLOPs; the dot also multiplies the zeros
        flops //= pack.arg
    sum_adds = 0
    x_steps = [s for s in low.steps if s.operand == "x" and s.op not in CONTRACTIONS]
    summed = next((i for i, s in enumerate(x_steps) if s.op == "sum"), None)
    if summed is not None:  # the input with groups split, before the sum
        x_flat = x_steps[summed - 1].shape if summed else low.x_shape
        sum_adds = math.prod(x_flat) - math.prod(x_steps[summed].shape)
    has_bias = any(s.op == "add" for s in low.steps)
    bias_adds = math.prod(low.out_shape) if has_bias else 0
    return Description(
        layer=mix,
        x_shape=x_shape,
        lowering=low,
        before=low.steps[:at],
        contraction=dot,
        loop=low.x_dot_shape[0] if low.loop else None,
        after=low.steps[at + 1 :],
        out_shape=low.out_shape,
        param_count=sum(math.prod(s) for s in mix.param_shapes.values()),
        dot_flops=flops,
        flops=flops + sum_adds + bias_adds,
        executed_dot_flops=packed_flops,
    )


def _dims(labels: tuple[str, ...], shape: Shape) -> str:
    dims = [a if a == "1" else f"{a}={n}" for a, n in zip(labels, shape, strict=True)]
    return "(" + ", ".join(dims) + ")"

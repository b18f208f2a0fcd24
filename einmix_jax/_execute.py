"""Execution: run a :class:`~._lowering.Lowering`'s steps on x, the weight and the bias.

Backend-neutral: what to run was decided by the planner (``_lower``), step by step; this module
runs each step as it is written and owns the dtype rule and the contraction that is called
(``jax.lax.dot_general`` as imported, where no tool reaches it, a hook, or -- in a module's
trace -- ``jax.lax.dot_general`` looked up at call time, so that a tool patching it sees it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._errors import EinMixError
from ._lowering import Lowering, Step
from ._options import DotGeneral
from ._params import is_array


class Contraction(Protocol):
    """What the computation reads of a layer besides the lowering (e.g. :class:`~._options.Options`)."""

    @property
    def dtype(self) -> np.dtype | None: ...
    @property
    def precision(self) -> Any: ...
    @property
    def preferred_element_type(self) -> np.dtype | None: ...
    @property
    def dot_general(self) -> DotGeneral | None: ...


def _transpose(a: jax.Array, perm: tuple[int, ...] | None) -> jax.Array:
    """``jnp.transpose`` at the lowest rank: dimensions that stay adjacent move as one.

    The same data movement, but XLA then sees e.g. ``(b t, h, c) -> (h, b t, c)`` instead of a
    4-d transpose, and shares one transposed copy of a gradient between its consumers.
    """
    if perm is None:
        return a
    runs: list[list[int]] = []  # runs of consecutive source dimensions, in destination order
    for p in perm:
        if runs and runs[-1][-1] + 1 == p:
            runs[-1].append(p)
        else:
            runs.append([p])
    if len(runs) == len(perm):
        return jnp.transpose(a, perm)
    by_source = sorted(runs)
    merged = a.reshape([math.prod(a.shape[i] for i in run) for run in by_source])
    moved = jnp.transpose(merged, [by_source.index(run) for run in runs])
    return moved.reshape([a.shape[p] for p in perm])


def _private_copy(fn: Callable) -> Callable:
    """A copy of a plain function that a tool patching ``fn`` (its attribute in its module, or
    its code object, as qwix does) does not reach; anything else as it is."""
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    return copy


#: what tools patch: the public functions as imported, and their code
_PATCHED = tuple(
    (module, name, getattr(module, name), getattr(getattr(module, name), "__code__", None))
    for module, name in ((jax.lax, "dot_general"), (jnp, "einsum"))
)
#: the functional apply's contraction: ``jax.lax.dot_general`` as imported, where no tool reaches
_LAX_DOT_GENERAL = _private_copy(jax.lax.dot_general)
#: ... and ``jnp.einsum``, for the ``'jnp.einsum'`` form
_JNP_EINSUM = _private_copy(jnp.einsum)


def intercepted(layer: Contraction) -> bool:
    """Whether a tool may see ``layer``'s contraction while a module is traced: a ``dot_general``
    hook, or ``jax.lax.dot_general`` / ``jnp.einsum`` patched (as qwix does while it traces).

    Example:
        >>> intercepted(einmix_jax.layer('b c -> b d', c=2, d=3))
        False
    """
    return layer.dot_general is not None or tool_active()


def tool_active() -> bool:
    """Whether ``jax.lax.dot_general`` or ``jnp.einsum`` is patched now (by an interception tool).

    Example:
        >>> tool_active()
        False
    """
    return any(
        getattr(module, name) is not fn or getattr(fn, "__code__", None) is not code
        for module, name, fn, code in _PATCHED
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dot_copied_lhs(dot: Callable, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """``dot(lhs, rhs)`` with ``lhs`` written out first (an optimization barrier keeps XLA from
    folding its transpose into the dot); derivatives as of ``dot(lhs, rhs)``, whose transposes
    XLA may fold where that helps (the weight gradient's and x's gradient's dots).

    Example:
        >>> dot = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())))
        >>> w, x = jnp.ones((3, 2)), jnp.ones((3, 4))
        >>> _dot_copied_lhs(dot, w.T, x).shape
        (2, 4)
    """
    return dot(lax.optimization_barrier(lhs), rhs)


@_dot_copied_lhs.defjvp
def _dot_copied_lhs_jvp(dot: Callable, primals: tuple, tangents: tuple) -> tuple:
    (lhs, rhs), (dlhs, drhs) = primals, tangents
    return _dot_copied_lhs(dot, lhs, rhs), dot(dlhs, rhs) + dot(lhs, drhs)  # bilinear


def execute(
    low: Lowering,
    x: jax.Array,
    weight: Any,
    options: Contraction,
    bias: jax.Array | None = None,
    traced: bool = False,
) -> jax.Array:
    """Run a lowering's steps in order; returns the output.

    The contraction is ``options.dot_general``, else ``jax.lax.dot_general`` (or, for the
    ``'jnp.einsum'`` form, ``jnp.einsum``): looked up at call time when ``traced`` (a module's
    call, so a tool that patches it sees the contraction), as imported otherwise (the functional
    apply's own jit: no tool sees inside it). It is called as
    Flax's layers call it: ``dot_general(lhs, rhs, dimension_numbers, precision=...)``, with
    ``preferred_element_type=`` only when it is set.

    Example:
        >>> import einmix_jax as em
        >>> layer = em.layer('b c -> b d', c=2, d=3)
        >>> low = em.planning.lower(layer.plan, (4, 2))
        >>> execute(low, jnp.ones((4, 2)), jnp.ones((2, 3)), layer.options).shape
        (4, 3)
    """
    hook = options.dot_general
    if low.backward is not None:
        if hook is None and not (traced and tool_active()):
            return _split(low, x, weight, options, bias, traced)
        low = low.backward  # one contraction for a hook or a tool to see: training's pick
    dot_general = hook or (jax.lax.dot_general if traced else _LAX_DOT_GENERAL)
    kwargs: dict[str, Any] = {"precision": options.precision}
    if options.preferred_element_type is not None:
        kwargs["preferred_element_type"] = options.preferred_element_type
    # a hook or a patched jax.lax.dot_general (e.g. a quantized dot) need not be bilinear, as
    # _dot_copied_lhs's derivative assumes: it gets the operands as they are
    own_dot = hook is None and not (traced and tool_active())
    values: dict[str, Any] = {"x": x, "weight": weight, "bias": bias}
    copied = False
    for step in low.steps:
        if step.op == "copy":
            copied = own_dot
        elif step.op in ("dot_general", "loop"):
            values["y"] = _contract(step, values, dot_general, kwargs, copied)
        elif step.op == "einsum":  # x and the weight as they are, as einops' layer calls it
            if hook is not None:
                raise EinMixError(
                    "the 'jnp.einsum' form calls jnp.einsum, which takes no dot_general hook"
                )
            einsum = jnp.einsum if traced else _JNP_EINSUM
            values["y"] = einsum(step.arg[2], values["x"], values["weight"], **kwargs)
        elif step.op == "add":  # in the dot's order: fuses into the transpose, and its gradient
            y_view, bias_view = step.detail
            y = values["y"]
            added = y.reshape(y_view) + values["bias"].astype(y.dtype).reshape(bias_view)
            values["y"] = added.reshape(step.shape)
        else:
            values[step.operand] = _shape_step(step, values[step.operand])
    return values["y"]


def _split(
    low: Lowering,
    x: jax.Array,
    weight: jax.Array,
    options: Contraction,
    bias: jax.Array | None,
    traced: bool,
) -> jax.Array:
    """``low`` forward, and in every derivative (``jvp``, and so ``grad``) the derivative of
    ``low.backward``: the layer is affine, so the two compute the same function, and XLA drops
    the backward lowering's own forward dot, which nothing reads.

    Example:
        >>> import einmix_jax as em
        >>> layer = em.layer('b c -> b d', c=2, d=3)
        >>> one = em.planning.lower(layer.plan, (4, 2))
        >>> low = dataclasses.replace(one, backward=one)
        >>> w, x = jnp.ones((2, 3)), jnp.ones((4, 2))
        >>> jax.grad(lambda w: _split(low, x, w, layer.options, None, False).sum())(w).shape
        (2, 3)
    """
    forward, backward = dataclasses.replace(low, backward=None), low.backward
    assert backward is not None
    operands = (x, weight) if bias is None else (x, weight, bias)

    def run(lowering: Lowering, x: jax.Array, w: jax.Array, *b: jax.Array) -> jax.Array:
        return execute(lowering, x, w, options, b[0] if b else None, traced)

    @jax.custom_jvp
    def f(*operands: jax.Array) -> jax.Array:
        return run(forward, *operands)

    @functools.partial(f.defjvp, symbolic_zeros=True)
    def f_jvp(primals: tuple, tangents: tuple) -> tuple:
        live = [not isinstance(t, jax.custom_derivatives.SymbolicZero) for t in tangents]

        def of_live(*args: jax.Array) -> jax.Array:  # the zero tangents' operands held fixed
            it = iter(args)
            return run(
                backward, *(next(it) if z else p for p, z in zip(primals, live, strict=True))
            )

        args = [p for p, z in zip(primals, live, strict=True) if z]
        _, dy = jax.jvp(of_live, args, [t for t, z in zip(tangents, live, strict=True) if z])
        return f(*primals), dy

    return f(*operands)


def _shape_step(step: Step, a: jax.Array) -> jax.Array:
    """One reshape, sum, transpose, pack or broadcast."""
    if step.op == "reshape":
        return a.reshape(step.arg)
    if step.op == "sum":
        return a.sum(step.arg)
    if step.op == "transpose":
        return _transpose(a, step.arg)
    if step.op == "broadcast":
        return jnp.broadcast_to(a, step.arg)
    if step.op == "pack":  # k groups on the diagonal of one block (see _lower._packed)
        k_axes, at = step.detail
        eye = [step.arg if i in k_axes else 1 for i in range(len(step.shape))]
        return jnp.expand_dims(a, at) * jnp.eye(step.arg, dtype=a.dtype).reshape(eye)
    raise AssertionError(step.op)


def _contract(
    step: Step, values: dict[str, Any], dot_general: Callable, kwargs: dict, copied: bool
) -> jax.Array:
    """The dot (or, for ``'loop'``, one dot per slice of x's first dimension, stacked)."""
    numbers = step.arg[2]
    w = values["weight"]

    def dot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return dot_general(lhs, rhs, numbers, **kwargs)

    def contract(x: jax.Array) -> jax.Array:
        lhs, rhs = (x, w) if step.operand == "x" else (w, x)
        if copied:
            return _dot_copied_lhs(dot, lhs, rhs)
        return dot(lhs, rhs)

    return lax.map(contract, values["x"]) if step.op == "loop" else contract(values["x"])


def compute(
    low: Lowering,
    options: Contraction,
    weight: Any,
    bias: jax.Array | None,
    x: jax.Array,
    traced: bool = False,
) -> jax.Array:
    """The dtype rule (:func:`dtype_of`), then the lowering's steps (:func:`execute`)."""
    dtype = dtype_of(options, weight, bias, x)
    x = x.astype(dtype)
    if is_array(weight) and weight.dtype != dtype:  # a container is the tool's to convert
        weight = weight.astype(dtype)
    return execute(low, x, weight, options, bias, traced)


def dtype_of(options: Contraction, weight: Any, bias: Any, x: Any) -> Any:
    """The computation dtype: ``options.dtype``, else that of x and the params together."""
    dtype = options.dtype
    if dtype is None:  # the layer's own rule, also under jax_numpy_dtype_promotion='strict'
        # a quantized weight container counts with the dtype it stands for
        operands = [p if is_array(p) else p.dtype for p in (weight, bias) if p is not None]
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x, *operands)
            if not jnp.issubdtype(dtype, jnp.inexact):  # integer x and params: the default
                dtype = jnp.result_type(dtype, float)  # float (float64 under x64), not float32
    return dtype

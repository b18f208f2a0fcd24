"""Execution: the pure functional EinMix -- ``init`` -> params dict, ``apply(params, x)``.

``EinMix`` is a hashable description of one layer (plan + dtype options + initializers). Its
``__call__`` runs a single module-level ``jax.jit`` with the layer as a static argument, so every
layer with the same configuration shares one compiled function per input shape and dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from ._errors import EinMixError
from ._init import Initializer, lecun_uniform_bias, lecun_uniform_weight
from ._lower import Lowering, lower
from ._parse import Plan, normalize_axes, parse
from ._shard import OutSharding, apply_sharded, explicit_mesh_active

Params = dict[str, jax.Array]
DotGeneral = Callable[..., jax.Array]


def _dtype(dtype: DTypeLike | None) -> np.dtype | None:
    return None if dtype is None else np.dtype(jnp.dtype(dtype))


@dataclasses.dataclass(frozen=True)
class EinMix:
    """One EinMix layer, as pure functions: ``init(key) -> params`` and ``self(params, x) -> y``.

    Build it with :func:`einmix_jax.init` (which also returns params) or :func:`layer`.

    Example:
        >>> layer = einmix_jax.layer('b t c -> b t d', bias_shape='d', c=4, d=3)
        >>> layer
        EinMix('b t c -> b t d', 'c d', 'd', c=4, d=3)
        >>> params = layer.init(jax.random.key(0))
        >>> layer(params, jnp.ones((2, 5, 4))).shape
        (2, 5, 3)
    """

    plan: Plan
    param_dtype: np.dtype = np.dtype("float32")  # noqa: RUF009 (immutable)
    dtype: np.dtype | None = None
    precision: Any = None
    preferred_element_type: np.dtype | None = None
    #: the contraction; None: ``jax.lax.dot_general``, looked up at each call
    dot_general: DotGeneral | None = None
    #: output sharding constraint, set by ``einmix_jax.with_out_sharding``; None: unconstrained
    out_sharding: OutSharding | None = None
    weight_init: Initializer | None = dataclasses.field(default=None, compare=False)
    bias_init: Initializer | None = dataclasses.field(default=None, compare=False)

    def __repr__(self) -> str:
        return repr(self.plan)

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the params dict, e.g. ``{'weight': (4, 3), 'bias': (3,)}``."""
        shapes = {"weight": self.plan.weight_sizes}
        if self.plan.bias_sizes is not None:
            shapes["bias"] = self.plan.bias_sizes
        return shapes

    def init_weight(self, key: jax.Array) -> jax.Array:
        """Draw the weight, shaped as ``weight_shape`` declares."""
        init = self.weight_init or lecun_uniform_weight(self.plan.fan_in)
        return _checked(init(key, self.plan.weight_sizes, self.param_dtype), self, "weight")

    def init_bias(self, key: jax.Array) -> jax.Array:
        """Draw the bias, shaped as ``bias_shape`` declares (an error if there is no bias)."""
        if self.plan.bias_sizes is None:
            raise EinMixError(f"this layer has no bias ({self.plan.context()})")
        init = self.bias_init or lecun_uniform_bias(self.plan.fan_in)
        return _checked(init(key, self.plan.bias_sizes, self.param_dtype), self, "bias")

    def init(self, key: jax.Array) -> Params:
        """A fresh params dict: ``{'weight'}``, plus ``'bias'`` when the layer has one."""
        weight_key, bias_key = jax.random.split(key)
        params = {"weight": self.init_weight(weight_key)}
        if self.plan.bias_sizes is not None:
            params["bias"] = self.init_bias(bias_key)
        return params

    def __call__(self, params: Params, x: ArrayLike) -> jax.Array:
        """Apply the layer: ``y = rearrange(contract(rearrange(x), weight) + bias)``."""
        return _apply_jit(params, x, layer=self)


def _checked(value: jax.Array, layer: EinMix, name: str) -> jax.Array:
    expected = layer.param_shapes[name]
    if tuple(value.shape) != expected:
        raise EinMixError(
            f"{name}_init returned shape {tuple(value.shape)}, expected {expected} "
            f"({layer.plan.context()})"
        )
    return value


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


def _shape(value: Any) -> tuple[int, ...]:
    """An array's shape; also a quantized container's (anything with a ``shape``)."""
    shape = getattr(value, "shape", None)
    return tuple(np.shape(value) if shape is None else shape)


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _check_params(layer: EinMix, params: Any) -> tuple[Any, jax.Array | None]:
    ctx = layer.plan.context()
    if not isinstance(params, dict) or "weight" not in params:
        raise EinMixError(f"params must be a dict with a 'weight' entry ({ctx})")
    expected = set(layer.param_shapes)
    if set(params) != expected:
        raise EinMixError(
            f"params has entries {sorted(params)}, expected {sorted(expected)} ({ctx})"
        )
    for name, shape in layer.param_shapes.items():
        got = _shape(params[name])
        if got != shape:
            axes = layer.plan.weight_shape if name == "weight" else layer.plan.bias_shape
            raise EinMixError(
                f"params[{name!r}] has shape {got}, expected {shape} for {axes!r} ({ctx})"
            )
    return params["weight"], params.get("bias")


def _apply(
    params: Params, x: ArrayLike, *, layer: EinMix, stored_weight: bool = False
) -> jax.Array:
    weight, bias = _check_params(layer, params)
    x = jnp.asarray(x)
    low = lower(layer.plan, tuple(x.shape), stored_weight=stored_weight)
    return _run(low, layer, weight, bias, x)


def apply_lowering(low: Lowering, params: Params, x: ArrayLike, layer: EinMix) -> jax.Array:
    """Apply ``layer`` with a given lowering (e.g. any of ``_lower.candidates``), as ``apply`` does.

    The same dtype rule and steps as the layer's own apply; only the planner's choice is replaced.
    The benchmarks time every candidate this way.
    """
    weight, bias = _check_params(layer, params)
    return _run(low, layer, weight, bias, jnp.asarray(x))


def _run(
    low: Lowering, layer: EinMix, weight: Any, bias: jax.Array | None, x: jax.Array
) -> jax.Array:
    """Cast to the computation dtype (the layer's rule) and execute ``low``; the output shape."""
    dtype = layer.dtype
    if dtype is None:  # the layer's own rule, also under jax_numpy_dtype_promotion='strict'
        # a quantized weight container counts with the dtype it stands for
        operands = [p for p in (weight, bias) if p is not None]
        operands = [p if _is_array(p) else p.dtype for p in operands]
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x, *operands)
            if not jnp.issubdtype(dtype, jnp.inexact):
                dtype = jnp.result_type(dtype, jnp.float32)
    x = x.astype(dtype)
    if _is_array(weight) and weight.dtype != dtype:  # a container is the tool's to convert
        weight = weight.astype(dtype)
    y = execute(low, x, weight, layer, bias)
    return y.reshape(low.out_shape)


def execute(
    low: Lowering, x: jax.Array, weight: jax.Array, layer: EinMix, bias: jax.Array | None = None
) -> jax.Array:
    """Run a lowering: the contraction and the bias add; returns the output with groups split."""
    x = x.reshape(low.x_flat_shape)
    if low.sum_axes:
        x = x.sum(low.sum_axes)
    x = _transpose(x, low.x_perm).reshape(low.x_dot_shape)
    w = _transpose(weight, low.w_perm)
    if low.w_broadcast is not None:
        w = jnp.broadcast_to(w.reshape(low.w_broadcast[0]), low.w_broadcast[1])
    if tuple(w.shape) != low.w_dot_shape:  # else the weight goes in as it is (see _lower)
        w = w.reshape(low.w_dot_shape)
    # looked up at call time, so a tool that patches jax.lax.dot_general sees the contraction
    dot_general = layer.dot_general or jax.lax.dot_general

    def contract(x: jax.Array) -> jax.Array:
        lhs, rhs = (x, w) if low.x_first else (w, x)
        return dot_general(
            lhs,
            rhs,
            low.dimension_numbers,
            precision=layer.precision,
            preferred_element_type=layer.preferred_element_type,
        )

    y = lax.map(contract, x) if low.loop else contract(x)
    if bias is not None:  # in the dot's order: fuses into the transpose, and its gradient too
        assert low.bias_view is not None
        y_view, bias_view = low.bias_view
        y = y.reshape(y_view) + _transpose(bias.astype(y.dtype), low.bias_perm).reshape(bias_view)
    y = _transpose(y.reshape(low.y_split_shape), low.y_perm)
    return y.reshape(low.out_flat_shape)


def _apply_maybe_sharded(
    params: Params, x: ArrayLike, *, layer: EinMix, stored_weight: bool = False
) -> jax.Array:
    """``_apply``, under the mesh's sharding rules when the layer or the context mesh asks for it."""
    compute = functools.partial(_apply, stored_weight=stored_weight)
    if layer.out_sharding is not None or explicit_mesh_active():
        return apply_sharded(compute, params, x, layer)
    return compute(params, x, layer=layer)


_apply_jit = jax.jit(_apply_maybe_sharded, static_argnames=("layer",))


def apply_traced(
    layer: EinMix, params: Params, x: ArrayLike, *, weight_as_stored: bool = True
) -> jax.Array:
    """Apply ``layer`` inside the caller's trace, as a module does: no jit of its own.

    With ``weight_as_stored`` (the Flax layers), the stored weight is the second operand of
    ``jax.lax.dot_general`` (looked up at call time), untouched, like ``nn.Dense``'s kernel, so
    tools that intercept the contraction while a module is traced (qwix's quantization and LoRA)
    see it and may hand in a quantized container instead of an array. Without it (the Equinox
    layer, which no such tool intercepts) the planner picks from every lowering.

    Example:
        >>> layer = einmix_jax.layer('b (h c) -> b (h d)', weight_shape='h c d', h=2, c=3, d=4)
        >>> params = layer.init(jax.random.key(0))
        >>> apply_traced(layer, params, jnp.ones((5, 6))).shape
        (5, 8)
    """
    return _apply_maybe_sharded(params, x, layer=layer, stored_weight=weight_as_stored)


def layer(
    pattern: str,
    /,
    *,
    weight_shape: str | None = None,
    bias_shape: str | None = None,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
    precision: Any = None,
    preferred_element_type: DTypeLike | None = None,
    weight_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    dot_general: DotGeneral | None = None,
    **axes: int,
) -> EinMix:
    """Describe an EinMix layer without drawing params (see :func:`init` for the arguments).

    Example:
        >>> einmix_jax.layer('b c -> b d', c=3, d=2).param_shapes
        {'weight': (3, 2)}
    """
    context = f"pattern {pattern!r}"
    plan = parse(pattern, weight_shape, bias_shape, normalize_axes(axes, context))
    if isinstance(precision, list):
        precision = tuple(precision)
    return EinMix(
        plan=plan,
        param_dtype=np.dtype(jnp.dtype(param_dtype)),
        dtype=_dtype(dtype),
        precision=precision,
        preferred_element_type=_dtype(preferred_element_type),
        dot_general=dot_general,
        weight_init=weight_init,
        bias_init=bias_init,
    )


def init(
    pattern: str,
    key: jax.Array,
    /,
    *,
    weight_shape: str | None = None,
    bias_shape: str | None = None,
    param_dtype: DTypeLike = jnp.float32,
    dtype: DTypeLike | None = None,
    precision: Any = None,
    preferred_element_type: DTypeLike | None = None,
    weight_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    dot_general: DotGeneral | None = None,
    **axes: int,
) -> tuple[Params, EinMix]:
    """Create an EinMix layer: a params dict and the pure, jitted ``apply(params, x)``.

    Args:
        pattern: input and output axes, e.g. ``'b t (h c) -> b t (h d)'``.
        key: a ``jax.random.key`` or legacy ``PRNGKey``.
        weight_shape: the weight's axes in storage order, e.g. ``'h c d'``; ``None`` infers the
            axes only in the input, then those only in the output; ``''`` is a scalar weight.
        bias_shape: the bias's axes (all in the output, after any ``...``); ``None``: no bias.
        param_dtype: dtype of the stored params.
        dtype: dtype of the computation and the output (inputs and params are cast to it);
            ``None`` promotes the input's and the params' dtypes.
        precision: passed to ``lax.dot_general`` (``lax.Precision``, a string or a pair).
        preferred_element_type: accumulation/output dtype passed to ``lax.dot_general``.
        weight_init: ``(key, shape, dtype) -> Array`` drawing the weight; default: symmetric
            uniform with variance ``1/fan_in``.
        bias_init: the same for the bias; default: symmetric uniform with bound
            ``sqrt(1/fan_in)``.
        dot_general: the contraction (a hook for quantisation); ``None``: ``jax.lax.dot_general``,
            looked up at each call, so tools that patch it (qwix) see the contraction.
        **axes: axis lengths; every weight and bias axis needs one.

    Example:
        >>> params, apply = einmix_jax.init('b t (h c) -> b t (h d)', jax.random.key(0),
        ...                                 weight_shape='h c d', bias_shape='h d', h=2, c=3, d=4)
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (2, 4), 'weight': (2, 3, 4)}
        >>> apply(params, jnp.ones((5, 7, 6))).shape
        (5, 7, 8)
    """
    mix = layer(
        pattern,
        weight_shape=weight_shape,
        bias_shape=bias_shape,
        param_dtype=param_dtype,
        dtype=dtype,
        precision=precision,
        preferred_element_type=preferred_element_type,
        weight_init=weight_init,
        bias_init=bias_init,
        dot_general=dot_general,
        **axes,
    )
    return mix.init(key), mix

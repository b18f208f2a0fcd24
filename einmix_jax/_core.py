"""Execution: the pure functional EinMix -- ``init`` -> params dict, ``apply(params, x)``.

``EinMix`` is a hashable description of one layer (plan + dtype options + initializers). Its
``__call__`` validates the params, plans the lowering for the input's shape and runs the jitted
function of that computation, kept in a bounded LRU (:data:`COMPILED_APPLIES`): layers that compute
the same thing share one compiled function per input shape and dtype, and no initializer or layer
is kept alive by it. The Flax and Equinox layers run :func:`apply_traced`, with no jit of their
own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from ._cache import LRU
from ._errors import EinMixError
from ._init import Initializer, lecun_uniform_bias, lecun_uniform_weight
from ._lower import Lowering, lower
from ._measure import measuring
from ._measure import plan as measured_plan
from ._options import axes_repr, check_options, merge_sizes, options_repr, reject_length
from ._parse import Plan, check_texts, normalize_axes, parse
from ._shard import OutSharding, apply_sharded, explicit_mesh_active

Params = dict[str, jax.Array]
DotGeneral = Callable[..., jax.Array]


def hook_key(fn: Any) -> Any:
    """What a callable option (an init, ``dot_general``) compares and hashes by, inside a layer.

    A ``functools.partial`` compares by its function and arguments, so rebuilding the same partial
    gives an equal layer; anything else by its own ``==`` (identity for functions). What cannot be
    hashed compares by identity, so the layer stays a hashable static ``jit`` argument.

    Example:
        >>> import functools
        >>> hook_key(functools.partial(max, 1)) == hook_key(functools.partial(max, 1))
        True
        >>> (lambda: 0) == (lambda: 0)  # two functions: never equal
        False
    """
    if isinstance(fn, functools.partial):
        key = ("partial", hook_key(fn.func), fn.args, tuple(sorted(fn.keywords.items())))
        try:
            hash(key)
        except TypeError:
            return _Identity(fn)
        return key
    try:
        hash(fn)
    except TypeError:
        return _Identity(fn)
    return fn


class _Weak:
    """A key part held weakly: equal to another while both objects live and are equal.

    A compiled apply's key holds its hook this way, so a hook (and what it captured) is freed
    with the layer that holds it, while an equal rebuilt partial finds the same compiled apply.
    """

    __slots__ = ("__weakref__", "hash", "ref")

    def __init__(self, obj: Any) -> None:
        self.ref = _weak_ref(obj)
        self.hash = hash(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Weak):
            return False
        a, b = self.ref(), other.ref()
        return a is not None and b is not None and (a is b or bool(a == b))

    def __hash__(self) -> int:
        return self.hash


def weak_key(key: Any) -> Any:
    """``key`` (a :func:`hook_key`) with every object in it held weakly where it can be.

    Example:
        >>> weak_key(hook_key(functools.partial(max, 1))) == weak_key(hook_key(functools.partial(max, 1)))
        True
    """
    if isinstance(key, tuple):
        return tuple(weak_key(k) for k in key)
    if isinstance(key, _Identity):
        try:
            return _WeakIdentity(key.obj)
        except TypeError:
            return key
    try:
        return _Weak(key)
    except TypeError:  # a value (a number, a string, None): nothing to free
        return key


class _WeakIdentity(_Weak):
    """A weakly held object that compares by identity (it may be unhashable)."""

    __slots__ = ()

    def __init__(self, obj: Any) -> None:
        self.ref = weakref.ref(obj)
        self.hash = id(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _WeakIdentity):
            return False
        a = self.ref()
        return a is not None and a is other.ref()

    def __hash__(self) -> int:
        return self.hash


class _Identity:
    """Compares and hashes by the identity of the object it holds."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class EinMix:
    """One EinMix layer, as pure functions: ``init(key) -> params`` and ``self(params, x) -> y``.

    ``EinMix(pattern, weight_shape, bias_shape, **options_and_axes)`` takes the arguments of
    :func:`layer` (einops' torch-layer order), so its ``repr`` pastes back into an equal layer.
    Layers are equal when they compute the same thing, initializers included; they are hashable,
    for use as static ``jit`` arguments.

    Example:
        >>> layer = einmix_jax.layer('b t c -> b t d', bias_shape='d', c=4, d=3)
        >>> layer
        EinMix('b t c -> b t d', 'c d', 'd', c=4, d=3)
        >>> layer == EinMix('b t c -> b t d', 'c d', 'd', c=4, d=3)
        True
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
    weight_init: Initializer | None = None
    bias_init: Initializer | None = None

    def __init__(
        self,
        /,
        plan: str | Plan,
        weight_shape: str | None = None,
        bias_shape: str | None = None,
        *,
        sizes: Mapping[str, int] | None = None,
        param_dtype: DTypeLike = jnp.float32,
        dtype: DTypeLike | None = None,
        precision: Any = None,
        preferred_element_type: DTypeLike | None = None,
        dot_general: DotGeneral | None = None,
        out_sharding: OutSharding | None = None,
        weight_init: Initializer | None = None,
        bias_init: Initializer | None = None,
        **axes: Any,  # lengths, checked (Any: a misplaced option is reported, not mistyped)
    ) -> None:
        """Build and validate a layer; ``plan`` is the pattern (or an already parsed ``Plan``)."""
        check_texts(plan, weight_shape, bias_shape)
        ctx = plan.context() if isinstance(plan, Plan) else f"pattern {plan!r}"
        values = check_options(
            ctx,
            param_dtype=param_dtype,
            dtype=dtype,
            precision=precision,
            preferred_element_type=preferred_element_type,
            dot_general=dot_general,
            weight_init=weight_init,
            bias_init=bias_init,
        )
        values["out_sharding"] = out_sharding
        if out_sharding is not None and not isinstance(out_sharding, OutSharding):
            raise EinMixError(
                f"out_sharding is set by einmix_jax.with_out_sharding(layer, rules), got "
                f"{out_sharding!r} ({ctx})"
            )
        if isinstance(plan, Plan):
            if weight_shape is not None or bias_shape is not None or sizes or axes:
                raise EinMixError(
                    f"EinMix(plan) takes no weight_shape, bias_shape or lengths: the plan has "
                    f"them ({ctx})"
                )
        else:
            reject_length("weight_shape", weight_shape, ctx)
            reject_length("bias_shape", bias_shape, ctx)
            lengths = normalize_axes(merge_sizes(sizes, axes, ctx), ctx)
            plan = parse(plan, weight_shape, bias_shape, lengths)
        values["plan"] = plan
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def _key(self) -> tuple[Any, ...]:
        """Equal keys: the layers compute the same thing, initializers included."""
        return (
            self.plan,
            self.param_dtype,
            self.dtype,
            self.precision,
            self.preferred_element_type,
            hook_key(self.dot_general),
            self.out_sharding,
            hook_key(self.weight_init),
            hook_key(self.bias_init),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EinMix):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        plan = self.plan
        args = [repr(plan.pattern), repr(plan.weight_shape)]
        if plan.bias_shape is not None:
            args.append(repr(plan.bias_shape))
        args += axes_repr(plan.axes)
        args += options_repr(
            {
                "param_dtype": self.param_dtype,
                "dtype": self.dtype,
                "precision": self.precision,
                "preferred_element_type": self.preferred_element_type,
                "dot_general": self.dot_general,
                "weight_init": self.weight_init,
                "bias_init": self.bias_init,
            }
        )
        text = f"EinMix({', '.join(args)})"
        out = self.out_sharding
        if out is None:
            return text
        target = repr(out.spec) if out.spec is not None else repr(out.rules)
        extra = f", logical_axes={dict(out.logical_axes)!r}" if out.logical_axes else ""
        return f"with_out_sharding({text}, {target}{extra})"

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
        check_key(key, self.plan.context())
        weight_key, bias_key = jax.random.split(key)
        params = {"weight": self.init_weight(weight_key)}
        if self.plan.bias_sizes is not None:
            params["bias"] = self.init_bias(bias_key)
        return params

    def __call__(self, params: Mapping[str, Any], x: ArrayLike) -> jax.Array:
        """Apply the layer: ``y = rearrange(contract(rearrange(x), weight) + bias)``.

        Runs the compiled function of what this call computes (see :data:`COMPILED_APPLIES`):
        layers that compute the same thing share it, whatever their axis names or initializers.
        """
        weight, bias = _check_params(self, _entries(self, params))  # errors before any trace
        x = x if isinstance(x, jax.Array) else jnp.asarray(x)
        if self.out_sharding is not None or explicit_mesh_active():
            # the mesh rules need the plan: one computation per layer (its initializers and hook
            # dropped: the hook is held weakly, as in every computation)
            bare = dataclasses.replace(self, weight_init=None, bias_init=None, dot_general=None)
            key = _Computation.of(self, None, bare)
        else:
            key = _Computation.of(self, _lowering(self, weight, bias, x), None)
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        jitted = _COMPILED.get_or_add(key, lambda: jax.jit(key))
        jitted.__wrapped__.use(self.dot_general)  # this call's (equal) hook, for any retrace
        return jitted(params, x)


def check_key(key: Any, context: str) -> None:
    """``key``: one ``jax.random.key(seed)``, or one legacy ``jax.random.PRNGKey(seed)``.

    Example:
        >>> check_key(jax.random.key(0), '')
        >>> check_key(42, "pattern 'b c -> b d'")
        Traceback (most recent call last):
        ...
        einmix_jax._errors.EinMixError: key must be one jax.random.key, e.g. jax.random.key(42), got 42 (pattern 'b c -> b d')
    """
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if isinstance(key, (jax.Array, np.ndarray)) and dtype is not None:
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
            return
        if dtype == np.uint32 and shape == (2,):  # a legacy PRNGKey
            return
    got = repr(key) if not hasattr(key, "shape") else f"an array of shape {shape} and dtype {dtype}"
    seed = key if isinstance(key, int) and not isinstance(key, bool) else 0
    raise EinMixError(
        f"key must be one jax.random.key, e.g. jax.random.key({seed}), got {got} ({context})"
    )


def _checked(value: Any, layer: EinMix, name: str) -> jax.Array:
    """An initializer's result: an array (a nested list of numbers is read as one) of the
    declared shape and of ``param_dtype``."""
    ctx = layer.plan.context()
    if not hasattr(value, "dtype"):
        try:
            value = jnp.asarray(value, layer.param_dtype)
        except (TypeError, ValueError):
            raise EinMixError(
                f"{name}_init must return an array, got {_short(value)} ({ctx})"
            ) from None
    expected = layer.param_shapes[name]
    if tuple(value.shape) != expected:
        raise EinMixError(
            f"{name}_init returned shape {tuple(value.shape)}, expected {expected} ({ctx})"
        )
    want = jax.dtypes.canonicalize_dtype(layer.param_dtype)
    if value.dtype != want:
        raise EinMixError(
            f"{name}_init returned dtype {value.dtype}, expected {want} (param_dtype; the "
            f"initializer is called with it as its dtype argument) ({ctx})"
        )
    return jnp.asarray(value)


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


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))


def _param_value(value: Any, name: str, ctx: str) -> Any:
    """One param as the core computes with it: Flax's boxes unwrapped, a nested list of numbers
    read as an array; an array, or a quantized container (anything else with a ``shape`` and a
    ``dtype``, a tool's to handle), as it is."""
    if hasattr(value, "unbox"):  # linen's partitioning boxes
        value = value.unbox()
    if type(value).__module__.startswith("flax.") and hasattr(value, "get_value"):
        value = value.get_value()  # an nnx.Variable, e.g. from nnx.state(layer)
    if _is_array(value):
        if jnp.issubdtype(value.dtype, jnp.number):
            return value
    elif hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    else:
        try:
            array = jnp.asarray(value)
        except (TypeError, ValueError):
            array = None
        if array is not None and jnp.issubdtype(array.dtype, jnp.number):
            return array
    raise EinMixError(
        f"params[{name!r}] must be an array of numbers (or nested lists of numbers), got "
        f"{_short(value)} ({ctx})"
    )


def _check_params(layer: EinMix, params: Any) -> tuple[Any, jax.Array | None]:
    """The weight and bias of ``params``: any mapping (dict, ``FrozenDict``, ``nnx.State``) of
    arrays, Flax boxes (``nn.LogicallyPartitioned``, ``nnx.Param``) or lists of numbers."""
    ctx = layer.plan.context()
    if not isinstance(params, Mapping) or "weight" not in params:
        raise EinMixError(
            "params must be a mapping (a dict, FrozenDict or nnx.State) with a 'weight' entry, "
            f"got {type(params).__name__} ({ctx})"
        )
    expected = set(layer.param_shapes)
    if set(params) != expected:
        raise EinMixError(
            f"params has entries {sorted(params)}, expected {sorted(expected)} ({ctx})"
        )
    values: dict[str, Any] = {}
    for name, shape in layer.param_shapes.items():
        value = _param_value(params[name], name, ctx)
        got = tuple(value.shape)
        if got != shape:
            axes = layer.plan.weight_shape if name == "weight" else layer.plan.bias_shape
            raise EinMixError(
                f"params[{name!r}] has shape {got}, expected {shape} for {axes!r} ({ctx})"
            )
        values[name] = value
    return values["weight"], values.get("bias")


def _entries(layer: EinMix, params: Any) -> Any:
    """``params`` as a dict whose lists of numbers are arrays, ready to pass through ``jit``
    (the entries of an ``nnx.State`` or ``FrozenDict`` are pytrees already)."""
    if not isinstance(params, Mapping):
        return params  # _check_params names the problem
    out = dict(params)
    for name, value in out.items():
        if isinstance(value, (list, tuple)):
            try:
                out[name] = jnp.asarray(value)
            except (TypeError, ValueError):
                raise EinMixError(
                    f"params[{name!r}] must be an array of numbers (or nested lists of numbers), "
                    f"got {_short(value)} ({layer.plan.context()})"
                ) from None
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _apply(
    params: Params,
    x: ArrayLike,
    *,
    layer: EinMix,
    stored_weight: bool = False,
    measure: bool = False,
    traced: bool = False,
) -> jax.Array:
    """One apply, in the caller's trace; ``traced``: a module's (a tool may see the contraction)."""
    weight, bias = _check_params(layer, params)
    x = jnp.asarray(x)
    if stored_weight:
        low = lower(layer.plan, tuple(x.shape), stored_weight=True, x_as_given=intercepted(layer))
    else:
        low = _lowering(layer, weight, bias, x, measure)
    return _compute(low, layer, weight, bias, x, traced)


def _packs(weight: Any) -> bool | None:
    """No block-diagonal packing of a weight whose type carries mesh axes (explicit sharding:
    the packing's reshapes would need them respecified); else the planner's default."""
    sharding = getattr(jax.typeof(weight), "sharding", None) if _is_array(weight) else None
    spec = getattr(sharding, "spec", None) or ()
    return False if any(p is not None for p in spec) else None


def _lowering(
    layer: EinMix, weight: Any, bias: jax.Array | None, x: jax.Array, measure: bool = True
) -> Lowering:
    """The planner's lowering for ``x``; measured inside ``einmix_jax.measured_planning()``
    (unless ``measure`` is off: under the mesh rules)."""
    packs = _packs(weight)
    if not (measure and measuring()) or not _is_array(weight):  # a tool's container: as planned
        return lower(layer.plan, tuple(x.shape), packs=packs)

    def run(low: Lowering, w: jax.Array, b: jax.Array | None, x: jax.Array) -> jax.Array:
        return _compute(low, layer, w, b, x)

    options = (layer.dtype, layer.precision, layer.preferred_element_type)
    return measured_plan(
        layer.plan,
        tuple(x.shape),
        _dtype(layer, weight, bias, x),
        weight.dtype,
        bias is not None,
        (*options, weak_key(hook_key(layer.dot_general))),
        run,
        packs,
    )


def apply_lowering(low: Lowering, params: Params, x: ArrayLike, layer: EinMix) -> jax.Array:
    """Apply ``layer`` with a given lowering (e.g. any of ``_lower.candidates``), as ``apply`` does.

    The same dtype rule and steps as the layer's own apply; only the planner's choice is replaced.
    The benchmarks time every candidate this way.
    """
    weight, bias = _check_params(layer, params)
    return _compute(low, layer, weight, bias, jnp.asarray(x), traced=True)


class _Options(Protocol):
    """What the computation reads of a layer besides the lowering."""

    @property
    def dtype(self) -> np.dtype | None: ...
    @property
    def precision(self) -> Any: ...
    @property
    def preferred_element_type(self) -> np.dtype | None: ...
    @property
    def dot_general(self) -> DotGeneral | None: ...


def _compute(
    low: Lowering,
    options: _Options,
    weight: Any,
    bias: jax.Array | None,
    x: jax.Array,
    traced: bool = False,
) -> jax.Array:
    """The dtype rule, then the lowering's steps (:func:`execute`), on checked params."""
    dtype = _dtype(options, weight, bias, x)
    x = x.astype(dtype)
    if _is_array(weight) and weight.dtype != dtype:  # a container is the tool's to convert
        weight = weight.astype(dtype)
    y = execute(low, x, weight, options, bias, traced)
    return y.reshape(low.out_shape)


def _dtype(options: _Options, weight: Any, bias: jax.Array | None, x: jax.Array) -> Any:
    """The computation dtype: ``options.dtype``, else that of x and the params together."""
    dtype = options.dtype
    if dtype is None:  # the layer's own rule, also under jax_numpy_dtype_promotion='strict'
        # a quantized weight container counts with the dtype it stands for
        operands = [p if _is_array(p) else p.dtype for p in (weight, bias) if p is not None]
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(x, *operands)
            if not jnp.issubdtype(dtype, jnp.inexact):  # integer x and params: the default
                dtype = jnp.result_type(dtype, float)  # float (float64 under x64), not float32
    return dtype


#: The most compiled functional applies the library keeps at once: one per distinct computation
#: (lowering, dtype options and contraction) that has been applied, least recently used dropped
#: first, with its traces and compiled code. A layer's initializers and names are not part of
#: it, so a deleted layer leaves nothing behind.
COMPILED_APPLIES = 256


@dataclasses.dataclass(frozen=True)
class _Computation:
    """What one functional apply computes, and nothing more: the key of its compiled function.

    Layers that differ only in axis names, keyword order, pattern spacing or initializers have
    equal lowerings (which hold no names) and so share one compiled function.
    """

    lowering: Lowering | None  #: None when the mesh rules decide inside the trace (``sharded``)
    dtype: np.dtype | None
    precision: Any
    preferred_element_type: np.dtype | None
    #: what ``dot_general`` compares by (a partial: its function and arguments), held weakly
    dot_key: Any
    sharded: EinMix | None  #: the layer, initializers and hook dropped, when mesh rules apply
    #: the hook of the latest call, held weakly (the call holds it while it may trace)
    hook_ref: Callable[[], DotGeneral | None] = dataclasses.field(compare=False)

    @classmethod
    def of(cls, layer: EinMix, low: Lowering | None, sharded: EinMix | None) -> _Computation:
        key = weak_key(hook_key(layer.dot_general))
        dtype, precision, preferred = layer.dtype, layer.precision, layer.preferred_element_type
        return cls(low, dtype, precision, preferred, key, sharded, _ref(layer.dot_general))

    def use(self, hook: DotGeneral | None) -> None:
        """Trace with ``hook`` (equal to the one this computation was made with) from now on."""
        object.__setattr__(self, "hook_ref", _ref(hook))

    @property
    def dot_general(self) -> DotGeneral | None:
        """The hook, for the steps (:class:`_Options`)."""
        hook = self.hook_ref()
        if hook is None and self.dot_key is not None:
            raise EinMixError("the dot_general hook of this compiled apply was deleted")
        return hook

    def __call__(self, params: Params, x: jax.Array) -> jax.Array:
        """The traced body of the compiled apply: no tool sees inside it (``jax.lax.dot_general``
        as imported, unless the layer has a hook), whatever is patched while it is traced."""
        if self.sharded is not None:
            layer = dataclasses.replace(self.sharded, dot_general=self.dot_general)
            return apply_sharded(_apply, params, x, layer)
        assert self.lowering is not None
        return _compute(self.lowering, self, params["weight"], params.get("bias"), x)


def _ref(hook: DotGeneral | None) -> Callable[[], DotGeneral | None]:
    """A weak reference to ``hook`` where it can be held weakly, else a strong one."""
    if hook is None:
        return lambda: None
    try:
        return _weak_ref(hook)
    except TypeError:  # e.g. a builtin: nothing it could capture
        return lambda: hook


def _weak_ref(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` (a ``WeakMethod`` for a bound method, which would die at
    once); ``TypeError`` where ``obj`` cannot be held weakly."""
    is_method = hasattr(obj, "__self__") and hasattr(obj, "__func__")
    return (weakref.WeakMethod if is_method else weakref.ref)(obj)


#: the ``jax.jit`` function of each :class:`_Computation` applied (see :data:`COMPILED_APPLIES`)
_COMPILED: LRU[Any] = LRU(COMPILED_APPLIES)


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


def intercepted(layer: EinMix) -> bool:
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
    weight: jax.Array,
    layer: _Options,
    bias: jax.Array | None = None,
    traced: bool = False,
) -> jax.Array:
    """Run a lowering: the contraction and the bias add; returns the output with groups split.

    The contraction is ``layer.dot_general``, else ``jax.lax.dot_general``: looked up at call
    time when ``traced`` (a module's call, so a tool that patches it sees the contraction), as
    imported otherwise (the functional apply's own jit: no tool sees inside it). It is called as
    Flax's layers call it: ``dot_general(lhs, rhs, dimension_numbers, precision=...)``, with
    ``preferred_element_type=`` only when it is set.
    """
    x = x.reshape(low.x_flat_shape)
    if low.sum_axes:
        x = x.sum(low.sum_axes)
    x = _transpose(x, low.x_perm).reshape(low.x_dot_shape)
    w = weight
    if low.w_pack is not None:  # k groups on the diagonal of one block (see _lower._packed)
        eye, at = low.w_pack
        w = jnp.expand_dims(w, at) * jnp.eye(eye[at], dtype=w.dtype).reshape(eye)
    w = _transpose(w, low.w_perm)
    if low.w_broadcast is not None:
        w = jnp.broadcast_to(w.reshape(low.w_broadcast[0]), low.w_broadcast[1])
    if tuple(w.shape) != low.w_dot_shape:  # else the weight goes in as it is (see _lower)
        w = w.reshape(low.w_dot_shape)
    dot_general = layer.dot_general or (jax.lax.dot_general if traced else _LAX_DOT_GENERAL)
    kwargs: dict[str, Any] = {"precision": layer.precision}
    if layer.preferred_element_type is not None:
        kwargs["preferred_element_type"] = layer.preferred_element_type

    def dot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return dot_general(lhs, rhs, low.dimension_numbers, **kwargs)

    # a hook or a patched jax.lax.dot_general (e.g. a quantized dot) need not be bilinear, as
    # _dot_copied_lhs's derivative assumes: it gets the operands as they are
    copy_lhs = low.w_copy and layer.dot_general is None and not (traced and tool_active())

    def contract(x: jax.Array) -> jax.Array:
        lhs, rhs = (x, w) if low.x_first else (w, x)
        if copy_lhs:
            return _dot_copied_lhs(dot, lhs, rhs)
        return dot(lhs, rhs)

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
    compute = functools.partial(_apply, stored_weight=stored_weight, traced=True)
    if layer.out_sharding is not None or explicit_mesh_active():
        return apply_sharded(compute, params, x, layer)
    return compute(params, x, layer=layer, measure=True)


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
    weight_shape: str | None = None,
    bias_shape: str | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
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
        >>> einmix_jax.layer('b c -> b d', 'd c', 'd', c=3, d=2)  # einops' torch-layer order
        EinMix('b c -> b d', 'd c', 'd', c=3, d=2)
    """
    return EinMix(
        pattern,
        weight_shape,
        bias_shape,
        # all lengths in one mapping: an axis named 'plan' or 'out_sharding' is just an axis here
        sizes=merge_sizes(sizes, axes, f"pattern {pattern!r}"),
        param_dtype=param_dtype,
        dtype=dtype,
        precision=precision,
        preferred_element_type=preferred_element_type,
        dot_general=dot_general,
        weight_init=weight_init,
        bias_init=bias_init,
    )


def init(
    pattern: str,
    key: jax.Array,
    /,
    weight_shape: str | None = None,
    bias_shape: str | None = None,
    *,
    sizes: Mapping[str, int] | None = None,
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
            Positional or keyword, as in einops' torch layer.
        bias_shape: the bias's axes (all in the output, after any ``...``); ``None``: no bias.
        sizes: axis lengths as a mapping, beside ``**axes``; for any axis name, also one that
            is an option's name (``sizes={'dtype': 4}``).
        param_dtype: floating dtype of the stored params.
        dtype: floating dtype of the computation and the output (inputs and params are cast to
            it); ``None`` promotes the input's and the params' dtypes, integer inputs to the
            params' float dtype. Integer dtypes are refused: they would truncate the params.
        precision: passed to ``lax.dot_general`` (``lax.Precision``, a string or a pair).
        preferred_element_type: floating accumulation dtype passed to ``lax.dot_general``.
        weight_init: ``(key, shape, dtype) -> Array`` drawing the weight; default: symmetric
            uniform with variance ``1/fan_in``.
        bias_init: the same for the bias; default: symmetric uniform with bound
            ``sqrt(1/fan_in)``.
        dot_general: the contraction (a hook for quantisation); ``None``: ``jax.lax.dot_general``,
            looked up at each call, so tools that patch it (qwix) see the contraction.
        **axes: axis lengths; every weight and bias axis needs one.

    Raises:
        EinMixError: for any invalid argument, naming it, before anything is drawn.

    Example:
        >>> params, apply = einmix_jax.init('b t (h c) -> b t (h d)', jax.random.key(0),
        ...                                 'h c d', 'h d', h=2, c=3, d=4)
        >>> jax.tree.map(jnp.shape, params)
        {'bias': (2, 4), 'weight': (2, 3, 4)}
        >>> apply(params, jnp.ones((5, 7, 6))).shape
        (5, 7, 8)
    """
    mix = layer(
        pattern,
        weight_shape,
        bias_shape,
        sizes=sizes,
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

"""The layer value: :class:`EinMix` (a plan, its options, an output sharding), ``layer``, ``init``.

``EinMix`` is a hashable description of one layer; its ``init`` draws the params and its
``__call__`` runs the compiled functional apply (``_apply``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from ._apply import Params, apply
from ._errors import EinMixError
from ._init import Initializer, lecun_uniform_bias, lecun_uniform_weight
from ._options import OPTION_FIELDS, DotGeneral, Options, axes_repr, merge_sizes, reject_length
from ._params import short
from ._parse import Plan, check_texts, normalize_axes, parse
from ._shard import OutSharding


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class EinMix:
    """One EinMix layer, as pure functions: ``init(key) -> params`` and ``self(params, x) -> y``.

    ``EinMix(pattern, weight_shape, bias_shape, **options_and_axes)`` takes the arguments of
    :func:`layer` (einops' torch-layer order), so its ``repr`` pastes back into an equal layer.
    Layers are equal when they compute the same thing, initializers included; they are hashable,
    for use as static ``jit`` arguments. Each option reads as an attribute (``layer.dtype``).

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
    options: Options
    #: output sharding constraint, set by ``einmix_jax.with_out_sharding``; None: unconstrained
    out_sharding: OutSharding | None = None

    def __init__(
        self,
        /,
        plan: str | Plan,
        weight_shape: str | None = None,
        bias_shape: str | None = None,
        *,
        sizes: Mapping[str, int] | None = None,
        out_sharding: OutSharding | None = None,
        **options_and_axes: Any,  # the options of :class:`Options` by name; lengths, checked
    ) -> None:
        """Build and validate a layer; ``plan`` is the pattern (or an already parsed ``Plan``)."""
        check_texts(plan, weight_shape, bias_shape)
        ctx = plan.context() if isinstance(plan, Plan) else f"pattern {plan!r}"
        given = {k: options_and_axes.pop(k) for k in OPTION_FIELDS if k in options_and_axes}
        options = Options.make(ctx, **given)
        axes = options_and_axes
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
        object.__setattr__(self, "plan", plan)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "out_sharding", out_sharding)

    def __getattr__(self, name: str) -> Any:
        """An option by its name: ``layer.dtype`` is ``layer.options.dtype``."""
        if name in OPTION_FIELDS:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def replace(self, **changes: Any) -> EinMix:
        """This layer with some of ``plan``, ``out_sharding`` or options replaced (a hook by a
        module's, the initializers dropped), as the library makes them; not checked again."""
        options = {k: changes.pop(k) for k in OPTION_FIELDS if k in changes}
        fields: dict[str, Any] = {
            "plan": self.plan,
            "options": self.options.replace(**options),
            "out_sharding": self.out_sharding,
            **changes,
        }
        new = object.__new__(EinMix)
        for name, value in fields.items():
            object.__setattr__(new, name, value)
        return new

    def _key(self) -> tuple[Any, ...]:
        """Equal keys: the layers compute the same thing, initializers included."""
        return (self.plan, self.options, self.out_sharding)

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
        args += self.options.repr_args()
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
        init = self.options.weight_init or lecun_uniform_weight(self.plan.fan_in)
        return _checked(init(key, self.plan.weight_sizes, self.param_dtype), self, "weight")

    def init_bias(self, key: jax.Array) -> jax.Array:
        """Draw the bias, shaped as ``bias_shape`` declares (an error if there is no bias)."""
        if self.plan.bias_sizes is None:
            raise EinMixError(f"this layer has no bias ({self.plan.context()})")
        init = self.options.bias_init or lecun_uniform_bias(self.plan.fan_in)
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

        Runs the compiled function of what this call computes (see ``COMPILED_APPLIES``):
        layers that compute the same thing share it, whatever their axis names or initializers.
        """
        return apply(self, params, x)


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
                f"{name}_init must return an array, got {short(value)} ({ctx})"
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

"""Flax linen layer: ``EinMix``, a drop-in for ``einops.layers.flax.EinMix`` over the functional core.

The module holds no parsing, init math or contraction of its own: at each call it builds the
functional :class:`einmix_jax.EinMix` (axis lengths that ``sizes`` omits are read off the input, as
``nn.Dense`` reads its input features), registers the core's params under the same names, and calls
the core. ``variables['params']`` is therefore exactly the functional params dict (with
``logical_axes`` set, each param is boxed as ``nn.LogicallyPartitioned``; ``nn.unbox`` gives it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict
from jax.typing import ArrayLike, DTypeLike

from . import _core
from ._core import (
    ELLIPSIS,
    OPTION_FIELDS,
    EinMixError,
    Initializer,
    Options,
    check_hook_class,
    check_texts,
    describe_call,
    infer_weight_shape,
    logical_option,
    merge_sizes,
    normalize_axes,
    param_axes,
    param_sizes_from_input,
)

__all__ = ["EinMix", "from_einops", "from_flax"]


class EinMix(nn.Module):
    """EinMix as a Flax linen module; the fields come in ``einops.layers.flax.EinMix``'s order.

    Attributes:
        pattern: input and output axes, e.g. ``'b t (h c) -> b t (h d)'``.
        weight_shape: the weight's axes, e.g. ``'h c d'``; ``None`` infers them (see
            :func:`einmix_jax.init`).
        bias_shape: the bias's axes, e.g. ``'h d'``; ``None``: no bias.
        sizes: axis lengths, for any axis name (also ``'dtype'`` or ``'sizes'``). Weight and bias
            axes that the input determines may be left out: they are read off the input at init.
            Stored as a ``FrozenDict``, so the module is hashable; ``None`` is ``{}``.
        dtype: computation dtype; ``None`` promotes the input's and the params' dtypes.
        param_dtype: dtype of the stored params.
        precision: passed to the contraction.
        weight_init: ``(key, shape, dtype) -> Array`` drawing the weight; ``None``: the core's
            default (symmetric uniform, variance ``1/fan_in``).
        bias_init: the same for the bias; ``None``: the core's default (symmetric uniform,
            bound ``sqrt(1/fan_in)``).
        dot_general: the contraction (a hook for quantisation); ``None``: ``jax.lax.dot_general``,
            looked up at each call. Called as Flax's layers call it:
            ``dot_general(x, weight, dimension_numbers, precision=...)``, plus
            ``preferred_element_type=`` when that is set.
        preferred_element_type: accumulation dtype passed to ``dot_general``.
        logical_axes: partitioning metadata, off by default (``None``: the params are plain
            arrays). ``True`` (or ``{}``) boxes each param as ``nn.LogicallyPartitioned`` whose
            names are its axis names in the pattern; a mapping such as ``{'c': 'embed'}`` renames
            some of them. Then ``nn.get_partition_spec``, ``nn.logical_axis_rules`` and
            ``nn.logical_to_mesh_sharding`` work as with Flax's own layers, and ``nn.unbox`` gives
            the plain params. Stored as a ``FrozenDict``.
        dot_general_cls: a class whose instance, made inside the module at each call, is the
            contraction, as ``nn.Dense(dot_general_cls=...)`` takes Flax's fp8 ops
            (``nn.fp8_ops.Fp8DirectDotGeneralOp``): a stateful op's variables live under this
            module. Not with ``dot_general``.

    Example:
        >>> import flax.linen as nn
        >>> layer = em.linen.EinMix('b t (h c) -> b t (h d)', 'h c d', 'h d', sizes=dict(h=2, d=3))
        >>> layer
        EinMix('b t (h c) -> b t (h d)', 'h c d', 'h d', sizes={'h': 2, 'd': 3})
        >>> variables = layer.init(jax.random.key(0), jnp.ones((1, 5, 8)))  # c = 8 / 2 read off x
        >>> jax.tree.map(jnp.shape, variables['params'])
        {'bias': (2, 3), 'weight': (2, 4, 3)}
        >>> layer.apply(variables, jnp.ones((7, 5, 8))).shape  # any batch and time length
        (7, 5, 6)
        >>> boxed = layer.clone(logical_axes={'h': 'heads'})  # partitioning metadata
        >>> specs = nn.get_partition_spec(boxed.init(jax.random.key(0), jnp.ones((1, 5, 8))))
        >>> specs['params']
        {'bias': P('heads', 'd'), 'weight': P('heads', 'c', 'd')}
        >>> nn.logical_to_mesh(specs, [('heads', 'model')])['params']
        {'bias': P('model', None), 'weight': P('model', None, None)}
    """

    #: While a tool intercepts the contraction (qwix), it gets the stored weight as it is and x
    #: with nn.Dense's axes, in nn.Dense's lax.dot_general or, where the planner predicts it
    #: faster and the tool patches jnp.einsum, einops' jnp.einsum; otherwise the planner's
    #: choice runs. describe() shows which.
    weight_as_stored: ClassVar[bool] = True

    pattern: str
    weight_shape: str | None = None
    bias_shape: str | None = None
    sizes: Mapping[str, int] = FrozenDict()
    dtype: DTypeLike | None = None
    param_dtype: DTypeLike = jnp.float32
    precision: Any = None
    weight_init: Initializer | None = None
    bias_init: Initializer | None = None
    dot_general: _core.DotGeneral | None = None
    preferred_element_type: DTypeLike | None = None
    logical_axes: Mapping[str, str] | bool | None = None
    dot_general_cls: Any = None

    def __post_init__(self) -> None:
        check_texts(self.pattern, self.weight_shape, self.bias_shape)
        context = describe_call(self.pattern, self.weight_shape, self.bias_shape)
        normalize_axes(merge_sizes(self.sizes, {}, context), context)
        _options(self, context)
        check_hook_class(self.dot_general_cls, self.dot_general, context)
        if not isinstance(self.sizes, FrozenDict):
            # A dict would make the module unhashable (as einops' layer is); None: no sizes.
            object.__setattr__(self, "sizes", FrozenDict(self.sizes or {}))
        logical = logical_option(self.logical_axes, self.pattern)
        object.__setattr__(self, "logical_axes", None if logical is None else FrozenDict(logical))
        super().__post_init__()

    @nn.nowrap
    def __setattr__(self, name: str, value: Any) -> None:
        """As Flax's, except for qwix's LoRA record of the einsum it ran (``weight_lora_einsum_str``,
        set on the module while it is traced, when the ``jnp.einsum`` form runs): a linen module is
        frozen then, so the record is kept as a plain attribute instead of raising."""
        if name.endswith("_lora_einsum_str"):
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def __repr__(self) -> str:
        args = [repr(self.pattern)]
        if self.weight_shape is not None or self.bias_shape is not None:
            args.append(repr(self.weight_shape))
        if self.bias_shape is not None:
            args.append(repr(self.bias_shape))
        if self.sizes:
            args.append(f"sizes={dict(self.sizes)!r}")
        args += _options(self).repr_args(dot_general_cls=self.dot_general_cls)
        logical = logical_option(self.logical_axes, self.pattern)
        if logical is not None:
            args.append(f"logical_axes={dict(logical)!r}")
        return f"EinMix({', '.join(args)})"

    def functional(
        self, x_shape: tuple[int, ...], param_shapes: Mapping[str, tuple[int, ...]] | None = None
    ) -> _core.EinMix:
        """The functional layer this module runs for inputs of ``x_shape``.

        Weight and bias lengths missing from ``sizes`` come from ``param_shapes`` (the stored
        params' shapes, once the layer has params) or else are read off the input.

        Example:
            >>> em.linen.EinMix('b c -> b d', sizes={'d': 3}).functional((2, 4))
            EinMix('b c -> b d', 'c d', d=3, c=4)
        """
        context = describe_call(self.pattern, self.weight_shape, self.bias_shape)
        sizes = dict(self.sizes)
        weight_shape = self.weight_shape
        if weight_shape is None:
            weight_shape = infer_weight_shape(self.pattern)
        for name, text in (("weight", weight_shape), ("bias", self.bias_shape)):
            shape = None if param_shapes is None else param_shapes.get(name)
            if isinstance(text, str) and shape is not None:
                names = text.split()
                if len(names) == len(shape):  # else the core reports the shape mismatch
                    sizes = {**dict(zip(names, shape, strict=True)), **sizes}
        axes = param_sizes_from_input(
            self.pattern,
            self.weight_shape,
            self.bias_shape,
            normalize_axes(sizes, context),
            tuple(x_shape),
        )
        return _core.EinMix(
            self.pattern,
            self.weight_shape,
            self.bias_shape,
            sizes=dict(axes),
            **{name: getattr(self, name) for name in OPTION_FIELDS},
        )

    @nn.compact
    def __call__(self, x: ArrayLike) -> jax.Array:
        """Apply the layer; at init, draw ``'weight'`` (and ``'bias'``) with the core's initializers.

        At apply the stored params fix the lengths; a missing, extra or misshapen param is the
        functional form's ``EinMixError``, not a Flax error. Entries named ``weight_*`` or
        ``bias_*`` are left to the tools that add them (qwix's LoRA factors ``weight_lora_a``),
        and so is every other entry while a tool intercepts the contraction.
        """
        shapes, own = None, {}
        hook = self.dot_general_cls() if self.dot_general_cls is not None else self.dot_general
        if not self.is_mutable_collection("params") or self.has_variable("params", "weight"):
            stored = dict(self.variables.get("params", {}))  # apply: the params fix the lengths
            # a tool's own entries: qwix's LoRA factors ('weight_lora_a'), and, while a tool
            # intercepts the contraction, any other (qwix's static scales, 'dot_general0_...')
            tool = hook is not None or _core.tool_active()
            own = {
                k: v
                for k, v in stored.items()
                if k in ("weight", "bias") or not (tool or k.startswith(("weight_", "bias_")))
            }
            shapes = {k: _param_shape(nn.meta.unbox(v)) for k, v in own.items()}
        layer = self.functional(tuple(jnp.shape(x)), shapes)
        if self.dot_general_cls is not None:
            layer = layer.replace(dot_general=hook)
        if shapes is not None and shapes != layer.param_shapes:
            _core.check_params(layer, nn.meta.unbox(own))  # raises the functional form's error
        inits: dict[str, Any] = {"weight": layer.init_weight}
        if layer.plan.bias_sizes is not None:
            inits["bias"] = layer.init_bias
        logical = logical_option(self.logical_axes, self.pattern)
        if logical is not None:
            names = param_axes(layer, logical_axes=logical)
            inits = {k: nn.with_logical_partitioning(f, names[k]) for k, f in inits.items()}
        params = {name: self.param(name, init) for name, init in inits.items()}
        return _core.apply_traced(layer, params, x)


def _refuse_lengths(init: Callable[..., None]) -> Callable[..., None]:
    """Flax's generated ``__init__``, with keywords that are no field read as axis lengths meant
    for ``sizes`` (``EinMix(..., d=4)``), an EinMixError that says so instead of a TypeError."""
    fields = {f.name for f in dataclasses.fields(EinMix)}

    @functools.wraps(init)
    def __init__(self: EinMix, *args: Any, **kwargs: Any) -> None:
        lengths = {k: v for k, v in kwargs.items() if k not in fields}
        if lengths:
            pattern = args[0] if args else kwargs.get("pattern")
            raise EinMixError(
                f"EinMix takes axis lengths in sizes, as einops' Flax layer does: pass "
                f"sizes={lengths!r}, not {', '.join(f'{k}={v!r}' for k, v in lengths.items())} "
                f"(pattern {pattern!r})"
            )
        init(self, *args, **kwargs)

    return __init__


EinMix.__init__ = _refuse_lengths(EinMix.__init__)  # type: ignore[method-assign]


def _param_shape(value: Any) -> tuple[int, ...]:
    """A stored param's shape; also a quantized container's (anything with a ``shape``)."""
    shape = getattr(value, "shape", None)
    return tuple(np.shape(value) if shape is None else shape)


def _options(module: EinMix, context: str = "") -> Options:
    """The module's options, checked, as the core holds them (the fields of the same names)."""
    return Options.make(context, **{name: getattr(module, name) for name in OPTION_FIELDS})


def from_einops(variables: Mapping[str, Any], layer: Any, x: Any = None) -> dict[str, Any]:
    """Convert variables saved from ``einops.layers.flax.EinMix`` into this module's variables.

    With ``x`` (an input, or its ``jax.ShapeDtypeStruct``), ``layer`` is a whole model: every
    einops EinMix in it is found by tracing ``layer.init`` on ``x`` (nothing is computed) and its
    subtree converted; everything else passes through.

    einops stores the bias broadcast against the output (e.g. ``(1, 1, d)`` for
    ``'b t c -> b t d'``) in output order; here it is stored as ``bias_shape`` declares. The weight
    is stored the same way by both. ``layer`` is the einops layer or the equivalent
    :class:`EinMix` (it is read for ``pattern``, ``weight_shape``, ``bias_shape`` and ``sizes``,
    which must give every weight and bias length, as einops requires). ``variables`` is either
    ``{'params': {...}}`` (other collections are passed through) or the params dict itself.

    Example:
        >>> import numpy as np
        >>> layer = em.linen.EinMix('b t c -> b t d', 'c d', 'd', sizes=dict(c=4, d=3))
        >>> saved = {'params': {'weight': np.ones((4, 3), np.float32),
        ...                     'bias': np.ones((1, 1, 3), np.float32)}}
        >>> jax.tree.map(np.shape, from_einops(saved, layer))
        {'params': {'bias': (3,), 'weight': (4, 3)}}
    """
    return _from_einops(variables, layer, x)


def _from_einops(variables: Mapping[str, Any], layer: Any, x: Any) -> dict[str, Any]:
    if "params" not in variables:
        return _from_einops({"params": variables}, layer, x)["params"]
    if x is not None:
        from einops.layers.flax import EinMix as EinopsEinMix

        params = variables["params"]
        for path, found in _modules(layer, x, EinopsEinMix):
            params = _at(params, path, functools.partial(_from_einops, layer=found, x=None))
        return {**variables, "params": params}
    sizes = getattr(layer, "sizes", None) or {}
    core = _core.layer(layer.pattern, layer.weight_shape, layer.bias_shape, sizes=dict(sizes))
    plan = core.plan
    params = dict(variables["params"])
    context = plan.context()
    if set(params) != set(core.param_shapes):
        raise EinMixError(
            f"einops params have entries {sorted(params)}, expected {sorted(core.param_shapes)} "
            f"({context})"
        )
    weight = params["weight"]
    if tuple(np.shape(weight)) != plan.weight_sizes:
        raise EinMixError(
            f"einops weight has shape {tuple(np.shape(weight))}, expected {plan.weight_sizes} "
            f"for {plan.weight_shape!r} ({context})"
        )
    if plan.bias_axes is not None:
        params["bias"] = _bias_from_einops(params["bias"], plan)
    return {**variables, "params": params}


def from_flax(variables: Mapping[str, Any], model: nn.Module, x: Any) -> dict[str, Any]:
    """A model's variables with every ``nn.Dense`` / ``nn.DenseGeneral`` kernel named ``weight``.

    Flax's kernel is the EinMix weight stored in the same axis order (``'c d'`` for
    ``'... c -> ... d'``; ``DenseGeneral``'s contracted axes, then its features), so a model whose
    Flax layers become EinMix layers of the same names keeps its params. The layers are found by
    tracing ``model.init`` on ``x`` (nothing is computed).

    Example:
        >>> class Model(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(3, name='out')(x)
        >>> x = jnp.ones((2, 4))
        >>> jax.tree.map(jnp.shape, from_flax(Model().init(jax.random.key(0), x), Model(), x))
        {'params': {'out': {'bias': (3,), 'weight': (4, 3)}}}
    """
    if "params" not in variables:
        return from_flax({"params": variables}, model, x)["params"]

    def rename(p: Mapping[str, Any]) -> dict[str, Any]:
        return {("weight" if k == "kernel" else k): v for k, v in p.items()}

    params = variables["params"]
    for path, _ in _modules(model, x, (nn.Dense, nn.DenseGeneral)):
        params = _at(params, path, rename)
    return {**variables, "params": params}


def _modules(model: nn.Module, x: Any, kind: Any) -> list[tuple[tuple[str, ...], Any]]:
    """The path and module of every ``kind`` module that ``model`` calls on ``x``."""
    found: dict[tuple[str, ...], Any] = {}

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        module = context.module
        if isinstance(module, kind) and context.method_name == "__call__":
            found[tuple(module.path)] = module
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), x)
    return list(found.items())


def _at(tree: Mapping[str, Any], path: tuple[str, ...], f: Callable[[Any], Any]) -> dict:
    """``tree`` with ``f`` applied to the subtree at ``path``."""
    if not path:
        return f(tree)
    return {**tree, path[0]: _at(tree[path[0]], path[1:], f)}


def _bias_from_einops(bias: ArrayLike, plan: Any) -> Any:
    """einops' bias -- output order, 1 for every non-bias axis -- to ``bias_shape`` order."""
    lengths = plan.sizes
    out_axes = [a for group in plan.right if group != ELLIPSIS for a in group if a != ELLIPSIS]
    expected = tuple(lengths[a] if a in plan.bias_axes else 1 for a in out_axes)
    if tuple(np.shape(bias)) != expected:
        raise EinMixError(
            f"einops bias has shape {tuple(np.shape(bias))}, expected {expected} ({plan.context()})"
        )
    in_output_order = [a for a in out_axes if a in plan.bias_axes]
    bias = jnp.reshape(bias, tuple(lengths[a] for a in in_output_order))
    return jnp.transpose(bias, tuple(in_output_order.index(a) for a in plan.bias_axes))

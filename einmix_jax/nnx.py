"""Flax NNX layer: ``EinMix`` with torch-style ``**axes``, over the functional core.

The module builds the functional :class:`einmix_jax.EinMix` once, in ``__init__``, keeps it as a
static attribute, stores the core's params as ``nnx.Param`` attributes ``weight`` and ``bias``, and
calls the core. :meth:`EinMix.get_params` / :meth:`EinMix.set_params` convert between the module's
state and the functional params dict. With ``logical_axes`` set, each ``nnx.Param`` carries its
axis names as NNX sharding metadata (through ``nnx.with_partitioning``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike, DTypeLike

from . import _core
from ._core import (
    EinMixError,
    Initializer,
    axes_repr,
    check_hook_class,
    logical_option,
    param_axes,
    reject_length,
)

__all__ = ["EinMix"]


class _Meta(type(nnx.Module)):  # type: ignore[misc]
    """NNX's metaclass, taking any keyword: an axis may be named ``self``."""

    def _pytree_meta_construct(cls, node: Any, /, *args: Any, **kwargs: Any) -> None:
        node.__init__(*args, **kwargs)


class EinMix(nnx.Module, metaclass=_Meta):
    """EinMix as a Flax NNX module: ``weight`` and ``bias`` are its only ``nnx.Param``s.

    Args:
        pattern: input and output axes, e.g. ``'b t (h c) -> b t (h d)'``.
        weight_shape: the weight's axes, e.g. ``'h c d'``; ``None`` infers them (see
            :func:`einmix_jax.init`).
        bias_shape: the bias's axes, e.g. ``'h d'``; ``None``: no bias (``self.bias`` is ``None``).
            ``weight_shape`` and ``bias_shape`` may be positional, as in einops' torch layer.
        sizes: axis lengths as a mapping, beside ``**axes``; for any axis name, also one that is
            an argument's name (``sizes={'rngs': 4}``).
        param_dtype: dtype of the stored params.
        dtype: computation dtype; ``None`` promotes the input's and the params' dtypes.
        precision: passed to the contraction.
        preferred_element_type: accumulation dtype passed to ``dot_general``.
        weight_init: ``(key, shape, dtype) -> Array`` drawing the weight; ``None``: the core's
            default (symmetric uniform, variance ``1/fan_in``).
        bias_init: the same for the bias; ``None``: the core's default (symmetric uniform,
            bound ``sqrt(1/fan_in)``).
        dot_general: the contraction (a hook for quantisation); ``None``: ``jax.lax.dot_general``,
            looked up at each call. Called as Flax's layers call it:
            ``dot_general(x, weight, dimension_numbers, precision=...)``, plus
            ``preferred_element_type=`` when that is set.
        dot_general_cls: a class whose instance, made at each call, is the contraction, as
            ``nnx.Linear(dot_general_cls=...)`` takes it. Not with ``dot_general``.
        logical_axes: sharding metadata, off by default (``None``: plain Params).
            ``True`` (or ``{}``) gives each Param its axis names in the pattern as sharding names
            (``nnx.with_partitioning``); a mapping such as ``{'c': 'embed'}`` renames some of
            them. ``nnx.get_partition_spec(nnx.state(layer))`` then gives the names, and
            ``nn.logical_to_mesh_sharding`` / ``nn.logical_axis_rules`` map them to a mesh. With
            Flax's eager sharding on (the default from Flax 0.12), the Params are placed when
            created, so create the layer under ``jax.set_mesh(mesh)`` and
            ``nn.logical_axis_rules(rules)`` with a rule for every name (``None`` replicates; NNX
            maps each name by its own rule, with none of linen's precedence), or under
            ``nnx.use_eager_sharding(False)``, as for Flax's own layers.
        rngs: ``nnx.Rngs``; the params are drawn from its ``params`` stream.
        **axes: axis lengths; every weight and bias axis needs one.

    Example:
        >>> from flax import nnx
        >>> layer = em.nnx.EinMix('b t c -> b t d', weight_shape='c d', bias_shape='d',
        ...                       c=4, d=3, rngs=nnx.Rngs(0))
        >>> layer
        EinMix('b t c -> b t d', weight_shape='c d', bias_shape='d', c=4, d=3)
        >>> layer.weight.shape, layer.bias.shape
        ((4, 3), (3,))
        >>> layer(jnp.ones((2, 5, 4))).shape
        (2, 5, 3)
        >>> import flax.linen as nn  # sharding names, mapped to a mesh by logical axis rules
        >>> mesh = jax.make_mesh((1,), ('model',))
        >>> with jax.set_mesh(mesh), nn.logical_axis_rules([('embed', None), ('d', 'model')]):
        ...     sharded = em.nnx.EinMix('b t c -> b t d', weight_shape='c d', c=4, d=3,
        ...                             logical_axes={'c': 'embed'}, rngs=nnx.Rngs(0))
        >>> specs = nnx.get_partition_spec(nnx.state(sharded))
        >>> specs.to_pure_dict()
        {'weight': P('embed', 'd')}
        >>> nn.logical_to_mesh(specs, [('d', 'model')]).to_pure_dict()
        {'weight': P(None, 'model')}
    """

    #: While a tool intercepts the contraction (qwix), it gets the stored weight as it is and x
    #: with nn.Dense's axes, in nn.Dense's lax.dot_general or, where the planner predicts it
    #: faster and the tool patches jnp.einsum, einops' jnp.einsum; otherwise the planner's
    #: choice runs. describe() shows which.
    weight_as_stored: ClassVar[bool] = True

    def __init__(
        self,
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
        dot_general: _core.DotGeneral | None = None,
        dot_general_cls: Any = None,
        logical_axes: Mapping[str, str] | bool | None = None,
        rngs: nnx.Rngs,
        **axes: int,
    ) -> None:
        context = f"pattern {pattern!r}"
        reject_length("rngs", rngs, context)
        reject_length("logical_axes", logical_axes, context)
        if not isinstance(rngs, nnx.Rngs):
            raise EinMixError(f"rngs must be an nnx.Rngs, got {rngs!r} ({context})")
        #: The functional layer (static: part of the graph definition, not of the state).
        self.functional = _core.layer(
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
        check_hook_class(dot_general_cls, dot_general, self.functional.plan.context())
        #: Instantiated at each call to make the contraction (as ``nnx.Linear`` does); static.
        self.dot_general_cls = dot_general_cls
        logical = logical_option(logical_axes, pattern)
        #: The ``logical_axes`` option as ``(axis, logical name)`` pairs; ``None``: no metadata.
        self.logical_axes = None if logical is None else tuple(logical.items())
        names = None if logical is None else param_axes(self.functional, logical_axes=logical)
        self.weight = _param(self.functional.init_weight, rngs.params(), names, "weight")
        self.bias: nnx.Param[jax.Array] | None
        if self.functional.plan.bias_sizes is not None:
            self.bias = _param(self.functional.init_bias, rngs.params(), names, "bias")
        else:
            self.bias = None

    def __repr__(self) -> str:
        core = self.functional
        plan = core.plan
        args = [repr(plan.pattern), f"weight_shape={plan.weight_shape!r}"]
        if plan.bias_shape is not None:
            args.append(f"bias_shape={plan.bias_shape!r}")
        args += axes_repr(plan.axes)
        args += core.options.repr_args(dot_general_cls=self.dot_general_cls)
        if self.logical_axes is not None:
            args.append(f"logical_axes={dict(self.logical_axes)!r}")
        return f"EinMix({', '.join(args)})"

    def get_params(self) -> _core.Params:
        """The functional params dict, as :func:`einmix_jax.init` returns it.

        ``layer(x) == layer.functional(layer.get_params(), x)``.

        Example:
            >>> from flax import nnx
            >>> layer = em.nnx.EinMix('b c -> b d', c=4, d=3, rngs=nnx.Rngs(0))
            >>> jax.tree.map(jnp.shape, layer.get_params())
            {'weight': (4, 3)}
        """
        params = {"weight": self.weight[...]}
        if self.bias is not None:
            params["bias"] = self.bias[...]
        return params

    def set_params(self, params: Mapping[str, Any]) -> None:
        """Load a functional params dict (from :func:`einmix_jax.init`, linen or einops' converter).

        Example:
            >>> from flax import nnx
            >>> params, _ = em.init('b c -> b d', jax.random.key(1), bias_shape='d', c=4, d=3)
            >>> layer = em.nnx.EinMix('b c -> b d', bias_shape='d', c=4, d=3, rngs=nnx.Rngs(0))
            >>> layer.set_params(params)
            >>> bool((layer.bias[...] == params['bias']).all())
            True
        """
        weight, bias = _core.check_params(self.functional, params)
        self.weight.set_value(jnp.asarray(weight))
        if self.bias is not None and bias is not None:
            self.bias.set_value(jnp.asarray(bias))

    def __call__(self, x: ArrayLike) -> jax.Array:
        """Apply the layer: the core's ``apply`` with this module's params."""
        layer = self.functional
        if self.dot_general_cls is not None:
            layer = layer.replace(dot_general=self.dot_general_cls())
        return _core.apply_traced(layer, self.get_params(), x)


def _param(
    init: Any, key: jax.Array, names: Mapping[str, tuple[str, ...]] | None, name: str
) -> nnx.Param:
    """A Param drawn by ``init(key)``; with ``names``, carrying ``names[name]`` as sharding names.

    ``nnx.with_partitioning`` files the names under the metadata key of the installed Flax
    (``sharding`` up to 0.11.1, ``sharding_names`` up to 0.12.3, ``out_sharding`` since).
    """
    if names is None:
        return nnx.Param(init(key))
    return nnx.Param(nnx.with_partitioning(init, names[name])(key))

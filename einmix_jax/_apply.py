"""Apply routing: which lowering a call runs, and the cache of compiled functional applies.

Every call -- the functional apply, the Flax and Equinox layers, ``describe`` -- gets its lowering
from :func:`lowering_for`: the planner's choice (measured inside ``measured_planning()``), the
Flax layers' stored-weight form, or, under a mesh's sharding rules, the planner's choice with no
packing of a sharded weight. The functional apply runs the jitted function of its computation,
kept in a bounded LRU (:data:`COMPILED_APPLIES`): layers that compute the same thing share one
compiled function per input shape and dtype, and no initializer or layer is kept alive by it.
The Flax and Equinox layers run :func:`apply_traced`, with no jit of their own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._cache import LRU
from ._errors import EinMixError
from ._execute import compute, dtype_of, intercepted, tool_active
from ._keys import hook_key, weak_key
from ._keys import hook_ref as ref_to
from ._lower import lower
from ._lowering import Lowering
from ._measure import measuring
from ._measure import plan as measured_plan
from ._options import DotGeneral, Options
from ._params import check_params, entries, is_array
from ._shard import apply_sharded, explicit_mesh_active

if TYPE_CHECKING:
    from ._layer import EinMix

Params = dict[str, jax.Array]

#: What a call runs: the planner's choice ('planned'), or the weight as stored, untouched, as
#: the right operand of the dot ('stored': x moved to a GEMM view, for a weight that is a tool's
#: container; 'as given': x with ``nn.Dense``'s axes, for a Flax layer while a tool may intercept
#: the contraction; under a tool that patches ``jnp.einsum``, not a hook, the planner may instead
#: pass both to ``jnp.einsum``, as einops' layer does).
FORMS = ("planned", "stored", "as given")


def form_of(layer: EinMix, weight_as_stored: bool) -> str:
    """The form a call runs (:data:`FORMS`): the planner's choice, except in a Flax layer
    (``weight_as_stored``) while a tool may intercept the contraction (a hook, or a patched
    ``jax.lax.dot_general``): then x as given and the weight as stored, as ``nn.Dense`` does."""
    return "as given" if weight_as_stored and intercepted(layer) else "planned"


def runs_sharded(layer: EinMix) -> bool:
    """Whether a call of ``layer`` runs under the mesh's sharding rules (``apply_sharded``)."""
    return layer.out_sharding is not None or explicit_mesh_active()


def lowering_for(
    layer: EinMix,
    x: Any,
    weight: Any,
    has_bias: bool,
    form: str = "planned",
    measure: bool = True,
) -> Lowering:
    """The lowering a call of ``layer`` runs for ``x`` (an array, a tracer or a
    ``jax.ShapeDtypeStruct``) and ``weight`` (the same, or a tool's container).

    ``form`` is one of :data:`FORMS`; ``measure``: inside ``measured_planning()``, time the
    candidates (off under the mesh rules). A weight whose type carries mesh axes is not packed
    block-diagonally (the packing's reshapes would need them respecified).

    Example:
        >>> layer = einmix_jax.layer('b c -> b d', c=2, d=3)
        >>> x, w = jax.ShapeDtypeStruct((4, 2), jnp.float32), jax.ShapeDtypeStruct((2, 3), jnp.float32)
        >>> lowering_for(layer, x, w, False).strategy
        'as einsum'
    """
    shape = tuple(x.shape)
    abstract = is_array(weight) or isinstance(weight, jax.ShapeDtypeStruct)
    if form == "planned" and not abstract:  # a tool's container: it cannot be moved
        form = "stored"
    if form != "planned":
        # under a tool that patches jnp.einsum too (qwix), einops' jnp.einsum call is a
        # candidate; a hook is a dot_general, called as nn.Dense calls it
        as_given = form == "as given"
        einsum = as_given and layer.dot_general is None and tool_active()
        return lower(layer.plan, shape, stored_weight=True, x_as_given=as_given, einsum=einsum)
    packs = False if _sharded_weight(weight) else None
    if not (measure and measuring()):
        return lower(layer.plan, shape, packs=packs)

    def run(low: Lowering, w: jax.Array, b: jax.Array | None, x: jax.Array) -> jax.Array:
        return compute(low, layer.options, w, b, x)

    options = layer.options
    computation = (options.dtype, options.precision, options.preferred_element_type)
    bias = jax.ShapeDtypeStruct(layer.plan.bias_sizes or (), weight.dtype) if has_bias else None
    return measured_plan(
        layer.plan,
        shape,
        dtype_of(options, weight, bias, x),
        weight.dtype,
        has_bias,
        (*computation, weak_key(hook_key(options.dot_general))),
        run,
        packs,
    )


def _sharded_weight(weight: Any) -> bool:
    """Whether ``weight``'s type carries mesh axes (explicit sharding)."""
    if isinstance(weight, jax.ShapeDtypeStruct):
        sharding = weight.sharding
    else:
        sharding = getattr(jax.typeof(weight), "sharding", None) if is_array(weight) else None
    spec = getattr(sharding, "spec", None) or ()
    return any(p is not None for p in spec)


def apply(layer: EinMix, params: Mapping[str, Any], x: ArrayLike) -> jax.Array:
    """The functional apply: the compiled function of what this call computes."""
    weight, bias = check_params(layer, entries(layer, params))  # errors before any trace
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if runs_sharded(layer):
        # the mesh rules need the plan: one computation per layer (its initializers and hook
        # dropped: the hook is held weakly, as in every computation)
        bare = layer.replace(weight_init=None, bias_init=None, dot_general=None)
        key = _Computation.of(layer, None, bare)
    else:
        key = _Computation.of(layer, lowering_for(layer, x, weight, bias is not None), None)
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    jitted = _COMPILED.get_or_add(key, lambda: jax.jit(key))
    jitted.__wrapped__.use(layer.dot_general)  # this call's (equal) hook, for any retrace
    return jitted(params, x)


def _apply(
    params: Params,
    x: ArrayLike,
    *,
    layer: EinMix,
    form: str = "planned",
    measure: bool = False,
    traced: bool = False,
) -> jax.Array:
    """One apply, in the caller's trace; ``traced``: a module's (a tool may see the contraction)."""
    weight, bias = check_params(layer, params)
    x = jnp.asarray(x)
    low = lowering_for(layer, x, weight, bias is not None, form, measure)
    return compute(low, layer.options, weight, bias, x, traced)


def apply_traced(
    layer: EinMix, params: Params, x: ArrayLike, *, weight_as_stored: bool = True
) -> jax.Array:
    """Apply ``layer`` inside the caller's trace, as a module does: no jit of its own.

    The planner picks from every lowering, as for the functional apply. With
    ``weight_as_stored`` (the Flax layers), while a tool intercepts the contraction (qwix's
    quantization and LoRA patch ``jax.lax.dot_general`` while a module is traced) or the layer
    has a hook, the stored weight is instead the second operand of ``jax.lax.dot_general``
    (looked up at call time), untouched, and x has ``nn.Dense``'s axes, so the tool sees what it
    sees in ``nn.Dense`` and may hand in a quantized container instead of an array.

    Example:
        >>> layer = einmix_jax.layer('b (h c) -> b (h d)', weight_shape='h c d', h=2, c=3, d=4)
        >>> params = layer.init(jax.random.key(0))
        >>> apply_traced(layer, params, jnp.ones((5, 6))).shape
        (5, 8)
    """
    compute_ = functools.partial(_apply, form=form_of(layer, weight_as_stored), traced=True)
    if runs_sharded(layer):
        return apply_sharded(compute_, params, x, layer)
    return compute_(params, x, layer=layer, measure=True)


def apply_lowering(low: Lowering, params: Params, x: ArrayLike, layer: EinMix) -> jax.Array:
    """Apply ``layer`` with a given lowering (e.g. any of ``planning.candidates``), as ``apply``
    does: the same dtype rule and steps; only the planner's choice is replaced.

    Example:
        >>> from einmix_jax import planning
        >>> layer = einmix_jax.layer('b c -> b d', c=2, d=3)
        >>> choice = planning.candidates(layer.plan, (4, 2))[1]
        >>> low = planning.build(layer.plan, (4, 2), choice)
        >>> apply_lowering(low, layer.init(jax.random.key(0)), jnp.ones((4, 2)), layer).shape
        (4, 3)
    """
    weight, bias = check_params(layer, params)
    return compute(low, layer.options, weight, bias, jnp.asarray(x), traced=True)


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
    options: Options  #: the layer's, with no hook or initializer (held below)
    #: what ``dot_general`` compares by (a partial: its function and arguments), held weakly
    dot_key: Any
    sharded: EinMix | None  #: the layer, initializers and hook dropped, when mesh rules apply
    #: the hook of the latest call, held weakly (the call holds it while it may trace)
    hook_ref: Callable[[], DotGeneral | None] = dataclasses.field(compare=False)

    @classmethod
    def of(cls, layer: EinMix, low: Lowering | None, sharded: EinMix | None) -> _Computation:
        key = weak_key(hook_key(layer.dot_general))
        bare = layer.options.replace(dot_general=None, weight_init=None, bias_init=None)
        return cls(low, bare, key, sharded, ref_to(layer.dot_general))

    def use(self, hook: DotGeneral | None) -> None:
        """Trace with ``hook`` (equal to the one this computation was made with) from now on."""
        object.__setattr__(self, "hook_ref", ref_to(hook))

    @property
    def dot_general(self) -> DotGeneral | None:
        """The hook of the latest call (an error if it was deleted since)."""
        hook = self.hook_ref()
        if hook is None and self.dot_key is not None:
            raise EinMixError("the dot_general hook of this compiled apply was deleted")
        return hook

    def __call__(self, params: Params, x: jax.Array) -> jax.Array:
        """The traced body of the compiled apply: no tool sees inside it (``jax.lax.dot_general``
        as imported, unless the layer has a hook), whatever is patched while it is traced."""
        if self.sharded is not None:
            layer = self.sharded.replace(dot_general=self.dot_general)
            return apply_sharded(_apply, params, x, layer)
        assert self.lowering is not None
        options = self.options.replace(dot_general=self.dot_general)
        return compute(self.lowering, options, params["weight"], params.get("bias"), x)


#: the ``jax.jit`` function of each :class:`_Computation` applied (see :data:`COMPILED_APPLIES`)
_COMPILED: LRU[Any] = LRU(COMPILED_APPLIES)

"""Sharding by axis name: EinMix params and outputs on a device mesh, with JAX's own SPMD machinery.

Every weight, bias and output axis of an EinMix layer has a name in its pattern, so its
partitioning follows from one set of *rules* mapping axis names to mesh axes, as Flax's logical
axis rules do:

* :func:`param_axes` -- the axis names of each param (``{'weight': ('c', 'd'), 'bias': ('d',)}``),
  optionally remapped to logical names (``logical_axes={'c': 'embed'}``); what the Flax layers
  attach as partitioning metadata.
* :func:`param_specs` -- a ``PartitionSpec`` per param, for ``jax.device_put`` and
  ``jax.jit(in_shardings=..., out_shardings=...)``; :func:`param_shardings` -- the same as
  ``NamedSharding`` on a mesh. ``jax.jit(layer.init, out_shardings=param_shardings(...))(key)``
  creates params already split, so no device ever holds a full copy.
* :func:`with_out_sharding` -- a layer whose output is constrained by the output axis names
  (``jax.lax.with_sharding_constraint``) whenever a mesh is set with ``jax.set_mesh``, so
  activations stay sharded between layers.

Rules follow Flax's ``logical_to_mesh_axes``: a dict or a sequence of ``(name, mesh_axes)`` pairs in
order of precedence, ``mesh_axes`` a mesh axis name, a tuple of them, or ``None`` (replicated). For
each rule in turn, the array dimension of that name takes the mesh axes when the dimension has none
yet and no other dimension of the same array uses them. A param axis no rule mentions is
replicated, so the specs here equal ``flax.linen.logical_to_mesh_axes(names, rules)``. For the
output constraint, an output axis no rule mentions (and every ``...`` dimension) is left to the
partitioner (``PartitionSpec.UNCONSTRAINED``) rather than forced to replicate: rules written for the
params alone never add an all-gather of the activations; a rule ``'b': None`` does replicate.

Mesh axis types. With ``Auto`` axes (``jax.make_mesh(..., axis_types=(AxisType.Auto,) * n)``) XLA
propagates shardings from the params and inputs, and the output constraint is a
``with_sharding_constraint``. With ``Explicit`` axes (the default of ``jax.make_mesh``) every array
carries its sharding in its type, and a contraction over a sharded axis has no implicit output
sharding; EinMix then runs its contraction under ``jax.sharding.auto_axes`` and reshards the result
to its output spec: the one the output sharding gives, else the one the names imply (each output
axis keeps the mesh axes its name has in the input or the weight; axes summed over a sharded mesh
axis are all-reduced). An input group such as ``(h c)`` lends its mesh axes to ``h`` only as far
as they split ``h`` into whole blocks (``h=2`` split over a mesh axis of size 4 lends nothing;
over ``('data', 'model')`` with ``'data'=2`` it lends ``'data'``); what nothing implies is
replicated. On a mesh that mixes both types, the output spec is split by axis type: its
``Explicit`` mesh axes become the result's type as above, and, when the layer has an output
sharding, its ``Auto`` mesh axes are then applied with ``with_sharding_constraint`` (dimensions it
leaves open stay unconstrained). Without an output sharding the ``Auto`` axes are left to XLA.

An output group such as ``(h d)`` is one array dimension, split into contiguous blocks: sharding
it by ``h`` is such a split, sharding it by ``d`` is not (each device would need a slice of every
``h``). So a group takes the mesh axes of its leading axis, and a rule sharding a later axis of a
group raises ``EinMixError``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, Union

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from ._errors import EinMixError
from ._parse import ELLIPSIS, Plan, expand_groups, resolve_sizes

#: Mesh axes of one array dimension: a mesh axis name, a tuple of them, or None (replicated).
MeshAxes = Union[str, tuple[str, ...], None]  # noqa: UP007 (runtime alias on Python 3.10)
#: Axis-name -> mesh-axes rules: a dict or a sequence of pairs in order of precedence.
Rules = Union[Mapping[str, MeshAxes], Sequence[tuple[str, MeshAxes]]]  # noqa: UP007
#: Rules in the hashable form kept on a layer.
NormalRules = tuple[tuple[str, MeshAxes], ...]
Params = dict[str, jax.Array]


class HasPlan(Protocol):
    """Anything with a ``plan``: an :class:`~einmix_jax.EinMix` or a Flax layer's plan holder."""

    @property
    def plan(self) -> Plan: ...


LayerOrPlan = Union[HasPlan, Plan]  # noqa: UP007


def _plan(layer_or_plan: Any) -> Plan:
    if isinstance(layer_or_plan, Plan):
        return layer_or_plan
    plan = getattr(layer_or_plan, "plan", None)
    if not isinstance(plan, Plan):
        raise EinMixError(
            f"expected an EinMix layer (from einmix_jax.layer or einmix_jax.init) or its plan, "
            f"got {type(layer_or_plan).__name__}"
        )
    return plan


def _mesh_axes(value: object, name: str) -> MeshAxes:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise EinMixError(
        f"rule for axis {name!r}: mesh axes must be a mesh axis name, a tuple of names or None, "
        f"got {value!r}"
    )


def normalize_rules(rules: Rules) -> NormalRules:
    """Rules as a hashable tuple of ``(name, mesh_axes)`` pairs, checked.

    Example:
        >>> normalize_rules({'h': 'model', 'b': ('data', 'fsdp'), 'c': None})
        (('h', 'model'), ('b', ('data', 'fsdp')), ('c', None))
    """
    if isinstance(rules, Mapping):
        pairs: list[Any] = list(rules.items())
    elif isinstance(rules, (tuple, list)):
        pairs = list(rules)
    else:
        raise EinMixError(
            f"rules must be a dict or a sequence of (axis name, mesh axes) pairs, like "
            f"{{'h': 'model'}} or [('h', 'model')], got {type(rules).__name__}"
        )
    out = []
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise EinMixError(
                f"each rule must be an (axis name, mesh axes) pair like ('h', 'model'), got {pair!r}"
            )
        out.append((pair[0], _mesh_axes(pair[1], pair[0])))
    return tuple(out)


def _normalize_logical(logical_axes: Mapping[str, str] | None, plan: Plan) -> tuple:
    if logical_axes is None:
        return ()
    if not isinstance(logical_axes, Mapping):
        raise EinMixError(
            f"logical_axes must be a dict from axis names to logical names, like {{'c': 'embed'}}, "
            f"got {type(logical_axes).__name__} ({plan.context()})"
        )
    known = _all_axis_names(plan)
    for name, logical in logical_axes.items():
        if name not in known:
            raise EinMixError(
                f"logical_axes names axis {name!r}, which is not an axis of this layer "
                f"(axes {', '.join(map(repr, sorted(known)))}; {plan.context()})"
            )
        if not isinstance(logical, str):
            raise EinMixError(
                f"logical_axes[{name!r}] must be a string, got {logical!r} ({plan.context()})"
            )
    return tuple(logical_axes.items())


def _all_axis_names(plan: Plan) -> set[str]:
    names = set(plan.weight_axes) | set(plan.bias_axes or ())
    for groups in (plan.left, plan.right):
        names |= {a for g in groups if g != ELLIPSIS for a in g if a != ELLIPSIS}
    return names


def _rename(names: Sequence[str], logical: tuple, what: str, plan: Plan) -> tuple[str, ...]:
    mapping = dict(logical)
    renamed = tuple(mapping.get(a, a) for a in names)
    for i, name in enumerate(renamed):
        if name in renamed[:i]:
            both = [a for a, r in zip(names, renamed, strict=True) if r == name]
            raise EinMixError(
                f"logical_axes maps {what} axes {', '.join(map(repr, both))} to the same logical "
                f"name {name!r}; each dimension of an array needs its own name ({plan.context()})"
            )
    return renamed


def mesh_axes_for(names: Sequence[str | None], rules: NormalRules) -> list[MeshAxes]:
    """The mesh axes of each dimension named in ``names``, by Flax's rule (see the module doc).

    ``None`` in ``names`` is a dimension no rule can shard.

    Example:
        >>> mesh_axes_for(('b', 't', 'c'), (('b', 'data'), ('c', 'data'), ('c', 'model')))
        ['data', None, 'model']
    """
    unset = object()
    result: list[Any] = [unset if n is not None else None for n in names]
    for name, mesh_axes in rules:
        if name not in names:
            continue
        pos = list(names).index(name)
        wanted = set(_flat(mesh_axes))
        used = {a for r in result if r is not unset for a in _flat(r)}
        if result[pos] is unset and not wanted & used:
            result[pos] = mesh_axes
    return [None if r is unset else r for r in result]


def _flat(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def param_axes(
    layer_or_plan: LayerOrPlan, logical_axes: Mapping[str, str] | None = None
) -> dict[str, tuple[str, ...]]:
    """The axis names of each param, optionally remapped to logical names.

    Args:
        layer_or_plan: an :class:`~einmix_jax.EinMix` (or anything with its ``plan``).
        logical_axes: renames some axes, e.g. ``{'c': 'embed'}``; the others keep their names.

    Returns:
        ``{'weight': names, 'bias': names}`` (no ``'bias'`` when the layer has none), one name
            per dimension, in the order of ``weight_shape`` and ``bias_shape``.

    Example:
        >>> mix = em.layer('b t (h c) -> b t (h d)', weight_shape='h c d', bias_shape='h d',
        ...                h=2, c=3, d=4)
        >>> em.param_axes(mix)
        {'weight': ('h', 'c', 'd'), 'bias': ('h', 'd')}
        >>> em.param_axes(mix, logical_axes={'h': 'heads', 'c': 'embed'})
        {'weight': ('heads', 'embed', 'd'), 'bias': ('heads', 'd')}
    """
    plan = _plan(layer_or_plan)
    logical = _normalize_logical(logical_axes, plan)
    axes = {"weight": _rename(plan.weight_axes, logical, "weight", plan)}
    if plan.bias_axes is not None:
        axes["bias"] = _rename(plan.bias_axes, logical, "bias", plan)
    return axes


def _mesh_shape(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise EinMixError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))


def _rule_of(name: str, mesh_axes: MeshAxes, renamed_from: str | None) -> str:
    rule = f"rule {name!r} -> {mesh_axes!r}"
    return rule if renamed_from in (None, name) else f"{rule} (for axis {renamed_from!r})"


def _check_dim(
    mesh_axes: MeshAxes,
    name: str,
    source: str | None,
    length: int,
    mesh_shape: dict[str, int],
    where: str,
    ctx: str,
) -> None:
    """Raise if ``mesh_axes`` names an axis not in the mesh or does not divide ``length``."""
    for axis in _flat(mesh_axes):
        if axis not in mesh_shape:
            raise EinMixError(
                f"{_rule_of(name, mesh_axes, source)}: mesh axis {axis!r} is not in the mesh "
                f"(its axes: {', '.join(f'{a!r}={n}' for a, n in mesh_shape.items())}) ({ctx})"
            )
    parts = math.prod(mesh_shape[a] for a in _flat(mesh_axes))
    if length % parts:
        sizes = " * ".join(f"{a!r}={mesh_shape[a]}" for a in _flat(mesh_axes))
        raise EinMixError(
            f"{where} axis {source or name!r} of length {length} cannot be sharded over mesh axes "
            f"{sizes}: {length} is not divisible by {parts} ({_rule_of(name, mesh_axes, source)}; "
            f"{ctx})"
        )


def param_specs(
    layer_or_plan: LayerOrPlan,
    rules: Rules,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    logical_axes: Mapping[str, str] | None = None,
) -> dict[str, PartitionSpec]:
    """A ``PartitionSpec`` for each param, from the param axis names and ``rules``.

    Args:
        layer_or_plan: an :class:`~einmix_jax.EinMix` (or anything with its ``plan``).
        rules: axis name -> mesh axes (a mesh axis name, a tuple of them or ``None``), as a dict
            or a sequence of pairs in order of precedence; names no rule mentions are replicated.
            The same rules can serve a whole model: rules for names a layer lacks are ignored.
        mesh: when given, every mesh axis used must be in it and divide the sharded axis length;
            otherwise ``EinMixError`` names the rule, the axis and the mesh.
        logical_axes: renames axes before the rules apply, e.g. ``{'c': 'embed'}``.

    Returns:
        ``{'weight': PartitionSpec, 'bias': PartitionSpec}``, matching the params dict.

    Example:
        >>> mix = em.layer('b t (h c) -> b t (h d)', weight_shape='h c d', bias_shape='h d',
        ...                h=2, c=3, d=4)
        >>> em.param_specs(mix, {'h': 'model', 'b': 'data'})
        {'weight': P('model', None, None), 'bias': P('model', None)}
    """
    plan = _plan(layer_or_plan)
    normal = normalize_rules(rules)
    names = param_axes(plan, logical_axes)
    sources = {"weight": plan.weight_axes, "bias": plan.bias_axes or ()}
    sizes = {"weight": plan.weight_sizes, "bias": plan.bias_sizes or ()}
    mesh_shape = None if mesh is None else _mesh_shape(mesh)
    specs = {}
    for param, dims in names.items():
        axes = mesh_axes_for(dims, normal)
        if mesh_shape is not None:
            for entry, name, source, length in zip(
                axes, dims, sources[param], sizes[param], strict=True
            ):
                _check_dim(entry, name, source, length, mesh_shape, param, plan.context())
        specs[param] = PartitionSpec(*axes)
    return specs


def param_shardings(
    layer_or_plan: LayerOrPlan,
    rules: Rules,
    mesh: Mesh,
    *,
    logical_axes: Mapping[str, str] | None = None,
) -> dict[str, NamedSharding]:
    """:func:`param_specs` as ``NamedSharding`` on ``mesh`` (checked against it).

    Pass it as ``out_shardings`` to create params already split: each device draws only its part.

    Example:
        >>> mix = em.layer('b c -> b d', bias_shape='d', c=3, d=4)
        >>> mesh = jax.make_mesh((1,), ('model',))
        >>> shardings = em.param_shardings(mix, {'d': 'model'}, mesh)
        >>> params = jax.jit(mix.init, out_shardings=shardings)(jax.random.key(0))
        >>> params['weight'].sharding.spec, params['bias'].sharding == shardings['bias']
        (P(None, 'model'), True)
    """
    if not isinstance(mesh, Mesh):
        raise EinMixError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    specs = param_specs(layer_or_plan, rules, mesh=mesh, logical_axes=logical_axes)
    return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


@dataclasses.dataclass(frozen=True)
class OutSharding:
    """How a layer constrains its output: by ``rules`` on the output axis names, or a fixed ``spec``.

    Hashable, so a layer carrying it stays a static ``jit`` argument. Build it with
    :func:`with_out_sharding`.
    """

    rules: NormalRules | None = None
    spec: PartitionSpec | None = None
    logical_axes: tuple[tuple[str, str], ...] = ()


def with_out_sharding(
    layer: Any,
    out_sharding: Rules | PartitionSpec | None,
    *,
    logical_axes: Mapping[str, str] | None = None,
) -> Any:
    """The same layer, with its output constrained to a sharding whenever a mesh is set.

    Under ``jax.set_mesh(mesh)`` the layer's output is passed through
    ``jax.lax.with_sharding_constraint`` (``Auto`` mesh axes) or resharded (``Explicit`` axes). With
    no mesh set it runs exactly as before. The layer stays hashable.

    Args:
        layer: an :class:`~einmix_jax.EinMix`.
        out_sharding: rules (as for :func:`param_specs`) mapping the output axis names to mesh
            axes -- an output group ``(h d)`` takes the mesh axes of its leading axis, ``...``
            dimensions are left to the partitioner; or a ``PartitionSpec`` used as given; or
            ``None`` to remove the constraint.
        logical_axes: renames axes before the rules apply, e.g. ``{'d': 'embed'}``.

    Example:
        >>> mix = em.layer('b t c -> b t d', c=3, d=4)
        >>> sharded = em.with_out_sharding(mix, {'b': 'data', 'd': 'model'})
        >>> mesh = jax.make_mesh((1, 1), ('data', 'model'))
        >>> params = mix.init(jax.random.key(0))
        >>> with jax.set_mesh(mesh):
        ...     y = sharded(params, jnp.ones((2, 5, 3)))
        >>> y.sharding.spec, bool(jnp.allclose(y, mix(params, jnp.ones((2, 5, 3)))))
        (P('data', None, 'model'), True)
    """
    plan = _plan(layer)
    if out_sharding is None:
        value = None
    elif isinstance(out_sharding, PartitionSpec):
        if logical_axes is not None:
            raise EinMixError(
                f"logical_axes applies to rules, not to a fixed PartitionSpec ({plan.context()})"
            )
        value = OutSharding(spec=out_sharding)
    else:
        value = OutSharding(
            rules=normalize_rules(out_sharding),
            logical_axes=_normalize_logical(logical_axes, plan),
        )
    return layer.replace(out_sharding=value)


def _context_mesh() -> AbstractMesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def explicit_mesh_active() -> bool:
    """Whether the mesh set with ``jax.set_mesh`` has ``Explicit`` axes (checked while tracing)."""
    mesh = _context_mesh()
    return mesh is not None and bool(mesh.explicit_axes)


def output_spec(
    plan: Plan,
    x_shape: tuple[int, ...],
    out: OutSharding | None,
    mesh: AbstractMesh,
    *,
    keep: Sequence[str],
    free: Any,
    derived: Mapping[str, MeshAxes] | None = None,
) -> PartitionSpec:
    """The output's ``PartitionSpec`` on ``mesh``, using only the mesh axes in ``keep``.

    The output sharding fixes some dimensions; the others stay *open*: ``...`` dimensions, those
    whose leading axis no rule mentions, ``PartitionSpec.UNCONSTRAINED`` entries, or all of them
    when ``out`` is None. An open dimension takes its leading axis's entry in ``derived`` (axis name
    -> mesh axes, when given and its mesh axes are still free), else ``free``.
    """
    ctx = plan.context()
    sizes, n_ellipsis = resolve_sizes(plan, x_shape)
    groups = expand_groups(plan.right, n_ellipsis)
    mesh_shape = _mesh_shape(mesh)
    lead: dict[tuple[str, ...], str | None] = {}
    for group in groups:
        non_unit = [a for a in group if sizes[a] != 1]
        lead[group] = non_unit[0] if non_unit else (group[0] if group else None)
    entries: list[Any] = [None] * len(groups)
    is_open = [bool(g) for g in groups]

    if out is not None and out.spec is not None:
        if len(out.spec) > len(groups):
            raise EinMixError(
                f"out_sharding {out.spec} has {len(out.spec)} entries but the output has "
                f"{len(groups)} dimensions ({ctx})"
            )
        for i, (entry, group) in enumerate(zip(out.spec, groups, strict=False)):
            if entry is PartitionSpec.UNCONSTRAINED:
                continue
            for axis in _flat(entry):
                if axis not in mesh_shape:
                    raise EinMixError(
                        f"out_sharding {out.spec}: mesh axis {axis!r} is not in the mesh (its "
                        f"axes: {', '.join(f'{a!r}={n}' for a, n in mesh_shape.items())}) ({ctx})"
                    )
            length = math.prod(sizes[a] for a in group)
            parts = math.prod(mesh_shape[a] for a in _flat(entry))
            if length % parts:
                raise EinMixError(
                    f"out_sharding {out.spec}: output dimension ({' '.join(group)}) of length "
                    f"{length} is not divisible by {parts}, the size of mesh axes {entry!r} ({ctx})"
                )
            entries[i], is_open[i] = entry, False
        for i in range(len(out.spec), len(groups)):
            is_open[i] = False
    elif out is not None and out.rules is not None:
        renamed = dict(out.logical_axes)
        mentioned = {name for name, _ in out.rules}
        flat = [a for g in groups for a in g]
        names = [None if a.startswith("...") else renamed.get(a, a) for a in flat]
        assigned = dict(zip(flat, mesh_axes_for(names, out.rules), strict=True))
        for i, group in enumerate(groups):
            head = lead[group]
            for axis in group:
                if assigned[axis] is not None and axis != head and sizes[axis] != 1:
                    raise EinMixError(
                        f"output group ({' '.join(group)}) can only be sharded by its leading axis "
                        f"{head!r}, but a rule maps axis {axis!r} to {assigned[axis]!r}; map "
                        f"{head!r} instead, or give a PartitionSpec ({ctx})"
                    )
            if head is None or head.startswith("...") or renamed.get(head, head) not in mentioned:
                continue
            entry = assigned[head]
            if entry is not None:
                length = math.prod(sizes[a] for a in group)
                _check_dim(entry, renamed.get(head, head), head, length, mesh_shape, "output", ctx)
            entries[i], is_open[i] = entry, False

    used = {a for e in entries if e is not None for a in _flat(e)}
    for i, group in enumerate(groups):
        if not is_open[i]:
            continue
        head = lead[group]
        entry = None if derived is None or head is None else derived.get(head)
        if entry is not None and not set(_flat(entry)) & used:
            used |= set(_flat(entry))
            entries[i] = entry
        else:
            entries[i] = free
    return PartitionSpec(*(_keep(e, keep) for e in entries))


def _keep(entry: Any, keep: Sequence[str]) -> Any:
    """``entry`` restricted to the mesh axes in ``keep``."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return entry
    kept = tuple(a for a in _flat(entry) if a in keep)
    if not kept:
        return None
    return kept[0] if isinstance(entry, str) else kept


def _divides(entry: MeshAxes, length: int, mesh_shape: Mapping[str, int]) -> MeshAxes:
    """The leading mesh axes of ``entry`` whose product divides ``length`` (None if none do).

    A dimension split over ``('data', 'model')`` is split over ``'data'`` first, so a prefix of
    its mesh axes that divides a group's first axis splits that axis into whole blocks.

    Example:
        >>> _divides(("data", "model"), 2, {"data": 2, "model": 4})
        ('data',)
        >>> _divides("model", 2, {"model": 4}) is None
        True
    """
    axes = _flat(entry)
    kept = 0
    while kept < len(axes) and length % math.prod(mesh_shape[a] for a in axes[: kept + 1]) == 0:
        kept += 1
    if not kept:
        return None
    return axes[0] if isinstance(entry, str) else axes[:kept]


def _derived(
    plan: Plan, x: jax.Array, weight: Any, mesh_shape: Mapping[str, int]
) -> dict[str, MeshAxes]:
    """Axis name -> mesh axes read off the (explicitly sharded) types of the input and weight.

    An input group such as ``(h c)`` credits its mesh axes to its leading (non-unit) axis only as
    far as they split that axis into whole blocks: ``(h c)`` with ``h=2`` split over a mesh axis
    of size 4 says nothing about ``h`` alone.
    """
    sizes, n_ellipsis = resolve_sizes(plan, tuple(x.shape))
    names: dict[str, MeshAxes] = {}
    x_spec = list(jax.typeof(x).sharding.spec)
    for group, entry in zip(expand_groups(plan.left, n_ellipsis), x_spec, strict=False):
        if not group or entry is None:
            continue
        head = next((a for a in group if sizes[a] != 1), group[0])
        credited = _divides(entry, sizes[head], mesh_shape)
        if credited is not None:
            names.setdefault(head, credited)
    if isinstance(weight, jax.Array) or hasattr(weight, "aval"):
        w_spec = list(jax.typeof(weight).sharding.spec)
        for axis, entry in zip(plan.weight_axes, w_spec, strict=False):
            if entry is not None:
                names.setdefault(axis, entry)
    return names


def apply_sharded(
    compute: Callable[..., jax.Array], params: Params, x: jax.typing.ArrayLike, layer: Any
) -> jax.Array:
    """Run ``compute(params, x, layer=layer)`` under the context mesh's sharding rules.

    * no mesh set: ``compute`` as is;
    * ``Explicit`` mesh axes: ``compute`` under ``jax.sharding.auto_axes``, its result resharded
      to the output spec (from the layer's output sharding, the rest from the names);
    * ``Auto`` axes and an output sharding: ``with_sharding_constraint`` on the result, to the
      output spec restricted to the ``Auto`` axes (on a mixed mesh, after the resharding above).
    """
    mesh = _context_mesh()
    out: OutSharding | None = layer.out_sharding
    if mesh is None:
        return compute(params, x, layer=layer)
    x = jnp.asarray(x)
    explicit = tuple(mesh.explicit_axes)
    if explicit:
        weight = params.get("weight") if isinstance(params, dict) else None
        spec = output_spec(
            layer.plan,
            tuple(x.shape),
            out,
            mesh,
            keep=explicit,
            free=None,
            derived=_derived(layer.plan, x, weight, _mesh_shape(mesh)),
        )

        def run(params: Params, x: jax.Array) -> jax.Array:
            return compute(params, x, layer=layer)

        y = jax.sharding.auto_axes(run, axes=explicit, out_sharding=spec)(params, x)
    else:
        y = compute(params, x, layer=layer)
    if out is None or not mesh.auto_axes:
        return y
    spec = output_spec(
        layer.plan,
        tuple(x.shape),
        out,
        mesh,
        keep=tuple(mesh.auto_axes),
        free=PartitionSpec.UNCONSTRAINED,
    )
    return jax.lax.with_sharding_constraint(y, spec)

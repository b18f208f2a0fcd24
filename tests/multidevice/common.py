"""Shared pieces of the 8-device tests: meshes, a 2-layer model and a reader of compiled HLO."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import einmix_jax as em

assert jax.device_count() == 8, (
    "tests/multidevice needs XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX "
    f"starts; run it through tests/test_multidevice.py (found {jax.device_count()} devices)"
)

#: (mesh shape, mesh axis names, rules for the MLP below)
MESHES = [
    ((8,), ("data",), {"b": "data"}),
    ((8,), ("model",), {"f": "model"}),
    ((2, 4), ("data", "model"), {"b": "data", "f": "model"}),
]


def make_mesh(shape: tuple[int, ...], names: tuple[str, ...], axis_type: AxisType) -> Mesh:
    """A mesh over the 8 simulated devices with every axis of ``axis_type``."""
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape))


def local_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> tuple[int, ...]:
    """The shape of one device's block of an array of ``shape`` split by ``spec``, computed from
    the spec and the mesh sizes alone."""
    entries = [*spec, *[None] * (len(shape) - len(spec))]
    out = []
    for length, entry in zip(shape, entries, strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else entry
        out.append(length // math.prod(mesh.shape[n] for n in names))
    return tuple(out)


def mlp(rules: dict | None = None) -> tuple[em.EinMix, em.EinMix]:
    """A 2-layer MLP, Megatron-shaped: ``c -> f`` then ``f -> c``, each with a bias."""
    up = em.layer("b t c -> b t f", bias_shape="f", c=4, f=16)
    down = em.layer("b t f -> b t c", bias_shape="c", c=4, f=16)
    if rules is not None:
        up, down = em.with_out_sharding(up, rules), em.with_out_sharding(down, rules)
    return up, down


def mlp_forward(layers: tuple[em.EinMix, em.EinMix], params: dict, x: jax.Array) -> jax.Array:
    up, down = layers
    return down(params["down"], jax.nn.gelu(up(params["up"], x)))


def train_step_fn(layers: tuple[em.EinMix, em.EinMix], optimizer: optax.GradientTransformation):
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``: MSE, grad, optax update."""

    def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((mlp_forward(layers, params, x) - y) ** 2)

    def step(params: dict, opt_state: optax.OptState, x: jax.Array, y: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def batch_sharding(mesh: Mesh, rules: dict, ndim: int) -> NamedSharding:
    """Inputs split along the batch axis when the rules shard ``b``."""
    return NamedSharding(mesh, PartitionSpec(rules.get("b"), *[None] * (ndim - 1)))


_COLLECTIVE = re.compile(
    r"=\s*(?P<type>\(.*?\)|\S+)\s+(?P<op>all-reduce|all-gather|reduce-scatter|all-to-all|"
    r"collective-permute)(?:-start)?\((?P<rest>.*)$"
)
_SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def _replica_groups(text: str) -> set[frozenset[int]] | None:
    """Replica groups, listed (``{{0,1},{2,3}}``) or in iota form (``[2,4]<=[4,2]T(1,0)``)."""
    listed = _GROUPS.search(text)
    if listed:
        return {
            frozenset(int(n) for n in g.split(",") if n)
            for g in re.findall(r"\{([\d,]*)\}", listed.group(1))
        }
    iota = _IOTA_GROUPS.search(text)
    if iota:
        dims = [int(n) for n in iota.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(4):
            ids = ids.transpose([int(n) for n in iota.group(4).split(",")])
        rows = ids.reshape(int(iota.group(1)), int(iota.group(2)))
        return {frozenset(int(i) for i in row) for row in rows}
    named = _MESH_GROUPS.search(text)
    if named:
        axes = re.findall(r"'([^']+)'=(\d+)", named.group(1))
        names = [name for name, _ in axes]
        ids = np.arange(math.prod(int(n) for _, n in axes)).reshape([int(n) for _, n in axes])
        grouped = [names.index(a) for a in re.findall(r"'([^']+)'", named.group(2))]
        rest = [i for i in range(len(names)) if i not in grouped]
        rows = ids.transpose(rest + grouped).reshape(-1, math.prod(ids.shape[i] for i in grouped))
        return {frozenset(int(i) for i in row) for row in rows}
    return None


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]], set[frozenset[int]] | None]]:
    """The collectives of a compiled module: (op, result shapes, replica groups or None)."""
    found = []
    for line in hlo.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        shapes = [
            tuple(int(n) for n in dims.split(",") if n)
            for dims in _SHAPE.findall(match.group("type"))
        ]
        found.append((match.group("op"), shapes, _replica_groups(match.group("rest"))))
    return found


def mesh_groups(mesh: Mesh, axis: str) -> set[frozenset[int]]:
    """Device-id groups that vary only along mesh ``axis`` (what a collective over it uses)."""
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    lines = np.moveaxis(ids, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
    return {frozenset(int(i) for i in line) for line in lines}


def compiled_text(fn, *args) -> str:
    """The optimised HLO XLA runs for ``jax.jit(fn)(*args)``."""
    return jax.jit(fn).lower(*args).compile().as_text()

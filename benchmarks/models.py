"""Whole-model benchmark: a transformer encoder and an MLP-Mixer, each built three ways.

Usage::

    python benchmarks/models.py                    # 9 rounds, prints the tables
    python benchmarks/models.py --rounds 7 --out benchmarks/RESULTS.md   # its section only
    python benchmarks/models.py --quick            # 2 rounds, batch 2, 1 block: a smoke test

The models:

* a pre-LN transformer encoder: 4 blocks, x (8, 128, 256), 8 heads of 32, MLP 1024; q, k and v
  come from one layer, attention is ``softmax(q k^T / sqrt(d)) v`` written with ``jnp.einsum``;
* the MLP-Mixer blocks of ``examples/mlp_mixer_digits.py``: 4 blocks, x (16, 64, 256), token
  hidden 128, channel hidden 1024.

Each is built with ``einmix_jax.linen.EinMix`` (``einmix``), with ``einops.layers.flax.EinMix``
(``einops``) and with Flax's own layers as Flax users write them (``flax``: ``nn.DenseGeneral``
for q/k/v and the output projection, ``nn.Dense`` for the MLPs, ``jnp.swapaxes`` around
``nn.Dense`` for token mixing). The transformer is also built in NNX, with ``einmix_jax.nnx.EinMix``
against ``nnx.LinearGeneral`` / ``nnx.Linear``. Every build runs its own initialised params
(the same shapes and FLOPs); before timing, the builds are checked to compute the same function
when given the same weights (Flax's kernels renamed by ``einmix_jax.linen.from_flax``, einops'
converted by ``einmix_jax.linen.from_einops``).

Metrics: the jitted inference forward and one jitted Adam train step (``jax.value_and_grad`` of
an MSE loss, ``optax.adam(1e-3)``'s update and ``optax.apply_updates``; in NNX ``nnx.jit`` with
``nnx.Optimizer``). The builds of a model are timed round-robin in one process, in a fresh random
order every round; ratios are medians of the per-round ratios. A second table shows where the
einmix transformer's train step spends its time: its EinMix layers alone (forward and backward),
the attention core alone, the layer norms alone and the optimizer update alone, each timed in its
own jitted function on inputs of the shapes it sees in the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import einops
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from einops.layers.flax import EinMix as EinopsEinMix
from flax import nnx
from harness import write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's einmix_jax
import einmix_jax

BUILDS = ("einmix", "einops", "flax")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The models' sizes."""

    blocks: int = 4
    batch: int = 8  # transformer
    tokens: int = 128
    channels: int = 256
    heads: int = 8
    mlp: int = 1024
    mixer_batch: int = 16
    mixer_tokens: int = 64
    mixer_channels: int = 256
    token_hidden: int = 128
    channel_hidden: int = 1024

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads


QUICK = Shapes(blocks=1, batch=2, mixer_batch=2)


# --------------------------------------------------------------------------------------------
# Linen models: one block class per model, the build picks the layers.
# --------------------------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d)) v`` over (batch, time, heads, head_dim) arrays."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _einops(name: str, pattern: str, weight: str, bias: str, **sizes: int) -> EinopsEinMix:
    """einops' Flax layer, which takes every weight and bias length in ``sizes``."""
    return EinopsEinMix(pattern, weight, bias, sizes=sizes, name=name)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: attention with one q/k/v layer, then a GELU MLP."""

    build: str
    heads: int
    head_dim: int
    mlp: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: (batch, time, channels)
        c, h, d, f = x.shape[-1], self.heads, self.head_dim, self.mlp
        y = nn.LayerNorm(name="ln1")(x)
        if self.build == "einmix":
            mix = einmix_jax.linen.EinMix
            qkv = mix(
                "b t c -> k b t h d", "c k h d", "k h d", sizes=dict(k=3, h=h, d=d), name="qkv"
            )
            q, k, v = qkv(y)
            out = mix("b t h d -> b t c", "h d c", "c", sizes={"c": c}, name="out")
        elif self.build == "einops":
            qkv = _einops("qkv", "b t c -> k b t h d", "c k h d", "k h d", c=c, k=3, h=h, d=d)
            q, k, v = qkv(y)
            out = _einops("out", "b t h d -> b t c", "h d c", "c", h=h, d=d, c=c)
        else:
            qkv = nn.DenseGeneral(features=(3, h, d), name="qkv")(y)
            q, k, v = (qkv[:, :, i] for i in range(3))
            out = nn.DenseGeneral(features=c, axis=(-2, -1), name="out")
        x = x + out(attention(q, k, v))
        y = nn.LayerNorm(name="ln2")(x)
        if self.build == "einmix":
            mix = einmix_jax.linen.EinMix
            mlp_in = mix("b t c -> b t f", "c f", "f", sizes={"f": f}, name="mlp_in")
            mlp_out = mix("b t f -> b t c", "f c", "c", sizes={"c": c}, name="mlp_out")
        elif self.build == "einops":
            mlp_in = _einops("mlp_in", "b t c -> b t f", "c f", "f", c=c, f=f)
            mlp_out = _einops("mlp_out", "b t f -> b t c", "f c", "c", f=f, c=c)
        else:
            mlp_in, mlp_out = nn.Dense(f, name="mlp_in"), nn.Dense(c, name="mlp_out")
        return x + mlp_out(nn.gelu(mlp_in(y)))


class MixerBlock(nn.Module):
    """The block of ``examples/mlp_mixer_digits.py``: token mixing, then channel mixing."""

    build: str
    token_hidden: int
    channel_hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: (batch, tokens, channels)
        t, c, u, e = x.shape[1], x.shape[2], self.token_hidden, self.channel_hidden
        y = nn.LayerNorm(name="ln1")(x)
        if self.build == "einmix":
            mix = einmix_jax.linen.EinMix
            y = mix("b t c -> b u c", "t u", "u", sizes={"u": u}, name="token_in")(y)
            y = mix("b u c -> b t c", "u t", "t", sizes={"t": t}, name="token_out")(nn.gelu(y))
        elif self.build == "einops":
            y = _einops("token_in", "b t c -> b u c", "t u", "u", t=t, u=u)(y)
            y = _einops("token_out", "b u c -> b t c", "u t", "t", u=u, t=t)(nn.gelu(y))
        else:
            y = nn.Dense(u, name="token_in")(jnp.swapaxes(y, 1, 2))
            y = jnp.swapaxes(nn.Dense(t, name="token_out")(nn.gelu(y)), 1, 2)
        x = x + y
        y = nn.LayerNorm(name="ln2")(x)
        if self.build == "einmix":
            mix = einmix_jax.linen.EinMix
            y = mix("b t c -> b t d", "c d", "d", sizes={"d": e}, name="channel_in")(y)
            y = mix("b t d -> b t c", "d c", "c", sizes={"c": c}, name="channel_out")(nn.gelu(y))
        elif self.build == "einops":
            y = _einops("channel_in", "b t c -> b t d", "c d", "d", c=c, d=e)(y)
            y = _einops("channel_out", "b t d -> b t c", "d c", "c", d=e, c=c)(nn.gelu(y))
        else:
            y = nn.Dense(e, name="channel_in")(y)
            y = nn.Dense(c, name="channel_out")(nn.gelu(y))
        return x + y


class Stack(nn.Module):
    """``blocks`` copies of a block (made by ``make(build)``), then a final LayerNorm."""

    build: str
    model: str
    shapes: Shapes

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.shapes
        for i in range(s.blocks):
            if self.model == "transformer":
                block: nn.Module = EncoderBlock(
                    self.build, s.heads, s.head_dim, s.mlp, name=f"block{i}"
                )
            else:
                block = MixerBlock(self.build, s.token_hidden, s.channel_hidden, name=f"block{i}")
            x = block(x)
        return nn.LayerNorm(name="ln_final")(x)


# --------------------------------------------------------------------------------------------
# NNX transformer.
# --------------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    """The same pre-LN block in NNX: ``einmix_jax.nnx.EinMix`` or ``nnx.LinearGeneral``."""

    def __init__(self, build: str, s: Shapes, rngs: nnx.Rngs) -> None:
        c, h, d, f = s.channels, s.heads, s.head_dim, s.mlp
        self.build = build
        self.ln1 = nnx.LayerNorm(c, rngs=rngs)
        self.ln2 = nnx.LayerNorm(c, rngs=rngs)
        if build == "einmix":
            mix = einmix_jax.nnx.EinMix
            self.qkv = mix("b t c -> k b t h d", "c k h d", "k h d", c=c, k=3, h=h, d=d, rngs=rngs)
            self.out = mix("b t h d -> b t c", "h d c", "c", h=h, d=d, c=c, rngs=rngs)
            self.mlp_in = mix("b t c -> b t f", "c f", "f", c=c, f=f, rngs=rngs)
            self.mlp_out = mix("b t f -> b t c", "f c", "c", f=f, c=c, rngs=rngs)
        else:
            self.qkv = nnx.LinearGeneral(c, (3, h, d), rngs=rngs)
            self.out = nnx.LinearGeneral((h, d), c, axis=(-2, -1), rngs=rngs)
            self.mlp_in = nnx.Linear(c, f, rngs=rngs)
            self.mlp_out = nnx.Linear(f, c, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = self.qkv(self.ln1(x))
        q, k, v = qkv if self.build == "einmix" else (qkv[:, :, i] for i in range(3))
        x = x + self.out(attention(q, k, v))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln2(x))))


class NnxEncoder(nnx.Module):
    """``blocks`` NNX blocks and a final LayerNorm."""

    def __init__(self, build: str, s: Shapes, rngs: nnx.Rngs) -> None:
        self.blocks = nnx.List([NnxBlock(build, s, rngs) for _ in range(s.blocks)])
        self.ln_final = nnx.LayerNorm(s.channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.ln_final(x)


# --------------------------------------------------------------------------------------------
# Jitted functions.
# --------------------------------------------------------------------------------------------

TX = optax.adam(1e-3)


def mse(y: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error."""
    return jnp.mean((y - target) ** 2)


@dataclasses.dataclass
class Runner:
    """A build's compiled forward and train step and the arguments they are timed on."""

    forward: Callable[[], Any]
    step: Callable[[], Any]


def linen_runner(model: nn.Module, params: Any, x: jax.Array, target: jax.Array) -> Runner:
    """``model``'s jitted forward and Adam train step on ``params``, ``x`` and ``target``."""

    def loss(p: Any, x: jax.Array, target: jax.Array) -> jax.Array:
        return mse(model.apply({"params": p}, x), target)

    def step(p: Any, opt_state: Any, x: jax.Array, target: jax.Array) -> tuple:
        value, grads = jax.value_and_grad(loss)(p, x, target)
        updates, opt_state = TX.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    opt_state = TX.init(params)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, x).compile()
    train = jax.jit(step).lower(params, opt_state, x, target).compile()
    return Runner(lambda: fwd(params, x), lambda: train(params, opt_state, x, target))


def nnx_runner(model: NnxEncoder, x: jax.Array, target: jax.Array) -> Runner:
    """``model``'s ``nnx.jit`` forward and train step (``nnx.Optimizer`` over its Params)."""
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)

    @nnx.jit
    def forward(model: NnxEncoder, x: jax.Array) -> jax.Array:
        return model(x)

    @nnx.jit
    def step(model: NnxEncoder, optimizer: nnx.Optimizer, x: jax.Array, t: jax.Array) -> Any:
        value, grads = nnx.value_and_grad(lambda m: mse(m(x), t))(model)
        optimizer.update(model, grads)
        return value

    return Runner(lambda: forward(model, x), lambda: step(model, optimizer, x, target))


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def _seconds(f: Callable[[], Any], reps: int) -> float:
    """Mean seconds per call of ``f`` over ``reps`` calls (dispatch included, as in training)."""
    start = time.perf_counter()
    for _ in range(reps):
        out = f()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def time_round_robin(
    fns: Mapping[str, Callable[[], Any]], rounds: int, min_time: float, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each function, per round: all of them run once a round, in random order.

    Each is warmed up, then called ``reps`` times a round, ``reps`` chosen so that a round of it
    lasts about ``min_time`` seconds.
    """
    rng = random.Random(seed)
    reps = {}
    for name, f in fns.items():
        jax.block_until_ready(f())
        reps[name] = max(1, min(200, round(min_time / max(_seconds(f, 1), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            times[name].append(_seconds(fns[name], reps[name]))
    return times


def median_ratio(times: Mapping[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``times[a][i] / times[b][i]``."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


# --------------------------------------------------------------------------------------------
# Checks: the builds compute the same function.
# --------------------------------------------------------------------------------------------


def _tolerance() -> float:
    return 1e-4 if jax.default_backend() == "cpu" else 2e-2


def _close(a: jax.Array, b: jax.Array, what: str) -> float:
    """The largest absolute difference of ``a`` and ``b``; raises past the tolerance."""
    err = float(jnp.max(jnp.abs(a - b)))
    scale = float(jnp.max(jnp.abs(b)))
    if not err <= _tolerance() * max(1.0, scale):
        raise SystemExit(f"{what}: max |difference| {err:.3g} (scale {scale:.3g})")
    return err


def check_linen(model: str, s: Shapes, x: jax.Array, params: Mapping[str, Any]) -> list[str]:
    """Outputs finite and of the same shape; einmix equals flax and einops on the same weights."""
    notes = []
    outs = {b: Stack(b, model, s).apply({"params": params[b]}, x) for b in BUILDS}
    for b, y in outs.items():
        if y.shape != x.shape or not bool(jnp.isfinite(y).all()):
            raise SystemExit(f"{model} {b}: output shape {y.shape}, finite {jnp.isfinite(y).all()}")
    einmix_model = Stack("einmix", model, s)
    from_flax = einmix_jax.linen.from_flax(params["flax"], Stack("flax", model, s), x)
    if jax.tree.structure(from_flax) != jax.tree.structure(params["einmix"]):
        raise SystemExit(f"{model}: the flax params do not map onto the einmix params")
    err = _close(einmix_model.apply({"params": from_flax}, x), outs["flax"], f"{model} vs flax")
    notes.append(f"einmix on flax's weights = flax (max |diff| {err:.1e})")
    converted = einmix_jax.linen.from_einops(params["einops"], Stack("einops", model, s), x)
    err = _close(einmix_model.apply({"params": converted}, x), outs["einops"], f"{model} einops")
    notes.append(f"einmix on einops' weights = einops (max |diff| {err:.1e})")
    return notes


def check_nnx(models: Mapping[str, NnxEncoder], x: jax.Array) -> str:
    """The NNX einmix encoder, given the ``nnx.LinearGeneral`` encoder's weights, equals it."""
    flax_state = nnx.state(models["flax"], nnx.Param).to_pure_dict()

    def rename(tree: Any) -> Any:
        if isinstance(tree, Mapping):
            return {("weight" if k == "kernel" else k): rename(v) for k, v in tree.items()}
        return tree

    copy = nnx.clone(models["einmix"])
    params = nnx.state(copy, nnx.Param)
    nnx.replace_by_pure_dict(params, rename(flax_state))
    nnx.update(copy, params)
    for b, m in models.items():
        y = m(x)
        if y.shape != x.shape or not bool(jnp.isfinite(y).all()):
            raise SystemExit(f"nnx {b}: output shape {y.shape}")
    err = _close(copy(x), models["flax"](x), "nnx transformer vs flax")
    return f"NNX einmix on nnx.LinearGeneral's weights = it (max |diff| {err:.1e})"


# --------------------------------------------------------------------------------------------
# Where the einmix transformer's train step spends its time.
# --------------------------------------------------------------------------------------------


def _normals(key: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    keys = jax.random.split(key, len(shapes))
    return [jax.random.normal(k, shape) for k, shape in zip(keys, shapes, strict=True)]


def part_functions(s: Shapes, params: Any) -> dict[str, Callable[[], Any]]:
    """The einmix transformer's parts as separately jitted functions, on distinct inputs.

    Each layer part is the value and gradient (params and inputs) of ``sum vdot(y, ct)`` over
    every instance of the part in the model (all blocks), so XLA cannot merge the instances.
    """
    b, t, c, h, d, f = s.batch, s.tokens, s.channels, s.heads, s.head_dim, s.mlp
    mix = einmix_jax.linen.EinMix
    layers = {  # name in the model -> (layer, input shape, output shape)
        "qkv": (mix("b t c -> k b t h d", "c k h d", "k h d", sizes=dict(k=3, h=h, d=d)),
                (b, t, c), (3, b, t, h, d)),
        "out": (mix("b t h d -> b t c", "h d c", "c", sizes={"c": c}), (b, t, h, d), (b, t, c)),
        "mlp_in": (mix("b t c -> b t f", "c f", "f", sizes={"f": f}), (b, t, c), (b, t, f)),
        "mlp_out": (mix("b t f -> b t c", "f c", "c", sizes={"c": c}), (b, t, f), (b, t, c)),
    }  # fmt: skip
    blocks = [f"block{i}" for i in range(s.blocks)]
    mixes = [(blk, name) for blk in blocks for name in layers]
    mix_params = {f"{blk}/{name}": params[blk][name] for blk, name in mixes}
    mix_in = _normals(jax.random.key(7), [layers[name][1] for _, name in mixes])
    mix_ct = _normals(jax.random.key(8), [layers[name][2] for _, name in mixes])

    def mix_loss(p: dict, xs: list, cts: list) -> jax.Array:
        terms = zip(mixes, xs, cts, strict=True)
        return sum(
            jnp.vdot(layers[name][0].apply({"params": p[f"{blk}/{name}"]}, x), ct)
            for (blk, name), x, ct in terms
        )

    norms = [params[blk][n] for blk in blocks for n in ("ln1", "ln2")] + [params["ln_final"]]
    norm_in = _normals(jax.random.key(9), [(b, t, c)] * len(norms))
    norm_ct = _normals(jax.random.key(10), [(b, t, c)] * len(norms))
    norm = nn.LayerNorm()

    def norm_loss(p: list, xs: list, cts: list) -> jax.Array:
        terms = zip(p, xs, cts, strict=True)
        return sum(jnp.vdot(norm.apply({"params": q}, x), ct) for q, x, ct in terms)

    qkv = _normals(jax.random.key(11), [(b, t, h, d)] * (4 * s.blocks))
    qkvs = [tuple(qkv[3 * i : 3 * i + 3]) for i in range(s.blocks)]
    att_ct = qkv[3 * s.blocks :]

    def attentions(qkvs: list, cts: list) -> jax.Array:
        return sum(jnp.vdot(attention(*a), ct) for a, ct in zip(qkvs, cts, strict=True))

    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    opt_state = TX.init(params)

    def update(p: Any, g: Any, state: Any) -> tuple:
        updates, state = TX.update(g, state, p)
        return optax.apply_updates(p, updates), state

    def compiled(f: Callable, *args: Any) -> Callable[[], Any]:
        run = jax.jit(f).lower(*args).compile()
        return lambda: run(*args)

    grad = jax.value_and_grad
    return {
        "EinMix layers (fwd+bwd)": compiled(grad(mix_loss, (0, 1)), mix_params, mix_in, mix_ct),
        "attention core (fwd+bwd)": compiled(grad(attentions), qkvs, att_ct),
        "layer norms (fwd+bwd)": compiled(grad(norm_loss, (0, 1)), norms, norm_in, norm_ct),
        "Adam update + apply_updates": compiled(update, params, grads, opt_state),
    }


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def machine() -> str:
    """One line naming the machine and the software."""
    cpu = platform.processor() or platform.machine()
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}; jax {jax.__version__} "
        f"({jax.default_backend()}: {devices}); flax {flax.__version__}; einops "
        f"{einops.__version__}; optax {optax.__version__}; einmix_jax {einmix_jax.__version__}"
    )


def _ms(ts: list[float]) -> str:
    return f"{1e3 * statistics.median(ts):.2f}"


def run(rounds: int, s: Shapes, min_time: float, command: str = "") -> str:
    """Check, time, and return the markdown section (``command``: the flags, for the header)."""
    start = time.perf_counter()
    key = jax.random.key(0)
    inputs = {
        "transformer": (s.batch, s.tokens, s.channels),
        "mixer": (s.mixer_batch, s.mixer_tokens, s.mixer_channels),
    }
    lines = [f"Machine: {machine()}.", ""]
    rows, notes = [], []
    transformer_params: Any = None
    for model, shape in inputs.items():
        x, target = _normals(jax.random.fold_in(key, len(model)), [shape, shape])
        params = {}
        runners = {}
        for i, b in enumerate(BUILDS):
            m = Stack(b, model, s)
            params[b] = m.init(jax.random.fold_in(key, i), x)["params"]
            runners[b] = linen_runner(m, params[b], x, target)
        notes += [f"{model}: {n}" for n in check_linen(model, s, x, params)]
        if model == "transformer":
            transformer_params = (params["einmix"], x, target)
        fns = {
            (b, kind): getattr(r, kind) for b, r in runners.items() for kind in ("forward", "step")
        }
        times = time_round_robin({f"{b} {k}": f for (b, k), f in fns.items()}, rounds, min_time)
        for b in BUILDS:
            fwd, step = times[f"{b} forward"], times[f"{b} step"]
            ratios = []
            for kind in ("forward", "step"):
                for other in ("einops", "flax"):
                    r = median_ratio(times, f"einmix {kind}", f"{other} {kind}")
                    ratios.append(f"{r:.2f}" if b == "einmix" else "")
            rows.append(f"| {model} | linen {b} | {_ms(fwd)} | {_ms(step)} | " + " | ".join(ratios))

    x, target = _normals(jax.random.key(3), [inputs["transformer"]] * 2)
    nnx_models = {b: NnxEncoder(b, s, nnx.Rngs(i)) for i, b in enumerate(("einmix", "flax"))}
    notes.append(f"transformer: {check_nnx(nnx_models, x)}")
    nnx_fns = {}
    for b, m in nnx_models.items():
        r = nnx_runner(m, x, target)
        nnx_fns[f"{b} forward"], nnx_fns[f"{b} step"] = r.forward, r.step
    times = time_round_robin(nnx_fns, rounds, min_time, seed=1)
    for b, label in (("einmix", "nnx einmix"), ("flax", "nnx Linear(General)")):
        fwd, step = times[f"{b} forward"], times[f"{b} step"]
        if b == "einmix":
            ratios = ["", f"{median_ratio(times, 'einmix forward', 'flax forward'):.2f}", ""]
            ratios.append(f"{median_ratio(times, 'einmix step', 'flax step'):.2f}")
        else:
            ratios = ["", "", "", ""]
        rows.append(f"| transformer | {label} | {_ms(fwd)} | {_ms(step)} | " + " | ".join(ratios))

    params, x, target = transformer_params
    parts = part_functions(s, params)
    whole = linen_runner(Stack("einmix", "transformer", s), params, x, target).step
    part_times = time_round_robin({"train step": whole, **parts}, rounds, min_time, seed=2)
    ratio = {k: median_ratio(part_times, k, "train step") for k in parts}
    share_rows = [f"| whole train step | {_ms(part_times['train step'])} | 1.00 |"]
    share_rows += [f"| {k} | {_ms(part_times[k])} | {r:.2f} |" for k, r in ratio.items()]
    rest = 1 - sum(ratio.values())
    share_rows.append(f"| rest (residuals, GELU, loss, fusion across parts) | | {rest:.2f} |")

    t_shape = f"x {inputs['transformer']}, {s.heads} heads of {s.head_dim}, MLP {s.mlp}"
    m_shape = (
        f"x {inputs['mixer']}, token hidden {s.token_hidden}, channel hidden {s.channel_hidden}"
    )
    lines += [
        f"Run: `python benchmarks/models.py {command}`, {time.perf_counter() - start:.0f} s. "
        f"Transformer: {s.blocks} pre-LN block(s), {t_shape}. Mixer: {s.blocks} block(s), "
        f"{m_shape}. Times are medians over rounds; ratios "
        "are medians of per-round ratios (below 1: einmix is faster).",
        "",
        "| model | build | forward ms | train step ms | fwd einmix/einops | fwd einmix/flax "
        "| step einmix/einops | step einmix/flax |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *[r + " |" for r in rows],
        "",
        "Checked before timing: every output finite and of x's shape; "
        + "; ".join(notes)
        + f" (tolerance {_tolerance():g} relative to the output's scale).",
        "",
        f"Where the einmix linen transformer's train step goes (each part jitted alone, over all "
        f"{s.blocks} blocks; share = median per-round ratio to the whole step):",
        "",
        "| part | ms | share of the step |",
        "|---|---:|---:|",
        *share_rows,
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9, help="timing rounds (default 9)")
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds, batch 2, 1 block: a smoke test"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="also write the section into this file (between its markers)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark; print (and with ``--out`` write) the markdown section."""
    args = parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    shapes, min_time = (QUICK, 0.05) if args.quick else (Shapes(), 0.3)
    command = "--quick" if args.quick else f"--rounds {rounds}"
    section = run(rounds, shapes, min_time, command)
    print(section)
    if args.out is not None:  # the section between its markers; the rest of the file is kept
        write_results(args.out, section, tag="models")
    return section


if __name__ == "__main__":
    main()

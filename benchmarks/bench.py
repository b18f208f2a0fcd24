"""Benchmark: einmix_jax against einops' and Flax's layers and hand-written JAX lowerings.

Usage::

    python benchmarks/bench.py                      # every case, 30 rounds, writes RESULTS.md
    python benchmarks/bench.py --cases 2 3 --rounds 30
    python benchmarks/bench.py --quick --no-write    # fewer rounds, nothing written

For every case the implementations below run, in one process, on the same input and the same
parameter values:

* ``einmix``        -- ``einmix_jax.init(...)``'s functional ``apply``;
* ``einmix linen``  -- ``einmix_jax.linen.EinMix`` with ``variables={'params': params}``;
* ``einops layer``  -- ``einops.layers.flax.EinMix`` (its bias stored with broadcast 1s);
* ``flax Einsum``   -- ``flax.linen.Einsum`` between explicit ``einops.rearrange`` calls;
* ``rearrange+einsum`` -- ``einops.rearrange`` + ``jnp.einsum`` by hand;
* ``hand: ...``     -- hand-written ``lax.dot_general`` lowerings; the fastest of them per metric
  ("best") is the reference every ratio is taken against.

Metrics: warm forward; forward+backward (value and gradient of ``vdot(y, ct)`` with respect to
the params and ``x``); first-call trace+compile time of each (``jax.clear_caches()`` before each
measurement, so nothing is reused but the library's own cached plan); XLA temp memory
(``compiled.memory_analysis().temp_size_in_bytes``). Timings are interleaved round-robin (in a
fresh random order each round) and reported as medians of the per-round ratios to the best
hand-written lowering, which are far steadier than absolute times on a shared machine. Every
output and gradient is checked against ``rearrange+einsum`` before timing, and the optimized HLO
of einmix is compared with that of each hand-written lowering. The timing loop, the
forward+backward function, the compile-time measurement and the closeness check are
``harness.py``'s, shared with ``regret.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
from einops.layers.flax import EinMix as EinopsEinMix
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's einmix_jax
from harness import (
    BF16,
    F32,
    Fn,
    Impl,
    Params,
    cast,
    close,
    compile_time,
    fwd_bwd,
    machine,
    repetitions,
    timed,
    write_results,
)

import einmix_jax

# --------------------------------------------------------------------------------------------
# Hand-written lowerings: functions of (core params, x); the compute dtype is applied by `cast`.
# --------------------------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array, contract: tuple, batch: tuple = ((), ())) -> jax.Array:
    return lax.dot_general(a, b, (contract, batch))


def hand_linear(p: Params, x: jax.Array) -> jax.Array:
    """'... c -> ... d': flatten to a 2-d GEMM (free reshapes), add the bias."""
    w = p["weight"]
    y = _dot(x.reshape(-1, w.shape[0]), w, ((1,), (0,))) + p["bias"]
    return y.reshape(*x.shape[:-1], w.shape[1])


def hand_mix_broadcast(p: Params, x: jax.Array) -> jax.Array:
    """'b k q -> b g q' (token mixing, channels-first): batch over b, weight broadcast."""
    b, k = x.shape[:2]
    x3 = x.reshape(b, k, -1)
    w = jnp.broadcast_to(p["weight"].T, (b, *p["weight"].T.shape))  # (b, g, k)
    y = _dot(w, x3, ((2,), (1,)), ((0,), (0,))) + p["bias"][:, None]
    return y.reshape(b, -1, *x.shape[2:])


def hand_mix_loop(p: Params, x: jax.Array) -> jax.Array:
    """'b k q -> b g q': a loop over b of 2-d GEMMs ``(g, k) @ (k, q)``."""
    b, k = x.shape[:2]
    wt = p["weight"].T
    y = lax.map(lambda xi: _dot(wt, xi, ((1,), (0,))), x.reshape(b, k, -1))
    return (y + p["bias"][:, None]).reshape(b, -1, *x.shape[2:])


def hand_heads(h: int) -> Fn:
    """'b t (h c) -> b t (h d)': x first, ``(h, b*t, c) @ (h, c, d)``, rows of c move."""

    def f(p: Params, x: jax.Array) -> jax.Array:
        b, t, hc = x.shape
        x3 = x.reshape(b * t, h, hc // h).transpose(1, 0, 2)
        y = _dot(x3, p["weight"], ((2,), (1,)), ((0,), (0,))) + p["bias"][:, None, :]
        return y.transpose(1, 0, 2).reshape(b, t, -1)

    return f


def hand_heads_direct(h: int) -> Fn:
    """'b t (h c) -> b t (h d)': one dot_general with h as a batch dimension in place."""

    def f(p: Params, x: jax.Array) -> jax.Array:
        b, t, hc = x.shape
        y = _dot(x.reshape(b * t, h, hc // h), p["weight"], ((2,), (1,)), ((1,), (0,)))
        return (y + p["bias"][:, None, :]).transpose(1, 0, 2).reshape(b, t, -1)

    return f


def hand_patches(ph: int, pw: int) -> Fn:
    """'b (h ph) (w pw) c -> b (h w) d': one transpose of x to ``(b h w, ph pw c)``, 2-d GEMM."""

    def f(p: Params, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape  # (b h, ph, w, pw c) -> (b h, w, ph, pw c): rows of pw c move
        x4 = x.reshape(b * (hh // ph), ph, ww // pw, pw * c).transpose(0, 2, 1, 3)
        y = _dot(x4.reshape(-1, ph * pw * c), p["weight"].reshape(ph * pw * c, -1), ((1,), (0,)))
        return (y + p["bias"]).reshape(b, (hh // ph) * (ww // pw), -1)

    return f


def hand_qkv(p: Params, x: jax.Array) -> jax.Array:
    """'b t c -> qkv b h t d': 2-d GEMM ``(b t, c) @ (c, qkv h d)``, one output transpose."""
    b, t, c = x.shape
    w = p["weight"]
    y = _dot(x.reshape(b * t, c), w.reshape(c, -1), ((1,), (0,))) + p["bias"].reshape(-1)
    return y.reshape(b, t, *w.shape[1:]).transpose(2, 0, 3, 1, 4)


def hand_merge_heads(p: Params, x: jax.Array) -> jax.Array:
    """'b h t e -> b t c': transpose x to ``(b t, h e)`` (rows of e move), 2-d GEMM."""
    b, h, t, e = x.shape
    x2 = x.transpose(0, 2, 1, 3).reshape(b * t, h * e)
    y = _dot(x2, p["weight"].reshape(h * e, -1), ((1,), (0,))) + p["bias"]
    return y.reshape(b, t, -1)


def hand_pool_linear(p: Params, x: jax.Array) -> jax.Array:
    """'b t c -> b d': sum t away first, then a 2-d GEMM."""
    return _dot(x.sum(1), p["weight"], ((1,), (0,))) + p["bias"]


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration; ``einsum`` runs on ``x`` rearranged by ``pre`` (if any)."""

    key: str
    title: str
    pattern: str
    weight_shape: str
    bias_shape: str  # in output order: also the bias of flax's Einsum
    sizes: dict[str, int]
    x_shape: tuple[int, ...]
    einsum: str
    hand: dict[str, Fn]
    pre: str | None = None
    post: str | None = None
    dtype: Any = F32  # computation dtype (params stay float32)


CASES = [
    Case(
        "1",
        "linear",
        "b t c -> b t d",
        "c d",
        "d",
        dict(c=512, d=2048),
        (32, 256, 512),
        "btc,cd->btd",
        {"2-d": hand_linear},
    ),
    Case(
        "2",
        "token mixing",
        "b t c -> b u c",
        "t u",
        "u",
        dict(t=196, u=256),
        (64, 196, 512),
        "btc,tu->buc",
        {"broadcast": hand_mix_broadcast, "loop": hand_mix_loop},
    ),
    Case(
        "3",
        "multi-head",
        "b t (h c) -> b t (h d)",
        "h c d",
        "h d",
        dict(h=16, c=64, d=64),
        (16, 256, 1024),
        "bthc,hcd->bthd",
        {"x first": hand_heads(16), "in place": hand_heads_direct(16)},
        pre="b t (h c) -> b t h c",
        post="b t h d -> b t (h d)",
    ),
    Case(
        "4",
        "patch embedding",
        "b (h ph) (w pw) c -> b (h w) d",
        "ph pw c d",
        "d",
        dict(ph=16, pw=16, c=3, d=768),
        (32, 224, 224, 3),
        "bhpwqc,pqcd->bhwd",
        {"transpose x": hand_patches(16, 16)},
        pre="b (h ph) (w pw) c -> b h ph w pw c",
        post="b h w d -> b (h w) d",
    ),
    Case(
        "5",
        "ellipsis",
        "... c -> ... d",
        "c d",
        "d",
        dict(c=256, d=256),
        (8, 16, 128, 256),
        "...c,cd->...d",
        {"2-d": hand_linear},
    ),
    Case(
        "3bf16",
        "multi-head, bf16 compute",
        "b t (h c) -> b t (h d)",
        "h c d",
        "h d",
        dict(h=16, c=64, d=64),
        (16, 256, 1024),
        "bthc,hcd->bthd",
        {"x first": hand_heads(16), "in place": hand_heads_direct(16)},
        pre="b t (h c) -> b t h c",
        post="b t h d -> b t (h d)",
        dtype=BF16,
    ),
    Case(
        "cf",
        "channels-first",
        "b c h w -> b d h w",
        "c d",
        "d",
        dict(c=256, d=256),
        (16, 256, 32, 32),
        "bchw,cd->bdhw",
        {"broadcast": hand_mix_broadcast, "loop": hand_mix_loop},
    ),
    Case(
        "qkv",
        "q/k/v projection",
        "b t c -> qkv b h t d",
        "c qkv h d",
        "qkv h d",
        dict(c=512, qkv=3, h=8, d=64),
        (16, 256, 512),
        "btc,cqhd->qbhtd",
        {"2-d": hand_qkv},
    ),
    Case(
        "heads-out",
        "merge heads (input-only axis h)",
        "b h t e -> b t c",
        "h e c",
        "c",
        dict(h=8, e=64, c=512),
        (16, 8, 256, 64),
        "bhte,hec->btc",
        {"transpose x": hand_merge_heads},
    ),
    Case(
        "pool",
        "summed axis",
        "b t c -> b d",
        "c d",
        "d",
        dict(c=512, d=1024),
        (64, 196, 512),
        "btc,cd->bd",
        {"sum, 2-d": hand_pool_linear},
    ),
]

TINY = Case(
    "tiny",
    "smoke test",
    "b t (h c) -> b t (h d)",
    "h c d",
    "h d",
    dict(h=2, c=3, d=4),
    (2, 5, 6),
    "bthc,hcd->bthd",
    {"x first": hand_heads(2)},
    pre="b t (h c) -> b t h c",
    post="b t h d -> b t (h d)",
)


# --------------------------------------------------------------------------------------------
# Implementations: each gives (fn(params, x) -> y, params in its own format, grads -> core form)
# --------------------------------------------------------------------------------------------


def implementations(case: Case, params: Params, x: jax.Array) -> list[Impl]:
    """Every implementation of ``case``, sharing ``params``' values."""
    dtype = None if case.dtype == F32 else case.dtype
    _, core = einmix_jax.init(
        case.pattern,
        jax.random.key(0),
        weight_shape=case.weight_shape,
        bias_shape=case.bias_shape,
        dtype=dtype,
        **case.sizes,
    )
    impls = [Impl("einmix", lambda p, x: core(p, x), params, lambda g: g)]

    try:
        linen = einmix_jax.linen
    except ImportError:  # the linen layer is optional here
        linen = None
    if linen is not None:
        mod = linen.EinMix(
            case.pattern, case.weight_shape, case.bias_shape, sizes=case.sizes, dtype=dtype
        )
        impls.append(
            Impl(
                "einmix linen",
                lambda v, x, mod=mod: mod.apply(v, x),
                {"params": params},
                lambda g: g["params"],
            )
        )

    eo = EinopsEinMix(case.pattern, case.weight_shape, case.bias_shape, sizes=case.sizes)
    eo_bias_shape = jax.eval_shape(eo.init, jax.random.key(0), x)["params"]["bias"].shape

    def einops_fn(p: Params, x: jax.Array) -> jax.Array:
        p, x = cast(case.dtype, p, x)
        return eo.apply({"params": p}, x)

    eo_params = {"weight": params["weight"], "bias": params["bias"].reshape(eo_bias_shape)}
    bias_shape = params["bias"].shape
    impls.append(
        Impl(
            "einops layer",
            einops_fn,
            eo_params,
            lambda g: {"weight": g["weight"], "bias": g["bias"].reshape(bias_shape)},
        )
    )

    pre_axes = set(re.findall(r"\w+", case.pre or ""))
    pre_sizes = {k: v for k, v in case.sizes.items() if k in pre_axes}
    einsum_mod = nn.Einsum(params["weight"].shape, case.einsum, dtype=dtype)

    def flax_fn(p: Params, x: jax.Array) -> jax.Array:
        if case.pre:
            x = einops.rearrange(x, case.pre, **pre_sizes)
        y = einsum_mod.apply({"params": p}, x)
        return einops.rearrange(y, case.post) if case.post else y

    impls.append(
        Impl(
            "flax Einsum",
            flax_fn,
            {"kernel": params["weight"], "bias": params["bias"]},
            lambda g: {"weight": g["kernel"], "bias": g["bias"]},
        )
    )

    def einsum_fn(p: Params, x: jax.Array) -> jax.Array:
        p, x = cast(case.dtype, p, x)
        if case.pre:
            x = einops.rearrange(x, case.pre, **pre_sizes)
        y = jnp.einsum(case.einsum, x, p["weight"])
        out = case.einsum.split("->")[1].replace("...", "")  # '...' leads: trailing broadcast
        kept = [a for a in out if a in case.einsum.split(",")[1].split("->")[0]]
        y = y + p["bias"].reshape([p["bias"].shape[kept.index(a)] if a in kept else 1 for a in out])
        return einops.rearrange(y, case.post) if case.post else y

    impls.append(Impl("rearrange+einsum", einsum_fn, params, lambda g: g))

    for name, f in case.hand.items():

        def hand_fn(p: Params, x: jax.Array, f: Fn = f) -> jax.Array:
            return f(*cast(case.dtype, p, x))

        impls.append(Impl(f"hand: {name}", hand_fn, params, lambda g: g, hand=True))
    return impls


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    fwd: list[float] = dataclasses.field(default_factory=list)
    fb: list[float] = dataclasses.field(default_factory=list)
    compile_fwd: list[float] = dataclasses.field(default_factory=list)
    compile_fb: list[float] = dataclasses.field(default_factory=list)
    mem_fwd: int = 0
    mem_fb: int = 0
    hlo: tuple = ()  #: signatures of the optimized forward and forward+backward HLO


def hlo_signature(hlo: str, min_size: int = 1 << 16) -> list[str]:
    """The optimized HLO's instructions on arrays of at least ``min_size`` elements, without
    names and metadata, sorted: equal signatures mean the same large kernels (shapes, layouts,
    fusions, dots, loops), whatever produced them; ops on bias-sized arrays are left out."""
    lines = []
    for line in hlo.splitlines():
        shape = re.match(r"\s+(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]", line)
        if not shape or math.prod(int(d) for d in shape.group(1).split(",") if d) < min_size:
            continue
        line = re.sub(r", (metadata|backend_config|frontend_attributes)=.*", "", line)
        line = re.sub(r"%[\w.\-]+|parameter\(\d+\)", "", line)
        lines.append(line.strip())
    return sorted(lines)


def run_case(case: Case, rounds: int, compile_rounds: int, log: Callable[[str], None]) -> dict:
    key_w, key_x, key_ct = jax.random.split(jax.random.key(42), 3)
    params, _ = einmix_jax.init(
        case.pattern,
        key_w,
        weight_shape=case.weight_shape,
        bias_shape=case.bias_shape,
        **case.sizes,
    )
    params["bias"] = jax.random.normal(key_w, params["bias"].shape, F32)  # not zeros
    x = jax.random.normal(key_x, case.x_shape, F32).astype(case.dtype)
    impls = implementations(case, params, x)
    ref = next(i for i in impls if i.name == "rearrange+einsum")
    y_ref = jax.jit(ref.fn)(ref.params, x)
    ct = jax.random.normal(key_ct, y_ref.shape, F32).astype(y_ref.dtype)
    _, (g_ref, gx_ref) = jax.jit(fwd_bwd(ref.fn))(ref.params, x, ct)

    results = {i.name: Measured() for i in impls}
    fwd, fb = {}, {}
    for impl in impls:  # correctness, memory, warm-up
        fwd[impl.name] = jax.jit(impl.fn)
        fb[impl.name] = jax.jit(fwd_bwd(impl.fn))
        y = fwd[impl.name](impl.params, x)
        close(impl.name, "output", y, y_ref, case.dtype)
        _, (g, gx) = fb[impl.name](impl.params, x, ct)
        for name in g_ref:
            close(impl.name, f"{name} grad", impl.to_core(g)[name], g_ref[name], case.dtype)
        close(impl.name, "x grad", gx, gx_ref, case.dtype)
        m = results[impl.name]
        compiled_fwd = fwd[impl.name].lower(impl.params, x).compile()
        compiled_fb = fb[impl.name].lower(impl.params, x, ct).compile()
        m.mem_fwd = compiled_fwd.memory_analysis().temp_size_in_bytes
        m.mem_fb = compiled_fb.memory_analysis().temp_size_in_bytes
        m.hlo = (hlo_signature(compiled_fwd.as_text()), hlo_signature(compiled_fb.as_text()))

    # A fresh random order every round: no implementation always follows the same one (which
    # may have left x in the cache or freed a buffer of the right size).
    order = random.Random(0)
    for _ in range(compile_rounds):  # first-call trace + compile, fresh caches every time
        for impl in order.sample(impls, len(impls)):
            m = results[impl.name]
            m.compile_fwd.append(compile_time(impl.fn, impl.params, x)[0])
            m.compile_fb.append(compile_time(fwd_bwd(impl.fn), impl.params, x, ct)[0])
    for impl in impls:  # recompile for the timing loop (the caches were cleared)
        fwd[impl.name] = jax.jit(impl.fn)
        fb[impl.name] = jax.jit(fwd_bwd(impl.fn))
        jax.block_until_ready(fwd[impl.name](impl.params, x))
        jax.block_until_ready(fb[impl.name](impl.params, x, ct))

    # repetitions per measurement so that each lasts >= ~40 ms
    hand0 = next(i for i in impls if i.hand)
    t_fwd = min(timed(fwd[hand0.name], (hand0.params, x), 1) for _ in range(3))
    t_fb = min(timed(fb[hand0.name], (hand0.params, x, ct), 1) for _ in range(3))
    reps_fwd, reps_fb = repetitions(t_fwd), repetitions(t_fb)
    for _ in range(rounds):
        for impl in order.sample(impls, len(impls)):
            m = results[impl.name]
            m.fwd.append(timed(fwd[impl.name], (impl.params, x), reps_fwd))
            m.fb.append(timed(fb[impl.name], (impl.params, x, ct), reps_fb))
    return summarize(case, results, rounds)


def summarize(case: Case, results: dict[str, Measured], rounds: int) -> dict:
    hand = [n for n in results if n.startswith("hand: ")]
    med = statistics.median
    best = {
        metric: min(hand, key=lambda n: med(getattr(results[n], metric)))
        for metric in ("fwd", "fb")
    }
    rows = {}
    for name, m in results.items():
        row = {}
        for metric in ("fwd", "fb"):
            ref = getattr(results[best[metric]], metric)
            mine = getattr(m, metric)
            row[metric] = med(mine)
            row[metric + "_ratio"] = med(a / b for a, b in zip(mine, ref, strict=True))
        row["compile_fwd"] = med(m.compile_fwd)
        row["compile_fb"] = med(m.compile_fb)
        row["mem_fwd"] = m.mem_fwd
        row["mem_fb"] = m.mem_fb
        # the hand-written lowerings that compile to the very same kernels (fwd, fwd+bwd)
        row["same_hlo"] = tuple(
            [h[6:] for h in hand if results[h].hlo[i] == m.hlo[i]] for i in range(2)
        )
        rows[name] = row
    return {"case": case, "rows": rows, "best": best, "rounds": rounds}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def case_table(result: dict) -> list[str]:
    case, rows, best = result["case"], result["rows"], result["best"]
    lines = [
        f"**{case.key}** `{case.pattern}` ({case.title}); weight `{case.weight_shape}`, bias "
        f"`{case.bias_shape}`, x {case.x_shape}, {', '.join(f'{k}={v}' for k, v in case.sizes.items())}"
        f"{', compute bf16' if case.dtype == BF16 else ''}; best fwd: {best['fwd'][6:]}, best "
        f"fwd+bwd: {best['fb'][6:]}; einmix's optimized HLO is that of "
        f"{_same(rows['einmix']['same_hlo'])}",
        "",
        "| implementation | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | compile fwd s | "
        "compile fwd+bwd s | temp MB fwd | temp MB fwd+bwd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        mark = " (best)" if name in best.values() else ""
        lines.append(
            f"| {name}{mark} | {r['fwd'] * 1e3:.2f} | {r['fwd_ratio']:.2f} | {r['fb'] * 1e3:.2f} | "
            f"{r['fb_ratio']:.2f} | {r['compile_fwd']:.2f} | {r['compile_fb']:.2f} | "
            f"{_mb(r['mem_fwd'])} | {_mb(r['mem_fb'])} |"
        )
    return lines


def _same(same: tuple[list[str], list[str]]) -> str:
    fwd, fb = (", ".join(f"hand: {n}" for n in names) or "no hand lowering" for names in same)
    return fwd if fwd == fb else f"{fwd} (fwd), {fb} (fwd+bwd)"


def targets(results: list[dict]) -> list[str]:
    """The targets for the functional apply (and the linen layer), one line per case."""
    lines = [
        "| case | einmix fwd | einmix fwd+bwd | linen fwd | linen fwd+bwd | compile vs einops "
        "(fwd / fwd+bwd) | temp vs best (fwd / fwd+bwd) | einops layer fwd / fwd+bwd | "
        "flax Einsum fwd / fwd+bwd | einmix HLO = hand (fwd / fwd+bwd) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        rows, best = res["rows"], res["best"]
        ours, eo, fx = rows["einmix"], rows["einops layer"], rows["flax Einsum"]
        linen = rows.get("einmix linen")

        def flag(v: float, limit: float) -> str:  # the target, at the table's precision
            return f"{v:.2f}" + ("" if round(v, 2) <= limit else " ✗")

        mem = [
            ours["mem_" + m] / max(rows[best[m]]["mem_" + m], 1)
            if rows[best[m]]["mem_" + m]
            else (1.0 if ours["mem_" + m] == 0 else float("inf"))
            for m in ("fwd", "fb")
        ]
        lines.append(
            f"| {res['case'].key} | {flag(ours['fwd_ratio'], 1.05)} | {flag(ours['fb_ratio'], 1.05)}"
            f" | {flag(linen['fwd_ratio'], 1.05) if linen else '-'}"
            f" | {flag(linen['fb_ratio'], 1.05) if linen else '-'}"
            f" | {flag(ours['compile_fwd'] / eo['compile_fwd'], 1.0)} / "
            f"{flag(ours['compile_fb'] / eo['compile_fb'], 1.0)}"
            f" | {flag(mem[0], 1.0)} / {flag(mem[1], 1.0)}"
            f" | {eo['fwd_ratio']:.2f} / {eo['fb_ratio']:.2f} | {fx['fwd_ratio']:.2f} / "
            f"{fx['fb_ratio']:.2f} | {' / '.join(', '.join(n) or '-' for n in ours['same_hlo'])} |"
        )
    worst = max(
        (res["rows"]["einmix"][m + "_ratio"], res["case"].key, m)
        for res in results
        for m in ("fwd", "fb")
    )
    lines += ["", f"Worst einmix ratio: {worst[0]:.2f} (case {worst[1]}, {worst[2]})."]
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    keys = [c.key for c in CASES]
    parser.add_argument("--cases", nargs="+", default=keys, choices=[*keys, "tiny"])
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 30)")
    parser.add_argument("--compile-rounds", type=int, default=None, help="default 3")
    parser.add_argument("--quick", action="store_true", help="5 timing rounds, 1 compile round")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 30)
    compile_rounds = args.compile_rounds or (1 if args.quick else 3)
    cases = {c.key: c for c in [*CASES, TINY]}

    def log(s: str) -> None:
        print(s, flush=True)

    log(machine())
    results = []
    start = time.perf_counter()
    for key in args.cases:
        res = run_case(cases[key], rounds, compile_rounds, log)
        results.append(res)
        log("")
        log("\n".join(case_table(res)))
    summary = targets(results)
    log("")
    log("\n".join(summary))
    elapsed = time.perf_counter() - start
    log(f"\n{elapsed:.0f} s")
    if not args.no_write:
        text = [
            f"Machine: {machine()}.",
            "",
            f"Run: `python benchmarks/bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" on {datetime.date.today()}, {rounds} timing rounds, {compile_rounds} compile rounds, "
            f"{elapsed / 60:.1f} min.",
            "",
            "### Targets (einmix; ratios are medians of per-round ratios to the best hand-written "
            "lowering; ✗ marks a missed target)",
            "",
            *summary,
            "",
            "### Per case",
        ]
        for res in results:
            text += ["", *case_table(res)]
        write_results(args.out, "\n".join(text))
    return results


if __name__ == "__main__":
    main()

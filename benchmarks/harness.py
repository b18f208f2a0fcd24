"""The timing harness ``bench.py`` and ``regret.py`` share.

What both scripts measure the same way: the timing loop (:func:`timed`, with
:func:`repetitions` so that each measurement lasts long enough), the forward+backward function
(:func:`fwd_bwd`), the first-call compile time (:func:`compile_time`), the closeness check of an
output or gradient against the reference (:func:`close`), one implementation under test
(:class:`Impl`), the machine line of a report (:func:`machine`) and the writing of a report's
generated section (:func:`write_results`).

Example::

    f = jax.jit(lambda x: x @ x)
    x = jnp.ones((256, 256))
    jax.block_until_ready(f(x))  # compiled and warm
    seconds = timed(f, (x,), repetitions(timed(f, (x,), 1)))
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import einops
import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's einmix_jax
import einmix_jax

Params = dict[str, jax.Array]
Fn = Callable[[Any, jax.Array], jax.Array]

F32, BF16 = jnp.float32, jnp.bfloat16


@dataclasses.dataclass
class Impl:
    """One implementation under test: ``fn(params, x) -> y`` with params in its own format."""

    name: str
    fn: Fn
    params: Any
    to_core: Callable[[Any], Params]  #: its params gradient in the core's format
    hand: bool = False  #: a hand-written lowering (bench.py's references)


def cast(dtype: Any, p: Any, x: jax.Array) -> tuple[Any, jax.Array]:
    """``p`` and ``x`` in the computation dtype ``dtype``."""
    return jax.tree.map(lambda a: a.astype(dtype), p), x.astype(dtype)


def timed(f: Callable[..., Any], args: tuple, reps: int) -> float:
    """Seconds per call of ``f(*args)``, over ``reps`` calls, until the last result is ready."""
    start = time.perf_counter()
    for _ in range(reps):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def repetitions(seconds: float, min_time: float = 0.04) -> int:
    """Calls per measurement (1 to 100) for one that lasts ``min_time`` at ``seconds`` a call."""
    return max(1, min(100, math.ceil(min_time / seconds)))


def fwd_bwd(fn: Fn) -> Callable[..., Any]:
    """The value and gradient of ``vdot(fn(p, x), ct)`` with respect to ``p`` and ``x``."""

    def loss(p: Any, x: jax.Array, ct: jax.Array) -> jax.Array:
        return jnp.vdot(fn(p, x), ct)

    return jax.value_and_grad(loss, argnums=(0, 1))


def close(name: str, what: str, got: Any, want: Any, dtype: Any) -> None:
    """Raise an AssertionError unless ``got`` matches ``want`` to ``dtype``'s tolerance."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"{name}: {what} has shape {got.shape}, expected {want.shape}")
    scale = np.max(np.abs(want)) + 1e-30
    err = np.max(np.abs(got - want)) / scale
    # bf16: sums of thousands of bf16 terms; float32 on an accelerator: its default dot precision
    # (TF32 on NVIDIA GPUs, bf16 passes on TPUs)
    tol = 6e-2 if dtype == BF16 else 1e-4 if jax.default_backend() == "cpu" else 2e-2
    if err > tol:
        raise AssertionError(f"{name}: {what} differs by {err:.2e} (relative to its max) > {tol}")


def compile_time(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """Seconds to trace and compile ``jax.jit(fn)`` on ``args`` from empty caches; the result."""
    jax.clear_caches()
    start = time.perf_counter()
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
    return time.perf_counter() - start, compiled


def machine() -> str:
    """The processor, the system and the versions a report's timings were taken with."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        if names:
            cpu = names[0]
    except OSError:
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    return (
        f"{cpu}, {os.cpu_count()} cores; {platform.system()} {platform.release()}; Python "
        f"{platform.python_version()}; jax {jax.__version__} ({jax.default_backend()}: {devices}); "
        f"flax {flax.__version__}; einops {einops.__version__}; einmix_jax "
        f"{einmix_jax.__version__}"
    )


BEGIN, END = "<!-- BEGIN GENERATED -->", "<!-- END GENERATED -->"


def write_results(path: Path, text: str, tag: str = "", title: str = "Benchmark results") -> None:
    """Replace the generated part of ``path`` (between the markers), keeping the prose around it.

    ``tag`` names one of several generated sections (markers ``<!-- BEGIN GENERATED tag -->``).
    """
    begin, end = (f"{m[:-4]} {tag} -->" if tag else m for m in (BEGIN, END))
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text() if path.exists() else f"# {title}\n\n{begin}\n{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)

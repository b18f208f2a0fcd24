"""Backend profiles: what the planner knows of one backend, in one frozen value.

A :class:`Profile` holds the seconds per unit of each cost term (:data:`TERMS`), the thresholds
of the cost model and which lowering forms exist on the backend. The planner
(:mod:`einmix_jax._lower`) takes one explicitly, and every cached decision is keyed by it; this is
the one module that knows a backend by name. :func:`profile` gives the one in use, chosen once per
(platform, device count): on several devices there are no loops and no block-diagonal packings
(the axes they merge or iterate over may be sharded).

``benchmarks/calibrate.py`` fits a profile on a machine and writes it as JSON;
:func:`load_profile` puts it in use for its platform, with no edit to the library.

Example:
    >>> p = profile('cpu', 1)
    >>> p.platform, p.loops, p.packs
    ('cpu', True, True)
    >>> profile('cpu', 8).loops  # several devices: no loops, no packings
    False
    >>> Profile.from_json(p.to_json()) == p
    True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from ._errors import EinMixError

#: The cost model's terms, each counted in the forward and in the backward pass (see
#: ``_lower._terms``): dot FLOPs; again for a batched dot (a batch dimension longer than 1: on
#: XLA:CPU it runs one GEMM per matrix, at about two thirds of one GEMM's rate, measured on an
#: Intel Xeon VM); elements a dot reads and writes (its operands and result, per
#: matrix: what makes a batch of small GEMMs or a matrix-vector product memory-bound), again for
#: narrow GEMMs; dots (per matrix of a batched dot); elements moved by a transpose, a weight
#: broadcast (and its gradient's sum) or a block-diagonal packing; again for those of arrays
#: larger than the profile's ``large_array`` (beyond the caches); again for the transposes of x
#: and of the result around a dot with x on the left that change their minor axis (strided
#: elements: x's contracted axes brought minor, where with the weight first its rows would
#: move whole); elements a loop copies in and out (and the weight gradient it accumulates);
#: loop iterations; and the elements of x and the
#: output, which every candidate reads and writes (so absolute times fit).
TERMS = (
    "flop",
    "batched flop",
    "dot element",
    "narrow dot element",
    "dot",
    "moved element",
    "large moved element",
    "strided element",
    "loop element",
    "loop step",
    "io element",
)


@dataclasses.dataclass(frozen=True)
class Profile:
    """What the planner knows of one backend: costs, thresholds and the forms it may use.

    Example:
        >>> p = profile('cpu', 1)
        >>> round(p.seconds_of({'flop': 1e12}), 2)  # the fitted seconds of a teraflop
        3.46
    """

    name: str  #: where it was fitted, e.g. 'XLA:CPU, 2-core Intel Xeon'
    platform: str  #: ``jax.default_backend()`` it serves ('cpu', 'gpu', 'tpu'); '*': any
    #: seconds per unit of each of :data:`TERMS`, as ``(term, seconds)`` pairs in that order
    seconds: tuple[tuple[str, float], ...]
    #: a loop must be predicted this much faster than the best form without one (it compiles
    #: two to three times slower than one dot)
    loop_margin: float = 0.05
    #: a loop pays off only when each iteration's GEMM has at least this many rows on the x side
    loop_min_rows: int = 64
    #: grouped layers whose per-group GEMM is narrower than this (contracted or weight-only
    #: elements) are also tried packed into one block-diagonal weight
    pack_below: int = 32
    #: an array moved (transposed, broadcast, packed) with more elements than this moves at
    #: memory speed, not the caches': its elements count again (``large moved element``)
    large_array: int = 1 << 23
    #: a GEMM narrower than this runs below the machine's rate: its elements count again, times
    #: how much narrower it is
    narrow: int = 16
    #: the planner departs from XLA's own lowering (the 'as einsum' candidate) only for a
    #: candidate predicted faster by more than this fraction (the cost model's measured error);
    #: None: never (a backend whose costs nobody has measured)
    depart_margin: float | None = 0.1
    loops: bool = False  #: loop candidates (``lax.map`` over an x-only axis, a GEMM per slice)
    packs: bool = True  #: block-diagonal packings of narrow groups
    packed_w_first: bool = False  #: the weight-first forms of a packed layer
    #: a transposed weight on the left of the dot is written out first (the backend would fold
    #: the transpose into the dot and run it outside its fast GEMM path)
    w_copy: bool = False
    #: a dot with one row and no batch dimension costs its weight gradient written transposed
    #: and copied (a unit batch dimension avoids it)
    one_row_copy: bool = True

    def __post_init__(self) -> None:
        names = tuple(t for t, _ in self.seconds)
        if names != TERMS:
            raise EinMixError(
                f"profile {self.name!r}: seconds must give the terms {list(TERMS)} in that "
                f"order, got {list(names)}"
            )
        m = self.depart_margin
        if m is not None and not (isinstance(m, (int, float)) and 0 <= m < math.inf):
            raise EinMixError(
                f"profile {self.name!r}: depart_margin must be a finite number >= 0 or None "
                f"(never depart from XLA's lowering), got {m!r}"
            )
        bad = [t for t, s in self.seconds if not (isinstance(s, (int, float)) and s >= 0)]
        if bad or not math.isfinite(sum(s for _, s in self.seconds)):
            raise EinMixError(
                f"profile {self.name!r}: seconds must be finite numbers >= 0, got "
                f"{dict(self.seconds)!r}"
            )

    def seconds_of(self, terms: Mapping[str, float]) -> float:
        """The predicted seconds of a count of terms (missing terms count 0)."""
        return sum(s * terms.get(t, 0) for t, s in self.seconds)

    def for_devices(self, device_count: int) -> Profile:
        """This profile on ``device_count`` devices: no loops or packings on several."""
        if device_count == 1:
            return self
        return dataclasses.replace(self, loops=False, packs=False)

    def to_json(self) -> str:
        """The profile as JSON text, as :func:`load_profile` reads it."""
        fields = dataclasses.asdict(self)
        fields["seconds"] = dict(self.seconds)
        return json.dumps(fields, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Profile:
        """A profile from :meth:`to_json`'s text; an ``EinMixError`` names what is wrong."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise EinMixError(f"a profile must be JSON text: {e}") from None
        return cls.from_dict(fields)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Profile:
        """A profile from a mapping of its fields (``seconds`` a mapping from term to seconds)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if not isinstance(fields, Mapping) or unknown:
            raise EinMixError(f"a profile has the fields {sorted(known)}, got also {unknown}")
        seconds = fields.get("seconds")
        if not isinstance(seconds, Mapping):
            raise EinMixError(f"a profile's seconds must map each of {list(TERMS)} to seconds")
        missing = [t for t in TERMS if t not in seconds]
        if missing or len(seconds) != len(TERMS):
            raise EinMixError(
                f"a profile's seconds must give exactly the terms {list(TERMS)}, got "
                f"{sorted(seconds)}"
            )
        ordered = tuple((t, float(seconds[t])) for t in TERMS)
        return cls(**{**fields, "seconds": ordered})


#: XLA:CPU, fitted by ``benchmarks/calibrate.py`` to the forward and forward+backward times of
#: every candidate of the regret corpus (seed 0, 5 rounds: 494 timings of 40 layers, on a 2-core
#: Intel Xeon VM); its depart margin fitted there on the replayed regret (margins 0 to 0.2
#: choose alike, 0.3 and more keep XLA's lowering where a departure was 1.4x faster). The
#: strided elements' seconds were chosen by the replayed decisions (calibrate.py's
#: ``fit_by_decisions``): they are what tells ``nn.Dense``'s ``lax.dot_general`` from
#: ``jnp.einsum`` under a tool (1.3-11x apart on the corpus), a small share of most timings. A
#: loop of 2-d GEMMs can beat a batched GEMM with a broadcast weight here (whose
#: backward pass sums the per-slice weight gradients in one slow fused kernel); XLA:CPU runs a dot
#: whose left operand is contracted along a leading dimension outside its fast GEMM path, so that
#: operand is copied first; and it writes a one-row dot's weight gradient transposed and copies it.
XLA_CPU = Profile(
    name="XLA:CPU, 2-core Intel Xeon VM (regret corpus seed 0)",
    platform="cpu",
    seconds=(
        ("flop", 3.46e-12),
        ("batched flop", 0.0),
        ("dot element", 1.79e-10),
        ("narrow dot element", 1.67e-10),
        ("dot", 0.0),
        ("moved element", 5.88e-10),
        ("large moved element", 0.0),
        ("strided element", 2.33e-10),
        ("loop element", 6.2e-10),
        ("loop step", 8.92e-06),
        ("io element", 1.15e-10),
    ),
    depart_margin=0.2,
    loops=True,
    packs=True,
    w_copy=True,
    one_row_copy=True,
)

#: A profile that is never refitted: the examples in the documentation print costs with it.
EXAMPLE_PROFILE = dataclasses.replace(
    XLA_CPU, name="example (fixed, for the documentation)", depart_margin=0.1
)

#: A backend nobody has measured: XLA's own lowering, always (``depart_margin=None``): every
#: departure the planner knows trades moved memory against the GEMM's shape, and which wins is
#: the backend's GEMM library's business; so no loops, packings or weight copy either.
UNMEASURED = dataclasses.replace(
    XLA_CPU,
    name="unmeasured backend (XLA's own lowering)",
    platform="*",
    depart_margin=None,
    loops=False,
    packs=False,
    w_copy=False,
)

_IN_USE: dict[str, Profile] = {"cpu": XLA_CPU}


def profile(platform: str | None = None, device_count: int | None = None) -> Profile:
    """The profile in use for ``platform`` on ``device_count`` devices (default: JAX's own).

    Example:
        >>> profile('gpu', 1).name
        "unmeasured backend (XLA's own lowering)"
    """
    if platform is None or device_count is None:
        platform = jax.default_backend() if platform is None else platform
        device_count = jax.device_count() if device_count is None else device_count
    return _profile(platform, device_count)


@functools.lru_cache(maxsize=64)
def _profile(platform: str, device_count: int) -> Profile:
    chosen = _IN_USE.get(platform, dataclasses.replace(UNMEASURED, platform=platform))
    return chosen.for_devices(device_count)


def use_profile(p: Profile) -> Profile:
    """Plan with ``p`` from now on on its platform (``p.platform``); returns the one it replaces.

    Example:
        >>> fast_flops = dataclasses.replace(profile('cpu', 1), name='mine')
        >>> old = use_profile(fast_flops)
        >>> profile('cpu', 1).name
        'mine'
        >>> _ = use_profile(old)
    """
    if not isinstance(p, Profile):
        raise EinMixError(f"use_profile takes an einmix_jax.planning.Profile, got {p!r}")
    old = _IN_USE.get(p.platform, dataclasses.replace(UNMEASURED, platform=p.platform))
    _IN_USE[p.platform] = p
    _profile.cache_clear()
    return old


def load_profile(path: str | Path) -> Profile:
    """Read a profile written by ``benchmarks/calibrate.py --out`` and plan with it.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), 'cpu.json')
        >>> _ = Path(path).write_text(profile('cpu', 1).to_json())
        >>> load_profile(path) == profile('cpu', 1)
        True
    """
    p = Profile.from_json(Path(path).read_text())
    use_profile(p)
    return p

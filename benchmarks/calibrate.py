"""Fit the planner's cost model (a ``planning.Profile``'s seconds) to measured candidate times.

Usage::

    python benchmarks/regret.py --seed 0 --json seed0.json      # measure every candidate
    python benchmarks/calibrate.py seed0.json --out cpu.json     # fit; print the profile, residuals
    python benchmarks/calibrate.py seed0.json --check seed1.json # replay another corpus

The model (see ``einmix_jax.planning.terms``) predicts a candidate's time as a sum of terms
(``planning.TERMS``), each a count (dot FLOPs, elements a dot reads and writes, dots, elements
moved, elements a loop copies, loop iterations, elements of x and the output) times seconds per
unit. The counts are exact; the seconds are fitted here by non-negative least squares on the
relative error, over the forward and the forward+backward time of every candidate of every layer
in the given ``regret.py --json`` files. Candidates the file has no time for (e.g. a packing it
did not measure) are skipped; the hand-written ``block-diagonal k=...`` rows stand for the
planner's x-first packing of ``k`` groups.

The depart margin (``Profile.depart_margin``: how much faster than XLA's own lowering a
candidate must be predicted before the planner takes it) is fitted on the same files: every
margin of ``MARGINS`` is replayed with the current seconds (the planner's choice among the timed
candidates, its regret from the per-round times) and the one with the lowest worst regret, then
p90, is kept (the larger margin among equals: closer to XLA's lowering); the table of all of them
is printed.

The fitted profile is the profile in use for the files' backend (``planning.profile(platform,
device_count)``, as regret.py recorded them) with the fitted seconds: its thresholds and forms are
kept. It is printed as JSON (``Profile.to_json()``) and, with ``--out PATH``, written there;
``einmix_jax.planning.load_profile(PATH)`` plans with it, with no edit to the library. Then come
the residuals (median and p90 of |predicted / measured - 1|, per kind of layer) and a replay: the
regret the planner would have on the measured layers with the current and with the fitted
profile (its choice among the measured candidates, timed against the fastest implementation
measured). ``--check`` replays other files with the fitted profile without fitting on them (the
held-out corpus).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's einmix_jax
import einmix_jax as em
from einmix_jax import planning

Sample = tuple[dict[str, float], dict[str, float], float, float]  # fwd terms, bwd terms, times


def _layer(record: dict[str, Any]) -> tuple[Any, tuple[int, ...]]:
    """The plan and input shape of a regret.py record."""
    names = set(record["weight_shape"].split()) | set(record["bias_shape"].split())
    axes = {a: n for a, n in record["sizes"].items() if a in names}
    mix = em.layer(record["pattern"], record["weight_shape"], record["bias_shape"], sizes=axes)
    return mix.plan, tuple(record["x_shape"])


def _measured(record: dict[str, Any], choice: planning.Choice) -> dict[str, Any] | None:
    """The record's row for a candidate, if it was timed."""
    if choice.stored_weight:  # a form under a tool (files before its rows: the same programs)
        return record["rows"].get(_tool_row(record, choice))
    row = record["rows"].get("cand: " + choice.label)
    c = choice.candidate
    if row is None and c.pack and c.x_first and not c.rhs_t:
        row = record["rows"].get(f"block-diagonal k={c.pack[1]}")
    return row


def samples(
    record: dict[str, Any], loops: bool, profile: planning.Profile
) -> list[tuple[planning.Choice, Sample]]:
    """Every timed candidate of a record, costed with ``profile``, with its terms and times (s)."""
    plan, x_shape = _layer(record)
    return _timed(record, planning.candidates(plan, x_shape, loops, profile=profile))


def _timed(
    record: dict[str, Any], choices: list[planning.Choice]
) -> list[tuple[planning.Choice, Sample]]:
    """The choices the record timed, each with its terms and its times (s)."""
    plan, x_shape = _layer(record)
    out = []
    for choice in choices:
        row = _measured(record, choice)
        if row is not None:
            fwd, bwd = planning.terms(plan, x_shape, choice)
            out.append((choice, (fwd, bwd, row["fwd_ms"] / 1e3, row["fb_ms"] / 1e3)))
    return out


def tool_choices(record: dict[str, Any], profile: planning.Profile) -> list[planning.Choice]:
    """The forms a Flax layer chooses from under a tool: ``lax.dot_general`` as ``nn.Dense``
    calls it (``as einsum``), and ``jnp.einsum`` as einops' layer calls it."""
    plan, x_shape = _layer(record)
    return planning.candidates(
        plan, x_shape, stored_weight=True, x_as_given=True, einsum=True, profile=profile
    )


def _tool_row(record: dict[str, Any], choice: planning.Choice) -> str:
    """The row that times a form under a tool: ``tool: <label>``; in files from before those
    rows, the programs that are the same (``flax under a tool``, then the ``lax.dot_general``
    form) or that stand for it (einops' layer calls ``jnp.einsum`` of the same operands)."""
    name = "tool: " + choice.label
    if name in record["rows"]:
        return name
    return "einops layer" if choice.kind == "jnp.einsum" else "flax under a tool"


def tool_samples(
    record: dict[str, Any], profile: planning.Profile
) -> list[tuple[planning.Choice, Sample]]:
    """The ``jnp.einsum`` form's terms and times (the ``lax.dot_general`` one is the functional
    ``as einsum`` candidate, already among :func:`samples`)."""
    return _timed(record, tool_choices(record, profile)[1:])


def fit(data: list[Sample]) -> dict[str, float]:
    """Seconds per term minimizing the squared relative error of forward and fwd+bwd times."""
    rows, weights = [], []
    for fwd, bwd, t_fwd, t_fb in data:
        rows.append([fwd[t] / t_fwd for t in planning.TERMS])
        rows.append([(fwd[t] + bwd[t]) / t_fb for t in planning.TERMS])
        weights += [1.0, 1.0]
    a = np.array(rows, dtype=np.float64)
    scale = a.max(axis=0)  # columns of similar size for the solver
    scale[scale == 0] = 1.0
    x, _ = nnls(a / scale, np.ones(len(rows)))
    return {t: float(v / s) for t, v, s in zip(planning.TERMS, x, scale, strict=True)}


def fitted_profile(
    base: planning.Profile, seconds: dict[str, float], name: str
) -> planning.Profile:
    """``base`` with ``seconds`` (to 3 significant digits) and ``name``: thresholds and forms kept.

    Example:
        >>> p = fitted_profile(planning.XLA_CPU, dict.fromkeys(planning.TERMS, 1e-10), "mine")
        >>> p.loops == planning.XLA_CPU.loops, p.seconds_of({"flop": 2})
        (True, 2e-10)
    """
    rounded = tuple((t, float(f"{seconds[t]:.3g}")) for t in planning.TERMS)
    return dataclasses.replace(base, seconds=rounded, name=name)


def residuals(data: list[tuple[str, Sample]], profile: planning.Profile) -> list[str]:
    """|predicted / measured - 1|: median and p90, overall and per kind, forward and fwd+bwd."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, (fwd, bwd, t_fwd, t_fb) in data:
        p_fwd = profile.seconds_of(fwd)
        p_fb = p_fwd + profile.seconds_of(bwd)
        err = (abs(p_fwd / t_fwd - 1), abs(p_fb / t_fb - 1))
        by_kind.setdefault(kind, []).append(err)
        by_kind.setdefault("(all)", []).append(err)
    lines = ["| kind | samples | fwd median | fwd p90 | fwd+bwd median | fwd+bwd p90 |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for kind in sorted(by_kind):
        e = np.array(by_kind[kind])
        lines.append(
            f"| {kind} | {len(e)} | {np.median(e[:, 0]):.2f} | {np.percentile(e[:, 0], 90):.2f} | "
            f"{np.median(e[:, 1]):.2f} | {np.percentile(e[:, 1], 90):.2f} |"
        )
    return lines


def _ratio(record: dict[str, Any], a: str, b: str, m: str) -> float:
    """time(a) / time(b) in metric m ('fwd' or 'fb'): the median of per-round ratios where the
    record has every round's time, else the ratio of medians."""
    ra, rb = record["rows"][a], record["rows"][b]
    if f"{m}_s" in ra and f"{m}_s" in rb:
        return statistics.median(x / y for x, y in zip(ra[f"{m}_s"], rb[f"{m}_s"], strict=True))
    return ra[f"{m}_ms"] / rb[f"{m}_ms"]


def _regret(record: dict[str, Any], name: str, m: str) -> float:
    """time(name) / time(the fastest row of the record), in metric m."""
    return max(1.0, max(_ratio(record, name, other, m) for other in record["rows"]))


def decisions(
    records: list[dict[str, Any]], loops: bool, profile: planning.Profile
) -> list[tuple[str, float, float, float, float]]:
    """Per record, the candidate ``profile`` chooses among the timed ones: its row name, its
    regret forward and forward+backward, and its time over einops' layer's (both metrics).

    Where the planner splits (``planning.split``), the forward metrics are the forward pick's
    and the forward+backward ones training's pick's (the split runs the forward pick's faster
    forward in their stead, predicted no slower), unless the record timed the split itself."""
    out = []
    for record in records:
        plan, x_shape = _layer(record)
        choices = [c for c, _ in samples(record, loops, profile)]
        chosen = planning.choose(choices)
        low = planning.build(plan, x_shape, chosen)
        split = planning.split(plan, x_shape, choices, chosen, low).backward is not None
        forward = planning.choose_forward(choices) if split else chosen
        name, fwd_name = _row(record, chosen), _row(record, forward)
        timed_split = f"cand: {forward.label} + backward of {chosen.label}"
        if split and timed_split in record["rows"]:  # regret.py timed the split itself
            name = fwd_name = timed_split
        regrets = [_regret(record, fwd_name, "fwd"), _regret(record, name, "fb")]
        einops = [_ratio(record, fwd_name, "einops layer", "fwd")]
        einops.append(_ratio(record, name, "einops layer", "fb"))
        out.append((name, *regrets, *einops))
    return out


def _row(record: dict[str, Any], choice: planning.Choice) -> str:
    """The record's row of a candidate (a packing: the hand-written block-diagonal row)."""
    name = "cand: " + choice.label
    return name if name in record["rows"] else f"block-diagonal k={choice.candidate.pack[1]}"


def tool_decisions(
    records: list[dict[str, Any]], profile: planning.Profile
) -> list[tuple[str, float, float, float, float]]:
    """:func:`decisions` for the Flax layers under a tool: the form ``profile`` chooses, its
    regret against the better of the two forms, and its time over einops' layer's."""
    out = []
    for record in records:
        choices = tool_choices(record, profile)
        rows = [_tool_row(record, c) for c in choices]
        name = _tool_row(record, planning.choose(choices))
        regrets = [max(1.0, *(_ratio(record, name, r, m) for r in rows)) for m in ("fwd", "fb")]
        einops = [_ratio(record, name, "einops layer", m) for m in ("fwd", "fb")]
        out.append((name, *regrets, *einops))
    return out


#: the margins ``fit_margin`` tries (None: never depart from XLA's own lowering)
MARGINS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, None)


def fit_margin(
    records: list[dict[str, Any]], loops: bool, profile: planning.Profile
) -> tuple[float | None, list[str]]:
    """The depart margin with the lowest worst regret (forward or forward+backward, of the
    functional choice and of the Flax layers' under a tool; then p90, then the larger margin:
    closer to XLA's own lowering), and a table of every margin tried."""
    lines = [
        "| depart_margin | form | regret fwd median / p90 / max | regret fwd+bwd median / p90 / "
        "max | vs einops fwd p90 / max (> 1.05) | vs einops fwd+bwd median / max (> 1.05) |",
        "|---|---|---|---|---|---|",
    ]
    scores = []
    for margin in MARGINS:
        p = replace(profile, margin)
        worst, p90 = 0.0, 0.0
        for form, made in (
            ("functional", decisions(records, loops, p)),
            ("flax under a tool", tool_decisions(records, p)),
        ):
            d = np.array([r[1:] for r in made])
            q = {
                s: (np.median(d[:, i]), np.percentile(d[:, i], 90), d[:, i].max())
                for s, i in (("fwd", 0), ("fb", 1), ("eo fwd", 2), ("eo fb", 3))
            }
            over = [int((d[:, i] > 1.05).sum()) for i in (2, 3)]
            lines.append(
                f"| {margin} | {form} | {'/'.join(f'{v:.2f}' for v in q['fwd'])} | "
                f"{'/'.join(f'{v:.2f}' for v in q['fb'])} | "
                f"{q['eo fwd'][1]:.2f} / {q['eo fwd'][2]:.2f} ({over[0]}) | "
                f"{q['eo fb'][0]:.2f} / {q['eo fb'][2]:.2f} ({over[1]}) |"
            )
            worst = max(worst, q["fwd"][2], q["fb"][2])
            p90 = max(p90, q["fwd"][1], q["fb"][1])
        scores.append((round(worst, 2), round(p90, 2), -MARGINS.index(margin), margin))
    return min(scores)[3], lines


#: the values ``fit_by_decisions`` tries for a term's seconds (factors of its NNLS value)
FACTORS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def fit_by_decisions(
    records: list[dict[str, Any]], loops: bool, profile: planning.Profile, term: str, fitted: float
) -> tuple[float, list[str]]:
    """The seconds of ``term`` (the others held) with the lowest worst replayed regret of both
    forms (then p90, then the value nearest the least-squares one, ``fitted``), and the table.

    For a term that decides between forms more than it adds to times: ``strided element`` is
    all that tells the two forms under a tool apart, but a small share of most timings, so the
    least-squares fit of times weighs it by that share, not by the decisions it makes.
    """
    lines = [
        f"| {term} seconds | regret fwd / fwd+bwd max (functional) | ... (flax under a tool) |"
    ]
    lines.append("|---|---|---|")
    scores = []
    for factor in FACTORS:
        value = float(f"{fitted * factor:.3g}")
        p = with_seconds(profile, term, value)
        fn = np.array([r[1:3] for r in decisions(records, loops, p)])
        tool = np.array([r[1:3] for r in tool_decisions(records, p)])
        lines.append(
            f"| {value:.3g} | {fn[:, 0].max():.2f} / {fn[:, 1].max():.2f} | "
            f"{tool[:, 0].max():.2f} / {tool[:, 1].max():.2f} |"
        )
        worst = max(fn.max(), tool.max())
        p90 = max(np.percentile(fn, 90, axis=0).max(), np.percentile(tool, 90, axis=0).max())
        scores.append((round(worst, 2), round(p90, 2), abs(factor - 1.0), value))
    return min(scores)[3], lines


def with_seconds(profile: planning.Profile, term: str, value: float) -> planning.Profile:
    """``profile`` with ``value`` seconds per unit of ``term``, the other seconds as they are."""
    seconds = tuple((t, value if t == term else s) for t, s in profile.seconds)
    return dataclasses.replace(profile, seconds=seconds)


def replace(profile: planning.Profile, margin: float | None) -> planning.Profile:
    """``profile`` with ``depart_margin=margin``."""
    return dataclasses.replace(profile, depart_margin=margin)


def replay(records: list[dict[str, Any]], loops: bool, profile: planning.Profile) -> list[str]:
    """The planner's regret on measured layers if it planned with ``profile``: median, p90, max."""
    tool = np.array([r[1:3] for r in tool_decisions(records, profile)])
    under_tool = [
        f"flax under a tool, regret {m}: median {np.median(tool[:, i]):.2f}, "
        f"p90 {np.percentile(tool[:, i], 90):.2f}, max {tool[:, i].max():.2f}"
        for i, m in enumerate(("fwd", "fwd+bwd"))
    ]
    regrets: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}
    worst = []
    for i, (record, (name, r_fwd, r_fb, _, _)) in enumerate(
        zip(records, decisions(records, loops, profile), strict=True)
    ):
        regrets["fwd"].append(r_fwd)
        regrets["fwd+bwd"].append(r_fb)
        worst.append((max(r_fwd, r_fb), i, record, name[6:], r_fwd, r_fb))
    lines = [
        f"regret {m}: median {statistics.median(v):.2f}, p90 {np.percentile(v, 90):.2f}, "
        f"max {max(v):.2f}"
        for m, v in regrets.items()
    ]
    for _, i, record, label, r_fwd, r_fb in sorted(worst, key=lambda w: -w[0])[:5]:
        lines.append(
            f"  worst #{i} {record['kind']} {tuple(record['x_shape'])}: {label!r} "
            f"{r_fwd:.2f} / {r_fb:.2f}"
        )
    return lines + under_tool


def base_profile(runs: list[dict[str, Any]]) -> planning.Profile:
    """The profile in use for the backend the runs were timed on (this one's, if unrecorded)."""
    backends = {(run.get("platform"), run.get("device_count")) for run in runs}
    if len(backends) > 1:
        raise SystemExit(
            f"the files were timed on different backends: {sorted(map(str, backends))}"
        )
    platform, device_count = backends.pop()
    return planning.profile(platform, device_count)


def main(argv: list[str] | None = None) -> planning.Profile:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="regret.py --json files to fit on")
    parser.add_argument("--check", nargs="*", type=Path, default=[], help="replay these only")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the fitted profile here (JSON)"
    )
    parser.add_argument("--name", default=None, help="the fitted profile's name")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.json]
    current = base_profile(runs)
    data: list[tuple[str, Sample]] = []
    for run in runs:
        for record in run["records"]:
            timed = samples(record, run["loops"], current) + tool_samples(record, current)
            data += [(record["kind"], s) for _, s in timed]
    files = ", ".join(p.name for p in args.json)
    name = args.name or f"{current.platform}, fitted by calibrate.py to {files}"
    fitted = fitted_profile(current, fit([s for _, s in data]), name)
    records = [(run["records"], run["loops"]) for run in runs]
    every = [r for rs, _ in records for r in rs]
    term = "strided element"
    strided, table = fit_by_decisions(
        every, runs[0]["loops"], current, term, dict(fitted.seconds)[term]
    )
    print(f"{term!r} seconds, fitted by the decisions (the others as now): {strided:.3g}")
    print("\n".join(table) + "\n")

    fitted = with_seconds(fitted, term, strided)
    margin, table = fit_margin(every, runs[0]["loops"], with_seconds(current, term, strided))
    print(f"Depart margin (the current seconds, {term!r} as fitted), fitted: {margin}")
    print("\n".join(table) + "\n")
    fitted = replace(fitted, margin)
    print(f"{len(data)} candidate timings of {sum(len(r['records']) for r in runs)} layers\n")
    print(f"Fitted profile (the seconds of {current.name!r} refitted):")
    print(fitted.to_json())
    print("\nSeconds per unit, fitted (current):")
    for (t, s), (_, was) in zip(fitted.seconds, current.seconds, strict=True):
        print(f"  {t:20} {s:.3g} ({was:.3g})")
    if args.out is not None:
        args.out.write_text(fitted.to_json() + "\n")
        print(f"\nWritten to {args.out}: einmix_jax.planning.load_profile({str(args.out)!r})")
    print("\nResiduals with the fitted profile:")
    print("\n".join(residuals(data, fitted)))
    for label, p in (("current", current), ("fitted", fitted)):
        for path, run in zip(args.json, runs, strict=True):
            print(f"\nReplay of {path} with the {label} profile:")
            print("\n".join(replay(run["records"], run["loops"], p)))
    for path in args.check:
        run = json.loads(path.read_text())
        print(f"\nReplay of {path} (held out) with the fitted profile:")
        print("\n".join(replay(run["records"], run["loops"], fitted)))
    return fitted


if __name__ == "__main__":
    main()

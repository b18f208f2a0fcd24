"""Fit the planner's cost model (``einmix_jax._lower.SECONDS``) to measured candidate times.

Usage::

    python benchmarks/regret.py --seed 0 --json seed0.json      # measure every candidate
    python benchmarks/calibrate.py seed0.json                    # fit; print constants, residuals
    python benchmarks/calibrate.py seed0.json --check seed1.json # replay another corpus

The model (see ``einmix_jax._lower``) predicts a candidate's time as a sum of terms, each a count
(dot FLOPs, elements a dot reads and writes, dots, elements moved, elements a loop copies, loop
iterations, elements of x and the output) times seconds per unit. The counts are exact; the
seconds are fitted here by non-negative least squares on the relative error, over the forward
and the forward+backward time of every candidate of every layer in the given ``regret.py --json``
files. Candidates the file has no time for (e.g. a packing it did not measure) are skipped; the
hand-written ``block-diagonal k=...`` rows stand for the planner's x-first packing of ``k`` groups.

It prints the fitted seconds (paste them into ``SECONDS``), the residuals (median and p90 of
|predicted / measured - 1|, per kind of layer) and a replay: the regret the planner would have on
the measured layers with the current and with the fitted constants (its choice among the measured
candidates, timed against the fastest implementation measured). ``--check`` replays other files
with the fitted constants without fitting on them (the held-out corpus).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import nnls

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's einmix_jax
import einmix_jax as em
from einmix_jax import _lower

Sample = tuple[dict[str, float], dict[str, float], float, float]  # fwd terms, bwd terms, times


def _layer(record: dict[str, Any]) -> tuple[Any, tuple[int, ...]]:
    """The plan and input shape of a regret.py record."""
    names = set(record["weight_shape"].split()) | set(record["bias_shape"].split())
    axes = {a: n for a, n in record["sizes"].items() if a in names}
    mix = em.layer(record["pattern"], record["weight_shape"], record["bias_shape"], sizes=axes)
    return mix.plan, tuple(record["x_shape"])


def _measured(record: dict[str, Any], choice: _lower.Choice) -> dict[str, Any] | None:
    """The record's row for a candidate, if it was timed."""
    row = record["rows"].get("cand: " + choice.label)
    c = choice.candidate
    if row is None and c.pack and c.x_first and not c.rhs_t:
        row = record["rows"].get(f"block-diagonal k={c.pack[1]}")
    return row


def samples(record: dict[str, Any], loops: bool) -> list[tuple[_lower.Choice, Sample]]:
    """Every timed candidate of a record with its terms and its times (s)."""
    plan, x_shape = _layer(record)
    out = []
    for choice in _lower.candidates(plan, x_shape, loops):
        row = _measured(record, choice)
        if row is not None:
            fwd, bwd = _lower.terms(plan, x_shape, choice)
            out.append((choice, (fwd, bwd, row["fwd_ms"] / 1e3, row["fb_ms"] / 1e3)))
    return out


def fit(data: list[Sample]) -> dict[str, float]:
    """Seconds per term minimizing the squared relative error of forward and fwd+bwd times."""
    rows, weights = [], []
    for fwd, bwd, t_fwd, t_fb in data:
        rows.append([fwd[t] / t_fwd for t in _lower.TERMS])
        rows.append([(fwd[t] + bwd[t]) / t_fb for t in _lower.TERMS])
        weights += [1.0, 1.0]
    a = np.array(rows, dtype=np.float64)
    scale = a.max(axis=0)  # columns of similar size for the solver
    scale[scale == 0] = 1.0
    x, _ = nnls(a / scale, np.ones(len(rows)))
    return {t: float(v / s) for t, v, s in zip(_lower.TERMS, x, scale, strict=True)}


def _predict(seconds: dict[str, float], terms: dict[str, float]) -> float:
    return sum(seconds[t] * terms[t] for t in _lower.TERMS)


def residuals(data: list[tuple[str, Sample]], seconds: dict[str, float]) -> list[str]:
    """|predicted / measured - 1|: median and p90, overall and per kind, forward and fwd+bwd."""
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, (fwd, bwd, t_fwd, t_fb) in data:
        p_fwd = _predict(seconds, fwd)
        p_fb = p_fwd + _predict(seconds, bwd)
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


def replay(records: list[dict[str, Any]], loops: bool, seconds: dict[str, float]) -> list[str]:
    """The planner's regret on measured layers if it used ``seconds``: median, p90, max."""
    saved = dict(_lower.SECONDS)
    _lower.SECONDS.update(seconds)
    try:
        regrets: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}
        worst = []
        for i, record in enumerate(records):
            timed = samples(record, loops)
            chosen = _lower.choose([c for c, _ in timed])
            t = next(s for c, s in timed if c is chosen)
            best_fwd = min(r["fwd_ms"] for r in record["rows"].values()) / 1e3
            best_fb = min(r["fb_ms"] for r in record["rows"].values()) / 1e3
            r_fwd, r_fb = t[2] / best_fwd, t[3] / best_fb
            regrets["fwd"].append(r_fwd)
            regrets["fwd+bwd"].append(r_fb)
            worst.append((max(r_fwd, r_fb), i, record, chosen.label, r_fwd, r_fb))
    finally:
        _lower.SECONDS.update(saved)
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
    return lines


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="regret.py --json files to fit on")
    parser.add_argument("--check", nargs="*", type=Path, default=[], help="replay these only")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.json]
    data: list[tuple[str, Sample]] = []
    for run in runs:
        for record in run["records"]:
            data += [(record["kind"], s) for _, s in samples(record, run["loops"])]
    fitted = fit([s for _, s in data])
    print(f"{len(data)} candidate timings of {sum(len(r['records']) for r in runs)} layers\n")
    print("SECONDS = {")
    for t in _lower.TERMS:
        print(f'    "{t}": {fitted[t]:.3g},  # was {_lower.SECONDS[t]:.3g}')
    print("}\n\nResiduals with the fitted constants:")
    print("\n".join(residuals(data, fitted)))
    for name, seconds in (("current", dict(_lower.SECONDS)), ("fitted", fitted)):
        for path, run in zip(args.json, runs, strict=True):
            print(f"\nReplay of {path} with the {name} constants:")
            print("\n".join(replay(run["records"], run["loops"], seconds)))
    for path in args.check:
        run = json.loads(path.read_text())
        print(f"\nReplay of {path} (held out) with the fitted constants:")
        print("\n".join(replay(run["records"], run["loops"], fitted)))
    return fitted


if __name__ == "__main__":
    main()

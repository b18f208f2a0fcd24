"""The planner-regret benchmark runs: a tiny corpus, one round, its report's structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import einmix_jax as em

ROOT = Path(__file__).resolve().parents[1]


def test_regret_benchmark_smoke(tmp_path):
    out = tmp_path / "regret.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "regret.py"),
            "--tiny",
            "--n",
            "3",
            "--kinds",
            "mix first axis",
            "summed axis",
            "grouped",
            "--no-write",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    records = report["records"]
    kinds = {"mix first axis", "summed axis", "grouped"}
    assert len(records) == 3 and {r["kind"] for r in records} == kinds
    for r in records:
        rows = r["rows"]
        assert r["chosen"] in rows and r["chosen"].startswith("cand: ")
        extras = {"flax under a tool", "measured pick", "rearrange+einsum", "einops layer"}
        assert extras | {"cand: as einsum"} <= set(rows)
        assert not rows[r["chosen"]]["pruned"]
        # the chosen candidate is within the depart margin of the cheapest
        costs = [row["cost"] for row in rows.values() if row["cost"] is not None]
        margin = em.planning.profile().depart_margin
        assert rows[r["chosen"]]["cost"] <= min(costs) * (1 + margin) + 1e-12
        assert len(rows["cand: as einsum"]["fwd_s"]) == len(rows[r["chosen"]]["fb_s"]) >= 1
        for metric in ("fwd", "fwd+bwd"):
            assert r[f"regret {metric}"] >= 1 and r[f"flax under a tool regret {metric}"] >= 1
            assert r[f"split regret {metric}"] >= 1 and r[f"measured regret {metric}"] >= 1
            assert r[f"best {metric}"] in rows
            assert r[f"compile vs einops {metric}"] > 0
    for metric, stats in report["distribution"].items():
        assert set(stats) == {"median", "p90", "max", "over 1.05"}, metric
        assert stats["median"] <= stats["p90"] <= stats["max"]
    assert "Candidate sets:" in result.stdout and "Worst five" in result.stdout
    grouped = next(r for r in records if r["kind"] == "grouped")
    assert any(n.startswith("block-diagonal k=") for n in grouped["rows"])  # hand-written
    assert any("packed block-diagonal" in n for n in grouped["rows"])  # the planner's

    # the calibration script fits the cost model to these timings and writes the profile
    fitted = tmp_path / "profile.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "calibrate.py"),
            str(out),
            "--check",
            str(out),
            "--out",
            str(fitted),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    from einmix_jax import planning

    for term in planning.TERMS:
        assert f'"{term}": ' in result.stdout
    profile = planning.Profile.from_json(fitted.read_text())  # what load_profile reads
    assert profile.to_json() in result.stdout  # the profile printed is the one written
    assert profile.platform == report["platform"] and profile.loops == report["loops"]
    assert "Residuals" in result.stdout and "(held out)" in result.stdout
    lines = result.stdout.splitlines()
    for form in ("regret fwd+bwd: median", "flax under a tool, regret fwd+bwd: median"):
        assert sum(line.startswith(form) for line in lines) == 3  # current, fitted, held out

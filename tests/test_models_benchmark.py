"""benchmarks/models.py's ``--out`` writes its section into a results file and keeps the rest."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _models() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(
            "benchmark_models", ROOT / "benchmarks" / "models.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_out_replaces_only_the_models_section(tmp_path, monkeypatch):
    models = _models()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nbench.py's tables and prose\n")
    sections = iter(["| first run |", "| second run |"])
    monkeypatch.setattr(models, "run", lambda *args: next(sections))
    models.main(["--quick", "--out", str(results)])
    first = results.read_text()
    assert "bench.py's tables and prose" in first and "| first run |" in first
    models.main(["--quick", "--out", str(results)])
    second = results.read_text()
    assert "bench.py's tables and prose" in second, "the rest of the file was overwritten"
    assert "| second run |" in second and "| first run |" not in second

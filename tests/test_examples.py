"""Smoke tests: every example runs, on a tiny setting, so they can't rot."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import jax
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Flax modules) look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _standard_dtype_promotion():
    """Run the examples as a user's script runs: optax's Adam computes ``decay ** count`` with an
    int32 count, which the suite's strict dtype promotion rejects. Rank promotion stays strict."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_mlp_mixer_digits_trains_plots_and_restores(tmp_path, capsys):
    mixer = load("mlp_mixer_digits")
    out = tmp_path / "run"
    result = mixer.main(
        ["--epochs", "2", "--subset", "128", "--depth", "1", "--out", str(out), "--no-progress"]
    )
    history = result["history"]
    assert len(history["loss"]) == len(history["test_acc"]) == 2
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["loss"][1] < history["loss"][0]
    assert result["restored_accuracy"] == result["test_accuracy"] == history["test_acc"][-1]
    assert result["plot"] == out.resolve() / "curves.png"
    assert result["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(result["checkpoint"].iterdir())
    printed = capsys.readouterr().out
    assert f"test accuracy {result['test_accuracy']:.2%}" in printed
    assert "wall time" in printed


def test_mlp_mixer_digits_help_names_the_flags(capsys, monkeypatch):
    mixer = load("mlp_mixer_digits")
    with pytest.raises(SystemExit) as exit_info:
        mixer.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--epochs", "--seed", "--out", "--subset", "runs/mlp_mixer_digits"):
        assert flag in text
    monkeypatch.setattr(sys, "argv", ["mlp_mixer_digits.py"])
    defaults = mixer.parse_args()
    assert (defaults.epochs, defaults.seed, defaults.out.as_posix()) == (
        60,
        0,
        "runs/mlp_mixer_digits",
    )


def test_attention_functional_matches_einsum(capsys):
    attention = load("attention_functional")
    err = attention.main(batch=2, seq=5, dim=8, heads=2, causal=True, seed=1)
    assert err < 1e-5
    assert "OK" in capsys.readouterr().out


def test_attention_functional_check_catches_a_wrong_projection():
    attention = load("attention_functional")
    params, layers = attention.make_layers(jax.random.key(0), 8, 2)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    good = jax.vmap(lambda xi: attention.attend(layers, params, xi, False))(x)
    wrong = dict(params, o=dict(params["o"], bias=params["o"]["bias"] + 1.0))
    assert float(abs(attention.reference(wrong, x, False) - good).max()) > 0.5
    assert float(abs(attention.reference(params, x, False) - good).max()) < 1e-5


def test_regression_fits():
    regression = load("regression")
    assert regression.main(steps=60) < 1e-2


def test_quantize_and_lora_quantizes_every_einmix_weight_and_trains_only_lora(tmp_path, capsys):
    pytest.importorskip("qwix")
    example = load("quantize_and_lora")
    # a float checkpoint to restore (the training path is the Mixer example's own smoke test)
    mixer = load("mlp_mixer_digits")
    images = jax.numpy.zeros((1, 8, 8))
    params = mixer.Mixer(depth=1).init(jax.random.key(0), images)["params"]
    checkpoint = mixer.checkpoint_round_trip(params, tmp_path / "float")
    assert jax.tree.structure(checkpoint) == jax.tree.structure(params)
    flags = ["--checkpoint", str(tmp_path / "float"), "--out", str(tmp_path / "run")]
    flags += ["--subset", "128", "--depth", "1", "--lora-epochs", "2"]
    result = example.main([*flags, "--no-progress"])
    stored = [
        leaf
        for leaf in jax.tree.leaves(result["int8_params"], is_leaf=lambda v: hasattr(v, "qvalue"))
        if hasattr(leaf, "qvalue")
    ]
    assert len(stored) == 1 + 4 + 1  # patch embedding, one block's four layers, head
    assert all(str(q.qvalue.dtype) == "int8" for q in stored)
    assert result["int8_bytes"] < 0.5 * result["float_bytes"]
    assert result["frozen_unchanged"]
    assert 0 < result["trainable"] < result["total"]
    for name in ("float_accuracy", "int8_accuracy", "lora_before", "lora_after"):
        assert 0.0 <= result[name] <= 1.0
    printed = capsys.readouterr().out
    assert "int8 (PTQ):" in printed and "LoRA on inverted digits" in printed

"""Smoke tests: every example runs, on a tiny setting, so they can't rot."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
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
    settings = example.float_settings(example.parse_args(flags))  # as if trained with these flags
    (tmp_path / "float.json").write_text(json.dumps(settings))
    result = example.main([*flags, "--no-progress"])
    assert result["restored"]
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


QUICK = ["--epochs", "1", "--subset", "64", "--depth", "1", "--lora-epochs", "0", "--no-progress"]
TRAINED = re.compile(r"^digits: 64 train / 64 test images", re.M)  # mlp_mixer_digits.py trains


def test_quantize_and_lora_restores_only_a_float_model_of_its_own_settings(tmp_path, capsys):
    """A float model trained with seed 0 is not seed 1's: seed 1's test split overlaps seed 0's
    training images, so its scores would be inflated."""
    pytest.importorskip("qwix")
    example = load("quantize_and_lora")
    checkpoint = tmp_path / "run" / "float" / "checkpoint"
    flags = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "run"), *QUICK]
    example.main([*flags, "--seed", "0"])
    assert TRAINED.search(capsys.readouterr().out)  # nothing to restore: trained first
    seed1 = example.main([*flags, "--seed", "1"])
    printed = capsys.readouterr().out
    assert TRAINED.search(printed), "seed 1 restored the float model trained with seed 0"
    assert "seed=0" in printed and "seed=1" in printed  # it says why it trains anew
    assert not seed1["restored"]
    again = example.main([*flags, "--seed", "1"])  # the float model is seed 1's now
    printed = capsys.readouterr().out
    assert again["restored"] and not TRAINED.search(printed)
    assert f"float model: restored {checkpoint}" in printed
    assert again["float_accuracy"] == seed1["float_accuracy"]
    assert again["int8_accuracy"] == seed1["int8_accuracy"]


def test_quantize_and_lora_writes_the_float_model_to_its_checkpoint_flag(tmp_path, capsys):
    pytest.importorskip("qwix")
    import orbax.checkpoint as ocp

    example = load("quantize_and_lora")
    checkpoint = tmp_path / "models" / "float"  # outside --out
    flags = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "run"), *QUICK]
    trained = example.main(flags)
    assert not trained["restored"] and trained["checkpoint"] == checkpoint
    with ocp.StandardCheckpointer() as checkpointer:  # a whole float model, where it was told
        params = checkpointer.restore(checkpoint.resolve())
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(trained["float_params"]))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trained["float_params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "run" / "float" / "checkpoint").exists()  # one copy, not two
    capsys.readouterr()
    restored = example.main(flags)
    assert restored["restored"] and f"restored {checkpoint}" in capsys.readouterr().out


def test_quantize_and_lora_overwrites_no_folder_that_is_not_a_checkpoint(tmp_path):
    pytest.importorskip("qwix")
    example = load("quantize_and_lora")
    folder = tmp_path / "mine"
    (folder / "notes").mkdir(parents=True)
    with pytest.raises(SystemExit, match="is no orbax checkpoint: not overwriting it"):
        example.main(["--checkpoint", str(folder), "--out", str(tmp_path / "run"), *QUICK])
    assert (folder / "notes").is_dir()

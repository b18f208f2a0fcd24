"""Quantize the MLP-Mixer of EinMix layers to int8 with qwix, then fine-tune it with LoRA.

The model is the one of ``mlp_mixer_digits.py``, whose every linear layer -- patch embedding,
token mixing, channel mixing, head -- is an ``einmix_jax.linen.EinMix``. qwix intercepts the
contraction while a Flax module is traced, so it treats these layers exactly as ``nn.Dense``:

1. **Float model**: restored from ``--checkpoint`` if it was trained with these settings (seed,
   epochs, depth, subset and the Mixer example's defaults; ``PATH.json`` beside the checkpoint
   names them), else trained first by ``mlp_mixer_digits.py`` and written to ``--checkpoint``
   with its settings. A model trained with another seed is never restored: another seed's test
   images are among its training images.
2. **PTQ to int8** (``qwix.PtqProvider`` + ``qwix.quantize_params``): every EinMix weight stored as
   int8 with per-channel scales, activations quantized to int8 on the fly. Test accuracy float vs
   int8, and the params' bytes before and after.
3. **LoRA** (``qwix.LoraProvider``) on a shifted task -- the same digits, inverted (``1 - x``): the
   float model is poor on it; rank-``--rank`` factors beside every EinMix weight are trained, the
   base model stays frozen (``optax.multi_transform`` with ``set_to_zero``). Accuracy on the
   inverted test set before and after, and the trainable parameters against the full model.

Run: ``python examples/quantize_and_lora.py`` (about a minute on two CPU cores, training the
float model included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
import qwix

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling example, run or imported
import mlp_mixer_digits as mixer


def nbytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (int8 values and float32 scales of quantized weights too)."""
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def training_flags(args: argparse.Namespace) -> list[str]:
    """The flags of ``mlp_mixer_digits.py`` that train this run's float model."""
    flags = ["--epochs", str(args.epochs), "--seed", str(args.seed), "--depth", str(args.depth)]
    return flags + (["--subset", str(args.subset)] if args.subset is not None else [])


def float_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting the float model depends on: the Mixer example's flags, its defaults included."""
    settings = vars(mixer.parse_args(training_flags(args)))
    return {k: v for k, v in sorted(settings.items()) if k not in ("out", "no_progress")}


def settings_path(checkpoint: Path) -> Path:
    """The JSON beside ``checkpoint`` that names the settings it was trained with."""
    return checkpoint.with_name(checkpoint.name + ".json")


def stored_settings(checkpoint: Path) -> dict[str, Any] | None:
    """The settings stored beside ``checkpoint``; ``None`` if there are none (or no checkpoint)."""
    path = settings_path(checkpoint)
    if not checkpoint.is_dir() or not path.is_file():
        return None
    return json.loads(path.read_text())


def float_params(args: argparse.Namespace) -> tuple[Any, bool]:
    """The float model's params, and whether they were restored from ``--checkpoint``.

    Restored only if the settings stored beside the checkpoint are this run's; else trained by
    the sibling example (under ``--out``/float) and written to ``--checkpoint`` with its settings.
    """
    import orbax.checkpoint as ocp

    checkpoint: Path = args.checkpoint
    settings, stored = float_settings(args), stored_settings(checkpoint)
    restored = stored == settings
    if restored:
        what = ", ".join(f"{k}={settings[k]}" for k in ("seed", "epochs", "depth", "subset"))
        print(f"float model: restored {checkpoint} (trained with the same settings: {what})")
    else:
        if stored is not None:
            differ = [k for k in sorted({*settings, *stored}) if settings.get(k) != stored.get(k)]
            was = ", ".join(f"{k}={stored.get(k)}" for k in differ)
            now = ", ".join(f"{k}={settings.get(k)}" for k in differ)
            why = f"{checkpoint} was trained with {was}, this run has {now}"
        elif checkpoint.exists():
            why = f"{checkpoint} has no {settings_path(checkpoint).name} naming its settings"
        else:
            why = f"no checkpoint at {checkpoint}"
        if checkpoint.exists() and not (checkpoint / "_CHECKPOINT_METADATA").is_file():
            raise SystemExit(f"--checkpoint {checkpoint} is there and is no orbax checkpoint: "
                             "not overwriting it")  # fmt: skip
        print(f"float model: {why}; training it and writing it there")
        settings_path(checkpoint).unlink(missing_ok=True)
        out = args.out / "float"
        flags = [*training_flags(args), "--out", str(out)]
        trained = mixer.main(flags + (["--no-progress"] if args.no_progress else []))["checkpoint"]
        if trained.resolve() != checkpoint.resolve():  # one copy, where --checkpoint says
            if checkpoint.exists():
                shutil.rmtree(checkpoint)
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(trained, checkpoint)
        settings_path(checkpoint).write_text(json.dumps(settings, indent=1) + "\n")
    x_train = mixer.load_data(args.seed, args.subset)[0]
    model = mixer.Mixer(depth=args.depth)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x_train[:1]))["params"]
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(checkpoint.resolve(), abstract)
    return params, restored


def accuracy(model: Any, params: Any, images: jax.Array, labels: jax.Array) -> float:
    """Fraction of ``images`` that ``model`` classifies as ``labels`` (jitted once per model)."""
    logits = jax.jit(model.apply)({"params": params}, images)
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def with_base(lora_params: Any, base: Any) -> Any:
    """``lora_params`` with every param that ``base`` has taken from ``base`` (the factors kept)."""
    if isinstance(lora_params, dict):
        return {k: with_base(v, base.get(k)) for k, v in lora_params.items()}
    return lora_params if base is None else base


def count(params: Any, labels: Any, label: str) -> int:
    """The number of parameters labelled ``label``."""
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True)
    return sum(p.size for p, k in pairs if k == label)


def lora_labels(params: Any) -> Any:
    """``'lora'`` for the LoRA factors, ``'frozen'`` for everything else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "lora" if "_lora_" in jax.tree_util.keystr(path) else "frozen", params
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        metavar="PATH",
        help="the float model's orbax checkpoint: restored if PATH.json beside it names this "
        "run's settings, else trained and written here (default OUT/float/checkpoint)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/quantize_and_lora"),
        help="folder for the run (default runs/quantize_and_lora)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the float model and LoRA (default 0)",
    )
    parser.add_argument("--epochs", type=int, default=60, help="float training epochs (60)")
    parser.add_argument("--depth", type=int, default=3, help="Mixer blocks (default 3)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--lora-epochs", type=int, default=30, help="LoRA epochs (default 30)")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="LoRA learning rate (1e-2)")
    parser.add_argument("--subset", type=int, default=None, help="a quick smoke run's size")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = args.out / "float" / "checkpoint"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Restore or train, quantize, fine-tune with LoRA; print and return the figures."""
    from tqdm import tqdm

    args = parse_args(argv)
    start = time.perf_counter()
    params, restored = float_params(args)
    x_train, y_train, x_test, y_test = map(jnp.asarray, mixer.load_data(args.seed, args.subset))
    model = mixer.Mixer(depth=args.depth)
    float_acc = accuracy(model, params, x_test, y_test)

    # PTQ: weights to int8 with per-channel scales, activations quantized on the fly
    rules = [qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")]
    ptq = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(ptq.init, jax.random.key(0), x_test[:1])["params"]
    int8_params = qwix.quantize_params(params, abstract)
    int8_acc = accuracy(ptq, int8_params, x_test, y_test)
    float_bytes, int8_bytes = nbytes(params), nbytes(int8_params)

    # LoRA on the inverted digits: only the factors train
    inverted_train, inverted_test = 1.0 - x_train, 1.0 - x_test
    lora = qwix.apply_lora_to_model(
        model, qwix.LoraProvider(module_path=".*", rank=args.rank, alpha=float(args.rank))
    )
    # the base as trained; the factors as LoRA draws them (B = 0: the same model to start)
    lora_params = with_base(lora.init(jax.random.key(args.seed), x_test[:1])["params"], params)
    before = accuracy(lora, lora_params, inverted_test, y_test)
    labels = lora_labels(lora_params)
    optimizer = optax.multi_transform(
        {"lora": optax.adam(args.lora_lr), "frozen": optax.set_to_zero()}, labels
    )
    batch_size = min(64, len(inverted_train))
    epoch = mixer.make_epoch(lora, optimizer, batch_size, smoothing=0.1)
    state = (lora_params, optimizer.init(lora_params))
    bar = tqdm(range(args.lora_epochs), desc="LoRA", unit="epoch", disable=args.no_progress)
    key = jax.random.key(args.seed + 1)
    for i in bar:
        state, loss, _ = epoch(state, jax.random.fold_in(key, i), inverted_train, y_train)
        bar.set_postfix({"loss": f"{loss:.3f}"})
    tuned = state[0]
    after = accuracy(lora, tuned, inverted_test, y_test)
    trainable, total = count(tuned, labels, "lora"), count(tuned, labels, "frozen")
    frozen_kept = all(
        bool(jnp.array_equal(a, b))
        for a, b, k in zip(
            jax.tree.leaves(tuned),
            jax.tree.leaves(lora_params),
            jax.tree.leaves(labels),
            strict=True,
        )
        if k == "frozen"
    )

    n = len(x_test)
    print(f"float model:  test accuracy {float_acc:.2%} ({round(float_acc * n)}/{n})")
    print(f"int8 (PTQ):   test accuracy {int8_acc:.2%} ({round(int8_acc * n)}/{n})")
    print(
        f"params: {float_bytes:,} bytes float32 -> {int8_bytes:,} bytes int8 + scales "
        f"({float_bytes / int8_bytes:.2f}x smaller)"
    )
    print(
        f"LoRA on inverted digits: accuracy {before:.2%} -> {after:.2%}, "
        f"{trainable:,} trainable parameters of {total:,} ({trainable / total:.1%}), "
        f"base unchanged: {frozen_kept}"
    )
    wall = time.perf_counter() - start
    print(f"wall time {wall:.1f} s")
    return {
        "checkpoint": args.checkpoint,
        "restored": restored,
        "float_params": params,
        "float_accuracy": float_acc,
        "int8_accuracy": int8_acc,
        "float_bytes": float_bytes,
        "int8_bytes": int8_bytes,
        "int8_params": int8_params,
        "lora_before": before,
        "lora_after": after,
        "trainable": trainable,
        "total": total,
        "frozen_unchanged": frozen_kept,
        "wall_time": wall,
    }


if __name__ == "__main__":
    main()

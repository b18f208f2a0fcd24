"""Quantize the MLP-Mixer of EinMix layers to int8 with qwix, then fine-tune it with LoRA.

The model is the one of ``mlp_mixer_digits.py``, whose every linear layer -- patch embedding,
token mixing, channel mixing, head -- is an ``einmix_jax.linen.EinMix``. qwix intercepts the
contraction while a Flax module is traced, so it treats these layers exactly as ``nn.Dense``:

1. **Float model**: restored from ``mlp_mixer_digits.py``'s checkpoint when ``--checkpoint`` names
   one, else trained here first (the same script, same seed).
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


def float_params(args: argparse.Namespace) -> Any:
    """The float model's params: restored from ``--checkpoint``, else trained by the sibling."""
    import orbax.checkpoint as ocp

    checkpoint = args.checkpoint
    if checkpoint is None or not checkpoint.exists():
        out = args.out / "float"
        flags = ["--epochs", str(args.epochs), "--seed", str(args.seed), "--out", str(out)]
        flags += ["--depth", str(args.depth)] + (
            ["--subset", str(args.subset)] if args.subset else []
        )
        flags += ["--no-progress"] if args.no_progress else []
        checkpoint = mixer.main(flags)["checkpoint"]
    x_train = mixer.load_data(args.seed, args.subset)[0]
    model = mixer.Mixer(depth=args.depth)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(x_train[:1]))["params"]
    checkpointer = ocp.StandardCheckpointer()
    params = checkpointer.restore(checkpoint.resolve(), abstract)
    checkpointer.close()
    return params


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
        default=Path("runs/mlp_mixer_digits/checkpoint"),
        help="float checkpoint of mlp_mixer_digits.py; trained first if it is missing "
        "(default runs/mlp_mixer_digits/checkpoint)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/quantize_and_lora"), help="folder for the run"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--epochs", type=int, default=60, help="float training epochs (60)")
    parser.add_argument("--depth", type=int, default=3, help="Mixer blocks (default 3)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument("--lora-epochs", type=int, default=30, help="LoRA epochs (default 30)")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="LoRA learning rate (1e-2)")
    parser.add_argument("--subset", type=int, default=None, help="a quick smoke run's size")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Restore or train, quantize, fine-tune with LoRA; print and return the figures."""
    from tqdm import tqdm

    args = parse_args(argv)
    start = time.perf_counter()
    params = float_params(args)
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

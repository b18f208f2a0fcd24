"""Train an MLP-Mixer built from EinMix layers on scikit-learn's 8x8 digits.

Patch embedding, token mixing, channel mixing and the classifier head are all
``einmix_jax.linen.EinMix`` layers; training uses optax (AdamW, warmup + cosine schedule, label
smoothing) with random 1-pixel shifts. The data ships with scikit-learn (no download); a 25%
stratified test split is fixed by the seed. At the end the script writes a plot of the curves
and an orbax checkpoint to --out, restores the checkpoint and re-evaluates it.

Run: ``python examples/mlp_mixer_digits.py`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import einmix_jax as em

EinMix = em.linen.EinMix


class MixerBlock(nn.Module):
    """Token mixing across the patches, then channel mixing within each patch (pre-norm MLPs)."""

    tokens: int
    channels: int
    token_hidden: int
    channel_hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: (batch, tokens, channels)
        y = nn.LayerNorm()(x)
        y = EinMix("b t c -> b u c", "t u", "u", sizes={"u": self.token_hidden})(y)
        y = EinMix("b u c -> b t c", "u t", "t", sizes={"t": self.tokens})(nn.gelu(y))
        x = x + y
        y = nn.LayerNorm()(x)
        y = EinMix("b t c -> b t d", "c d", "d", sizes={"d": self.channel_hidden})(y)
        y = EinMix("b t d -> b t c", "d c", "c", sizes={"c": self.channels})(nn.gelu(y))
        return x + y


class Mixer(nn.Module):
    """MLP-Mixer for (batch, 8, 8) images: 2x2 patches -> 16 tokens of ``channels`` features."""

    patch: int = 2
    channels: int = 64
    depth: int = 3
    token_hidden: int = 64
    channel_hidden: int = 128
    classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        p = self.patch
        x = EinMix(
            "b (h p1) (w p2) -> b (h w) c", "p1 p2 c", "c", sizes=dict(p1=p, p2=p, c=self.channels)
        )(images)  # h and w are read off the image size
        for _ in range(self.depth):
            x = MixerBlock(x.shape[1], self.channels, self.token_hidden, self.channel_hidden)(x)
        x = nn.LayerNorm()(x).mean(axis=1)
        return EinMix("b c -> b k", "c k", "k", sizes={"k": self.classes})(x)


def load_data(seed: int, subset: int | None = None) -> tuple[np.ndarray, ...]:
    """Digits scaled to [0, 1]; a 25% stratified test split fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    if subset is not None:
        x_train, y_train, x_test, y_test = (
            x_train[:subset],
            y_train[:subset],
            x_test[:subset],
            y_test[:subset],
        )
    return x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32)


def shift(key: jax.Array, images: jax.Array) -> jax.Array:
    """Shift each image by a random -1, 0 or +1 pixels along each axis (zero fill)."""
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1)))
    offsets = jax.random.randint(key, (images.shape[0], 2), 0, 3)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1]), images.shape[1:])  # noqa: E731
    return jax.vmap(crop)(padded, offsets)


def make_epoch(
    model: Mixer, optimizer: optax.GradientTransformation, batch_size: int, smoothing: float
):
    """One jitted epoch: shuffle, then ``lax.scan`` over the batches (shift-augmented)."""

    def loss_fn(params: Any, images: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.apply({"params": params}, images)
        targets = optax.smooth_labels(jax.nn.one_hot(labels, model.classes), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

    @jax.jit
    def epoch(state: tuple, key: jax.Array, images: jax.Array, labels: jax.Array):
        n_batches = images.shape[0] // batch_size
        order = jax.random.permutation(key, images.shape[0])[: n_batches * batch_size]
        images = images[order].reshape(n_batches, batch_size, *images.shape[1:])
        labels = labels[order].reshape(n_batches, batch_size)
        keys = jax.random.split(jax.random.fold_in(key, 1), n_batches)

        def step(state: tuple, batch: tuple) -> tuple[tuple, tuple[jax.Array, jax.Array]]:
            params, opt_state = state
            batch_images, batch_labels, batch_key = batch
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, acc), grads = grad_fn(params, shift(batch_key, batch_images), batch_labels)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), (loss, acc)

        state, (losses, accs) = jax.lax.scan(step, state, (images, labels, keys))
        return state, losses.mean(), accs.mean()

    return epoch


@functools.partial(jax.jit, static_argnums=0)
def accuracy(model: Mixer, params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of ``images`` classified as ``labels``."""
    return jnp.mean(jnp.argmax(model.apply({"params": params}, images), -1) == labels)


def save_plot(history: dict[str, list[float]], path: Path) -> None:
    """Loss and accuracy per epoch, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["loss"], label="train (smoothed labels)")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, history["train_acc"], label="train (shifted)")
    ax_acc.plot(epochs, history["test_acc"], label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0.8, 1.0))
    ax_acc.grid(alpha=0.3)
    ax_acc.legend()
    fig.suptitle(
        f"MLP-Mixer of EinMix layers on 8x8 digits: test accuracy {history['test_acc'][-1]:.2%}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def checkpoint_round_trip(params: Any, directory: Path) -> Any:
    """Save ``params`` with orbax, restore them into a fresh tree of the same structure."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, params, force=True)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, params)
    restored = checkpointer.restore(directory, abstract)
    checkpointer.close()
    return restored


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split, the init and the shuffling (default 0)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/mlp_mixer_digits"),
        help="folder for curves.png and the checkpoint (default runs/mlp_mixer_digits)",
    )
    parser.add_argument("--depth", type=int, default=3, help="Mixer blocks (default 3)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    parser.add_argument(
        "--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)"
    )
    parser.add_argument(
        "--label-smoothing", type=float, default=0.1, help="label smoothing (default 0.1)"
    )
    parser.add_argument(
        "--subset",
        type=int,
        default=None,
        help="use only this many training and test images (a quick smoke run)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, plot, checkpoint, restore; return the final figures."""
    from tqdm import tqdm

    args = parse_args(argv)
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_data(args.seed, args.subset)
    batch_size = min(args.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch_size

    model = Mixer(depth=args.depth)
    init_key, train_key = jax.random.split(jax.random.key(args.seed))
    params = model.init(init_key, jnp.asarray(x_train[:1]))["params"]
    n_params = sum(p.size for p in jax.tree.leaves(params))
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = min(
        5 * steps_per_epoch, total_steps // 4
    )  # 5 epochs, or a quarter of a short run
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps, total_steps)
    optimizer = optax.adamw(schedule, weight_decay=args.weight_decay)
    epoch = make_epoch(model, optimizer, batch_size, args.label_smoothing)
    state = (params, optimizer.init(params))
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)

    print(f"digits: {len(x_train)} train / {len(x_test)} test images, {n_params:,} parameters")
    history: dict[str, list[float]] = {"loss": [], "train_acc": [], "test_acc": []}
    bar = tqdm(range(args.epochs), desc="training", unit="epoch", disable=args.no_progress)
    for i in bar:
        state, loss, train_acc = epoch(state, jax.random.fold_in(train_key, i), x_train, y_train)
        test_acc = accuracy(model, state[0], x_test, y_test)
        history["loss"].append(float(loss))
        history["train_acc"].append(float(train_acc))
        history["test_acc"].append(float(test_acc))
        bar.set_postfix(
            {"loss": f"{loss:.3f}", "train_acc": f"{train_acc:.3f}", "test_acc": f"{test_acc:.3f}"}
        )
    params = state[0]
    train_time = time.perf_counter() - start

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "curves.png"
    save_plot(history, plot)
    restored = checkpoint_round_trip(params, out / "checkpoint")
    restored_acc = float(accuracy(model, restored, x_test, y_test))
    final_acc = history["test_acc"][-1]
    if restored_acc != final_acc:
        raise SystemExit(
            f"checkpoint round trip changed the accuracy: {final_acc} -> {restored_acc}"
        )
    wall = time.perf_counter() - start
    print(f"test accuracy {final_acc:.2%} ({round(final_acc * len(x_test))}/{len(x_test)})")
    print(f"checkpoint {out / 'checkpoint'} restored: test accuracy {restored_acc:.2%}")
    print(f"curves: {plot}")
    print(f"wall time {wall:.1f} s (training {train_time:.1f} s)")
    return {
        "test_accuracy": final_acc,
        "restored_accuracy": restored_acc,
        "wall_time": wall,
        "history": history,
        "plot": plot,
        "checkpoint": out / "checkpoint",
    }


if __name__ == "__main__":
    main()

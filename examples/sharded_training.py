"""Train an MLP-Mixer block on a (2, 4) device mesh, sharded by axis name, and check it on 1 device.

Every EinMix weight axis has a name in its pattern, so one dict of rules shards the whole model:

    RULES = {"b": "data", "g": "model", "f": "model"}

``b`` (batch) is split over the mesh's ``data`` axis; the hidden axes of the token-mixing MLP
(``g``) and of the channel-mixing MLP (``f``) over ``model`` -- Megatron-style: the first layer of
each MLP is split on its output axis, the second on its input axis, so each MLP communicates once
(an all-reduce of the second layer's partial sums). Nothing else is written by hand:

* ``em.param_shardings(layer, RULES, mesh)`` gives each param's ``NamedSharding``, and
  ``jax.jit(init, out_shardings=...)`` creates the params already split (no device ever holds a
  full weight);
* ``em.with_out_sharding(layer, RULES)`` keeps each layer's output split by its axis names while
  ``jax.set_mesh(mesh)`` is active;
* each process feeds only its own rows of the batch (``jax.make_array_from_process_local_data``);
* the train step is a plain ``jax.jit``; XLA inserts the collectives.

Three ways to run it:

* ``python examples/sharded_training.py`` -- one process, 8 simulated CPU devices
  (``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set below before JAX starts).
* ``python examples/sharded_training.py --processes N`` (N = 1, 2, 4 or 8) -- N local worker
  processes on 127.0.0.1, each owning ``8/N`` simulated CPU devices, joined by JAX's distributed
  runtime (gloo CPU collectives) into one global 8-device mesh. ``--checkpoint DIR`` saves the params and
  optimizer state with orbax, each process writing its own shards; ``--restore --checkpoint DIR``
  restores them in one process onto other layouts (one device; an (8,) ``'model'`` mesh).
* ``python examples/sharded_training.py --worker`` on every host of a real cluster (SLURM, TPU
  pods, Kubernetes): ``jax.distributed.initialize()`` with no arguments finds the coordinator and
  the process ids from the cluster's environment; the mesh takes all hosts' devices.

Each run trains the same model unsharded on one device too, and the losses and final params must
agree (rtol 1e-5).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--worker" not in sys.argv:  # must precede JAX's start
    _FLAGS = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in _FLAGS:
        os.environ["XLA_FLAGS"] = f"{_FLAGS} --xla_force_host_platform_device_count=8".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import functools
import json
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import einmix_jax as em

BATCH, TOKENS, CHANNELS, TOKEN_HIDDEN, CHANNEL_HIDDEN, OUTPUTS = 16, 8, 16, 16, 32, 4
RULES = {"b": "data", "g": "model", "f": "model"}
MODEL = 4  # devices along the mesh's 'model' axis; the rest go to 'data'
DEVICES = 8  # simulated CPU devices in all, split over the local processes
PROCESS_COUNTS = tuple(n for n in range(1, DEVICES + 1) if DEVICES % n == 0)  # 1, 2, 4, 8
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
RTOL = 1e-5

Layers = dict[str, em.EinMix]
Params = dict[str, dict[str, jax.Array]]


def make_layers(rules: dict | None = None) -> Layers:
    """One Mixer block and a pooling head; with ``rules``, each output is kept sharded by name."""
    sizes = dict(t=TOKENS, c=CHANNELS)
    layers = {
        "token_up": em.layer("b t c -> b g c", weight_shape="t g", bias_shape="g", g=TOKEN_HIDDEN, **sizes),
        "token_down": em.layer("b g c -> b t c", weight_shape="g t", bias_shape="t c", g=TOKEN_HIDDEN, **sizes),
        "channel_up": em.layer("b t c -> b t f", bias_shape="f", f=CHANNEL_HIDDEN, **sizes),
        "channel_down": em.layer("b t f -> b t c", bias_shape="c", f=CHANNEL_HIDDEN, **sizes),
        # 't' is in neither the weight nor the output: the head sum-pools the tokens
        "head": em.layer("b t c -> b k", weight_shape="c k", bias_shape="k", c=CHANNELS, k=OUTPUTS),
    }  # fmt: skip
    if rules is not None:
        layers = {name: em.with_out_sharding(layer, rules) for name, layer in layers.items()}
    return layers


def init_params(layers: Layers, key: jax.Array) -> Params:
    keys = jax.random.split(key, len(layers))
    return {name: layer.init(k) for (name, layer), k in zip(layers.items(), keys, strict=True)}


def _norm(x: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def forward(layers: Layers, params: Params, x: jax.Array) -> jax.Array:
    """``x`` (b, t, c) -> (b, k): token mixing, channel mixing (both residual), pooled head."""

    def mlp(first: str, second: str, h: jax.Array) -> jax.Array:
        return layers[second](params[second], jax.nn.gelu(layers[first](params[first], h)))

    x = x + mlp("token_up", "token_down", _norm(x))
    x = x + mlp("channel_up", "channel_down", _norm(x))
    return layers["head"](params["head"], _norm(x)) / TOKENS


def state_shardings(
    optimizer: optax.GradientTransformation, shardings: Any, replicated: Any
) -> Any:
    """The optimizer state's shardings: param-shaped leaves (Adam's moments) as their params."""
    abstract = jax.tree.map(
        lambda sharding, shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding),
        shardings,
        {name: layer.param_shapes for name, layer in make_layers().items()},
    )
    return optax.tree_utils.tree_map_params(
        optimizer,
        lambda _, param: param.sharding,
        jax.eval_shape(optimizer.init, abstract),
        abstract,
        transform_non_params=lambda _: replicated,
    )


def make_step(layers: Layers, optimizer: optax.GradientTransformation, out_shardings: Any = None):
    """The jitted train step; ``out_shardings`` keeps params and state where they were."""

    def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((forward(layers, params, x) - y) ** 2)

    def step(params: Params, state: optax.OptState, x: jax.Array, y: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, out_shardings=out_shardings)


@functools.cache
def make_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch: random inputs and the outputs of a random tanh-linear 'teacher' on them.

    numpy, so every process draws the same batch and nothing is compiled for it.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, TOKENS, CHANNELS), dtype=np.float32)
    teacher = rng.standard_normal((TOKENS * CHANNELS, OUTPUTS)) / np.sqrt(TOKENS * CHANNELS)
    return x, np.tanh(x.reshape(BATCH, -1) @ teacher).astype(np.float32)


def sharding_table(params: Params) -> str:
    rows = [("param", "shape", "PartitionSpec", "per device")]
    for layer, entries in params.items():
        for name, value in entries.items():
            block = value.sharding.shard_shape(value.shape)
            rows.append((f"{layer}.{name}", str(value.shape), str(value.sharding.spec), str(block)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def collective_counts(hlo: str) -> dict[str, int]:
    """How many of each collective op a compiled module runs, e.g. ``{'all-reduce': 3}``."""
    ops = re.findall(
        r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
        hlo,
    )
    return {op: ops.count(op) for op in sorted(set(ops))}


def make_mesh(axis_type: AxisType = AxisType.Auto) -> Mesh:
    """A ('data', 'model') mesh over every process's devices: 'model' of size 4, the rest 'data'."""
    n = jax.device_count()
    if n % MODEL or BATCH % (n // MODEL):
        raise SystemExit(f"needs a multiple of {MODEL} devices dividing batch {BATCH}, found {n}")
    return jax.make_mesh((n // MODEL, MODEL), ("data", "model"), axis_types=(axis_type,) * 2)


def global_batch(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One global array from this process's rows only, as a per-host data loader would give them.

    Here every process computes the whole (small) batch and keeps the rows its own devices hold.
    """
    indices = sharding.addressable_devices_indices_map(array.shape).values()
    start = min(index[0].start or 0 for index in indices)
    stop = max(index[0].stop or array.shape[0] for index in indices)
    return jax.make_array_from_process_local_data(sharding, array[start:stop], array.shape)


def gather(tree: Any) -> Any:
    """Every process gets the full value of every (global, possibly not addressable) array."""
    return multihost_utils.process_allgather(tree, tiled=True)


def train_sharded(
    steps: int, lr: float, seed: int, verbose: bool, axis_type: AxisType = AxisType.Auto
) -> tuple[list[float], Params, optax.OptState]:
    """Train on the global mesh; returns the losses and the final (sharded) params and state."""
    mesh = make_mesh(axis_type)
    layers = make_layers(RULES)
    shardings = {name: em.param_shardings(layer, RULES, mesh) for name, layer in layers.items()}
    params = jax.jit(lambda k: init_params(layers, k), out_shardings=shardings)(
        jax.random.key(seed)
    )
    x, y = make_data(seed)
    x = global_batch(x, NamedSharding(mesh, P("data")))
    y = global_batch(y, NamedSharding(mesh, P("data")))
    if verbose:
        print(f"mesh: {dict(mesh.shape)} ({axis_type.name}), {jax.process_count()} process(es), "
              f"devices\n{np.vectorize(lambda d: d.id)(mesh.devices)}")  # fmt: skip
        print(f"rules: {RULES}\n\n{sharding_table(params)}\n")
    optimizer = optax.adam(lr)
    losses = []
    with jax.set_mesh(mesh):
        opt_shardings = state_shardings(optimizer, shardings, NamedSharding(mesh, P()))
        state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
        step = make_step(layers, optimizer, (shardings, opt_shardings, NamedSharding(mesh, P())))
        step = step.lower(params, state, x, y).compile()
        if verbose:
            print(f"collectives in the compiled train step: {collective_counts(step.as_text())}\n")
        for _ in range(steps):
            params, state, loss = step(params, state, x, y)
            losses.append(float(loss))
    return losses, params, state


@functools.cache
def train_single(steps: int, lr: float, seed: int) -> tuple[list[float], Params, optax.OptState]:
    """The same training, unsharded, on this process's first device: the reference."""
    layers = make_layers()
    params = jax.jit(lambda k: init_params(layers, k))(jax.random.key(seed))
    x, y = make_data(seed)
    optimizer = optax.adam(lr)
    state, step, losses = optimizer.init(params), make_step(layers, optimizer), []
    for _ in range(steps):
        params, state, loss = step(params, state, x, y)
        losses.append(float(loss))
    return losses, params, state


def assert_trees_close(actual: Any, expected: Any, rtol: float = RTOL) -> None:
    leaves = jax.tree.leaves(actual)
    assert len(leaves) == len(jax.tree.leaves(expected))
    for a, b in zip(leaves, jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=1e-6)


# -- checkpoints: save from the multi-process run, restore onto another layout ---------------------


def save_checkpoint(directory: Path, params: Params, state: optax.OptState, info: dict) -> None:
    """Save params and optimizer state with orbax; every process writes the shards it holds."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        state_dir = directory.resolve() / "state"  # replaced if there: a rerun overwrites
        checkpointer.save(state_dir, {"params": params, "opt_state": state}, force=True)
        checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (directory / "run.json").write_text(json.dumps(info))


def target_shardings(mesh: Mesh | None, rules: dict) -> dict[str, dict[str, Any]]:
    """Each param's sharding on ``mesh`` by ``rules``; with no mesh, all on one device."""
    layers = make_layers()
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return {name: dict.fromkeys(layer.param_shapes, one) for name, layer in layers.items()}
    return {name: em.param_shardings(layer, rules, mesh) for name, layer in layers.items()}


def restore_checkpoint(directory: Path, shardings: dict, lr: float) -> tuple[Params, Any]:
    """Restore onto the layout ``shardings`` gives the params (the Adam moments follow them)."""
    import orbax.checkpoint as ocp

    layers = make_layers()
    abstract_params = {
        name: {
            key: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=shardings[name][key])
            for key, shape in layer.param_shapes.items()
        }
        for name, layer in layers.items()
    }
    optimizer = optax.adam(lr)
    one = jax.tree.leaves(shardings)[0]
    replicated = NamedSharding(one.mesh, P()) if isinstance(one, NamedSharding) else one
    abstract_state = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(optimizer.init, abstract_params),
        state_shardings(optimizer, shardings, replicated),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            directory.resolve() / "state", {"params": abstract_params, "opt_state": abstract_state}
        )
    return restored["params"], restored["opt_state"]


def restore_main(directory: Path, verbose: bool = True, reference: bool = True) -> dict:
    """Restore every run saved under ``directory`` onto 1 device and onto an (8,) 'model' mesh."""
    results = {}
    runs = sorted(p.parent for p in directory.glob("*/run.json"))
    if not runs:
        raise SystemExit(f"no checkpoint under {directory} (save one with --checkpoint)")
    model_mesh = jax.make_mesh((jax.device_count(),), ("model",), axis_types=(AxisType.Auto,))
    for run in runs:
        info = json.loads((run / "run.json").read_text())
        if reference:
            _, ref_params, ref_state = train_single(info["steps"], info["lr"], info["seed"])
        layouts = {
            "1 device": target_shardings(None, {}),
            f"mesh {dict(model_mesh.shape)}": target_shardings(
                model_mesh, {"g": "model", "f": "model"}
            ),
        }
        restored = {}
        for layout, shardings in layouts.items():
            params, state = restore_checkpoint(run, shardings, info["lr"])
            for value, sharding in zip(
                jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True
            ):
                assert value.sharding.is_equivalent_to(sharding, value.ndim), (layout, value)
            restored[layout] = (params, state)
            if reference:
                assert_trees_close((params, state), (ref_params, ref_state))
            if verbose:
                where = getattr(params["channel_up"]["weight"].sharding, "spec", "one device")
                agree = f"equal the 1-device run (rtol {RTOL})" if reference else "restored"
                print(f"{run.name}: restored onto {layout} (channel_up.weight: {where}); "
                      f"params and Adam state {agree}")  # fmt: skip
        (a, b) = restored.values()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        results[run.name] = restored
    if verbose:
        print("both layouts hold bit-identical values")
    return results


# -- processes: a worker per process, and a local launcher --------------------------------------


def worker_main(args: argparse.Namespace, verbose: bool) -> dict:
    """Train on the global mesh of all processes' devices, check against 1 device, save."""
    results = {}
    for name in args.axis_types:
        losses, params, state = train_sharded(
            args.steps, args.lr, args.seed, verbose, AXIS_TYPES[name]
        )
        gathered = gather({"params": params, "opt_state": state})  # every process takes part
        single_losses: list[float] = []
        if jax.process_index() == 0 and args.reference:  # the 1-device reference, once
            single_losses, single_params, single_state = train_single(
                args.steps, args.lr, args.seed
            )
            np.testing.assert_allclose(losses, single_losses, rtol=RTOL)
            assert_trees_close(gathered["params"], single_params)
            assert_trees_close(gathered["opt_state"], single_state)
        if verbose:
            print(loss_table(losses, single_losses))
        if args.checkpoint is not None:
            run = args.checkpoint / name
            info = {"steps": args.steps, "lr": args.lr, "seed": args.seed, "axis_type": name}
            save_checkpoint(run, params, state, info)
            if verbose:
                print(f"saved params and Adam state to {run} ({jax.process_count()} writers)\n")
        results[name] = {
            "losses": losses,
            "single_losses": single_losses,
            "params": params,
            "gathered": gathered,
        }
    if args.result is not None and jax.process_index() == 0:
        flat = {
            f"{name}/{k}": v for name, r in results.items() for k, v in flat_tree(r["gathered"])
        }
        losses_of = {f"{name}/losses": np.asarray(r["losses"]) for name, r in results.items()}
        np.savez(args.result, **flat, **losses_of)
    return results


def loss_table(losses: list[float], single_losses: list[float]) -> str:
    """Every 5th step's loss, next to the 1-device run's when there is one."""
    rows = ["step  sharded   1 device" if single_losses else "step  sharded"]
    for i, loss in enumerate(losses):
        if i % 5 == 0 or i == len(losses) - 1:
            single = f"  {single_losses[i]:.6f}" if single_losses else ""
            rows.append(f"{i:4d}  {loss:.6f}{single}")
    if single_losses:
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses, single_losses, strict=True))
        rows.append(f"sharded and 1-device runs agree (rtol {RTOL}; largest relative loss "
                    f"difference {diff:.1e})")  # fmt: skip
    return "\n".join(rows) + "\n"


def flat_tree(tree: Any) -> list[tuple[str, np.ndarray]]:
    """``(path, value)`` for each leaf, e.g. ``('params/head/bias', ...)``."""
    return [(jax.tree_util.keystr(path, simple=True, separator="/"), np.asarray(value))
            for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]]  # fmt: skip


def initialize(args: argparse.Namespace) -> None:
    """Join the distributed runtime; must come before any other JAX call."""
    if args.coordinator is None:  # a real cluster: SLURM, TPU pods, Kubernetes, MPI ...
        jax.distributed.initialize()
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        coordinator_bind_address=args.coordinator,  # loopback only, not every interface
        initialization_timeout=args.timeout,
        heartbeat_timeout_seconds=args.timeout,
        shutdown_timeout_seconds=args.timeout,
    )


class LaunchError(RuntimeError):
    """A worker process failed (its output is in the message) or the run timed out."""


class HostnameUnresolvable(LaunchError):
    """``gethostname()`` does not resolve: gloo, which binds to it, cannot run here."""


class Stopped(BaseException):
    """The launcher got ``signum`` (SIGTERM, SIGINT, SIGHUP); raised so that its cleanup runs.

    A ``BaseException``, as ``KeyboardInterrupt``: no ``except Exception`` swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM, SIGINT and SIGHUP into :class:`Stopped` while the block runs.

    Python runs no ``finally`` when a signal's default action ends the process; ``kill``,
    ``timeout`` and a cancelled CI job send SIGTERM. Outside the main thread (where Python
    cannot install handlers) the block runs unchanged: the workers watch their parent anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """Hold off SIGTERM, SIGINT and SIGHUP while the workers are being stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def watch_parent(parent: int, interval: float = 0.5) -> None:
    """End this worker once its launcher ``parent`` is gone, however it ended (SIGKILL too).

    An orphaned worker would otherwise train on alone, or wait for its peers until the heartbeat
    timeout. A daemon thread polls ``os.getppid()``: an orphan is adopted by another process.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        print(f"worker {os.getpid()}: launcher {parent} is gone, exiting", file=sys.stderr)
        os._exit(1)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(output: str) -> bool:
    return bool(re.search(r"address already in use|failed to (bind|add port)", output, re.I))


def check_hostname() -> None:
    """Raise :class:`HostnameUnresolvable` if gloo could not bind to this host's name."""
    try:
        socket.gethostbyname(socket.gethostname())
    except OSError as error:
        raise HostnameUnresolvable(
            f"gethostname() = {socket.gethostname()!r} does not resolve ({error}); gloo's CPU "
            "collectives bind to it: add it to /etc/hosts"
        ) from None


def launch(
    processes: int,
    worker_args: Sequence[str],
    timeout: float = 120.0,
    script: Path | None = None,
    verbose: bool = False,
) -> list[tuple[str, str]]:
    """Run ``processes`` local workers of ``script`` (this one) on 127.0.0.1; their (stdout, stderr).

    Each worker owns ``8 / processes`` simulated CPU devices. If one fails, the others are killed
    at once (they would wait for the heartbeat timeout); all are killed, by pid, on any exit of
    the launcher: an error, a timeout, SIGTERM / SIGINT / SIGHUP (raised as :class:`Stopped`
    after the workers are gone). Each worker also exits by itself once the launcher is gone
    (SIGKILL). A port picked free can be taken before the coordinator binds it: then the run is
    retried once. ``verbose`` prints the workers' pids as they start.
    """
    if processes < 1 or DEVICES % processes:
        raise LaunchError(f"--processes must divide {DEVICES}, got {processes}")
    check_hostname()
    for attempt in (1, 2):
        try:
            return _run_workers(processes, _free_port(), worker_args, timeout, script, verbose)
        except LaunchError as error:
            if attempt == 2 or not _port_taken(str(error)):
                raise
    raise AssertionError("unreachable")


def _run_workers(
    processes: int,
    port: int,
    worker_args: Sequence[str],
    timeout: float,
    script: Path | None,
    verbose: bool,
) -> list[tuple[str, str]]:
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
    )
    # the workers import the einmix_jax this process imported (a source checkout, say)
    path = [str(Path(em.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES // processes}".strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(p for p in path if p),
    }
    init_timeout = max(10, min(30, int(timeout / 2)))  # a hung peer fails the run in seconds
    with tempfile.TemporaryDirectory(prefix="einmix_workers_") as tmp:
        logs = [(Path(tmp) / f"{i}.out", Path(tmp) / f"{i}.err") for i in range(processes)]
        procs: list[subprocess.Popen] = []
        with stop_on_signals():
            try:
                for i, (out, err) in enumerate(logs):
                    command = [sys.executable, str(script or Path(__file__).resolve()), "--worker",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                               str(processes), "--process-id", str(i), "--timeout",
                               str(init_timeout), "--parent-pid", str(os.getpid()),
                               *worker_args]  # fmt: skip
                    with out.open("wb") as stdout, err.open("wb") as stderr:
                        procs.append(
                            subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
                        )
                if verbose:
                    print(f"workers: pids {', '.join(str(p.pid) for p in procs)} "
                          f"(coordinator 127.0.0.1:{port})", flush=True)  # fmt: skip
                failed = _wait_for(procs, timeout)
            finally:  # a failed worker's siblings, or all on a timeout / an error / a signal
                with signals_ignored():
                    for p in procs:
                        if p.poll() is None:
                            p.kill()
                    for p in procs:
                        p.wait(timeout=30)
        outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    if failed is None and any(p.returncode != 0 for p in procs):
        raise LaunchError(f"workers timed out after {timeout:.0f} s:\n{_tails(outputs)}")
    if failed is not None:
        raise LaunchError(
            f"worker {failed} of {processes} exited with code {procs[failed].returncode}; "
            f"the others were stopped:\n{_tails(outputs)}"
        )
    return outputs


def _wait_for(procs: list[subprocess.Popen], timeout: float) -> int | None:
    """Wait until every worker succeeded, one failed (its index) or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None or all(c == 0 for c in codes):
            return failed
        time.sleep(0.05)
    return None


def _tails(outputs: list[tuple[str, str]], lines: int = 15) -> str:
    return "\n".join(
        f"--- worker {i} ---\n" + "\n".join((out + err).strip().splitlines()[-lines:])
        for i, (out, err) in enumerate(outputs)
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    counts = f"{', '.join(map(str, PROCESS_COUNTS[:-1]))} or {PROCESS_COUNTS[-1]}"
    parser.add_argument("--processes", type=int, choices=PROCESS_COUNTS, metavar="N",
                        help=f"run N local processes of {DEVICES}/N devices each; N = {counts}")  # fmt: skip
    parser.add_argument("--axis-types", nargs="+", choices=sorted(AXIS_TYPES), default=["auto"],
                        help="mesh axis types to train with, in turn (default: auto)")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, help="save (or, with --restore, load) here")
    parser.add_argument("--restore", action="store_true", help="restore --checkpoint and check it")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="skip the 1-device run the results are checked against")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help="run as one process of many")
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # a worker's .npz, for tests
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)  # set by the local launcher
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # the local launcher
    args = parser.parse_args(argv)
    if args.restore and args.checkpoint is None:
        parser.error("--restore needs --checkpoint DIR")
    return args


def main(argv: Sequence[str] | None = None, verbose: bool = True) -> dict:
    args = parse_args(argv)
    if args.worker:
        if args.parent_pid is not None:
            watch_parent(args.parent_pid)
        initialize(args)
        verbose = verbose and jax.process_index() == 0
        results = worker_main(args, verbose)
        jax.distributed.shutdown()
        return results
    if args.processes is not None:
        forwarded = ["--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed),
                     "--axis-types", *args.axis_types]  # fmt: skip
        if not args.reference:
            forwarded.append("--no-reference")
        if args.checkpoint is not None:
            forwarded += ["--checkpoint", str(args.checkpoint.resolve())]
        if args.result is not None:
            forwarded += ["--result", str(args.result.resolve())]
        start = time.perf_counter()
        try:
            outputs = launch(args.processes, forwarded, verbose=verbose)
        except HostnameUnresolvable as error:
            print(f"skipped: {error}")
            return {"skipped": str(error)}
        except Stopped as stop:  # the workers are gone: end as the signal would have
            print(f"{stop}; the workers were stopped", file=sys.stderr, flush=True)
            signal.signal(stop.signum, signal.SIG_DFL)
            os.kill(os.getpid(), stop.signum)
            raise
        wall = time.perf_counter() - start
        if verbose:  # gloo's C++ code prints a line per connection to stdout
            print("".join(line for line in outputs[0][0].splitlines(True)
                          if not line.startswith("[Gloo]")), end="")  # fmt: skip
            agree = "all agree with 1 device" if args.reference else "done"
            print(f"{args.processes} process(es) x {DEVICES // args.processes} devices: "
                  f"{agree}; wall time {wall:.1f} s")  # fmt: skip
        return {"outputs": outputs, "wall": wall}
    if jax.device_count() < DEVICES:
        raise SystemExit(
            f"needs {DEVICES} devices, found {jax.device_count()}: JAX started before XLA_FLAGS"
        )
    if args.restore:
        return restore_main(args.checkpoint, verbose, args.reference)
    results = worker_main(args, verbose)
    first = results[args.axis_types[0]]
    return {"losses": first["losses"], "single_losses": first["single_losses"],
            "params": first["params"]}  # fmt: skip


if __name__ == "__main__":
    main()

"""Multi-process SPMD training: 2 OS processes x 4 simulated CPU devices, joined by JAX's distributed
runtime on 127.0.0.1, train examples/sharded_training.py's Mixer block on one global (2, 4) mesh
and must equal one device; their orbax checkpoint restores onto other layouts.

The workers and the launcher are the example's own (``launch`` runs ``--worker`` processes). The
2-process run happens once per module; its first port is one this test holds, so the launcher's
retry on a taken port is exercised by every run. The launcher's failure handling is checked with
stand-in worker scripts that start no JAX.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sharded_training.py"
STEPS, LR, SEED = 3, 3e-3, 0
TIMEOUT = 150  # seconds for the whole 2-process run; about 10-40 s here, depending on load


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("examples_sharded_training_mp", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _load()


@pytest.fixture(autouse=True)
def _standard_dtype_promotion():
    """optax's Adam computes ``decay ** count`` with an int32 count, as a user's script runs it."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Train with 2 processes (Auto, then Explicit axes), save checkpoints; the outputs and files."""
    try:
        example.check_hostname()
    except example.HostnameUnresolvable as error:
        pytest.skip(str(error))
    out = tmp_path_factory.mktemp("two_processes")
    held = socket.socket()  # a port that is taken: the first attempt must fail and be retried
    held.bind(("127.0.0.1", 0))
    held.listen()
    ports = [held.getsockname()[1]]
    free_port = example._free_port

    def pick() -> int:
        if len(ports) == 1 and not hasattr(pick, "used"):
            pick.used = True  # type: ignore[attr-defined]
            return ports[0]
        ports.append(free_port())
        return ports[-1]

    args = ["--steps", str(STEPS), "--lr", str(LR), "--seed", str(SEED),
            "--axis-types", "auto", "explicit", "--checkpoint", str(out / "ckpt"),
            "--result", str(out / "result.npz"), "--no-reference"]  # fmt: skip
    start = time.perf_counter()
    example._free_port = pick
    try:
        outputs = example.launch(2, args, timeout=TIMEOUT)
    finally:
        example._free_port = free_port
        held.close()
    wall = time.perf_counter() - start
    print(f"2-process run: {wall:.1f} s")
    return {"outputs": outputs, "dir": out, "ports": ports, "wall": wall}


def test_the_taken_port_was_retried_once(two_process_run):
    first, *rest = two_process_run["ports"]
    assert len(rest) == 1 and rest[0] != first


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_two_processes_equal_one_device(two_process_run, axis_type):
    result = np.load(two_process_run["dir"] / "result.npz")
    losses, params, state = example.train_single(STEPS, LR, SEED)  # unsharded, this process
    np.testing.assert_allclose(result[f"{axis_type}/losses"], losses, rtol=1e-5)
    expected = example.flat_tree({"params": params, "opt_state": state})
    assert len(expected) == 31  # 10 params, Adam's count, mu and nu
    for path, value in expected:
        np.testing.assert_allclose(result[f"{axis_type}/{path}"], value, rtol=1e-5, atol=1e-6)


def test_workers_report_the_global_mesh(two_process_run):
    (out0, _), (out1, _) = two_process_run["outputs"]
    assert "mesh: {'data': 2, 'model': 4} (Auto), 2 process(es)" in out0
    assert "mesh: {'data': 2, 'model': 4} (Explicit), 2 process(es)" in out0
    # Megatron-style MLPs: partial sums all-reduced, no split weight gathered
    assert out0.count("collectives in the compiled train step: {'all-reduce': 4}") == 2
    assert "mesh:" not in out1  # process 1 trains silently


def test_checkpoint_has_each_process_shards(two_process_run):
    state = two_process_run["dir"] / "ckpt" / "auto" / "state"
    assert {p.name for p in state.glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}


def test_checkpoint_restores_onto_one_device(two_process_run):
    run = two_process_run["dir"] / "ckpt" / "explicit"
    params, state = example.restore_checkpoint(run, example.target_shardings(None, {}), LR)
    result = np.load(two_process_run["dir"] / "result.npz")
    restored = example.flat_tree({"params": params, "opt_state": state})
    assert len(restored) == 31
    for path, value in restored:  # bit-equal to what the 2 processes held
        np.testing.assert_array_equal(value, result[f"explicit/{path}"])
    device = jax.devices()[0]
    assert all(leaf.devices() == {device} for leaf in jax.tree.leaves((params, state)))


def test_checkpoint_restores_onto_a_model_mesh_in_one_process(two_process_run):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(EXAMPLE.parents[1])}  # fmt: skip
    command = [sys.executable, str(EXAMPLE), "--restore", "--no-reference", "--checkpoint",
               str(two_process_run["dir"] / "ckpt")]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    for run in ("auto", "explicit"):
        assert (f"{run}: restored onto mesh {{'model': 8}} (channel_up.weight: "
                "P(None, 'model')); params and Adam state restored") in done.stdout  # fmt: skip
        assert f"{run}: restored onto 1 device (channel_up.weight: one device)" in done.stdout
    assert "both layouts hold bit-identical values" in done.stdout


# -- the launcher, with stand-in workers (no JAX) -------------------------------------------------

STAND_IN = """
import argparse, os, pathlib, sys, time
parser = argparse.ArgumentParser()
parser.add_argument("--process-id", type=int)
args, rest = parser.parse_known_args()
pathlib.Path(rest[-1], f"{{args.process_id}}.pid").write_text(str(os.getpid()))
{body}
"""


def _stand_in(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(STAND_IN.format(body=textwrap.dedent(body)))
    return script


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failed_worker_stops_its_siblings_at_once(tmp_path):
    script = _stand_in(tmp_path, """
        if args.process_id == 1:
            time.sleep(0.5)
            sys.exit("worker 1: out of memory")
        time.sleep(60)  # as a worker waiting for a dead peer until the heartbeat timeout
    """)  # fmt: skip
    start = time.perf_counter()
    with pytest.raises(example.LaunchError, match=r"(?s)worker 1 of 2 exited with code 1.*out of"):
        example.launch(2, [str(tmp_path)], timeout=60, script=script)
    assert time.perf_counter() - start < 15
    assert not _alive(int((tmp_path / "0.pid").read_text()))


def test_a_hung_run_times_out_and_is_killed(tmp_path):
    script = _stand_in(tmp_path, "time.sleep(60)")
    with pytest.raises(example.LaunchError, match="timed out after 2 s"):
        example.launch(4, [str(tmp_path)], timeout=2, script=script)
    for i in range(4):
        assert not _alive(int((tmp_path / f"{i}.pid").read_text()))


def test_a_port_taken_twice_is_an_error(tmp_path):
    script = _stand_in(tmp_path, """
        sys.exit("E add_port.cc:83] Failed to add port to server" if args.process_id == 0 else 0)
    """)  # fmt: skip
    with pytest.raises(example.LaunchError, match="Failed to add port"):
        example.launch(2, [str(tmp_path)], timeout=30, script=script)


def test_processes_must_divide_the_devices():
    with pytest.raises(example.LaunchError, match="--processes must divide 8, got 3"):
        example.launch(3, [])


@pytest.mark.parametrize(
    ("count", "message"),
    [
        (count, rf"invalid choice: '?{count}'? \(choose from 1, 2, 4, 8\)")
        for count in (3, 0, -1, 16)
    ]
    + [("two", "invalid int value: 'two'")],
)
def test_an_invalid_process_count_is_a_usage_error(count, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--processes", str(count)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    assert re.search(rf"error: argument --processes: {message}", err), err


def test_the_help_names_every_valid_process_count(capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    assert "1, 2, 4 or 8" in " ".join(capsys.readouterr().out.split())
    for count in (1, 2, 4, 8):
        assert example.parse_args(["--processes", str(count)]).processes == count


def test_an_unresolvable_hostname_skips_with_the_reason(monkeypatch, capsys):
    def unresolvable(name: str) -> str:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "gethostbyname", unresolvable)
    assert "skipped" in example.main(["--processes", "2"])
    printed = capsys.readouterr().out
    assert "skipped: gethostname() = " in printed and "does not resolve" in printed


# -- the launcher stopped from outside: its workers must go with it -------------------------------


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (``'Z'``: a zombie), ``None`` once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid``, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _running(pid: int) -> bool:
    return _state(pid) not in (None, "Z")  # an orphan's zombie may wait for a reaper


def _read_until(stream: Any, pattern: re.Pattern, seconds: float) -> re.Match | None:
    """Read the pipe ``stream`` until ``pattern`` matches what came, it closes, or time is up."""
    text, deadline = b"", time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and select.select([stream], [], [], left)[0]:
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            break
        text += chunk
        if found := pattern.search(text.decode(errors="replace")):
            return found
    return None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_stopped_launcher_ends_its_workers(signum, tmp_path):
    """As ``kill``, ``timeout``, Ctrl-C or a cancelled CI job stop it, mid-run (SIGKILL too)."""
    try:
        example.check_hostname()
    except example.HostnameUnresolvable as error:
        pytest.skip(str(error))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(EXAMPLE.parents[1]),
           "TMPDIR": str(tmp_path)}  # a killed launcher leaves its log folder there  # fmt: skip
    command = [sys.executable, str(EXAMPLE), "--processes", "2", "--steps", "1000000",
               "--no-reference"]  # fmt: skip
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE)
    pids: list[int] = []
    try:
        found = _read_until(launcher.stdout, re.compile(r"workers: pids (\d+), (\d+) "), 60)
        assert found, "the launcher printed no worker pids"
        pids = [int(pid) for pid in found.groups()]
        assert _children(launcher.pid) == sorted(pids)  # the pids printed are its children
        time.sleep(3)  # the workers import JAX, join and train
        assert all(_running(pid) for pid in pids)
        launcher.send_signal(signum)
        assert launcher.wait(timeout=30) == -signum  # it ends as the signal would end it
        deadline = time.monotonic() + 15  # the workers watch their parent every 0.5 s
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _running(pid)], f"workers running after {signum!r}"
        if signum != signal.SIGKILL:  # the launcher's own cleanup ran
            assert not list(tmp_path.glob("einmix_workers_*"))
    finally:
        for pid in [launcher.pid, *pids]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        assert launcher.stdout is not None
        launcher.stdout.close()

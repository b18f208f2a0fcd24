"""Run tests/multidevice on 8 simulated CPU devices, in a subprocess.

JAX fixes its device count when it starts, and the rest of the suite runs on one device, so the
8-device tests run in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; ``EINMIX_MULTIDEVICE=1`` lets the root
``conftest.py`` collect them there. To run them alone::

    EINMIX_MULTIDEVICE=1 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest tests/multidevice
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_multidevice_suite_passes_on_8_devices():
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "EINMIX_MULTIDEVICE": "1",
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip(),
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        # one process: this test already runs beside the suite's other workers
        [sys.executable, "-m", "pytest", "tests/multidevice", "-p", "no:cacheprovider", "-n", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"8-device tests failed:\n{output}"
    assert " passed" in output and "skipped" not in output, output

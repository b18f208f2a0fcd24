"""Shared test settings: strict dtype and rank promotion, as equinox's suite runs."""

import os

import jax
import jax.numpy as jnp
import pytest

import einmix_jax

# tests/multidevice needs 8 simulated devices, which must be set before JAX starts: the 1-device
# run skips collecting it and tests/test_multidevice.py runs it in a subprocess with
# EINMIX_MULTIDEVICE=1 and XLA_FLAGS=--xla_force_host_platform_device_count=8.
collect_ignore_glob = [] if os.environ.get("EINMIX_MULTIDEVICE") == "1" else ["tests/multidevice/*"]

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, einmix_jax=einmix_jax, em=einmix_jax)

"""Shared test settings: strict dtype and rank promotion, as equinox's suite runs."""

import jax
import jax.numpy as jnp
import pytest

import einmix_jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(jax=jax, jnp=jnp, einmix_jax=einmix_jax, em=einmix_jax)

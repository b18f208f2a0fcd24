"""The public door: what ``import einmix_jax`` brings in, and what it exports."""

import subprocess
import sys

import einmix_jax as em


def test_import_does_not_import_flax_or_equinox_until_their_layer_is_used():
    script = (
        "import sys, jax, jax.numpy as jnp, einmix_jax as em\n"
        "params, apply = em.init('b c -> b d', jax.random.key(0), c=2, d=3)\n"
        "apply(params, jnp.ones((1, 2)))\n"
        "assert 'flax' not in sys.modules, 'flax imported by the core'\n"
        "assert 'equinox' not in sys.modules, 'equinox imported by the core'\n"
        "em.linen.EinMix\n"
        "assert 'flax.linen' in sys.modules and 'equinox' not in sys.modules\n"
        "em.eqx.EinMix\n"
        "assert 'equinox' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_public_names():
    assert set(em.__all__) <= set(dir(em))
    assert em.linen.EinMix.__module__ == "einmix_jax.linen"
    assert em.nnx.EinMix.__module__ == "einmix_jax.nnx"
    assert em.eqx.EinMix.__module__ == "einmix_jax.eqx"

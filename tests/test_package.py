"""The public door: what ``import einmix_jax`` brings in, and what it exports."""

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

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


def test_built_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    """The wheel `python -m build` makes carries the package, py.typed and the license, and works
    when installed: a fresh virtual environment (reusing this environment's jax and flax, so
    nothing is downloaded) imports the installed copy, not this checkout."""
    root = Path(__file__).resolve().parent.parent
    dist, env = tmp_path / "dist", tmp_path / "venv"
    build = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)]
    subprocess.run([*build, str(root)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = dist.glob("einmix_jax-*.whl")
    assert wheel.name.startswith(f"einmix_jax-{em.__version__}-")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {
        "einmix_jax/py.typed",
        "einmix_jax/linen.py",
        "einmix_jax/nnx.py",
        "einmix_jax/eqx.py",
    } <= names
    assert f"einmix_jax-{em.__version__}.dist-info/licenses/LICENSE" in names

    venv.create(env, system_site_packages=True, with_pip=False)
    python = env / "bin" / "python"
    # When this interpreter is itself a virtual environment, its packages are not the system's:
    # name its site-packages in a .pth file (appended to sys.path, after the new environment's own).
    new_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(new_site, "outer_environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps"]
    subprocess.run([*install, "--force-reinstall", "-q", str(wheel)], check=True, cwd=tmp_path)
    script = (
        "import jax, jax.numpy as jnp, einmix_jax as em, einmix_jax.linen, einmix_jax.nnx\n"
        "from importlib.metadata import version\n"
        "from flax import nnx\n"
        "print(em.__file__, version('einmix-jax'), em.__version__)\n"
        "layer = em.nnx.EinMix('b c -> b d', bias_shape='d', c=3, d=2, rngs=nnx.Rngs(0))\n"
        "y = layer(jnp.ones((4, 3)))\n"
        "assert y.shape == (4, 2), y.shape\n"
        "assert jnp.allclose(y, layer.weight[...].sum(0) + layer.bias[...])\n"
    )
    result = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    location, installed_version, module_version = result.stdout.split()
    assert Path(location).is_relative_to(env), location
    assert installed_version == module_version == em.__version__

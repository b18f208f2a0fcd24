"""The public door: what ``import einmix_jax`` brings in, and what it exports; the extras."""

import ast
import functools
import importlib.metadata
import site
import subprocess
import sys
import venv
import zipfile
from collections.abc import Mapping
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import einmix_jax as em

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


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


def _installed_by(extra: str) -> set[str]:
    """The distributions ``pip install ".[extra]"`` brings: pyproject's dependencies and the
    extra's (the project's own extras expanded from pyproject, not from possibly stale installed
    metadata), and, as installed here, everything they require in turn."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = canonicalize_name(project["name"])
    seen: set[tuple[str, str]] = set()
    todo = [(name, extra)]
    while todo:
        dist, dist_extra = todo.pop()
        if (dist, dist_extra) in seen:
            continue
        seen.add((dist, dist_extra))
        if dist == name:
            requires = [
                *project["dependencies"],
                *project["optional-dependencies"].get(dist_extra, []),
            ]
            environment = {"extra": ""}
        else:
            try:
                requires = importlib.metadata.requires(dist) or []
            except importlib.metadata.PackageNotFoundError:
                continue
            environment = {"extra": dist_extra}
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(environment):
                todo += [(canonicalize_name(req.name), e) for e in ("", *req.extras)]
    return {dist for dist, _ in seen}


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The statements importing the module runs: not its functions' bodies (an import inside a
    function is needed only when the function is called)."""
    nodes, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            todo += [
                c
                for c in ast.iter_child_nodes(node)
                if isinstance(c, (ast.stmt, ast.excepthandler))
            ]
    return nodes


def _distributions(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _packages_distributions().get(module, [])}


@functools.cache
def _packages_distributions() -> Mapping[str, list[str]]:
    """``importlib.metadata.packages_distributions()``, read once: it scans every installed
    distribution's files (seconds), and the tests ask it of each import of the package."""
    return importlib.metadata.packages_distributions()


def test_docs_extra_alone_installs_what_the_docs_build_needs():
    """`pip install ".[docs]" && mkdocs build --strict` (the README's command, CI's docs job):
    mkdocs.yml's theme, plugins, handlers and Markdown extensions, every module the API pages
    render (the docs' griffe extension imports each public one: einmix_jax.eqx needs Equinox) and
    a signature formatter (mkdocstrings' separate signatures are one clipped line without ruff
    or black) all come with the docs extra."""
    docs = _installed_by("docs")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    entry_points = importlib.metadata.entry_points()
    needed = {
        f"theme {config['theme']['name']}": {
            canonicalize_name(e.dist.name)
            for e in entry_points.select(group="mkdocs.themes", name=config["theme"]["name"])
        }
    }
    for plugin in config["plugins"]:
        (plugin_name,) = plugin if isinstance(plugin, dict) else [plugin]
        needed[f"plugin {plugin_name}"] = {
            canonicalize_name(e.dist.name)
            for e in entry_points.select(group="mkdocs.plugins", name=plugin_name)
        }
        if plugin_name == "mkdocstrings":
            for handler in plugin[plugin_name]["handlers"]:
                needed[f"handler {handler}"] = {f"mkdocstrings-{handler}"}
    for extension in config["markdown_extensions"]:
        (extension_name,) = extension if isinstance(extension, dict) else [extension]
        if "." in extension_name:  # a bare name is one of Markdown's own (mkdocs requires it)
            needed[f"extension {extension_name}"] = _distributions(extension_name.split(".")[0])
    sources = [*(ROOT / "einmix_jax").glob("*.py"), *(ROOT / "docs" / "_ext").glob("*.py")]
    for source in sources:
        for node in _module_level(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "einmix_jax":
                    needed[f"{top} (imported by {source.relative_to(ROOT)})"] = _distributions(top)
    needed["a signature formatter"] = {"ruff", "black"}
    missing = [what for what, dists in needed.items() if not dists & docs]
    assert not missing, f"the docs extra does not install: {', '.join(missing)}"


def test_every_runtime_dependency_is_imported_by_the_package():
    """``pip install einmix-jax`` installs only what ``einmix_jax/`` imports (at any level: the
    Flax layers import Flax on first use): what only the tests or the examples use (optax, chex)
    belongs to their extras."""
    imported: set[str] = set()
    for source in (ROOT / "einmix_jax").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                imported |= _distributions(module.split(".")[0])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {canonicalize_name(Requirement(line).name) for line in project["dependencies"]}
    assert {"jax", "flax", "einops"} <= imported, imported  # the reading of imports works
    assert required <= imported, f"installed but never imported: {sorted(required - imported)}"
    for extra in ("test", "examples"):
        assert "optax" in _installed_by(extra), f"the {extra} extra does not install optax"
    assert "chex" in _installed_by("test")

"""The wheel stands alone: built from the sources, installed into a fresh virtual environment and
run from a folder outside the checkout, it finds its shipped presets, and nothing it imports or
reads comes from the checkout.

The fresh environment has no network, so it sees the already-installed dependencies (torch,
numpy, ...) through a ``.pth`` file listing their ``site-packages`` folders. Plain path lines in
a ``.pth`` file do not run the ``.pth`` files inside those folders, so an editable install of
flatminima there (its path entry or import finder) is not picked up; the test checks that.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import flatminima

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "flatminima"
# Files of the project the build reads besides src/ (the readme, the license file).
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("pip") is None or importlib.util.find_spec("setuptools") is None,
    reason="building the wheel offline needs pip and setuptools in this environment",
)


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel --no-deps --no-build-isolation`` on a copy of the sources (building in place
    would write build/ and *.egg-info into the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    dist = tmp_path_factory.mktemp("dist")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), "."],
        cwd=source,
    )
    wheels = sorted(dist.glob("flatminima-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = f"flatminima-{flatminima.__version__}.dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
    assert wheel.name == f"flatminima-{flatminima.__version__}-py3-none-any.whl"
    assert f"\nVersion: {flatminima.__version__}\n" in metadata  # one version, from __init__
    assert "License-Expression: MIT" in metadata
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "flatminima/py.typed" in names
    presets = {f"flatminima/presets/{p.name}" for p in (PACKAGE / "presets").glob("*.yaml")}
    assert "flatminima/presets/fashion-quick.yaml" in presets and presets <= names
    # Every module of the source tree is packaged (a subpackage without __init__.py would not be).
    modules = {
        p.relative_to(PACKAGE.parent).as_posix()
        for p in PACKAGE.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules <= names, sorted(modules - names)
    assert not any(n.startswith(("tests/", "src/", "docs/")) for n in names)


def _dependency_dirs() -> list[str]:
    """The site-packages folders of this interpreter (where torch, numpy, ... live)."""
    dirs = [p for p in sys.path if p and Path(p).name in ("site-packages", "dist-packages")]
    return [p for p in dict.fromkeys(dirs) if Path(p).is_dir()]


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A new venv with the wheel installed; returns (venv, its site-packages)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_run([str(python), "-I", "-c", code]).stdout.strip())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)])
    (purelib / "_flatminima_test_dependencies.pth").write_text("\n".join(_dependency_dirs()))
    return venv, purelib


def _clean_env(venv: Path, home: Path) -> dict[str, str]:
    """An environment with no path to the checkout: no PYTHONPATH, no config folders."""
    return {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(home),
        "MPLCONFIGDIR": str(home / "mpl"),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "LC_ALL": "C.UTF-8",
    }


_PROBE = """
import importlib.metadata, importlib.resources, json, sys
import flatminima
from flatminima.studies.presets import find_preset
print(json.dumps({
    "file": flatminima.__file__,
    "version": flatminima.__version__,
    "dist_version": importlib.metadata.version("flatminima"),
    "presets": str(importlib.resources.files("flatminima.presets")),
    "fashion_quick": str(find_preset("fashion-quick")),
    "sys_path": sys.path,
    "finders": [type(f).__name__ for f in sys.meta_path],
}))
"""


def test_installed_wheel_imports_from_the_fresh_venv(
    fresh_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    venv, purelib = fresh_venv
    env = _clean_env(venv, tmp_path)
    assert not any(str(REPO) in value for value in env.values())
    assert not _inside(tmp_path, REPO)
    out = _run([str(venv / "bin" / "python"), "-c", _PROBE], cwd=tmp_path, env=env).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    for key in ("file", "presets", "fashion_quick"):
        assert _inside(probe[key], purelib), (key, probe[key])
        assert not _inside(probe[key], REPO / "src"), (key, probe[key])
    assert probe["version"] == probe["dist_version"] == flatminima.__version__
    assert not any(_inside(p, REPO / "src") for p in probe["sys_path"] if p)
    assert str(REPO) not in probe["sys_path"] and "" not in probe["sys_path"][1:]
    assert not any("editable" in name.lower() for name in probe["finders"])


def test_installed_wheel_runs_a_shipped_preset_outside_the_checkout(
    fresh_venv: tuple[Path, Path], tmp_path: Path
) -> None:
    pytest.importorskip("sklearn")  # the digits data set
    venv, purelib = fresh_venv
    work = tmp_path / "work"
    work.mkdir()
    cmd = [str(venv / "bin" / "flatminima"), "--threads", "1", "compare"]
    cmd += ["--preset", "fashion-quick", "--data", "digits", "--train-subset", "256"]
    cmd += ["--optimizers", "sgd", "--seeds", "1", "--budget", "grad-evals"]
    cmd += ["--budget-epochs", "1", "--flatness-samples", "100", "--flatness-draws", "1"]
    cmd += ["--sigmas", "0.1", "--set", "augment=false", "--set", "train_eval_samples=100"]
    cmd += ["--set", "eval_points=1", "--no-progress", "--out", "report"]
    proc = _run(cmd, cwd=work, env=_clean_env(venv, tmp_path))
    assert str(REPO) not in proc.stdout + proc.stderr
    text = (work / "report" / "results.json").read_text()
    assert str(REPO) not in text
    results = json.loads(text)
    preset = Path(results["settings"]["preset"])
    assert preset.name == "fashion-quick.yaml" and _inside(preset, purelib)
    (row,) = [r for r in results["table"] if r["optimizer"] == "sgd"]
    assert math.isfinite(float(row["test_error"])) and int(row["samples"]) > 0
    assert (work / "report" / "report.md").is_file()

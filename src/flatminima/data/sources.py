"""Where data-set files are found, and how to obtain them.

Search order for a data set ``name``:

1. the explicit ``root`` argument,
2. ``$FLATMINIMA_DATA``,
3. the Debian package folder (``/usr/share/datasets/fashion-mnist`` from ``dataset-fashion-mnist``;
   ``/usr/share/datasets/mnist`` if present),
4. the download cache ``$XDG_CACHE_HOME/flatminima`` (default ``~/.cache/flatminima``).

Inside each base folder ``B`` the files may sit in a sub-folder named like the data set
(``B/fashion-mnist``, ``B/cifar-10-batches-py``, ...), in torchvision's layout
(``B/FashionMNIST/raw``) or directly in ``B``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "SYNTHETIC_DATASETS",
    "IDX_FILES",
    "SYSTEM_DIRS",
    "data_home",
    "default_cache_dir",
    "how_to_obtain",
    "locate_dataset",
    "describe_datasets",
    "check_name",
]

logger = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = (
    "fashion-mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "tiny-imagenet",
    "digits",
    "gmm",
    "teacher-student",
)
IMAGE_DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet")
SYNTHETIC_DATASETS: tuple[str, ...] = ("gmm", "teacher-student")

#: IDX file stems (train images, train labels, test images, test labels); ``.gz`` optional.
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: System-wide folders (Debian ``dataset-*`` packages) searched after ``$FLATMINIMA_DATA``.
SYSTEM_DIRS: dict[str, list[Path]] = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}

_SUBDIRS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", "."),
    "mnist": ("mnist", "MNIST/raw", "MNIST", "."),
    "cifar10": (
        "cifar-10-batches-py",
        "cifar10/cifar-10-batches-py",
        "cifar10",
        "cifar-10",
        ".",
    ),
    "cifar100": ("cifar-100-python", "cifar100/cifar-100-python", "cifar100", "cifar-100", "."),
    "tiny-imagenet": (
        "tiny-imagenet-200",
        "tiny-imagenet/tiny-imagenet-200",
        "tiny-imagenet",
        ".",
    ),
}

_HOW_TO: dict[str, str] = {
    "fashion-mnist": (
        "Install the Debian package 'dataset-fashion-mnist' (files in "
        "/usr/share/datasets/fashion-mnist), or put the four *-ubyte.gz files from "
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/ "
        "(github.com/zalandoresearch/fashion-mnist) into $FLATMINIMA_DATA/fashion-mnist, "
        "or pass download=True when online."
    ),
    "mnist": (
        "Put the four *-ubyte.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
        "(mirror of http://yann.lecun.com/exdb/mnist/) into $FLATMINIMA_DATA/mnist, "
        "or pass download=True when online."
    ),
    "cifar10": (
        "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
        "$FLATMINIMA_DATA (it creates cifar-10-batches-py/), or pass download=True when online."
    ),
    "cifar100": (
        "Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into "
        "$FLATMINIMA_DATA (it creates cifar-100-python/), or pass download=True when online."
    ),
    "tiny-imagenet": (
        "Download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into "
        "$FLATMINIMA_DATA (it creates tiny-imagenet-200/); automatic download is not supported."
    ),
    "digits": "Install scikit-learn (pip install flatminima[digits]); the data ship with it.",
    "gmm": "Synthetic: generated on the fly.",
    "teacher-student": "Synthetic: generated on the fly.",
}


def check_name(name: str) -> str:
    """Return ``name`` if it is a known data set, else raise ValueError listing the valid names."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r} (valid: {', '.join(DATASETS)})")
    return name


def how_to_obtain(name: str) -> str:
    """Human-readable instructions for obtaining the files of ``name``."""
    return _HOW_TO[check_name(name)]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/flatminima``, default ``~/.cache/flatminima``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flatminima"


def data_home(root: str | os.PathLike | None = None) -> Path:
    """Folder that downloads go to: ``root``, else ``$FLATMINIMA_DATA``, else the cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("FLATMINIMA_DATA")
    return Path(env).expanduser() if env else default_cache_dir()


def _has_idx(d: Path) -> bool:
    return all((d / s).is_file() or (d / (s + ".gz")).is_file() for s in IDX_FILES)


_CHECKS: dict[str, Callable[[Path], bool]] = {
    "fashion-mnist": _has_idx,
    "mnist": _has_idx,
    "cifar10": lambda d: all(
        (d / f).is_file() for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    ),
    "cifar100": lambda d: all((d / f).is_file() for f in ("train", "test", "meta")),
    "tiny-imagenet": lambda d: (d / "wnids.txt").is_file() and (d / "train").is_dir(),
}


def _base_dirs(name: str, root: str | os.PathLike | None) -> list[tuple[Path, bool]]:
    """Base folders in search order; the flag says whether to look inside sub-folders."""
    bases: list[tuple[Path, bool]] = []
    if root is not None:
        bases.append((Path(root).expanduser(), True))
    env = os.environ.get("FLATMINIMA_DATA")
    if env:
        bases.append((Path(env).expanduser(), True))
    bases += [(p, False) for p in SYSTEM_DIRS.get(name, [])]
    bases.append((default_cache_dir(), True))
    return bases


def locate_dataset(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """Folder holding the files of ``name``, or ``None`` if not found (nothing is downloaded).

    ``digits`` and the synthetic sets have no files and always give ``None``.

    Raises:
        ValueError: unknown ``name``.
    """
    check_name(name)
    if name not in _CHECKS:
        return None
    check = _CHECKS[name]
    for base, nested in _base_dirs(name, root):
        for sub in _SUBDIRS[name] if nested else (".",):
            d = base / sub if sub != "." else base
            if d.is_dir() and check(d):
                return d
    return None


def describe_datasets(root: str | os.PathLike | None = None) -> list[dict]:
    """Availability of every data set, for ``flatminima data``.

    Returns:
        One dict per name in :data:`DATASETS` with ``name``, ``found`` (bool), ``path`` (str or
        None), ``kind`` (``"images"`` or ``"synthetic"``) and ``notes`` (what the set is and,
        when missing, how to obtain it).
    """
    about = {
        "fashion-mnist": "70000 28x28 grayscale, 10 classes (60000 train / 10000 test)",
        "mnist": "70000 28x28 grayscale digits, 10 classes (60000 train / 10000 test)",
        "cifar10": "60000 32x32 RGB, 10 classes (50000 train / 10000 test)",
        "cifar100": "60000 32x32 RGB, 100 fine classes (50000 train / 10000 test)",
        "tiny-imagenet": "110000 64x64 RGB, 200 classes (100000 train / 10000 val used as test)",
        "digits": "1797 8x8 grayscale digits from scikit-learn, 10 classes (seeded 20% test)",
        "gmm": "Gaussian mixture x = y v/sqrt(N) + sqrt(Delta) z, 2 classes",
        "teacher-student": "Gaussian inputs labelled by a random teacher MLP",
    }
    rows = []
    for name in DATASETS:
        path: Path | None = None
        if name in SYNTHETIC_DATASETS:
            found, kind = True, "synthetic"
        elif name == "digits":
            found, kind = importlib.util.find_spec("sklearn") is not None, "images"
        else:
            path = locate_dataset(name, root)
            found, kind = path is not None, "images"
        notes = about[name] if found else f"{about[name]}. Not found: {how_to_obtain(name)}"
        rows.append(
            {
                "name": name,
                "found": found,
                "path": str(path) if path else None,
                "kind": kind,
                "notes": notes,
            }
        )
    return rows

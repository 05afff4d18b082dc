"""Where data-set files are found, and how to obtain them.

Search order for a data set ``name``:

1. the explicit ``root`` argument (``--data-root``); when given, *only* this folder is searched,
2. else ``$FLATMINIMA_DATA``; when set, *only* this folder is searched,
3. else the Debian package folder (``/usr/share/datasets/fashion-mnist`` from
   ``dataset-fashion-mnist``; ``/usr/share/datasets/mnist`` if present), then the download cache
   ``$XDG_CACHE_HOME/flatminima`` (default ``~/.cache/flatminima``).

A folder the user named never falls back to another one: a missing or incomplete user folder is
an error (see :func:`explain_missing`), so a run never trains on other data than the user meant.

Inside each base folder ``B`` the files may sit in a sub-folder named like the data set
(``B/fashion-mnist``, ``B/cifar-10-batches-py``, ...), in torchvision's layout
(``B/FashionMNIST/raw``) or directly in ``B``. IDX files (MNIST, Fashion-MNIST) are found under
the names mirrors ship them with (:func:`find_idx_files`): ``train-images-idx3-ubyte`` or
``train-images.idx3-ubyte``, gzipped or not, any letter case, in the folder or its ``raw/``.
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
    "explain_missing",
    "find_idx_files",
    "how_to_obtain",
    "idx_lookalikes",
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
        "or run `flatminima data --download fashion-mnist` when online (Python: download=True)."
    ),
    "mnist": (
        "Put the four *-ubyte.gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
        "(mirror of http://yann.lecun.com/exdb/mnist/) into $FLATMINIMA_DATA/mnist, "
        "or run `flatminima data --download mnist` when online (Python: download=True)."
    ),
    "cifar10": (
        "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into "
        "$FLATMINIMA_DATA (it creates cifar-10-batches-py/), or run "
        "`flatminima data --download cifar10` when online (Python: download=True)."
    ),
    "cifar100": (
        "Download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and extract it into "
        "$FLATMINIMA_DATA (it creates cifar-100-python/), or run "
        "`flatminima data --download cifar100` when online (Python: download=True)."
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


def _idx_key(filename: str) -> str:
    """The canonical stem a file name stands for: lower case, no ``.gz``, ``.idx`` -> ``-idx``."""
    key = filename.lower()
    key = key[:-3] if key.endswith(".gz") else key
    return key.replace(".idx", "-idx")


def _files(d: Path) -> list[Path]:
    """Files directly in ``d`` and in ``d/raw`` (sorted; ``.gz`` before the plain file)."""
    out: list[Path] = []
    for folder in (d, d / "raw"):
        try:
            entries = sorted(folder.iterdir(), key=lambda p: (_idx_key(p.name), p.suffix != ".gz"))
        except OSError:  # missing, not a folder, or unreadable
            continue
        out += [p for p in entries if p.is_file()]
    return out


def find_idx_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The IDX files of :data:`IDX_FILES` found in ``folder`` (or its ``raw/``), by stem.

    A file matches a stem ``S`` (e.g. ``train-images-idx3-ubyte``) under the usual variants of
    its name: ``S`` or ``S`` with a dot before ``idx`` (``train-images.idx3-ubyte``), with or
    without ``.gz``, in any letter case. Files directly in ``folder`` win over ``raw/``, a gzipped
    file over a plain one.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "Train-Images.idx3-ubyte").write_bytes(b"")
        >>> find_idx_files(d)["train-images-idx3-ubyte"].name
        'Train-Images.idx3-ubyte'
    """
    found: dict[str, Path] = {}
    for path in _files(Path(folder)):
        key = _idx_key(path.name)
        if key in IDX_FILES and key not in found:
            found[key] = path
    return found


def idx_lookalikes(folder: str | os.PathLike) -> list[Path]:
    """Files in ``folder`` (or its ``raw/``) that look like IDX data but match no known name."""
    words = ("ubyte", "idx", "images", "labels", "t10k")
    return [
        p
        for p in _files(Path(folder))
        if any(w in p.name.lower() for w in words) and _idx_key(p.name) not in IDX_FILES
    ]


def _has_idx(d: Path) -> bool:
    return len(find_idx_files(d)) == len(IDX_FILES)


_CHECKS: dict[str, Callable[[Path], bool]] = {
    "fashion-mnist": _has_idx,
    "mnist": _has_idx,
    "cifar10": lambda d: all(
        (d / f).is_file() for f in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
    ),
    "cifar100": lambda d: all((d / f).is_file() for f in ("train", "test", "meta")),
    "tiny-imagenet": lambda d: (d / "wnids.txt").is_file() and (d / "train").is_dir(),
}


def user_root(root: str | os.PathLike | None = None) -> tuple[Path, str] | None:
    """The folder the user named (``root``, else ``$FLATMINIMA_DATA``) and how it was named."""
    if root is not None:
        return Path(root).expanduser(), f"data root {Path(root)}"
    env = os.environ.get("FLATMINIMA_DATA")
    if env:
        return Path(env).expanduser(), f"$FLATMINIMA_DATA={env}"
    return None


def _base_dirs(name: str, root: str | os.PathLike | None) -> list[tuple[Path, bool]]:
    """Base folders in search order; the flag says whether to look inside sub-folders."""
    named = user_root(root)
    if named is not None:  # a folder the user named: that folder only, never a fallback
        return [(named[0], True)]
    bases = [(p, False) for p in SYSTEM_DIRS.get(name, [])]
    bases.append((default_cache_dir(), True))
    return bases


def _candidates(name: str, root: str | os.PathLike | None) -> list[Path]:
    """Every folder searched for ``name``, in order."""
    out = []
    for base, nested in _base_dirs(name, root):
        for sub in _SUBDIRS[name] if nested else (".",):
            out.append(base / sub if sub != "." else base)
    return out


def locate_dataset(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """Folder holding the files of ``name``, or ``None`` if not found (nothing is downloaded).

    ``digits`` and the synthetic sets have no files and always give ``None``. When ``root`` is
    given (or ``$FLATMINIMA_DATA`` is set) only that folder and its sub-folders are searched.

    Raises:
        ValueError: unknown ``name``.
    """
    check_name(name)
    if name not in _CHECKS:
        return None
    check = _CHECKS[name]
    for d in _candidates(name, root):
        if d.is_dir() and check(d):
            return d
    return None


def explain_missing(name: str, root: str | os.PathLike | None = None) -> str:
    """Why ``name`` was not found: the folders searched, what they lack, look-alike files.

    For IDX sets it names the missing files of an incomplete folder and lists files that look
    like the data set but match no known name (e.g. ``train_images.bin``).
    """
    check_name(name)
    named = user_root(root)
    if named is not None and not named[0].is_dir():
        what = "is not a folder" if named[0].exists() else "does not exist"
        return f"{named[1]}: the folder {what}"
    where = named[1] if named else "system folders and the cache " + str(default_cache_dir())
    notes = [f"searched {where}"]
    if name in ("fashion-mnist", "mnist"):
        seen: set[Path] = set()
        for d in _candidates(name, root):
            found = find_idx_files(d)
            odd = [p for p in idx_lookalikes(d) if p not in seen]
            if set(found.values()) - seen:
                missing = [s for s in IDX_FILES if s not in found]
                notes.append(f"{d} is incomplete: missing {', '.join(missing)}[.gz]")
            if odd:
                notes.append(
                    f"{d} holds files that look like IDX data but match no known name: "
                    f"{', '.join(p.name for p in odd[:8])} (expected e.g. "
                    "train-images-idx3-ubyte[.gz] or train-images.idx3-ubyte)"
                )
            seen.update(found.values(), odd)
    return "; ".join(notes)


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
        why = f"{explain_missing(name, root)}. " if kind == "images" and name != "digits" else ""
        notes = about[name] if found else f"{about[name]}. Not found: {why}{how_to_obtain(name)}"
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

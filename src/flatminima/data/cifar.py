"""Readers for the CIFAR-10 / CIFAR-100 "python version" pickle folders.

Layout (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):
``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` with keys ``b"data"``
(``N x 3072`` uint8, rows are R, G, B planes of 32 x 32) and ``b"labels"``;
``cifar-100-python/{train, test, meta}`` with ``b"fine_labels"`` (100 classes) and
``b"coarse_labels"`` (20 super-classes).

The pickles are read with a restricted unpickler that only rebuilds numpy arrays, so a
tampered file cannot run code.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["read_cifar10", "read_cifar100", "read_cifar_batch"]

logger = logging.getLogger(__name__)

CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_META_FILE = "batches.meta"
CIFAR100_FILES = ("train", "test", "meta")

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals numpy arrays need."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR pickle")


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable CIFAR pickle ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def read_cifar_batch(
    path: str | os.PathLike, label_key: bytes = b"labels", num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR pickle batch into ``x`` uint8 ``[N, 3, 32, 32]`` and ``y`` int64 ``[N]``.

    Args:
        path: the pickle file (e.g. ``data_batch_1`` or ``train``).
        label_key: ``b"labels"`` (CIFAR-10), ``b"fine_labels"`` or ``b"coarse_labels"`` (CIFAR-100).
        num_classes: labels must lie in ``[0, num_classes)``.

    Raises:
        FileNotFoundError: missing file.
        ValueError: unreadable pickle, missing keys, ``data`` not ``N x 3072`` uint8, label count
            differing from ``N``, or labels out of range; the message names the file.
    """
    path = Path(path)
    obj = _load_pickle(path)
    if b"data" not in obj or label_key not in obj:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in obj)
        raise ValueError(
            f"{path}: missing key b'data' or {label_key!r} in CIFAR batch (found keys {keys})"
        )
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: CIFAR data must be an N x 3072 uint8 array, found {desc}")
    if data.shape[1] != 3072:
        raise ValueError(
            f"{path}: CIFAR data must have 3072 = 3*32*32 columns, found shape {data.shape}"
        )
    labels = np.asarray(obj[label_key])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(
            f"{path}: {labels.size} labels for {data.shape[0]} images (counts must match)"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{path}: labels must lie in [0, {num_classes}), found range "
            f"[{labels.min()}, {labels.max()}]"
        )
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _read_names(path: Path, key: bytes) -> list[str]:
    if not path.is_file():
        logger.warning("CIFAR meta file %s not found; class names unavailable", path)
        return []
    obj = _load_pickle(path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in obj.get(key, [])]


def read_cifar10(
    folder: str | os.PathLike,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read a ``cifar-10-batches-py`` folder.

    Returns:
        ``(x_train, y_train, x_test, y_test, class_names)``: uint8 ``[50000, 3, 32, 32]``,
        int64 ``[50000]``, uint8 ``[10000, 3, 32, 32]``, int64 ``[10000]`` for the real data set,
        and the 10 names from ``batches.meta`` (empty if that file is absent).

    Raises:
        FileNotFoundError: a batch file is missing (named in the message).
        ValueError: a batch is malformed (see :func:`read_cifar_batch`).
    """
    folder = Path(folder)
    parts = [read_cifar_batch(folder / f, b"labels", 10) for f in CIFAR10_TRAIN_FILES]
    x_test, y_test = read_cifar_batch(folder / CIFAR10_TEST_FILE, b"labels", 10)
    names = _read_names(folder / CIFAR10_META_FILE, b"label_names")
    x_train = torch.cat([p[0] for p in parts])
    y_train = torch.cat([p[1] for p in parts])
    return x_train, y_train, x_test, y_test, names


def read_cifar100(
    folder: str | os.PathLike, *, coarse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read a ``cifar-100-python`` folder (fine labels by default).

    Args:
        folder: the ``cifar-100-python`` folder holding ``train``, ``test`` and ``meta``.
        coarse: use the 20 ``coarse_labels`` instead of the 100 ``fine_labels``.

    Returns:
        ``(x_train, y_train, x_test, y_test, class_names)`` as in :func:`read_cifar10`.

    Raises:
        FileNotFoundError: ``train`` or ``test`` missing.
        ValueError: a file is malformed.
    """
    folder = Path(folder)
    key, k = (b"coarse_labels", 20) if coarse else (b"fine_labels", 100)
    x_train, y_train = read_cifar_batch(folder / "train", key, k)
    x_test, y_test = read_cifar_batch(folder / "test", key, k)
    names_key = b"coarse_label_names" if coarse else b"fine_label_names"
    names = _read_names(folder / "meta", names_key)
    return x_train, y_train, x_test, y_test, names

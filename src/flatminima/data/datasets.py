"""In-memory data sets and :func:`load_dataset`, the one entry point the training loop uses."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cifar import read_cifar10, read_cifar100
from .download import REMOTE_FILES, DownloadError, download_file, extract_tar
from .idx import read_idx
from .sources import (
    IDX_FILES,
    SYNTHETIC_DATASETS,
    check_name,
    data_home,
    explain_missing,
    find_idx_files,
    how_to_obtain,
    locate_dataset,
)
from .synthetic import gaussian_mixture, teacher_student

__all__ = ["ArrayDataset", "DataSplits", "DatasetNotFoundError", "download_dataset", "load_dataset"]

logger = logging.getLogger(__name__)

# Seed streams: each random step has its own generator so that, e.g., changing train_subset
# leaves the validation split unchanged.
_STREAM_VAL, _STREAM_SUBSET, _STREAM_DIGITS = 0, 1, 4
# The label-noise streams live far from 0, 1, 2, ...: TensorLoader draws epoch e's order from
# SeedSequence([seed, e]) over the same training set, so a small stream id s made epoch s's order
# of a run whose loader seed equals the data seed (seed 0) the flip order itself: that epoch
# began with every flipped sample (all labels wrong) and ended with the clean ones. Ids 2 and 3
# were used before this fix; the other ids never share a permutation size with the loader.
_STREAM_NOISE_WHO, _STREAM_NOISE_WHAT = 0x6E6F6973, 0x6E6F6974


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set were not found (the message says how to obtain them)."""


@dataclass
class ArrayDataset:
    """A data set held as two tensors on one device.

    Attributes:
        x: float32 inputs, ``[N, C, H, W]`` for images or ``[N, D]`` for vectors.
        y: int64 class labels ``[N]``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ArrayDataset: x has {self.x.shape[0]} samples but y has {self.y.shape[0]}"
            )
        if self.y.ndim != 1:
            raise ValueError(f"ArrayDataset: y must be 1-D, got shape {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: str | torch.device) -> ArrayDataset:
        """Copy to ``device`` (no copy when already there)."""
        return ArrayDataset(self.x.to(device), self.y.to(device))


@dataclass
class DataSplits:
    """Train / validation / test splits of one data set plus what the model needs to know.

    Attributes:
        name: data-set name (one of :data:`DATASETS`).
        train, val, test: the splits; ``val`` is ``None`` when ``val_size == 0``.
        num_classes: number of classes ``K`` (labels in ``[0, K)``).
        input_shape: ``(C, H, W)`` for images, ``(D,)`` for vectors.
        source: where the data came from (a folder, ``"scikit-learn"`` or ``"synthetic"``).
        mean, std: per-channel statistics used to normalise (``None`` when not normalised).
        files: the data files read (IDX sets: train images, train labels, test images, test
            labels); empty for generated sets and where not recorded.
    """

    name: str
    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    source: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    files: tuple[str, ...] = ()


def _generator(seed: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ----------------------------------------------------------------------------- raw readers
# Each returns (x_train, y_train, x_test, y_test, num_classes, source[, files]); images are uint8
# [N, C, H, W] (scaled to [0, 1] later), vectors float32 [N, D].


def _obtain(name: str, root: str | os.PathLike | None, download: bool) -> Path:
    folder = locate_dataset(name, root)
    if folder is not None:
        logger.info("%s: using files in %s", name, folder)
        return folder
    if not download or name not in REMOTE_FILES:  # how_to_obtain names the download command
        raise DatasetNotFoundError(
            f"data set {name!r} not found ({explain_missing(name, root)}). {how_to_obtain(name)}"
        )
    return download_dataset(name, root)


def download_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> Path:
    """Download ``name``'s files (checksummed) into ``root`` (default :func:`data_home`).

    Files already there with the right checksum are kept; archives (CIFAR) are extracted.

    Args:
        name: a data set with known URLs (``fashion-mnist``, ``mnist``, ``cifar10``,
            ``cifar100``).
        root: destination base folder; IDX sets go to ``root/NAME``.
        progress: called as ``progress(filename, bytes_done, bytes_total_or_None)``.

    Returns:
        The folder holding the data set's files.

    Raises:
        ValueError: unknown name, a name without known URLs, or a checksum mismatch.
        DatasetNotFoundError: every mirror failed (offline); the message says how to obtain the
            files by hand.
    """
    check_name(name)
    if name not in REMOTE_FILES:
        raise ValueError(
            f"no download is known for {name!r} (downloadable: {', '.join(REMOTE_FILES)}). "
            f"{how_to_obtain(name)}"
        )
    home = data_home(root)
    try:
        if name in ("fashion-mnist", "mnist"):
            for remote in REMOTE_FILES[name]:
                download_file(remote, home / name, how_to=how_to_obtain(name), progress=progress)
        else:
            (remote,) = REMOTE_FILES[name]
            archive = download_file(remote, home, how_to=how_to_obtain(name), progress=progress)
            extract_tar(archive, home)
    except DownloadError as err:
        raise DatasetNotFoundError(str(err)) from err
    folder = locate_dataset(name, home)
    if folder is None:  # pragma: no cover - archive layout changed upstream
        raise DatasetNotFoundError(f"downloaded {name!r} into {home} but its files are missing")
    return folder


def _check_idx_pair(x: torch.Tensor, y: torch.Tensor, xpath: Path, ypath: Path) -> None:
    """Images ``[N, H, W]`` uint8 and labels ``[N]`` integers in [0, 9], or a ValueError naming
    the file and what is wrong."""
    if x.ndim != 3 or x.dtype != torch.uint8:
        raise ValueError(
            f"{xpath}: not an IDX image file: expected uint8 images [N, H, W], found "
            f"{x.dtype} {tuple(x.shape)}"
        )
    if y.ndim != 1 or y.dtype.is_floating_point:
        raise ValueError(
            f"{ypath}: not an IDX label file: expected integer labels [N], found "
            f"{y.dtype} {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{ypath}: {y.shape[0]} labels but {xpath.name} holds {x.shape[0]} images "
            "(the counts must agree; a truncated or mismatched file?)"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) > 9):
        bad = y[(y < 0) | (y > 9)]
        raise ValueError(
            f"{ypath}: {bad.numel()} labels outside the classes 0..9 (e.g. {int(bad[0])})"
        )


def _load_idx_set(folder: Path) -> tuple:
    found = find_idx_files(folder)
    paths = [found[s] for s in IDX_FILES]
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    _check_idx_pair(x_train, y_train, paths[0], paths[1])
    _check_idx_pair(x_test, y_test, paths[2], paths[3])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{paths[2]}: test images are {tuple(x_test.shape[1:])} but training images "
            f"{tuple(x_train.shape[1:])}"
        )
    return (
        x_train[:, None],
        y_train.long(),
        x_test[:, None],
        y_test.long(),
        10,
        str(folder),
        tuple(str(p) for p in paths),
    )


def _load_digits(seed: int) -> tuple:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "the 'digits' data set needs scikit-learn: pip install flatminima[digits]"
        ) from err
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # pixel values 0..16
    y = torch.as_tensor(d.target, dtype=torch.int64)
    # No official split: a seeded 20% test split (fixed per seed).
    perm = torch.randperm(len(y), generator=_generator(seed, _STREAM_DIGITS))
    n_test = round(0.2 * len(y))
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[tr], y[tr], x[te], y[te], 10, "scikit-learn"


def _load_raw(name: str, root, download: bool, seed: int, synthetic_kwargs: dict) -> tuple:
    if name in SYNTHETIC_DATASETS:
        fn = gaussian_mixture if name == "gmm" else teacher_student
        try:
            x_tr, y_tr, x_te, y_te, _ = fn(seed=seed, **synthetic_kwargs)
        except TypeError as err:
            raise ValueError(f"bad keyword argument for data set {name!r}: {err}") from err
        k = 2 if name == "gmm" else synthetic_kwargs.get("num_classes", 2)
        return x_tr, y_tr, x_te, y_te, k, "synthetic"
    if synthetic_kwargs:
        raise ValueError(
            f"data set {name!r} takes no extra keyword arguments, got {sorted(synthetic_kwargs)} "
            f"(these are for {', '.join(SYNTHETIC_DATASETS)})"
        )
    if name == "digits":
        return _load_digits(seed)
    folder = _obtain(name, root, download)
    if name in ("fashion-mnist", "mnist"):
        return _load_idx_set(folder)
    if name == "cifar10":
        x_tr, y_tr, x_te, y_te, _ = read_cifar10(folder)
        return x_tr, y_tr, x_te, y_te, 10, str(folder)
    if name == "cifar100":
        x_tr, y_tr, x_te, y_te, _ = read_cifar100(folder)
        return x_tr, y_tr, x_te, y_te, 100, str(folder)
    from .tiny_imagenet import read_tiny_imagenet

    x_tr, y_tr, x_te, y_te, wnids = read_tiny_imagenet(folder)
    return x_tr, y_tr, x_te, y_te, len(wnids), str(folder)


# ----------------------------------------------------------------------------- transforms


def _check_args(val_size, train_subset, label_noise, seed) -> None:
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be an int (count) or float (fraction), got {val_size!r}")
    if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
        raise ValueError(f"val_size as a fraction must lie in [0, 1), got {val_size}")
    if isinstance(val_size, int) and val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if train_subset is not None and (
        isinstance(train_subset, bool) or not isinstance(train_subset, int) or train_subset <= 0
    ):
        raise ValueError(f"train_subset must be a positive integer or None, got {train_subset!r}")
    if not isinstance(label_noise, (int, float)) or not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {label_noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _flip_labels(y: torch.Tensor, fraction: float, num_classes: int, seed: int) -> torch.Tensor:
    """Replace ``round(fraction * N)`` labels by a uniformly random *different* class."""
    n = len(y)
    k = round(fraction * n)
    if k == 0:
        return y
    who = torch.randperm(n, generator=_generator(seed, _STREAM_NOISE_WHO))[:k]
    # y + s mod K with s uniform in {1..K-1} is uniform over the K-1 other classes.
    shift = torch.randint(1, num_classes, (k,), generator=_generator(seed, _STREAM_NOISE_WHAT))
    y = y.clone()
    y[who] = (y[who] + shift) % num_classes
    return y


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std over all but the channel axis, in float64."""
    dims = (0, 2, 3) if x.ndim == 4 else (0,)
    xd = x.double()
    mean = xd.mean(dim=dims)
    std = xd.std(dim=dims, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant channel: leave its scale
    return mean, std


def _normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    return ((x - mean.view(shape).float()) / std.view(shape).float()).contiguous()


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_size: int | float = 0,
    train_subset: int | None = None,
    label_noise: float = 0.0,
    normalize: bool = True,
    seed: int = 0,
    download: bool = False,
    device: str | torch.device = "cpu",
    **synthetic_kwargs,
) -> DataSplits:
    """Load a data set into memory as train / validation / test tensors.

    Steps, in order (each seeded by ``seed`` through its own generator):

    1. read the files (see :func:`locate_dataset` for the search order) or generate the
       synthetic set; image pixels are scaled to ``[0, 1]``;
    2. ``val``: ``val_size`` samples (or that fraction of the training set) drawn uniformly
       without replacement from the training set (no stratification); the rest is ``train``;
    3. ``train_subset``: keep that many samples of ``train``, drawn uniformly (original order);
    4. ``label_noise``: exactly ``round(label_noise * len(train))`` training labels ``y`` are
       replaced by ``(y + s) mod K``, ``s`` uniform in ``{1..K-1}``, i.e. a uniformly random
       *different* class (symmetric noise); val and test labels stay clean;
    5. ``normalize``: ``x <- (x - mean_c) / std_c`` with per-channel mean and population std of
       the final ``train`` split, applied to all splits. Synthetic sets (``gmm``,
       ``teacher-student``) are never normalised: their scale is part of the model
       (``Delta``, ``1/sqrt(N)``), so ``mean`` and ``std`` are ``None`` for them.

    Args:
        name: one of :data:`DATASETS`.
        root: folder searched first (and where downloads go).
        val_size: validation samples carved from the training set: a count or a fraction.
        train_subset: keep only this many training samples (after the validation split).
        label_noise: fraction of training labels flipped to a different class.
        normalize: standardise per channel with training statistics.
        seed: seed for splits, subset, noise and synthetic data.
        download: fetch missing files (checksummed; fails fast when offline).
        device: device of the returned tensors.
        **synthetic_kwargs: options of :func:`gaussian_mixture` (``gmm``) or
            :func:`teacher_student` (``teacher-student``), e.g. ``dim``, ``num_train``,
            ``alpha``, ``delta``.

    Returns:
        :class:`DataSplits`.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), bad argument values,
            keyword arguments for a non-synthetic set, or malformed files.
        DatasetNotFoundError: files not found (the message says how to obtain them).
        ImportError: an optional dependency (Pillow, scikit-learn) is missing.

    Example:
        >>> s = load_dataset("gmm", dim=50, num_train=200, num_test=100, val_size=0.1)
        >>> len(s.train), len(s.val), s.input_shape
        (180, 20, (50,))
    """
    check_name(name)
    _check_args(val_size, train_subset, label_noise, seed)
    x_tr, y_tr, x_te, y_te, k, source, *files = _load_raw(
        name, root, download, seed, synthetic_kwargs
    )
    if x_tr.dtype == torch.uint8:
        x_tr, x_te = x_tr.float().div_(255.0), x_te.float().div_(255.0)
    x_tr, x_te = x_tr.float(), x_te.float()

    n = len(y_tr)
    n_val = math.floor(val_size * n) if isinstance(val_size, float) else val_size
    if n_val >= n:
        raise ValueError(f"val_size={val_size} leaves no training samples ({n} available)")
    val = None
    if n_val > 0:
        perm = torch.randperm(n, generator=_generator(seed, _STREAM_VAL))
        vi, ti = perm[:n_val].sort().values, perm[n_val:].sort().values
        val = ArrayDataset(x_tr[vi], y_tr[vi])
        x_tr, y_tr = x_tr[ti], y_tr[ti]
    if train_subset is not None:
        if train_subset > len(y_tr):
            raise ValueError(
                f"train_subset={train_subset} exceeds the {len(y_tr)} training samples available"
            )
        keep = torch.randperm(len(y_tr), generator=_generator(seed, _STREAM_SUBSET))
        keep = keep[:train_subset].sort().values
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if label_noise > 0:
        y_tr = _flip_labels(y_tr, float(label_noise), k, seed)

    mean = std = None
    if normalize and name not in SYNTHETIC_DATASETS:
        m, s = _channel_stats(x_tr)
        x_tr, x_te = _normalize(x_tr, m, s), _normalize(x_te, m, s)
        if val is not None:
            val = ArrayDataset(_normalize(val.x, m, s), val.y)
        mean, std = tuple(m.tolist()), tuple(s.tolist())

    splits = DataSplits(
        name=name,
        train=ArrayDataset(x_tr, y_tr).to(device),
        val=val.to(device) if val is not None else None,
        test=ArrayDataset(x_te, y_te).to(device),
        num_classes=int(k),
        input_shape=tuple(x_tr.shape[1:]),
        source=source,
        mean=mean,
        std=std,
        files=tuple(files[0]) if files else (),
    )
    logger.info(
        "%s: train %d, val %d, test %d, %d classes, input %s, from %s",
        name,
        len(splits.train),
        0 if val is None else len(val),
        len(splits.test),
        k,
        splits.input_shape,
        source,
    )
    return splits

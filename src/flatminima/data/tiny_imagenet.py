"""Reader for the Tiny ImageNet standard layout (Stanford CS231n, 200 classes, 64 x 64 RGB).

Layout::

    tiny-imagenet-200/wnids.txt                      one WordNet id per line (class order)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 training images per class
    tiny-imagenet-200/val/images/*.JPEG              10000 validation images
    tiny-imagenet-200/val/val_annotations.txt        "<file>\\t<wnid>\\t<bbox...>"

The official test split has no labels, so the labelled ``val`` split is returned as the test set.
Needs Pillow (``pip install flatminima[images]``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["read_tiny_imagenet"]

logger = logging.getLogger(__name__)


def _require_pillow():
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Tiny ImageNet needs Pillow to decode JPEG files: pip install flatminima[images]"
        ) from err
    return Image


def _read_images(files: list[Path], size: int) -> torch.Tensor:
    Image = _require_pillow()
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")  # some Tiny ImageNet images are grayscale
                if im.size != (size, size):
                    raise ValueError(f"{f}: image size {im.size}, expected ({size}, {size})")
                out[i] = np.asarray(im)
        except OSError as err:
            raise ValueError(f"{f}: cannot decode image ({err})") from err
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_tiny_imagenet(
    folder: str | os.PathLike, *, image_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read a ``tiny-imagenet-200`` folder into uint8 tensors ``[N, 3, 64, 64]``.

    Args:
        folder: the ``tiny-imagenet-200`` folder.
        image_size: expected side length (64 for the real data set).

    Returns:
        ``(x_train, y_train, x_val, y_val, wnids)``; labels index ``wnids`` (the order of
        ``wnids.txt``).

    Raises:
        ImportError: Pillow is not installed.
        FileNotFoundError: ``wnids.txt``, a class folder or ``val_annotations.txt`` is missing.
        ValueError: an annotation names an unknown wnid or an image cannot be decoded.
    """
    folder = Path(folder)
    _require_pillow()
    wnids_file = folder / "wnids.txt"
    if not wnids_file.is_file():
        raise FileNotFoundError(f"Tiny ImageNet class list not found: {wnids_file}")
    wnids = [w.strip() for w in wnids_file.read_text().splitlines() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}

    train_files: list[Path] = []
    train_labels: list[int] = []
    for w in wnids:
        d = folder / "train" / w / "images"
        if not d.is_dir():
            raise FileNotFoundError(f"Tiny ImageNet training folder not found: {d}")
        files = sorted(d.glob("*.JPEG"))
        train_files += files
        train_labels += [index[w]] * len(files)

    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"Tiny ImageNet validation annotations not found: {ann}")
    val_files: list[Path] = []
    val_labels: list[int] = []
    for lineno, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise ValueError(f"{ann}:{lineno}: unknown or missing wnid in line {line!r}")
        val_files.append(folder / "val" / "images" / parts[0])
        val_labels.append(index[parts[1]])

    logger.info("decoding %d + %d Tiny ImageNet images", len(train_files), len(val_files))
    x_train = _read_images(train_files, image_size)
    x_val = _read_images(val_files, image_size)
    y_train = torch.tensor(train_labels, dtype=torch.int64)
    y_val = torch.tensor(val_labels, dtype=torch.int64)
    return x_train, y_train, x_val, y_val, wnids

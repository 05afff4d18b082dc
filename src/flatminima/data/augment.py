"""Batched data augmentation: random crop with zero padding and horizontal flip."""

from __future__ import annotations

import torch

__all__ = ["Augment", "default_augment"]


class Augment:
    """Random crop of a zero-padded image plus random horizontal flip, for a whole batch at once.

    For each image ``x_i`` (``[C, H, W]``) with padding ``p``: pad by ``p`` zeros on every side,
    draw offsets ``(a_i, b_i)`` uniform in ``{0..2p}^2`` and keep
    ``padded[:, a_i:a_i+H, b_i:b_i+W]``, i.e. ``x_i`` shifted by ``(p - a_i, p - b_i)`` with zero
    fill; then mirror the width axis with probability 1/2. This is the standard CIFAR recipe
    (He et al., 2016, "Deep residual learning for image recognition").

    Random draws come from the given CPU ``generator`` in a fixed order, so a run is reproducible
    and independent of the data's device: ``offsets = randint(0, 2p+1, (N, 2))`` (rows
    ``(a_i, b_i)``; skipped when ``p = 0``), then ``flip = rand(N) < 0.5`` (skipped when
    ``hflip=False``).

    Args:
        crop_padding: zero padding ``p`` >= 0 (0 disables cropping).
        hflip: enable random horizontal flips.

    Raises:
        ValueError: ``crop_padding`` negative or not an integer.

    Example:
        >>> aug = Augment(crop_padding=4)
        >>> aug(torch.zeros(8, 3, 32, 32), torch.Generator().manual_seed(0)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(self, crop_padding: int = 4, hflip: bool = True) -> None:
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise ValueError(f"crop_padding must be a non-negative integer, got {crop_padding!r}")
        self.crop_padding = crop_padding
        self.hflip = bool(hflip)

    def __repr__(self) -> str:
        return f"Augment(crop_padding={self.crop_padding}, hflip={self.hflip})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``x`` of shape ``[N, C, H, W]``; returns a new tensor of that shape.

        Raises:
            ValueError: ``x`` is not 4-dimensional.
        """
        if x.ndim != 4:
            raise ValueError(f"Augment expects images [N, C, H, W], got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        p = self.crop_padding
        if p == 0 and not self.hflip:
            return x
        dev = x.device
        if p > 0:
            off = torch.randint(0, 2 * p + 1, (n, 2), generator=generator).to(dev)
        else:
            off = torch.zeros(n, 2, dtype=torch.int64, device=dev)
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(dev)
        else:
            flip = torch.zeros(n, dtype=torch.bool, device=dev)
        # Crop and flip as one gather over the flattened padded plane:
        # out[i, :, r, s] = padded[i, :, a_i + r, b_i + (W - 1 - s if flip_i else s)].
        w2 = w + 2 * p
        padded = torch.nn.functional.pad(x, (p, p, p, p)) if p > 0 else x
        r = torch.arange(h, device=dev)
        s = torch.arange(w, device=dev)
        col = torch.where(flip[:, None], (w - 1) - s, s) + off[:, 1, None]  # [N, W]
        row = (off[:, 0, None] + r) * w2  # [N, H]
        idx = (row[:, :, None] + col[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
        out = padded.reshape(n, c, -1).gather(2, idx)
        return out.reshape(n, c, h, w)


def default_augment(name: str) -> Augment | None:
    """The augmentation used by default for data set ``name``.

    - ``cifar10``, ``cifar100``: crop with padding 4 + flip (the standard recipe);
    - ``tiny-imagenet``: crop with padding 8 (same 1/8 of the side as CIFAR's 4/32) + flip;
    - ``fashion-mnist``: crop with padding 2 + flip (garments stay garments when mirrored);
    - ``mnist``: crop with padding 2, no flip (mirrored digits are not digits);
    - ``digits`` (8 x 8, too small to crop), ``gmm``, ``teacher-student``: ``None``.

    Raises:
        ValueError: unknown ``name``.
    """
    from .sources import check_name

    check_name(name)
    table = {
        "cifar10": Augment(4, True),
        "cifar100": Augment(4, True),
        "tiny-imagenet": Augment(8, True),
        "fashion-mnist": Augment(2, True),
        "mnist": Augment(2, False),
    }
    return table.get(name)

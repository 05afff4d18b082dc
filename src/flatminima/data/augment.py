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
        if p > 0:
            off = torch.randint(0, 2 * p + 1, (n, 2), generator=generator).to(x.device)
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = off[:, 0, None] + torch.arange(h, device=x.device)  # [N, H]
            cols = off[:, 1, None] + torch.arange(w, device=x.device)  # [N, W]
            idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * p)
            x = padded.gather(2, idx_r)
            x = x.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


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

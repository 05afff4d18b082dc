"""Minibatches of an in-memory :class:`ArrayDataset` without per-sample Python work."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from .augment import Augment
from .datasets import ArrayDataset

__all__ = ["TensorLoader"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


def _seeded(seed: int, *key: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TensorLoader:
    """Iterates over minibatches ``(x[idx], y[idx])`` of a data set, on the data set's device.

    The loader is a cursor over a seeded stream of epochs. Epoch ``e`` uses the permutation
    ``torch.randperm(N)`` drawn from a CPU generator seeded by ``(seed, e)``, and batch ``b`` of
    it is augmented with a CPU generator seeded by ``(seed, e, b)``; so the stream depends only on
    ``seed`` and the cursor ``(epoch, batch)``, not on the device or on how the run was split.
    Each ``iter()`` continues from the cursor: normally the start of the next epoch; after an
    abandoned iteration or :meth:`load_state_dict` of a mid-epoch state, the rest of that epoch.
    Every batch is one index operation on the device (no per-sample Python).

    Args:
        dataset: the data (any device).
        batch_size: samples per batch.
        shuffle: draw a fresh permutation each epoch (else original order).
        drop_last: drop the final incomplete batch.
        augment: optional :class:`Augment` applied to each input batch (image data only).
        seed: seed of the stream.

    Raises:
        ValueError: ``batch_size`` not a positive integer, or ``augment`` with non-image data.

    Example:
        >>> ds = ArrayDataset(torch.randn(10, 3), torch.arange(10))
        >>> [len(y) for _, y in TensorLoader(ds, 4)]
        [4, 4, 2]
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment is not None and dataset.x.ndim != 4:
            raise ValueError(
                f"augment needs image data [N, C, H, W], got x of shape {tuple(dataset.x.shape)}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.epoch = 0  # epoch the cursor is in
        self.batch = 0  # batches of that epoch already produced

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n, device=self.dataset.x.device)
        perm = torch.randperm(n, generator=_seeded(self.seed, epoch))
        return perm.to(self.dataset.x.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start, nb = self.epoch, self.batch, len(self)
        order = self._order(epoch)
        x, y, bs = self.dataset.x, self.dataset.y, self.batch_size
        for b in range(start, nb):
            idx = order[b * bs : (b + 1) * bs]
            xb = x[idx]
            if self.augment is not None:
                xb = self.augment(xb, _seeded(self.seed, epoch, b))
            self.batch = b + 1
            yield xb, y[idx]
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict:
        """The cursor and the settings it depends on: ``seed``, ``epoch``, ``batch``, ...

        The random generators are derived from ``(seed, epoch, batch)``, so this is their full
        state.
        """
        epoch, batch = self.epoch, self.batch
        if batch >= len(self):  # all batches of this epoch produced: the next one starts fresh
            epoch, batch = epoch + 1, 0
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "epoch": epoch,
            "batch": batch,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the cursor: the next ``iter()`` continues exactly where the saved run was.

        Raises:
            ValueError: missing keys, or a state saved with a different ``batch_size``,
                ``shuffle``, ``drop_last`` or data-set size (the stream would differ).
        """
        missing = {"seed", "epoch", "batch", "batch_size", "num_samples"} - set(state)
        if missing:
            raise ValueError(f"TensorLoader state is missing keys {sorted(missing)}")
        for key, mine in (
            ("batch_size", self.batch_size),
            ("shuffle", self.shuffle),
            ("drop_last", self.drop_last),
            ("num_samples", len(self.dataset)),
        ):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"TensorLoader state has {key}={state[key]!r} but this loader has {mine!r}"
                )
        if not 0 <= int(state["batch"]) <= len(self) or int(state["epoch"]) < 0:
            raise ValueError(
                f"TensorLoader state has an invalid cursor epoch={state['epoch']}, "
                f"batch={state['batch']} (batches per epoch: {len(self)})"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.batch = int(state["batch"])

"""Shared machinery of the studies: data cache, training a run folder, cached flatness measures.

Every study trains through :func:`flatminima.train.train` on a run folder, so a finished run is
skipped and a partial one resumes. Measurements of a finished network are cached in the run
folder's ``flatness.json``, keyed by their settings: a re-run with the same settings reads them
back, a change of settings re-measures only what changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatminima.data import DataSplits
from flatminima.flatness import hessian_trace, local_energy, local_free_entropy
from flatminima.train import DivergenceError, TrainConfig, train
from flatminima.train.loop import load_data, load_run
from flatminima.train.run_folder import RunFolder

log = logging.getLogger(__name__)

FLATNESS = RunFolder.FLATNESS


class DataCache:
    """Loads each distinct data split once (splits depend on the data keys and the seed only)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, DataSplits] = {}

    @staticmethod
    def key(cfg: TrainConfig) -> tuple:
        return (
            cfg.data,
            cfg.data_root,
            repr(sorted(cfg.data_kwargs.items())),
            cfg.val_size,
            cfg.train_subset,
            cfg.label_noise,
            cfg.seed,
        )

    def get(self, cfg: TrainConfig) -> DataSplits:
        key = self.key(cfg)
        if key not in self._cache:
            self._cache[key] = load_data(cfg, torch.device("cpu"))
        return self._cache[key]


def is_complete(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a run of exactly ``cfg`` that used up its budget."""
    return RunFolder(run_dir).is_complete(cfg)


def train_run(cfg: TrainConfig, run_dir: Path, data: DataCache) -> dict[str, Any]:
    """Train (or resume, or skip) one run and return its summary.

    A run that diverges (non-finite loss) does not stop the study: its summary has
    ``status: diverged`` and is returned as is, also on a re-run (training is deterministic, so
    it would diverge again).
    """
    folder = RunFolder(run_dir)
    summary = folder.finished_summary(cfg)
    if summary is not None:
        log.info("skipping finished run %s (%s)", run_dir, summary["status"])
        return summary
    try:
        return train(cfg, run_dir, data=data.get(cfg), progress=False)
    except DivergenceError as exc:
        log.warning("run %s diverged: %s", run_dir, exc)
        return folder.summary() or {"status": "diverged", "message": str(exc)}


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The per-epoch rows of ``metrics.csv`` as floats (empty cells -> NaN)."""
    return RunFolder(run_dir).read_metrics()


def load_network(cfg: TrainConfig, run_dir: Path, data: DataCache) -> tuple[nn.Module, DataSplits]:
    """The evaluated network of a finished run (the model, or the rSGD/eSGD centre) and its data.

    Raises:
        FileNotFoundError: the run folder has no checkpoint.
    """
    trainer = load_run(run_dir, cfg.device, data=data.get(cfg))
    return next(iter(trainer.eval_models().values())), trainer.data


@dataclass
class MeasureSettings:
    """What to measure on each finished network, and how.

    Attributes:
        sigmas: local-energy noise strengths (multiplicative noise).
        n_draws: noise draws per sigma.
        n_samples: the first ``n_samples`` training samples are the fixed measurement subset.
        seed: seed of every measure's private generator (the same for every run: common random
            numbers across the compared networks).
        hessian_samples: Hutchinson probes for the Hessian trace (0: not measured).
        free_entropy: settings of :func:`flatminima.flatness.local_free_entropy` (``gamma``,
            ``beta`` and sampler options), or ``None`` for not measured.
    """

    sigmas: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
    n_draws: int = 5
    n_samples: int = 2000
    seed: int = 0
    hessian_samples: int = 0
    free_entropy: dict[str, Any] | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad value."""
        if not self.sigmas:
            raise ValueError("sigmas is empty; give at least one noise strength, e.g. 0.1,0.2")
        for s in self.sigmas:
            if not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
                raise ValueError(f"Invalid sigma {s!r}: must be a finite number >= 0")
        for name in ("n_draws", "n_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name} value: {v!r} (must be an integer >= 1)")
        if (
            isinstance(self.hessian_samples, bool)
            or not isinstance(self.hessian_samples, int)
            or self.hessian_samples < 0
        ):
            raise ValueError(
                f"Invalid hessian_samples value: {self.hessian_samples!r} (integer >= 0)"
            )


def measure_run(
    cfg: TrainConfig, run_dir: Path, data: DataCache, settings: MeasureSettings
) -> dict[str, Any]:
    """Flatness of a finished run's evaluated network, cached in ``run_dir/flatness.json``.

    Measures (each only when asked for and not cached with the same settings):

    * ``local_energy``: :func:`flatminima.flatness.local_energy` at ``settings.sigmas`` on the
      fixed subset (first ``n_samples`` training samples), BatchNorm in eval mode;
    * ``hessian_trace``: Hutchinson estimate of ``tr H`` of the mean cross-entropy on the subset;
    * ``free_entropy``: ``Phi(w; gamma, beta)`` by thermodynamic integration on the subset.

    Returns:
        ``{"local_energy": LocalEnergyResult.to_dict(), "hessian_trace": {...},
        "free_entropy": {...}}`` (the measures asked for).
    """
    folder = RunFolder(run_dir)
    cache: dict[str, Any] = folder.read_json(FLATNESS) or {}
    summary = folder.summary() or {}
    stamp = {"steps": summary.get("steps"), "config": cfg.numerics()}
    n = settings.n_samples
    wanted: dict[str, dict[str, Any]] = {
        "local_energy": {
            "sigmas": [float(s) for s in settings.sigmas],
            "n_draws": settings.n_draws,
            "n_samples": n,
            "seed": settings.seed,
        },
    }
    if settings.hessian_samples:
        wanted["hessian_trace"] = {
            "n_probes": settings.hessian_samples,
            "n_samples": n,
            "seed": settings.seed,
        }
    if settings.free_entropy is not None:
        wanted["free_entropy"] = {**settings.free_entropy, "n_samples": n, "seed": settings.seed}
    todo = [k for k, s in wanted.items() if cache.get(k, {}).get("settings") != {**s, **stamp}]
    if todo:
        model, splits = load_network(cfg, run_dir, data)
        dev = next(model.parameters()).device
        m = min(n, len(splits.train))
        xy = (splits.train.x[:m].to(dev), splits.train.y[:m].to(dev))
        bs = cfg.eval_batch_size
        for key in todo:
            if key == "local_energy":
                res = local_energy(
                    model,
                    xy,
                    settings.sigmas,
                    n_draws=settings.n_draws,
                    seed=settings.seed,
                    batch_size=bs,
                ).to_dict()
            elif key == "hessian_trace":
                res = hessian_trace(
                    model,
                    F.cross_entropy,
                    xy,
                    n_samples=settings.hessian_samples,
                    seed=settings.seed,
                    batch_size=bs,
                ).to_dict()
            else:
                opts = dict(settings.free_entropy or {})
                gamma, beta = float(opts.pop("gamma")), float(opts.pop("beta"))
                res = local_free_entropy(
                    model, xy, gamma, beta, seed=settings.seed, batch_size=bs, **opts
                ).to_dict()
            cache[key] = {"settings": {**wanted[key], **stamp}, "result": res}
            log.info("measured %s of %s", key, run_dir)
        folder.write_json(FLATNESS, cache)
    return {k: cache[k]["result"] for k in wanted}

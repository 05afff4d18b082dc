"""Flatness of finished run folders: the library behind ``flatminima flatness RUN_DIR...``.

For each run, :func:`measure_run_flatness` rebuilds the trained network(s) from the folder and
writes ``flatness/local_energy.csv`` and ``flatness/local_energy.png`` (delta E against sigma),
plus ``hessian.json`` when asked. Every CSV row carries the run's status and its training error
at the last evaluation point (``run_status``, ``train_error``) and, with the Hessian, the
Hessian columns of the measured model (``hessian_top``, ``hessian_trace``, ``hessian_trace_se``).

Only a *complete* run is a minimum to measure: :func:`check_runs` refuses a run that diverged,
was interrupted or is still training unless ``allow_incomplete``.

The measures themselves (:mod:`flatminima.flatness`) know nothing of run folders; this module
joins the two.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from flatminima.flatness import hessian_eigenvalues, hessian_trace, local_energy, plot_local_energy
from flatminima.train.loop import load_run
from flatminima.train.run_folder import RunFolder, atomic_writer

__all__ = ["FlatnessOptions", "check_runs", "flatness_dir", "measure_run_flatness"]

_WHY = {
    "running": "another process is training it now",
    "interrupted": "it stopped before the end of its budget; rerun its train command to finish",
    "started": "it has no checkpoint yet",
    "empty": "the folder holds no run",
}


@dataclasses.dataclass(frozen=True)
class FlatnessOptions:
    """What :func:`measure_run_flatness` measures and where it writes.

    Args:
        sigmas: local-energy noise strengths.
        draws: noise draws per sigma.
        samples: first training samples measured.
        noise: ``multiplicative`` (``w*(1+sigma*xi)``) or ``additive`` (``w+sigma*xi``).
        bn: BatchNorm statistics of the perturbed network: ``eval`` or ``recalibrate``.
        all_models: also measure every replica of an rSGD run, not only the centre.
        hessian: also the top Hessian eigenvalue (Lanczos) and trace (Hutchinson).
        hessian_samples: first training samples for the Hessian measures.
        seed: seed of the noise draws.
        device: compute on this device (default: the run's).
        out: write into ``out / RUN_NAME`` instead of ``RUN_DIR/flatness``.
    """

    sigmas: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5)
    draws: int = 10
    samples: int = 5000
    noise: str = "multiplicative"
    bn: str = "eval"
    all_models: bool = False
    hessian: bool = False
    hessian_samples: int = 1000
    seed: int = 0
    device: str | None = None
    out: Path | None = None


def flatness_dir(run_dir: Path, out: Path | None = None) -> Path:
    """Where the flatness files of ``run_dir`` go: ``out / NAME`` or ``run_dir/flatness``."""
    return Path(out) / Path(run_dir).name if out else Path(run_dir) / RunFolder.FLATNESS_DIR


def check_runs(run_dirs: list[Path], allow_incomplete: bool) -> dict[Path, str]:
    """The status of each run; raise unless all are complete (or ``allow_incomplete``).

    Raises:
        FileNotFoundError: a folder that is not a run folder.
        ValueError: a run that is not complete, naming it, its status and why.
    """
    statuses = {}
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        if not folder.file(RunFolder.CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no {RunFolder.CONFIG})")
        status = folder.status()
        if status != "complete" and not allow_incomplete:
            why = _WHY.get(status) or (folder.summary() or {}).get("message") or status
            raise ValueError(
                f"{run_dir}: the run is {status} ({why}); flatness measures a complete run "
                "(a minimum): pass --allow-incomplete to measure it anyway"
            )
        statuses[run_dir] = status
    return statuses


def _hessian(model: Any, train: Any, opts: FlatnessOptions) -> dict[str, Any]:
    m = min(opts.hessian_samples, len(train))
    hdata = (train.x[:m], train.y[:m])
    eig = hessian_eigenvalues(model, F.cross_entropy, hdata, k=1, seed=opts.seed)
    tr = hessian_trace(model, F.cross_entropy, hdata, n_samples=50, seed=opts.seed)
    return {
        "top_eigenvalue": float(eig.eigenvalues[0]),
        "trace": float(tr.estimate),
        "trace_se": float(tr.stderr),
        "samples": m,
    }


def _hessian_columns(hessian: dict[str, Any], name: str) -> dict[str, float]:
    """The Hessian columns of model ``name``'s rows (NaN for the models not measured)."""
    if not hessian:
        return {}
    mine = name == hessian["model"]
    return {
        "hessian_top": hessian["top_eigenvalue"] if mine else math.nan,
        "hessian_trace": hessian["trace"] if mine else math.nan,
        "hessian_trace_se": hessian["trace_se"] if mine else math.nan,
    }


def measure_run_flatness(
    run_dir: Path, status: str, opts: FlatnessOptions | None = None
) -> list[dict[str, Any]]:
    """Measure one run; write its CSV, plot (and ``hessian.json``); return the CSV rows.

    Args:
        run_dir: the run folder (with a checkpoint).
        status: its status (from :func:`check_runs`), recorded in every row.
        opts: what to measure (default :class:`FlatnessOptions`).

    Raises:
        FileNotFoundError: no checkpoint, or the run's data files are gone.
    """
    opts = opts or FlatnessOptions()
    trainer = load_run(run_dir, device=opts.device)
    models = trainer.eval_models()
    if not opts.all_models:
        models = dict([next(iter(models.items()))])
    train = trainer.data.train
    n = min(opts.samples, len(train))
    last = trainer.history[-1] if trainer.history else {}
    about = {
        "run": str(run_dir),
        "run_status": status,
        "train_error": last.get("train_error", math.nan),
    }
    hessian: dict[str, Any] = {}
    if opts.hessian:
        name, model = next(iter(models.items()))
        hessian = {"model": name, **_hessian(model, train, opts)}
    results, rows = {}, []
    for name, model in models.items():
        res = local_energy(
            model,
            (train.x[:n], train.y[:n]),
            list(opts.sigmas),
            n_draws=opts.draws,
            noise=opts.noise,
            bn=opts.bn,
            seed=opts.seed,
        )
        results[name] = res
        extra = _hessian_columns(hessian, name)
        rows += [{**about, "model": name, **r, **extra} for r in res.to_rows()]
    out = flatness_dir(run_dir, opts.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out / "local_energy.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = trainer.cfg
    plot_local_energy(
        results,
        out / "local_energy.png",
        title=f"Local energy: {cfg.optimizer} {cfg.model}/{cfg.data} seed {cfg.seed}",
    )
    if hessian:
        with atomic_writer(out / "hessian.json") as fh:
            fh.write(json.dumps(hessian, indent=2))
    return rows

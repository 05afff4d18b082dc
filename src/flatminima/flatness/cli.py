"""``flatminima flatness RUN_DIR...``: measure the flatness of finished runs.

Writes ``flatness/local_energy.csv`` and ``flatness/local_energy.png`` (delta E against sigma)
into each run folder (or ``--out``), plus ``hessian.json`` with ``--hessian``, and prints a table.
Every CSV row carries the run's status and its training error at the last evaluation point
(``run_status``, ``train_error``) and, with ``--hessian``, the Hessian columns of the measured
model (``hessian_top``, ``hessian_trace``, ``hessian_trace_se``).

Only a *complete* run is a minimum to measure: a run that diverged, was interrupted or is still
training is refused (exit status 1, one line naming the run and its status) unless
``--allow-incomplete`` is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import torch.nn.functional as F

from flatminima.train.run_folder import RunFolder, atomic_writer


def _floats(text: str) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers >= 0 (at least one), got {text!r}"
        )
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "flatness",
        help="measure local energy (and Hessian) of finished runs",
        description="Local energy delta_E(sigma): the train-error/loss increase under random "
        "multiplicative weight noise w*(1+sigma*xi), on the run's training data. Only complete "
        "runs are measured unless --allow-incomplete.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folders written by `flatminima train`")
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
        help="noise strengths (default 0,0.05,0.1,0.2,0.3,0.4,0.5)",
    )
    p.add_argument("--draws", type=_positive_int, default=10,
                   help="noise draws per sigma (default 10)")
    p.add_argument("--samples", type=_positive_int, default=5000,
                   help="first training samples measured (default 5000)")
    p.add_argument("--noise", choices=("multiplicative", "additive"), default="multiplicative",
                   help="w*(1+sigma*xi) (default) or w+sigma*xi")
    p.add_argument("--bn", choices=("eval", "recalibrate"), default="eval",
                   help="BatchNorm statistics of the perturbed network: the stored ones (eval, "
                   "default) or recomputed on the measured samples")
    p.add_argument(
        "--all-models",
        action="store_true",
        help="for rSGD runs also measure every replica, not only the centre",
    )
    p.add_argument(
        "--hessian",
        action="store_true",
        help="also the top Hessian eigenvalue (Lanczos) and trace (Hutchinson)",
    )
    p.add_argument("--hessian-samples", type=_positive_int, default=1000,
                   help="first training samples for the Hessian measures (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    p.add_argument("--device", default=None, help="device (default: the run's)")
    p.add_argument(
        "--out", type=Path, default=None, help="write results here instead of RUN_DIR/flatness"
    )
    p.add_argument("--allow-incomplete", action="store_true",
                   help="also measure runs that diverged, were interrupted or are still training")
    p.set_defaults(func=run)


_WHY = {
    "running": "another process is training it now",
    "interrupted": "it stopped before the end of its budget; rerun its train command to finish",
    "started": "it has no checkpoint yet",
    "empty": "the folder holds no run",
}


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


def _hessian(model: Any, train: Any, args: argparse.Namespace) -> dict[str, Any]:
    from flatminima.flatness import hessian_eigenvalues, hessian_trace

    m = min(args.hessian_samples, len(train))
    hdata = (train.x[:m], train.y[:m])
    eig = hessian_eigenvalues(model, F.cross_entropy, hdata, k=1, seed=args.seed)
    tr = hessian_trace(model, F.cross_entropy, hdata, n_samples=50, seed=args.seed)
    return {
        "top_eigenvalue": float(eig.eigenvalues[0]),
        "trace": float(tr.estimate),
        "trace_se": float(tr.stderr),
        "samples": m,
    }


def measure_run(run_dir: Path, args: argparse.Namespace, status: str) -> list[dict[str, Any]]:
    """Measure one run and write its CSV, plot (and ``hessian.json``); the CSV rows."""
    from flatminima.flatness import local_energy, plot_local_energy
    from flatminima.train.loop import load_run

    trainer = load_run(run_dir, device=args.device)
    models = trainer.eval_models()
    if not args.all_models:
        models = dict([next(iter(models.items()))])
    train = trainer.data.train
    n = min(args.samples, len(train))
    last = trainer.history[-1] if trainer.history else {}
    about = {"run": str(run_dir), "run_status": status,
             "train_error": last.get("train_error", math.nan)}
    hessian: dict[str, Any] = {}
    if args.hessian:
        name, model = next(iter(models.items()))
        hessian = {"model": name, **_hessian(model, train, args)}
    results, rows = {}, []
    for name, model in models.items():
        res = local_energy(model, (train.x[:n], train.y[:n]), args.sigmas, n_draws=args.draws,
                           noise=args.noise, bn=args.bn, seed=args.seed)
        results[name] = res
        extra = {}
        if hessian:
            extra = {"hessian_top": hessian["top_eigenvalue"] if name == hessian["model"]
                     else math.nan,
                     "hessian_trace": hessian["trace"] if name == hessian["model"] else math.nan,
                     "hessian_trace_se": hessian["trace_se"] if name == hessian["model"]
                     else math.nan}
        rows += [{**about, "model": name, **r, **extra} for r in res.to_rows()]
    out = args.out / run_dir.name if args.out else run_dir / RunFolder.FLATNESS_DIR
    out.mkdir(parents=True, exist_ok=True)
    with atomic_writer(out / "local_energy.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cfg = trainer.cfg
    plot_local_energy(results, out / "local_energy.png",
                      title=f"Local energy: {cfg.optimizer} {cfg.model}/{cfg.data} seed {cfg.seed}")
    if hessian:
        with atomic_writer(out / "hessian.json") as fh:
            fh.write(json.dumps(hessian, indent=2))
    return rows


def run(args: argparse.Namespace) -> int:
    from flatminima._table import format_table

    statuses = check_runs(args.runs, args.allow_incomplete)
    for run_dir in args.runs:
        rows = measure_run(run_dir, args, statuses[run_dir])
        cols = ["model", "sigma", "delta_error", "delta_error_se", "delta_loss", "delta_loss_se"]
        cols += [c for c in ("hessian_top", "hessian_trace") if c in rows[0]]
        note = "" if statuses[run_dir] == "complete" else f", status {statuses[run_dir]}"
        print(
            f"{run_dir} (base train error {rows[0]['base_error']:.4f}, "
            f"{rows[0]['n_samples']} samples, {rows[0]['n_draws']} draws{note})"
        )
        print(format_table(rows, cols))
        where = args.out / run_dir.name if args.out else run_dir / RunFolder.FLATNESS_DIR
        print(f"wrote {where}/local_energy.csv and local_energy.png\n")
    return 0

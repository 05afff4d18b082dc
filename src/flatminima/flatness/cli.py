"""``flatminima flatness RUN_DIR...``: measure the flatness of finished runs.

Writes ``flatness/local_energy.csv`` and ``flatness/local_energy.png`` (delta E against sigma)
into each run folder (or ``--out``), plus ``hessian.json`` with ``--hessian``, and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch.nn.functional as F


def _floats(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "flatness",
        help="measure local energy (and Hessian) of finished runs",
        description="Local energy delta_E(sigma): the train-error/loss increase under random "
        "multiplicative weight noise w*(1+sigma*xi), on the run's training data.",
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "--sigmas",
        type=_floats,
        default=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5],
        help="noise strengths (default 0,0.05,0.1,0.2,0.3,0.4,0.5)",
    )
    p.add_argument("--draws", type=int, default=10, help="noise draws per sigma")
    p.add_argument("--samples", type=int, default=5000, help="training samples measured")
    p.add_argument("--noise", choices=("multiplicative", "additive"), default="multiplicative")
    p.add_argument("--bn", choices=("eval", "recalibrate"), default="eval")
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
    p.add_argument(
        "--hessian-samples",
        type=int,
        default=1000,
        help="training samples for the Hessian measures",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="device (default: the run's)")
    p.add_argument(
        "--out", type=Path, default=None, help="write results here instead of RUN_DIR/flatness"
    )
    p.set_defaults(func=run)


def measure_run(run_dir: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from flatminima.flatness import (
        hessian_eigenvalues,
        hessian_trace,
        local_energy,
        plot_local_energy,
    )
    from flatminima.train import load_run

    trainer = load_run(run_dir, device=args.device)
    models = trainer.algo.eval_models()
    if not args.all_models:
        models = dict([next(iter(models.items()))])
    train = trainer.data.train
    n = min(args.samples, len(train))
    data = (train.x[:n], train.y[:n])
    results = {}
    rows = []
    for name, model in models.items():
        res = local_energy(
            model,
            data,
            args.sigmas,
            n_draws=args.draws,
            noise=args.noise,
            bn=args.bn,
            seed=args.seed,
        )
        results[name] = res
        for r in res.to_rows():
            rows.append({"run": str(run_dir), "model": name, **r})
    out = args.out / run_dir.name if args.out else run_dir / "flatness"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "local_energy.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_local_energy(
        results,
        out / "local_energy.png",
        title=f"Local energy: {trainer.cfg.optimizer} {trainer.cfg.model}/"
        f"{trainer.cfg.data} seed {trainer.cfg.seed}",
    )
    if args.hessian:
        name, model = next(iter(models.items()))
        m = min(args.hessian_samples, len(train))
        hdata = (train.x[:m], train.y[:m])
        eig = hessian_eigenvalues(model, F.cross_entropy, hdata, k=1, seed=args.seed)
        tr = hessian_trace(model, F.cross_entropy, hdata, n_samples=50, seed=args.seed)
        info = {
            "model": name,
            "top_eigenvalue": float(eig.eigenvalues[0]),
            "trace": float(tr.estimate),
            "trace_se": float(tr.stderr),
            "samples": m,
        }
        (out / "hessian.json").write_text(json.dumps(info, indent=2))
        for r in rows:
            if r["model"] == name:
                r["hessian_top"] = info["top_eigenvalue"]
                r["hessian_trace"] = info["trace"]
    return rows


def run(args: argparse.Namespace) -> int:
    from flatminima._table import format_table

    if args.draws < 1:
        raise ValueError(f"Invalid --draws value: {args.draws} (must be >= 1)")
    for run_dir in args.runs:
        rows = measure_run(run_dir, args)
        cols = ["model", "sigma", "delta_error", "delta_error_se", "delta_loss", "delta_loss_se"]
        cols += [c for c in ("hessian_top", "hessian_trace") if c in rows[0]]
        print(
            f"{run_dir} (base train error {rows[0]['base_error']:.4f}, "
            f"{rows[0]['n_samples']} samples, {rows[0]['n_draws']} draws)"
        )
        print(format_table(rows, cols))
        where = args.out / run_dir.name if args.out else run_dir / "flatness"
        print(f"wrote {where}/local_energy.csv and local_energy.png\n")
    return 0

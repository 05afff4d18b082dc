"""Benchmark of the local-energy measure: cost of one noise draw against a plain evaluation pass.

Target (issue 4): time per draw / plain evaluation pass over the same data <= 1.10.

    python benchmarks/bench_flatness.py                 # CPU, MLP and small CNN
    python benchmarks/bench_flatness.py --device cuda --samples 8192
    python benchmarks/bench_flatness.py --quick         # smoke run

Per draw = (T(n_draws = d2) - T(n_draws = d1)) / (d2 - d1) for the full ``local_energy`` call,
so fixed costs (moving the data, the unperturbed pass) cancel. The plain pass is an
independent loop (forward, loss, error count, one host sync) under ``torch.inference_mode``.
Timings interleave the variants; times are medians [min-max] over ``--repeats``, ratios the
median [min-max] of per-repeat ratios (each repeat's variants were timed next to each other).
Torch threads are pinned before any torch work (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import add_threads_arg, env_line, fmt_stats, fmt_triple, pin_threads, stats
from torch import nn

from flatminima.flatness import local_energy
from flatminima.flatness.perturb import NoisePerturber

# ---------------------------------------------------------------- models
INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST
NUM_CLASSES = 10


def _local_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, NUM_CLASSES),
        )
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, NUM_CLASSES),
    )


def make_model(name: str) -> tuple[nn.Module, str]:
    try:
        from flatminima.models import build_model

        return build_model(name, INPUT_SHAPE, NUM_CLASSES), "flatminima.models"
    except Exception:  # noqa: BLE001 - models subpackage not ready: use local equivalents
        return _local_model(name), "local"


# ---------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def plain_pass(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.inference_mode():
        loss = torch.zeros((), device=batches[0][0].device)
        err = torch.zeros((), device=batches[0][0].device, dtype=torch.long)
        for x, y in batches:
            out = model(x)
            loss += F.cross_entropy(out, y) * x.shape[0]
            err += (out.argmax(1) != y).sum()
        return loss.item() + err.item()


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--samples", type=int, default=2048, help="samples in the ratio benchmark")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    add_threads_arg(ap)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    args = ap.parse_args()
    pin_threads(args.threads)
    dev = torch.device(args.device)
    samples = 256 if args.quick else args.samples
    repeats = 2 if args.quick else args.repeats
    print(f"# bench_flatness: {env_line(dev)}")
    print(f"samples={samples} batch={args.batch_size} repeats={repeats} (interleaved)")

    for name in args.models.split(","):
        bench_model(name, dev, samples, args.batch_size, repeats, args.quick)


def bench_model(
    name: str, dev: torch.device, samples: int, batch_size: int, repeats: int, quick: bool
) -> None:
    torch.manual_seed(0)
    model, source = make_model(name)
    model = model.to(dev).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *INPUT_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (samples,), generator=g)
    batches = [
        (x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev))
        for i in range(0, samples, batch_size)
    ]
    pert = NoisePerturber(list(model.parameters()), "multiplicative")
    d1, d2 = (1, 3) if quick else (2, 10)
    many = [0.02, 0.05, 0.1, 0.2, 0.5]  # a typical sigma grid: noise drawn once per draw

    def le(n: int, sigmas: list[float], ns: int = samples) -> None:
        local_energy(
            model,
            (x[:ns], y[:ns]),
            sigmas,
            n_draws=n,
            batch_size=batch_size,
            device=dev,
        )

    def perturb10() -> None:
        for s in range(10):
            pert.perturb_(0.05, s)

    for _ in range(3):  # warm-up (cuDNN algorithm choice, allocator, clocks)
        plain_pass(model, batches)
    le(1, [0.05])
    keys = ("plain", "d1", "d2", "m1", "m2", "pert")
    t: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats):  # interleaved: each repeat measures every variant side by side
        t["plain"].append(
            statistics.median(timed(lambda: plain_pass(model, batches), dev) for _ in range(3))
        )
        t["d1"].append(timed(lambda: le(d1, [0.05]), dev))
        t["d2"].append(timed(lambda: le(d2, [0.05]), dev))
        t["m1"].append(timed(lambda: le(d1, many), dev))
        t["m2"].append(timed(lambda: le(d2, many), dev))
        t["pert"].append(timed(perturb10, dev) / 10)
    pert.restore_()
    plain = t["plain"]
    per_draw = [(b - a) / (d2 - d1) for a, b in zip(t["d1"], t["d2"])]
    per_eval_many = [(b - a) / ((d2 - d1) * len(many)) for a, b in zip(t["m1"], t["m2"])]
    print(f"\n[{name}] ({source}, {n_params:,} parameters, {samples} samples)")
    print("  ms and ratios to the plain pass: median [min-max] over interleaved repeats")
    rows = [
        ("plain eval pass", plain, ""),
        ("per draw, 1 sigma", per_draw, "  (target <= 1.10)"),
        (f"per draw x sigma, {len(many)} sigmas", per_eval_many, ""),
        ("perturbation only (draw+apply)", t["pert"], ""),
    ]
    for label, v, note in rows:
        r = stats([a / b for a, b in zip(v, plain)])
        print(f"  {label:32s}{fmt_stats(v, 1e3):>24} ms   ratio {fmt_triple(r, 1, 3)}{note}")

    # growth of the total time with draws x samples
    draws_list = [2, 4] if quick else [5, 10, 20]
    samp_list = [128, 256] if quick else [samples // 4, samples // 2, samples]
    print(
        "  total local_energy time [s] (one sigma, median of repeats); rows n_draws, "
        "columns n_samples"
    )
    print("  " + "n_draws".rjust(8) + "".join(f"{s:>10d}" for s in samp_list))
    for nd in draws_list:
        row = []
        for ns in samp_list:
            ts = [
                timed(lambda nd=nd, ns=ns: le(nd, [0.05], ns), dev)
                for _ in range(max(1, repeats // 2))
            ]
            row.append(statistics.median(ts))
        print("  " + f"{nd:8d}" + "".join(f"{v:10.3f}" for v in row))


if __name__ == "__main__":
    main()

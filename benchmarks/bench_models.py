"""Training and evaluation throughput of the flatminima models.

Training: images/s of one forward + backward + SGD(momentum) step on random Fashion-MNIST-shaped
data (1x28x28, 10 classes). Evaluation: images/s of no-grad forward passes of the CNN at several
batch sizes (large eval batches were slower than 64-256 for convolutions on a 2-core CPU).
Each number is the median [min-max] over ``--repeats`` timed repeats of ``--iters`` steps after
warm-up. Torch threads are pinned before any torch work (``--threads``, default 1).

    python benchmarks/bench_models.py               # all models, 1 thread
    python benchmarks/bench_models.py --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import add_threads_arg, env_line, fmt_stats, pin_threads, sync

from flatminima.models import build_model, count_parameters

# ----------------------------------------------------------------------------- configuration
INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST
NUM_CLASSES = 10
# key -> (label, model name, kwargs, iterations per repeat or None for --iters)
TRAIN_CONFIGS: dict[str, tuple[str, str, dict[str, object], int | None]] = {
    "mlp": ("mlp 256-256", "mlp", {}, None),
    "cnn": ("cnn width 32", "cnn", {}, None),
    "resnet18-16": ("resnet18 width 16", "resnet18", {"width": 16}, None),
    "resnet18-64": ("resnet18 width 64", "resnet18", {"width": 64}, 1),  # slow on CPU
}


def median_rate(
    step: Callable[[], None],
    images_per_step: int,
    iters: int,
    repeats: int,
    warmup: int,
    device: torch.device,
) -> list[float]:
    """Images/s of each repeat, each repeat timing ``iters`` calls of ``step``."""
    for _ in range(warmup):
        step()
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        rates.append(images_per_step * iters / (time.perf_counter() - start))
    return rates


def bench_train(
    name: str,
    kwargs: dict[str, object],
    batch: int,
    iters: int,
    repeats: int,
    device: torch.device,
) -> tuple[int, list[float]]:
    torch.manual_seed(0)
    model = build_model(name, INPUT_SHAPE, NUM_CLASSES, **kwargs).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *INPUT_SHAPE, device=device)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    rate = median_rate(step, batch, iters, repeats, warmup=min(2, iters), device=device)
    return count_parameters(model), rate


def bench_eval(batch: int, total: int, repeats: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = build_model("cnn", INPUT_SHAPE, NUM_CLASSES).to(device).eval()
    x = torch.randn(batch, *INPUT_SHAPE, device=device)
    iters = max(1, total // batch)

    @torch.no_grad()
    def step() -> None:
        model(x)

    return median_rate(step, batch, iters, repeats, warmup=1, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_threads_arg(parser)
    parser.add_argument("--batch-size", type=int, default=128, help="training batch (128)")
    parser.add_argument("--iters", type=int, default=10, help="training steps per repeat (10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; median (5)")
    parser.add_argument(
        "--eval-batches", default="64,256,1024", help="CNN eval batch sizes (64,256,1024)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=4096, help="images per eval repeat (4096)"
    )
    parser.add_argument(
        "--train-models",
        default=",".join(TRAIN_CONFIGS),
        help=f"comma list of training configs from {','.join(TRAIN_CONFIGS)}; '' for none",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args()
    pin_threads(args.threads)
    device = torch.device(args.device)

    print(f"# bench_models: {env_line(device)}")
    print(
        f"input {INPUT_SHAPE}, batch {args.batch_size}, median [min-max] of {args.repeats} repeats"
    )
    print("\nTraining (forward + backward + SGD momentum step)")
    print(f"{'model':<20}{'params':>12}  {'images/s':<26}{'ms/step':>10}{'s/60k epoch':>13}")
    keys = [k.strip() for k in args.train_models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TRAIN_CONFIGS]
    if unknown:
        parser.error(f"unknown --train-models {unknown}; choose from {list(TRAIN_CONFIGS)}")
    for key in keys:
        label, name, kwargs, iters = TRAIN_CONFIGS[key]
        n_params, rates = bench_train(
            name, kwargs, args.batch_size, iters or args.iters, args.repeats, device
        )
        rate = sorted(rates)[len(rates) // 2]
        ms = 1000 * args.batch_size / rate
        print(
            f"{label:<20}{n_params:>12,}  {fmt_stats(rates, 1, 0):<26}{ms:>10.1f}"
            f"{60000 / rate:>13.1f}"
        )

    print("\nEvaluation of cnn width 32 (no grad)")
    print(f"{'batch':>8}  {'images/s':<26}")
    for batch in (int(b) for b in args.eval_batches.split(",")):
        rates = bench_eval(batch, args.eval_images, args.repeats, device)
        print(f"{batch:>8}  {fmt_stats(rates, 1, 0):<26}")


if __name__ == "__main__":
    main()

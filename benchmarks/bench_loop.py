"""Overhead of flatminima's training loop over a bare PyTorch loop (target: at most 5%).

Both train the same model (same init) with SGD on the same in-memory data and TensorLoader
order; the flatminima side runs ``Trainer`` with evaluation reduced to a minimum and reports its
``train_time_s`` (which excludes evaluation, like the bare loop). Runs are interleaved; times are
medians [min-max] over the repeats and the ratio is the median [min-max] of the per-repeat
ratios, per model. Torch threads are pinned (``--threads``, default 1).

    python benchmarks/bench_loop.py --models mlp cnn --steps 200 --repeats 5
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import add_threads_arg, env_line, fmt_stats, fmt_triple, pin_threads, ratio_stats

from flatminima.data import ArrayDataset, DataSplits, TensorLoader
from flatminima.models import build_model
from flatminima.train import TrainConfig, Trainer


def make_data(n: int, seed: int = 0) -> DataSplits:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    test = ArrayDataset(x[:256], y[:256])
    return DataSplits(
        "synthetic-fmnist", ArrayDataset(x, y), None, test, 10, (1, 28, 28), "synthetic", None, None
    )


def bare(model_name: str, data: DataSplits, batch: int, epochs: int, lr: float) -> float:
    torch.manual_seed(0)
    model = build_model(model_name, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loader = TensorLoader(data.train, batch, drop_last=True, seed=0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            float(loss.detach())  # the loop reads the loss every step (divergence check)
    return time.perf_counter() - t0


def ours(model_name: str, data: DataSplits, batch: int, epochs: int, lr: float) -> float:
    cfg = TrainConfig(
        data="gmm",
        model=model_name,
        optimizer="sgd",
        lr=lr,
        batch_size=batch,
        epochs=epochs,
        lr_schedule="constant",
        progress=False,
        train_eval_samples=64,
        eval_batch_size=256,
    )
    trainer = Trainer(cfg, None, data=data, progress=False)
    trainer.run()
    return trainer.train_time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    p.add_argument("--steps", type=int, default=150, help="SGD steps per epoch")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    add_threads_arg(p)
    args = p.parse_args()
    pin_threads(args.threads)
    print(f"# bench_loop: {env_line()}")
    data = make_data(args.steps * args.batch_size)
    print(
        f"# loop overhead: {args.steps} steps x {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.threads} thread(s), median of {args.repeats} interleaved repeats"
    )
    print(f"{'model':8} {'bare s':<22}{'flatminima s':<22}{'ratio (target <= 1.05)':<22}")
    for name in args.models:
        b, o = [], []
        for _ in range(args.repeats):
            b.append(bare(name, data, args.batch_size, args.epochs, 0.01))
            o.append(ours(name, data, args.batch_size, args.epochs, 0.01))
        r = fmt_triple(ratio_stats(o, b), 1, 3)
        print(f"{name:8} {fmt_stats(b, 1, 3):<22}{fmt_stats(o, 1, 3):<22}{r:<22}")


if __name__ == "__main__":
    main()

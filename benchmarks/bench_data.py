"""Benchmark: batched TensorLoader + Augment against a per-sample Python pipeline.

Run: python benchmarks/bench_data.py [--n 10000] [--repeats 5] [--threads 1]
Both variants are timed side by side in one run (alternating); times are medians [min-max] over
the repeats, the speed-up the median [min-max] of the per-repeat ratios. Torch threads are
pinned (default 1).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import add_threads_arg, env_line, fmt_stats, fmt_triple, pin_threads, ratio_stats

from flatminima.data import ArrayDataset, Augment, TensorLoader


def per_sample_epoch(ds: ArrayDataset, batch_size: int, p: int, g: torch.Generator) -> int:
    """Reference pipeline: shuffle, then crop/flip and collate one sample at a time."""
    n, _, h, w = ds.x.shape
    perm = torch.randperm(n, generator=g).tolist()
    count = 0
    for s in range(0, n, batch_size):
        xs, ys = [], []
        for i in perm[s : s + batch_size]:
            a, b = torch.randint(0, 2 * p + 1, (2,), generator=g).tolist()
            xi = F.pad(ds.x[i], (p, p, p, p))[:, a : a + h, b : b + w]
            if torch.rand((), generator=g) < 0.5:
                xi = xi.flip(2)
            xs.append(xi)
            ys.append(ds.y[i])
        xb, yb = torch.stack(xs), torch.stack(ys)
        count += len(yb) + 0 * int(xb.shape[0])
    return count


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000, help="samples (CIFAR shape 3x32x32)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="device holding the data, e.g. cuda")
    add_threads_arg(ap)
    args = ap.parse_args()
    pin_threads(args.threads)
    print(f"# bench_data: {env_line(args.device)}, {args.repeats} interleaved repeats")
    torch.manual_seed(0)
    cpu = ArrayDataset(torch.rand(args.n, 3, 32, 32), torch.randint(0, 10, (args.n,)))
    ds = cpu.to(args.device)
    loader = TensorLoader(ds, args.batch_size, augment=Augment(4, True))
    if args.device != "cpu":
        # The stream must not depend on the device: compare one epoch with the CPU loader.
        cpu_loader = TensorLoader(cpu, args.batch_size, augment=Augment(4, True))
        for (xd, yd), (xc, yc) in zip(loader, cpu_loader):
            assert torch.equal(xd.cpu(), xc) and torch.equal(yd.cpu(), yc)
        loader.load_state_dict(cpu_loader.state_dict())
        print(f"{args.device} batches identical to CPU batches for one epoch")

    def sync() -> None:
        if ds.x.device.type == "cuda":
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    t_fast, t_ref = [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        assert sum(len(y) for _, y in loader) == args.n
        sync()
        t_fast.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert per_sample_epoch(ds, args.batch_size, 4, g) == args.n
        sync()
        t_ref.append(time.perf_counter() - t0)
    print(
        f"epoch of {args.n} CIFAR-shaped samples on {ds.x.device}, batch {args.batch_size}, "
        "crop 4 + flip; ms median [min-max]"
    )
    for label, t in (
        ("TensorLoader+Augment (batched)", t_fast),
        ("per-sample Python reference", t_ref),
    ):
        rate = args.n / sorted(t)[len(t) // 2]
        print(f"  {label:31s}: {fmt_stats(t, 1e3, 1):>26} ms  ({rate:,.0f} samples/s)")
    print(f"  speed-up: {fmt_triple(ratio_stats(t_ref, t_fast), 1, 1)}x")


if __name__ == "__main__":
    main()

"""Benchmark: the coupling all-reduce of distributed Replicated-SGD against the step it adds to.

Run: python benchmarks/bench_distributed.py [--steps 40] [--procs 2,3,4] [--threads 1]

For y = 2, 3, 4 processes (one replica each, gloo on 127.0.0.1) and two models (the MLP and the
small CNN of flatminima.models, Fashion-MNIST shapes, random data), every rank runs ``--steps``
rSGD steps with coupling every step (K = 1) and times, per step (medians over steps, rank 0):

- ``compute``: forward + backward + the local SGD update (what a step costs without coupling);
- ``couple``: ``DistributedReplicatedSGD.couple()`` inside the step: the flat all-reduce of the
  parameters, including waiting for the slowest rank;
- ``allreduce``: the same all-reduce alone, after a barrier (the transfer, without skew).

Everything is measured in one run, side by side; each column is the median [min-max] over the
timed steps, couple/compute the median [min-max] of the per-step ratios. Every rank pins its
torch threads (``--threads``, default 1). On a machine with fewer cores than processes the
ranks time-share the cores, so the coupling then also absorbs scheduling delays.
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import add_threads_arg, env_line, fmt_stats, fmt_triple, pin_threads, ratio_stats

from flatminima.distributed import DistributedReplicatedSGD, launch_local
from flatminima.models import build_model

MODELS = {"mlp": {"hidden": [256, 256]}, "cnn": {}}
BATCH = 64


def _rank_bench(model_name: str, steps: int, threads: int = 1) -> dict[str, object] | None:
    pin_threads(threads)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    model = build_model(model_name, (1, 28, 28), 10, **MODELS[model_name])
    opt = DistributedReplicatedSGD(model.parameters(), lr=0.01, momentum=0.9, gamma=1e-3)
    n = opt.flat.numel()
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    compute, couple, alone = [], [], []
    for i in range(steps + 5):
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        t1 = time.perf_counter()
        opt.couple()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        buf = opt.flat.detach().clone()
        dist.barrier()
        t4 = time.perf_counter()
        dist.all_reduce(buf)
        t5 = time.perf_counter()
        if i >= 5:  # warm-up
            compute.append((t1 - t0) + (t3 - t2))
            couple.append(t2 - t1)
            alone.append(t5 - t4)
    dist.destroy_process_group()
    if rank != 0:
        return None
    return {"world": world, "params": n, "compute": compute, "couple": couple, "alone": alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    ap.add_argument("--procs", default="2,3,4", help="process counts y, comma separated")
    add_threads_arg(ap)
    args = ap.parse_args()
    pin_threads(args.threads)
    print(f"# bench_distributed: {env_line()} per rank, {args.steps} timed steps")
    rows = []
    for model_name in MODELS:
        for y in (int(p) for p in args.procs.split(",")):
            res = launch_local(
                y,
                _rank_bench,
                (model_name, args.steps, args.threads),
                env={"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(args.threads)},
                start_method="fork",
                timeout=600,
            )[0]
            rows.append((model_name, res))
    print(
        f"{'model':6} {'y':>2} {'params':>9} {'MB/allreduce':>12}  {'compute ms':<20}"
        f"{'couple ms':<20}{'allreduce ms':<20}{'couple/compute':<20}"
    )
    for model_name, r in rows:
        mb = 4 * r["params"] / 1e6
        print(
            f"{model_name:6} {r['world']:>2} {r['params']:>9,} {mb:>12.2f}  "
            f"{fmt_stats(r['compute'], 1e3):<20}{fmt_stats(r['couple'], 1e3):<20}"
            f"{fmt_stats(r['alone'], 1e3):<20}"
            f"{fmt_triple(ratio_stats(r['couple'], r['compute'])):<20}"
        )


if __name__ == "__main__":
    main()

"""Benchmark of the flatminima optimizers against plain SGD (wall-clock, medians).

Measures, with every pair of numbers taken interleaved in the same run (the machine is noisy);
times are medians with [min-max] over the repeats, ratios the median [min-max] of the per-repeat
ratios of variants timed next to each other. Torch threads are pinned (``--threads``, default 1)
before any torch work: with torch's default threads on a small shared machine the ratios are
noise (4.2 and 0.24 for the same quantity in one run).

1. rSGD step / (y x SGD step) for MLP, small CNN, ResNet-18 (width 16), y = 3 and 5, batch 128;
   target <= 1.05 (the coupling and the flat-buffer update should be nearly free).
2. eSGD outer step / (L x SGD step), L = 5; target <= 1.05.
3. rSGD with the loop backend vs the vmap backend for the small models.
4. The coupling + momentum update alone: per-tensor loop vs torch._foreach vs flat [y, N] buffer,
   against a plain copy of the same bytes.

Usage::

    python benchmarks/bench_optim.py                              # CPU, 1 thread, 2-4 minutes
    python benchmarks/bench_optim.py --models mlp --repeats 5     # one model
    python benchmarks/bench_optim.py --device cuda --repeats 30   # on a GPU
    python benchmarks/bench_optim.py --quick                      # smoke run
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- imports
import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import (
    add_threads_arg,
    env_line,
    fmt_stats,
    fmt_triple,
    pin_threads,
    ratio_stats,
    resolve_clock,
)
from _common import interleaved as _interleaved
from torch import nn

from flatminima.optim import EntropySGD, Replicas, ReplicatedSGD

try:
    from flatminima.models import build_model
except ImportError:  # the models subpackage is optional for this script
    build_model = None

# ----------------------------------------------------------------------------- config
MODELS = {  # name: (input shape, build kwargs)
    "mlp": ((1, 28, 28), {}),  # Fashion-MNIST shaped
    "cnn": ((1, 28, 28), {}),
    "resnet18": ((3, 32, 32), {"width": 16}),  # CIFAR shaped
}
NUM_CLASSES = 10
BATCH = 128  # samples per replica per step


def local_model(name: str, shape: tuple[int, ...]) -> nn.Module:
    """Fallback models if flatminima.models is not importable."""
    c, h, w = shape
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 10),
        )  # fmt: skip
    from torchvision.models import resnet18  # pragma: no cover

    return resnet18(num_classes=10)  # pragma: no cover


def make(name: str) -> Callable[[], nn.Module]:
    shape, kw = MODELS[name]
    if build_model is not None:
        return lambda: build_model(name, shape, NUM_CLASSES, **kw)
    return lambda: local_model(name, shape)


# ----------------------------------------------------------------------------- timing
MIN_TIME = 0.1  # seconds per measurement (set from --min-time)
CLOCK = "wall"  # set from --clock


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, device) -> dict[str, list[float]]:
    """Seconds per call of each fn per repeat, interleaved round-robin after one warm-up each;
    each measurement times back-to-back calls lasting about ``MIN_TIME`` seconds."""
    return _interleaved(fns, repeats, device, warmup=1, min_time=MIN_TIME, clock=CLOCK)


def ms(times: list[float], per: float = 1.0) -> str:
    """``median [min-max]`` in milliseconds of ``times / per``."""
    return fmt_stats(times, 1e3 / per, 2)


def ratio(num: list[float], den: list[float]) -> str:
    return fmt_triple(ratio_stats(num, den), 1, 3)


def batches(shape, y: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(y, BATCH, *shape, generator=g).to(device)
    t = torch.randint(0, NUM_CLASSES, (y, BATCH), generator=g).to(device)
    return x, t


def sgd_step_fn(model: nn.Module, x, t) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def fn() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), t).backward()
        opt.step()

    return fn


def rsgd_step_fn(reps: Replicas, x, t, backend: str = "loop") -> Callable[[], None]:
    opt = ReplicatedSGD(reps, lr=0.01, momentum=0.9, weight_decay=5e-4, gamma=1e-3, backend=backend)

    def fn() -> None:
        opt.zero_grad()
        out = opt.forward_all(x)
        F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="sum").div(BATCH).backward()
        opt.step()

    return fn


# ----------------------------------------------------------------------------- benchmarks
def bench_rsgd(args, device) -> None:
    print(f"\n## rSGD step / (y x SGD step), batch {BATCH} per replica (target <= 1.05)")
    print(f"{'model':<10}{'y':>3}  {'SGD ms':<22}{'rSGD ms':<22}{'ratio':<22}")
    for name in args.models:
        shape, _ = MODELS[name]
        for y in args.replicas:
            x, t = batches(shape, y, device)
            single = make(name)().to(device)
            reps = Replicas(make(name), y, seed=0).to(device)
            fns = {"sgd": sgd_step_fn(single, x[0], t[0]), "rsgd": rsgd_step_fn(reps, x, t)}
            # y SGD steps per repetition, so the ratio compares equal work
            sgd_fn = fns["sgd"]
            fns["sgd"] = lambda sgd_fn=sgd_fn, y=y: [sgd_fn() for _ in range(y)] and None
            times = interleaved(fns, args.repeats, device)
            print(
                f"{name:<10}{y:>3}  {ms(times['sgd'], y):<22}{ms(times['rsgd']):<22}"
                f"{ratio(times['rsgd'], times['sgd']):<22}"
            )


def bench_esgd(args, device) -> None:
    L = 5
    print(f"\n## eSGD outer step / (L x SGD step), L = {L} (target <= 1.05)")
    print(
        f"{'model':<10}{'L*SGD ms':<22}{'eSGD ms':<22}{'ratio':<22}{'noise=0 ms':<22}{'ratio':<22}"
    )
    for name in args.models:
        shape, _ = MODELS[name]
        x, t = batches(shape, 1, device)
        m_sgd = make(name)().to(device)
        sgd_fn = sgd_step_fn(m_sgd, x[0], t[0])
        fns: dict[str, Callable[[], None]] = {
            "sgd": lambda sgd_fn=sgd_fn: [sgd_fn() for _ in range(L)] and None
        }
        for key, noise in (("esgd", 1e-4), ("esgd0", 0.0)):
            m = make(name)().to(device)
            opt = EntropySGD(
                m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4,
                inner_steps=L, gamma=1e-3, noise=noise, seed=0,
            )  # fmt: skip

            def closure(m=m, opt=opt, x=x, t=t) -> torch.Tensor:
                opt.zero_grad()
                loss = F.cross_entropy(m(x[0]), t[0])
                loss.backward()
                return loss

            fns[key] = lambda opt=opt, closure=closure: opt.step(closure) and None
        times = interleaved(fns, args.repeats, device)
        print(
            f"{name:<10}{ms(times['sgd']):<22}{ms(times['esgd']):<22}"
            f"{ratio(times['esgd'], times['sgd']):<22}"
            f"{ms(times['esgd0']):<22}{ratio(times['esgd0'], times['sgd']):<22}"
        )


def bench_vmap(args, device) -> None:
    print("\n## rSGD step: loop vs vmap backend (small models)")
    print(f"{'model':<10}{'y':>3}  {'loop ms':<22}{'vmap ms':<22}{'vmap/loop':<22}")
    for name in [m for m in args.models if m != "resnet18"]:
        shape, _ = MODELS[name]
        for y in args.replicas:
            x, t = batches(shape, y, device)
            ra = Replicas(make(name), y, seed=0).to(device)
            rb = Replicas(make(name), y, seed=0).to(device)
            fns = {"loop": rsgd_step_fn(ra, x, t, "loop"), "vmap": rsgd_step_fn(rb, x, t, "vmap")}
            times = interleaved(fns, args.repeats, device)
            print(
                f"{name:<10}{y:>3}  {ms(times['loop']):<22}{ms(times['vmap']):<22}"
                f"{ratio(times['vmap'], times['loop']):<22}"
            )


def bench_update(args, device) -> None:
    """Coupling + momentum + SGD update alone on ResNet-18-shaped parameter lists."""
    y = 3
    shapes = [p.shape for p in make("resnet18")().parameters()]
    n = sum(s.numel() for s in shapes)
    print(f"\n## coupling + momentum update alone, y = {y}, N = {n} parameters per replica")
    gamma, mom, lr = 1e-3, 0.9, 0.01
    W = [[torch.randn(s, device=device) for s in shapes] for _ in range(y)]
    G = [[torch.randn(s, device=device) for s in shapes] for _ in range(y)]
    B = [[torch.zeros(s, device=device) for s in shapes] for _ in range(y)]

    def per_tensor() -> None:
        for i in range(len(shapes)):
            c = sum(W[a][i] for a in range(y)) / y
            for a in range(y):
                g = G[a][i].add(W[a][i] - c, alpha=gamma)
                B[a][i].mul_(mom).add_(g)
                W[a][i].add_(B[a][i], alpha=-lr)

    def foreach() -> None:
        c = torch._foreach_add(W[0], W[1])
        for a in range(2, y):
            torch._foreach_add_(c, W[a])
        torch._foreach_div_(c, y)
        for a in range(y):
            g = torch._foreach_add(G[a], W[a], alpha=gamma)
            torch._foreach_sub_(g, c, alpha=gamma)
            torch._foreach_mul_(B[a], mom)
            torch._foreach_add_(B[a], g)
            torch._foreach_add_(W[a], B[a], alpha=-lr)

    reps = Replicas(make("resnet18"), y, seed=0).to(device)
    opt = ReplicatedSGD(reps, lr=lr, momentum=mom, gamma=gamma)
    for g in reps.flat_grads:
        g.normal_()
    opt.step()  # create the momentum buffer

    def flat() -> None:
        opt.step()  # coupling every step + momentum + update on the [y, N] buffers

    src = torch.randn(y, n, device=device)
    dst = torch.empty_like(src)
    fns = {
        "per-tensor": per_tensor,
        "foreach": foreach,
        "flat": flat,
        "copy": lambda: dst.copy_(src),
    }
    times = interleaved(fns, args.repeats, device)
    print(f"{'kernel':<12}{'ms':<26}{'/ copy':<22}")
    for k, v in times.items():
        print(f"{k:<12}{fmt_stats(v, 1e3, 3):<26}{ratio(v, times['copy']):<22}")


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--replicas", nargs="+", type=int, default=[3, 5])
    parser.add_argument("--quick", action="store_true", help="mlp/cnn only, 3 repeats")
    add_threads_arg(parser)
    parser.add_argument(
        "--only", nargs="+", default=["rsgd", "esgd", "vmap", "update"],
        choices=["rsgd", "esgd", "vmap", "update"],
    )  # fmt: skip
    parser.add_argument(
        "--min-time", type=float, default=0.1,
        help="seconds each measurement lasts at least (calls repeated back to back; 0.1)",
    )  # fmt: skip
    parser.add_argument(
        "--clock", default="auto", choices=["auto", "cpu", "wall"],
        help="cpu: process CPU time; wall: wall-clock; auto (default): cpu on the CPU with one "
        "thread (waiting for a core held by other processes is not the optimizer's cost), "
        "else wall",
    )  # fmt: skip
    args = parser.parse_args()
    pin_threads(args.threads)  # before any torch work
    global MIN_TIME, CLOCK
    MIN_TIME = args.min_time
    CLOCK = resolve_clock(args.clock, args.device, args.threads)
    if args.quick:
        args.models, args.repeats = ["mlp", "cnn"], 3
    device = torch.device(args.device)
    print(
        f"# bench_optim: {env_line(device)}, {args.repeats} interleaved repeats of >= "
        f"{args.min_time} s, {CLOCK} clock; times median [min-max], ratios median [min-max] of "
        "per-repeat ratios"
    )
    torch.manual_seed(0)
    for part in args.only:
        {"rsgd": bench_rsgd, "esgd": bench_esgd, "vmap": bench_vmap, "update": bench_update}[part](
            args, device
        )


if __name__ == "__main__":
    main()

"""Where the time of one optimizer step goes: SGD, rSGD and eSGD phase by phase.

``bench_optim.py`` gives the ratios (rSGD step / (y x SGD step), eSGD outer step / (L x SGD
step)); this script splits each step into its phases, so a ratio above its target can be read
off the phase that costs more than SGD's counterpart. Every phase is timed with the process CPU
clock (one torch thread), summed over many steps, phases interleaved within each step.

Phases: ``zero_grad``, ``forward`` (all replicas / one inner minibatch), ``backward``,
``update`` (rSGD: coupling + flat SGD step; SGD: ``torch.optim.SGD.step``), and for eSGD the
Langevin ``inner`` update (noise draw included) and the ``outer`` step.

Usage::

    python benchmarks/profile_steps.py --models mlp cnn --steps 200
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

from _common import add_threads_arg, env_line, pin_threads


def _timed(acc: dict[str, float], name: str, fn: Callable[[], object]) -> object:
    t0 = time.process_time()
    out = fn()
    acc[name] += time.process_time() - t0
    return out


def profile_sgd(make, x, t, steps: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    acc: dict[str, float] = defaultdict(float)
    for _ in range(steps):
        _timed(acc, "zero_grad", opt.zero_grad)
        loss = _timed(acc, "forward", lambda: F.cross_entropy(model(x[0]), t[0]))
        _timed(acc, "backward", loss.backward)  # type: ignore[union-attr]
        _timed(acc, "update", opt.step)
    return {k: v / steps for k, v in acc.items()}


def profile_rsgd(make, x, t, steps: int) -> dict[str, float]:
    import torch.nn.functional as F

    from flatminima.optim import Replicas, ReplicatedSGD

    reps = Replicas(make, x.shape[0], seed=0)
    opt = ReplicatedSGD(reps, lr=0.01, momentum=0.9, weight_decay=5e-4, gamma=1e-3)
    acc: dict[str, float] = defaultdict(float)
    n = x.shape[1]

    def forward():
        out = opt.forward_all(x)
        return F.cross_entropy(out.flatten(0, 1), t.flatten(), reduction="sum").div(n)

    for _ in range(steps):
        _timed(acc, "zero_grad", opt.zero_grad)
        loss = _timed(acc, "forward", forward)
        _timed(acc, "backward", loss.backward)  # type: ignore[union-attr]
        _timed(acc, "update", opt.step)
    return {k: v / steps for k, v in acc.items()}


def profile_esgd(make, x, t, steps: int, inner: int, noise: float) -> dict[str, float]:
    import torch.nn.functional as F

    from flatminima.optim import EntropySGD

    model = make()
    opt = EntropySGD(
        model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, inner_steps=inner,
        gamma=1e-3, noise=noise, seed=0,
    )  # fmt: skip
    acc: dict[str, float] = defaultdict(float)
    for _ in range(steps):
        for _ in range(inner):
            _timed(acc, "zero_grad", opt.zero_grad)
            loss = _timed(acc, "forward", lambda: F.cross_entropy(model(x[0]), t[0]))
            _timed(acc, "backward", loss.backward)  # type: ignore[union-attr]
            _timed(acc, "inner", opt.inner_step)
        _timed(acc, "outer", opt.outer_step)
    return {k: v / steps for k, v in acc.items()}


def _row(name: str, phases: dict[str, float], per: float) -> str:
    total = sum(phases.values())
    parts = "  ".join(f"{k} {1e3 * v / per:.3f}" for k, v in phases.items())
    return f"{name:<28} total {1e3 * total / per:8.3f} ms   {parts}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn", "resnet18"]
    )
    p.add_argument("--steps", type=int, default=100, help="steps timed per optimizer")
    p.add_argument("--replicas", type=int, default=3, help="y of rSGD")
    p.add_argument("--inner-steps", type=int, default=5, help="L of eSGD")
    add_threads_arg(p)
    args = p.parse_args()
    pin_threads(args.threads)
    import torch
    from bench_optim import BATCH, MODELS, NUM_CLASSES, make

    print(env_line("cpu"))
    print("milliseconds of process CPU time per step, by phase (per SGD-equivalent step in [])")
    for name in args.models:
        shape, _ = MODELS[name]
        y, L = args.replicas, args.inner_steps
        g = torch.Generator().manual_seed(0)
        x = torch.randn(y, BATCH, *shape, generator=g)
        t = torch.randint(0, NUM_CLASSES, (y, BATCH), generator=g)
        fn = make(name)
        steps = args.steps if name != "resnet18" else max(5, args.steps // 20)
        print(f"## {name}")
        print(_row("SGD", profile_sgd(fn, x, t, steps * y), 1))
        print(_row(f"rSGD (y={y}) [/y]", profile_rsgd(fn, x, t, steps), y))
        print(_row(f"eSGD (L={L}) [/L]", profile_esgd(fn, x, t, steps, L, 1e-4), L))
        print(_row(f"eSGD (L={L}, noise 0) [/L]", profile_esgd(fn, x, t, steps, L, 0.0), L))


if __name__ == "__main__":
    main()

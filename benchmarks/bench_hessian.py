"""Peak memory of the Hessian top-k eigenvalues (thick-restart Lanczos) against the iteration cap.

Done when (issue 15): the peak at ``max_iter`` 100 is within 10 % of the peak at ``max_iter`` 20
on ResNet-18 width 16, and the projection for WRN-28-10 (36.5M parameters) fits in 24 GB.

    python benchmarks/bench_hessian.py                       # CPU, 1 thread, about 4 minutes
    python benchmarks/bench_hessian.py --k 1 3 --repeats 3
    python benchmarks/bench_hessian.py --device cuda --width 64 --samples 256

Every setting runs in a fresh Python process (so each high-water mark is its own), the
settings of one repeat one after the other (interleaved repeats):

- ``model``: import, build the model, make the data; no Hessian work;
- ``hvp``: plus one Hessian-vector product (the model's own baseline: parameters, the
  double-backward graph of one batch, the product);
- ``eig k, max_iter M``: ``hessian_eigenvalues(k, max_iter=M, tol=1e-12)``: the tolerance is
  out of reach, so every run does exactly ``M`` products (and restarts once the basis is full).

Peak = the process's resident-set high-water mark (``VmHWM``; ``ru_maxrss`` where there is no
/proc) on the CPU, ``torch.cuda.max_memory_allocated`` on a GPU. On the CPU the settings run with
glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (``--mmap-threshold``, 128 KiB), so that every tensor
of a vector's size is mmapped and returned to the system when freed: the high-water mark then
counts live tensors, not what glibc's heap kept of freed ones (with the dynamic default the
``hvp`` baseline alone varied by 15 MB between identical runs). "Solver" memory is the peak
above the ``hvp`` baseline, also given in vectors of ``D`` float32 entries.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import (
    add_threads_arg,
    env_line,
    fmt_stats,
    fmt_triple,
    pin_threads,
    ratio_stats,
    stats,
)

WRN_PARAMS = 36_479_194  # WRN-28-10, 10 classes (checked with --check-wrn)
GB = 1e9
MB = 1e6


# ----------------------------------------------------------------------------- child process
def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def child(spec: dict) -> dict:
    """Run one setting in this (fresh) process and return its measurements."""
    pin_threads(spec["threads"])
    import torch
    import torch.nn.functional as F

    from flatminima.flatness import hessian_eigenvalues, hvp
    from flatminima.models import build_model

    dev = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 32, 32), 10, width=spec["width"]).to(dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(spec["samples"], 3, 32, 32, generator=g).to(dev)
    y = torch.randint(0, 10, (spec["samples"],), generator=g).to(dev)
    dim = sum(p.numel() for p in model.parameters())
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = {"dim": dim, "n_hvp": 0, "seconds": 0.0}
    t0 = time.perf_counter()
    data, bs = (x, y), spec["batch_size"]
    if spec["kind"] == "hvp":
        v = torch.randn(dim, generator=g).to(dev)
        hvp(model, F.cross_entropy, data, v, batch_size=bs)
        out["n_hvp"] = 1
    elif spec["kind"] == "eig":
        r = hessian_eigenvalues(
            model, F.cross_entropy, data, k=spec["k"], max_iter=spec["max_iter"], tol=1e-12,
            batch_size=bs, ncv=spec["ncv"],
        )  # fmt: skip
        out.update(n_hvp=r.n_hvp, ncv=r.ncv, restarts=r.n_restarts, top=r.eigenvalues[0])
    out["seconds"] = time.perf_counter() - t0
    out["peak"] = _peak_bytes(spec["device"])
    return out


def run_child(spec: dict, mmap_threshold: int) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = dict(os.environ)
    if mmap_threshold > 0:  # glibc: large blocks mmapped and returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"setting {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- parent
def settings(args: argparse.Namespace) -> list[tuple[str, dict]]:
    base = {
        "threads": args.threads, "device": args.device, "width": args.width,
        "samples": args.samples, "batch_size": args.batch_size, "ncv": args.ncv,
    }  # fmt: skip
    out = [("model", {**base, "kind": "model"}), ("hvp", {**base, "kind": "hvp"})]
    for k in args.k:
        for m in args.max_iter:
            out.append((f"eig k={k} max_iter={m}", {**base, "kind": "eig", "k": k, "max_iter": m}))
    return out


def measure(args: argparse.Namespace) -> dict[str, list[dict]]:
    """All settings, each repeat running every setting once (fresh process each)."""
    todo = settings(args)
    res: dict[str, list[dict]] = {name: [] for name, _ in todo}
    for rep in range(args.repeats):
        for name, spec in todo:
            r = run_child(spec, args.mmap_threshold)
            res[name].append(r)
            print(f"  repeat {rep + 1}/{args.repeats} {name:<24} peak {r['peak'] / MB:9.1f} MB "
                  f"{r['n_hvp']:4d} products {r['seconds']:7.1f} s", flush=True)  # fmt: skip
    return res


def report(args: argparse.Namespace, res: dict[str, list[dict]]) -> None:
    dim = res["model"][0]["dim"]
    vec = 4 * dim  # bytes of one float32 vector of the parameter size
    base = [r["peak"] for r in res["hvp"]]
    print(f"\n{'setting':<26}{'products':>9}  {'peak MB':<24}{'solver MB (above hvp)':<26}"
          f"{'solver / (4 D B)':<22}{'s':>7}")  # fmt: skip
    solver_vectors: dict[str, tuple[float, float, float]] = {}
    for name, runs in res.items():
        peaks = [r["peak"] for r in runs]
        above = [p - b for p, b in zip(peaks, base)]
        solver_vectors[name] = tuple(v / vec for v in stats(above))
        mb, nv = (fmt_stats(above, 1 / MB, 1), fmt_stats(above, 1 / vec, 1)) if name not in (
            "model", "hvp") else ("-", "-")  # fmt: skip
        print(f"{name:<26}{runs[0]['n_hvp']:>9}  {fmt_stats(peaks, 1 / MB, 1):<24}"
              f"{mb:<26}{nv:<22}{fmt_stats([r['seconds'] for r in runs], 1, 1):>7}")  # fmt: skip
    lo_cap, hi_cap = min(args.max_iter), max(args.max_iter)
    print(f"\npeak(max_iter {hi_cap}) / peak(max_iter {lo_cap}), per repeat (target <= 1.10):")
    for k in args.k:
        hi = res[f"eig k={k} max_iter={hi_cap}"]
        lo = res[f"eig k={k} max_iter={lo_cap}"]
        total = ratio_stats([r["peak"] for r in hi], [r["peak"] for r in lo])
        solver = ratio_stats(
            [r["peak"] - b for r, b in zip(hi, base)], [r["peak"] - b for r, b in zip(lo, base)]
        )
        print(f"  k={k}: whole process {fmt_triple(total, 1, 3)}, solver part "
              f"{fmt_triple(solver, 1, 3)}")  # fmt: skip
    project(args, solver_vectors, hi_cap, res)


def project(args: argparse.Namespace, solver_vectors: dict, cap: int, res: dict) -> None:
    """WRN-28-10 estimate: measured solver vectors and the parameter-sized state of a product."""
    print(f"\nprojection for WRN-28-10, D = {WRN_PARAMS:,} (float32, activations not included):")
    for k in args.k:
        ncv = res[f"eig k={k} max_iter={cap}"][0]["ncv"]
        basis = (ncv + 1) * 4 * WRN_PARAMS
        v_med, _, v_hi = solver_vectors[f"eig k={k} max_iter={cap}"]
        solver = v_hi * 4 * WRN_PARAMS
        state = 4 * 4 * WRN_PARAMS  # parameters, gradients with graph, product, its input
        total = solver + state
        verdict = "fits" if total <= 24 * GB else "does NOT fit"
        print(f"  k={k}: basis (ncv+1) x D x 4 B = {basis / GB:.2f} GB; measured solver "
              f"{v_med:.1f} (max {v_hi:.1f}) vectors -> {solver / GB:.2f} GB; + model state "
              f"4 x D x 4 B = {state / GB:.2f} GB; total {total / GB:.2f} GB: {verdict} "
              "in 24 GB")  # fmt: skip


def check_wrn() -> None:
    from flatminima.models import build_model, count_parameters

    n = count_parameters(build_model("wrn", (3, 32, 32), 10, depth=28, widen_factor=10))
    print(f"WRN-28-10 parameters: {n:,} (constant in this script: {WRN_PARAMS:,})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_threads_arg(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=16, help="ResNet-18 width (16)")
    ap.add_argument("--samples", type=int, default=32, help="samples in the Hessian (32)")
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the products (32)")
    ap.add_argument("--k", type=int, nargs="+", default=[3], help="eigenvalues wanted (3)")
    ap.add_argument("--max-iter", type=int, nargs=2, default=[20, 100], help="caps (20 100)")
    ap.add_argument("--ncv", type=int, default=None, help="Lanczos basis (default max(2k+1,20))")
    ap.add_argument("--repeats", type=int, default=2, help="fresh-process repeats (2)")
    ap.add_argument(
        "--mmap-threshold", type=int, default=131072,
        help="glibc MALLOC_MMAP_THRESHOLD_ of the settings' processes, bytes (131072); 0: "
        "glibc's dynamic default, whose heap keeps freed tensors and blurs the high-water mark",
    )  # fmt: skip
    ap.add_argument("--check-wrn", action="store_true", help="count WRN-28-10's parameters")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    pin_threads(args.threads)
    if args.check_wrn:
        check_wrn()
        return
    print(f"# bench_hessian: {env_line(args.device)}")
    print(f"# resnet18 width {args.width}, {args.samples} samples, batch {args.batch_size}, "
          f"k {args.k}, max_iter {args.max_iter}, {args.repeats} repeats, one process per "
          f"setting, MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'dynamic'}")  # fmt: skip
    report(args, measure(args))


if __name__ == "__main__":
    main()

"""Shared helpers of the benchmarks: pinned threads, interleaved repeats, median [min-max].

Every benchmark calls :func:`add_threads_arg` on its parser and :func:`pin_threads` right after
parsing, before building models or data, so its numbers do not depend on torch's default
thread count (on a small shared machine two threads fight over two cores and ratios measured
minutes apart become meaningless). Timings of the variants compared are taken round-robin in
one run (:func:`interleaved`), so drifts of the machine hit every variant alike; ratios are
formed per repeat, from variants measured next to each other, and summarised by their median
and range (:func:`ratio_stats`, :func:`fmt_stats`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

#: Clocks of :func:`interleaved`.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

__all__ = [
    "CLOCKS",
    "add_threads_arg",
    "env_line",
    "fmt_stats",
    "fmt_triple",
    "interleaved",
    "pin_threads",
    "ratio_stats",
    "resolve_clock",
    "stats",
    "sync",
]


def add_threads_arg(parser: argparse.ArgumentParser, default: int = 1) -> None:
    """Add ``--threads`` (torch intra-op threads; default 1)."""
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        help=f"torch CPU threads, pinned before any torch work (default {default})",
    )


def pin_threads(n: int) -> int:
    """Pin torch's intra-op (and, if still possible, inter-op) threads to ``n``.

    Also exports ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` so child processes inherit the
    setting. Returns the thread count torch reports.
    """
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel work; intra-op is what counts
        pass
    return torch.get_num_threads()


def env_line(device: object = "cpu") -> str:
    """One line describing the run: torch version, device, threads, CPU count."""
    return (
        f"torch {torch.__version__}, python {platform.python_version()}, device {device}, "
        f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs"
    )


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    device: torch.device | str = "cpu",
    warmup: int = 1,
    min_time: float = 0.0,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """Seconds per call of each fn, repeats interleaved round-robin after ``warmup`` calls each.

    With ``min_time > 0`` a measurement times ``n`` back-to-back calls of a fn, ``n`` chosen
    once (from one calibration call after the warm-up) so that it lasts about ``min_time``
    seconds, and reports the time per call: a scheduler hiccup then weighs less in a fast
    fn's number. ``clock``: ``"wall"`` (``time.perf_counter``) or ``"cpu"`` (the process's CPU
    time, ``time.process_time``: the work done, without the time spent waiting for a core that
    other processes hold; only meaningful on the CPU with one thread). Returns every
    measurement (``repeats`` per key) so callers can report medians, ranges and per-repeat
    ratios.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {tuple(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    inner: dict[str, int] = {}
    for key, fn in fns.items():
        for _ in range(warmup):
            fn()
        inner[key] = 1
        if min_time > 0:
            one = _time(fn, 1, device, now)
            inner[key] = max(1, math.ceil(min_time / max(one, 1e-9)))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            times[key].append(_time(fn, inner[key], device, now) / inner[key])
    return times


def _time(
    fn: Callable[[], object], n: int, device: torch.device | str, now: Callable[[], float]
) -> float:
    sync(device)
    t0 = now()
    for _ in range(n):
        fn()
    sync(device)
    return now() - t0


def resolve_clock(clock: str, device: torch.device | str, threads: int) -> str:
    """``"auto"``: CPU time on the CPU with one thread, else wall-clock."""
    if clock != "auto":
        return clock
    return "cpu" if torch.device(device).type == "cpu" and threads == 1 else "wall"


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    """``(median, min, max)``."""
    return statistics.median(values), min(values), max(values)


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median and range of the per-repeat ratios ``num[i] / den[i]`` (measured side by side)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"need equally many measurements, got {len(num)} and {len(den)}")
    return stats([a / b for a, b in zip(num, den)])


def fmt_triple(triple: tuple[float, float, float], scale: float = 1.0, digits: int = 2) -> str:
    """``median [min-max]`` of a ``(median, min, max)`` triple, each times ``scale``."""
    med, lo, hi = (scale * v for v in triple)
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt_stats(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``median [min-max]`` of ``values``, each times ``scale``."""
    return fmt_triple(stats(values), scale, digits)

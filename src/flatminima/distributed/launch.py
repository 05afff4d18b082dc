"""Start ``nprocs`` local processes with the environment ``torchrun`` would give them.

:func:`launch_local` is for tests, notebooks and users without ``torchrun``: it picks a free
localhost port, starts one process per rank with ``torch.multiprocessing``'s ``spawn`` context,
sets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``LOCAL_WORLD_SIZE`` (and ``GLOO_SOCKET_IFNAME=lo`` unless already set), runs ``fn(*args)`` in
each, and returns every rank's return value. Results travel through files in a temporary folder,
never through pipes, so a large result cannot block a child's exit.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["LaunchError", "free_port", "launch_local"]

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """One or more ranks of :func:`launch_local` failed.

    Attributes:
        exitcodes: exit code of every rank (``None``: still running when the launcher gave up;
            negative: killed by that signal).
        errors: the traceback text of each rank that raised, keyed by rank.
        elapsed: seconds from the start to the moment the last process was reaped.
    """

    def __init__(
        self, message: str, exitcodes: list[int | None], errors: dict[int, str], elapsed: float
    ) -> None:
        super().__init__(message)
        self.exitcodes = exitcodes
        self.errors = errors
        self.elapsed = elapsed


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int,
    nprocs: int,
    port: int,
    env: dict[str, str],
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    folder: str,
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nprocs),
        }
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    try:
        result = fn(*args)
    except BaseException:
        Path(folder, f"rank{rank}.err").write_text(traceback.format_exc())
        raise SystemExit(1) from None
    tmp = Path(folder, f"rank{rank}.pt.tmp")
    torch.save(result, tmp)
    os.replace(tmp, Path(folder, f"rank{rank}.pt"))


def launch_local(
    nprocs: int,
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    terminate_on_failure: bool = True,
    start_method: str = "spawn",
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes set up as ranks ``0..nprocs-1``.

    Inside ``fn``, :func:`flatminima.distributed.init_distributed` (or
    ``torch.distributed.init_process_group("gloo")``) joins the group from the environment.
    ``fn`` must be importable by name (a module-level function), as ``spawn`` requires.

    Args:
        nprocs: number of processes (world size), ``>= 1``.
        fn: the function each rank runs; its return value must be picklable by ``torch.save``.
        args: positional arguments of ``fn`` (picklable).
        env: extra environment variables for the children.
        timeout: seconds to wait for all ranks; the rest are terminated after it (``None``:
            wait forever).
        terminate_on_failure: terminate the other ranks as soon as one fails (like
            ``torch.multiprocessing.spawn``). ``False`` lets them run into their own error
            handling, which is how the fault-tolerance tests observe it.
        start_method: ``"spawn"`` (fresh interpreters: safe everywhere, seconds to import torch)
            or ``"fork"`` (copies of this process: starts at once; only safe while this process
            has no CUDA context, no process group and no OpenMP worker threads, e.g. with
            ``OMP_NUM_THREADS=1``), or ``"forkserver"``.

    Returns:
        the return value of ``fn`` on each rank, in rank order.

    Raises:
        ValueError: ``nprocs`` is not a positive integer, ``timeout`` is not positive, or an
            unknown ``start_method``.
        LaunchError: a rank raised, died or did not finish within ``timeout``; carries every
            rank's exit code and the tracebacks.

    Example:
        >>> launch_local(2, os.getpid)  # doctest: +SKIP
        [12345, 12346]
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"Invalid nprocs: {nprocs!r} (must be a positive integer)")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"Invalid timeout: {timeout!r} (must be > 0 seconds, or None)")
    if start_method not in ("spawn", "fork", "forkserver"):
        raise ValueError(f"Invalid start_method: {start_method!r}; valid: spawn, fork, forkserver")
    ctx = mp.get_context(start_method)
    port = free_port()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flatminima-launch-") as folder:
        procs = [
            ctx.Process(  # type: ignore[attr-defined]
                target=_entry,
                args=(r, nprocs, port, dict(env or {}), fn, tuple(args), folder),
                daemon=False,
            )
            for r in range(nprocs)
        ]
        for p in procs:
            p.start()
        deadline = None if timeout is None else start + timeout
        failed = False
        try:
            pending = list(procs)
            while pending:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                ready = wait([p.sentinel for p in pending], timeout=left)
                if not ready:
                    log.error(
                        "launch_local: ranks still running after %.0f s; terminating", timeout
                    )
                    break
                for p in [p for p in pending if p.sentinel in ready]:
                    p.join()
                    pending.remove(p)
                    if p.exitcode != 0:
                        failed = True
                if failed and terminate_on_failure:
                    break
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(5.0)
                if p.is_alive():
                    p.kill()
                    p.join()
        elapsed = time.monotonic() - start
        codes: list[int | None] = [p.exitcode for p in procs]
        errors = {
            r: Path(folder, f"rank{r}.err").read_text()
            for r in range(nprocs)
            if Path(folder, f"rank{r}.err").is_file()
        }
        if any(c != 0 for c in codes):
            first = min(errors) if errors else None
            detail = f"; rank {first} raised:\n{errors[first]}" if first is not None else ""
            raise LaunchError(
                f"launch_local: ranks exited with codes {codes}{detail}", codes, errors, elapsed
            )
        return [torch.load(Path(folder, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]

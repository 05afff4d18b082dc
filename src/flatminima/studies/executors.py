"""Where the runs of a study are trained: this process, a local process pool, or a cluster.

Every study (``compare``, ``tune``, ``study``) builds a list of run items ``(run_dir, config)``
and hands it to an executor's :meth:`Executor.run`. An executor trains every item that is not
finished (a finished run is one whose ``summary.json`` holds this exact configuration with status
``complete`` or ``diverged``), resumes partial ones from their checkpoint, and returns when all
are done. The study then reads the run folders back in its own process (measurements, report):
so the numbers do not depend on the executor, and a killed worker costs only its unfinished run.

Executors:

* ``serial``: in this process, one run after the other (the default with ``jobs=1``);
* ``local``: a pool of ``jobs`` spawned processes on this machine, ``cores // jobs`` torch
  threads each;
* ``submitit``: one job (or an array of jobs) per chunk of ``runs_per_job`` runs through
  `submitit <https://github.com/facebookincubator/submitit>`_: SLURM on a cluster
  (``cluster="slurm"``, with ``partition``, ``timeout_min``, ``gpus_per_node``, ...), or its local
  mode (``cluster="local"``: subprocesses on this machine, used by the tests).

Example:
    >>> ex = make_executor("serial")
    >>> ex.run([])  # nothing to train
    >>> ex.name
    'serial'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flatminima.studies._runs import DataCache, train_run
from flatminima.train import RunFolder, TrainConfig

log = logging.getLogger(__name__)

__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalPoolExecutor",
    "SerialExecutor",
    "SubmititExecutor",
    "make_executor",
    "run_finished",
]

EXECUTORS = ("serial", "local", "submitit")

RunItem = tuple[Path, TrainConfig]


def run_finished(cfg: TrainConfig, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly ``cfg`` (complete or diverged; the
    one definition, :meth:`flatminima.train.run_folder.RunFolder.is_finished`)."""
    return RunFolder(run_dir).is_finished(cfg)


def train_chunk(run_dirs: Sequence[str], configs: Sequence[dict[str, Any]], threads: int) -> int:
    """Train (resume, or skip) each run of a chunk in this process; the worker entry point.

    Module-level and given plain strings and dicts, so it pickles for process pools and
    cluster jobs. Returns the number of runs handled.
    """
    import torch

    torch.set_num_threads(max(1, int(threads)))
    data = DataCache()
    for run_dir, values in zip(run_dirs, configs):
        train_run(TrainConfig.from_dict(values), Path(run_dir), data)
    return len(run_dirs)


def _pending(items: Sequence[RunItem]) -> list[RunItem]:
    seen: dict[str, RunItem] = {}
    for run_dir, cfg in items:
        seen.setdefault(str(run_dir), (Path(run_dir), cfg))
    return [(d, c) for d, c in seen.values() if not run_finished(c, d)]


class Executor:
    """Base class: :meth:`run` trains the unfinished items (see the module docstring)."""

    name = "executor"

    def run(self, items: Sequence[RunItem], *, progress: bool = False) -> None:
        todo = _pending(items)
        if todo:
            log.info("%s executor: %d of %d runs to train", self.name, len(todo), len(items))
            self._run(todo, progress)

    def _run(self, todo: list[RunItem], progress: bool) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The executor's settings (recorded in the report)."""
        return {"name": self.name}


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="run", desc=desc)


class SerialExecutor(Executor):
    """Every run in this process, one after the other (one shared data cache)."""

    name = "serial"

    def _run(self, todo: list[RunItem], progress: bool) -> None:
        data, bar = DataCache(), _bar(progress, len(todo), "training")
        try:
            for run_dir, cfg in todo:
                train_run(cfg, run_dir, data)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()


class LocalPoolExecutor(Executor):
    """``jobs`` spawned worker processes on this machine, ``cores // jobs`` torch threads each.

    Raises:
        ValueError: ``jobs`` < 1.
    """

    name = "local"

    def __init__(self, jobs: int = 1) -> None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"Invalid jobs value: {jobs!r} (must be an integer >= 1)")
        self.jobs = jobs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "jobs": self.jobs}

    def _run(self, todo: list[RunItem], progress: bool) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        bar = _bar(progress, len(todo), f"training ({self.jobs} jobs)")
        errors: list[str] = []
        with ProcessPoolExecutor(self.jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {
                pool.submit(train_chunk, [str(d)], [c.to_dict()], threads): d for d, c in todo
            }
            try:
                for fut in as_completed(futures):
                    if fut.exception() is not None:
                        errors.append(f"{futures[fut]}: {fut.exception()!r}")
                    if bar is not None:
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
        _raise_failures(errors)


def _raise_failures(errors: list[str]) -> None:
    if errors:
        raise RuntimeError(
            f"{len(errors)} run(s) failed (finished runs are kept; re-run to resume):\n"
            + "\n".join(errors)
        )


class SubmititExecutor(Executor):
    """Runs as submitit jobs: SLURM on a cluster, or submitit's local mode.

    Args:
        folder: submitit's log and pickle folder.
        cluster: ``"slurm"``, ``"local"`` (subprocesses here), ``"debug"`` (this process) or
            ``None`` (submitit picks SLURM when available, else local).
        runs_per_job: runs trained one after the other in one job (fewer, longer jobs). In
            submitit's local mode every job starts at once: this bounds the processes.
        threads: torch threads of each job (default ``cpus_per_task``).
        parameters: submitit parameters, e.g. ``timeout_min``, ``cpus_per_task``,
            ``gpus_per_node``, ``mem_gb``, ``slurm_partition``, ``slurm_array_parallelism``.

    Raises:
        ValueError: ``runs_per_job`` < 1.
        ImportError: submitit is not installed (``pip install flatminima[cluster]``).
    """

    name = "submitit"

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        cluster: str | None = None,
        runs_per_job: int = 1,
        threads: int | None = None,
        **parameters: Any,
    ) -> None:
        if isinstance(runs_per_job, bool) or not isinstance(runs_per_job, int) or runs_per_job < 1:
            raise ValueError(f"Invalid runs_per_job {runs_per_job!r}: an integer >= 1")
        try:
            import submitit  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "the submitit executor needs submitit: pip install 'flatminima[cluster]'"
            ) from exc
        self.folder = Path(folder)
        self.cluster = cluster
        self.runs_per_job = runs_per_job
        self.parameters = {"timeout_min": 60, "cpus_per_task": 1, **parameters}
        self.threads = int(threads or self.parameters["cpus_per_task"])

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cluster": self.cluster,
            "folder": str(self.folder),
            "runs_per_job": self.runs_per_job,
            **self.parameters,
        }

    def _run(self, todo: list[RunItem], progress: bool) -> None:
        import submitit

        ex = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        ex.update_parameters(name="flatminima", **self.parameters)
        k = self.runs_per_job
        chunks = [todo[i : i + k] for i in range(0, len(todo), k)]
        dirs = [[str(d) for d, _ in ch] for ch in chunks]
        cfgs = [[c.to_dict() for _, c in ch] for ch in chunks]
        jobs = ex.map_array(train_chunk, dirs, cfgs, [self.threads] * len(chunks))
        log.info("submitit: %d job(s) submitted (%s)", len(jobs), jobs[0].job_id if jobs else "-")
        bar = _bar(progress, len(todo), f"training ({len(jobs)} submitit jobs)")
        errors: list[str] = []
        try:
            for job, ds in zip(jobs, dirs):
                try:
                    job.result()
                except Exception as exc:  # a failed job: report it, keep the others
                    errors.append(f"job {job.job_id} ({', '.join(ds)}): {exc!r}")
                if bar is not None:
                    bar.update(len(ds))
        finally:
            if bar is not None:
                bar.close()
        _raise_failures(errors)


def make_executor(kind: str = "local", *, jobs: int = 1, **options: Any) -> Executor:
    """An executor by name (see the module docstring).

    ``local`` with ``jobs=1`` is the serial executor (no worker processes). ``options`` go to
    :class:`SubmititExecutor` (``folder`` is required there).

    Raises:
        ValueError: an unknown name, options for an executor that takes none, or bad values.
    """
    if kind not in EXECUTORS:
        raise ValueError(f"Invalid executor {kind!r}; valid: {', '.join(EXECUTORS)}")
    if kind != "submitit" and options:
        raise ValueError(f"Executor {kind!r} takes no options, got {sorted(options)}")
    if kind == "serial" or (kind == "local" and jobs == 1):
        return SerialExecutor()
    if kind == "local":
        return LocalPoolExecutor(jobs)
    if "folder" not in options:
        raise ValueError("The submitit executor needs a folder (e.g. --submitit-folder DIR)")
    return SubmititExecutor(options.pop("folder"), **options)

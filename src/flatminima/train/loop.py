"""The training loop shared by every algorithm, with run folders, exact resume and budgets.

A run folder holds:

``config.yaml``
    the resolved :class:`~flatminima.train.config.TrainConfig`;
``metrics.csv``
    one row per evaluation point (``eval_point``): samples through backward (``samples``),
    epochs of data (``data_epochs``), learning rate, coupling, training loss, and the
    loss/error of the evaluated network(s) on train subset, validation and test sets;
``checkpoint.pt``
    written atomically after every evaluation point: model(s), optimizer, schedulers, RNG and
    data-order state, metrics history. A killed run resumes from it and ends with the same numbers;
``summary.json``
    the final result (``status`` is ``complete`` or ``diverged``);

plus the marker ``run.json`` (config hash, data files) and, while a process trains it, the lock
``run.lock``. The folder's file names, reuse rules, lock and atomic writes live in
:mod:`flatminima.train.run_folder`; how several processes share one run is the trainer's
synchronisation strategy (:class:`LocalSync` here, ``TorchDistributedSync`` in
:mod:`flatminima.distributed.trainer`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatminima.data import ArrayDataset, DataSplits, TensorLoader, default_augment, load_dataset
from flatminima.flatness import local_energy
from flatminima.models import build_model
from flatminima.train.algorithms import Algorithm, build_algorithm
from flatminima.train.config import TrainConfig
from flatminima.train.evaluate import evaluate, evaluate_ensemble
from flatminima.train.run_folder import (
    ResumeMismatchError,
    RunFileError,
    RunFolder,
    RunFolderError,
    RunFolderLocked,
    current_names,
)

log = logging.getLogger(__name__)

__all__ = [
    "DivergenceError",
    "LocalSync",
    "Plan",
    "ResumeMismatchError",
    "RunFileError",
    "RunFolderError",
    "RunFolderLocked",
    "Trainer",
    "determinism",
    "load_run",
    "make_plan",
    "read_summary",
    "train",
]


class DivergenceError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Plan:
    """How a budget maps onto optimizer steps and evaluation points.

    Units (docs/design.md, "Budget units"): *samples* are examples through backward (one
    backward pass of a minibatch of ``B`` is ``B`` samples); an *evaluation point* is one
    metrics row and checkpoint, ``num_eval_points`` of them evenly spaced in steps.
    """

    steps_per_epoch: int  # optimizer steps per epoch of data (per stream)
    total_steps: int
    num_eval_points: int  # metrics rows / checkpoints over the run, evenly spaced in steps
    train_size: int
    samples_per_step: int  # samples through backward per optimizer step (passes x batch size)

    @property
    def total_samples(self) -> int:
        """Samples through backward over the whole run."""
        return self.total_steps * self.samples_per_step

    def eval_point_step(self, point: int) -> int:
        """The optimizer step at which evaluation point ``point`` (1-based) falls."""
        return round(point * self.total_steps / self.num_eval_points)


def make_plan(cfg: TrainConfig, algo: Algorithm, train_size: int) -> Plan:
    """Translate ``cfg.epochs`` under ``cfg.budget`` into a number of optimizer steps.

    An epoch of data is ``train_size // batch_size`` full batches (the loader drops the last
    incomplete one). ``grad-evals``: the run may spend ``epochs`` epochs' worth of samples
    through backward, whatever one step costs (SAM 2 passes, rSGD y, eSGD L). ``epochs``:
    every stream sees ``epochs`` epochs of data (eSGD: ``epochs`` epochs of inner minibatches,
    so for SGD and eSGD both budgets give the same run).
    """
    batches = train_size // cfg.batch_size
    if batches < algo.batches_per_step:
        raise ValueError(
            f"Training set of {train_size} samples gives {batches} batches of {cfg.batch_size}, "
            f"fewer than the {algo.batches_per_step} one {algo.name} step needs; "
            "lower batch_size or inner_steps"
        )
    steps_per_epoch = batches / algo.batches_per_step
    if cfg.budget == "grad-evals":
        total = round(cfg.epochs * batches / algo.passes_per_step)
    else:
        total = round(cfg.epochs * steps_per_epoch)
    total = max(total, 1)
    if cfg.eval_points:
        points = cfg.eval_points
    else:  # one evaluation per epoch of data
        points = round(total / steps_per_epoch)
    points = max(1, min(points, total))
    per_step = algo.passes_per_step * cfg.batch_size
    return Plan(max(1, math.floor(steps_per_epoch)), total, points, train_size, per_step)


def lr_factor(cfg: TrainConfig, plan: Plan) -> Callable[[int], float]:
    """Multiplicative LR factor of the optimizer step (warm-up, then constant/cosine/step)."""
    warmup = round(cfg.warmup_epochs * plan.steps_per_epoch)
    total = plan.total_steps
    milestones = sorted(round(m * total) for m in cfg.lr_milestones)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "cosine":
            span = max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
        if cfg.lr_schedule == "step":
            return cfg.lr_decay ** sum(step >= m for m in milestones)
        return 1.0

    return factor


def _model_factory(cfg: TrainConfig, data: DataSplits) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        return build_model(cfg.model, data.input_shape, data.num_classes, **cfg.model_kwargs)

    return factory


def load_data(cfg: TrainConfig, device: torch.device) -> DataSplits:
    # val_size below 1 is a fraction of the training set, from 1 up a number of samples
    val_size = int(cfg.val_size) if cfg.val_size >= 1 else cfg.val_size
    return load_dataset(
        cfg.data,
        cfg.data_root,
        val_size=val_size,
        train_subset=cfg.train_subset,
        label_noise=cfg.label_noise,
        seed=cfg.seed,
        device=device,
        **cfg.data_kwargs,
    )


def _endless(loader: TensorLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from loader


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of a run folder, or ``None`` (see :meth:`RunFolder.summary`)."""
    return RunFolder(run_dir).summary()


@contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms while the block runs, the previous settings after.

    Only switched on accelerators (the CPU kernels used here are deterministic already, and the
    switch costs seconds of imports per process). ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is set
    unless already set (cuBLAS reads it when its first handle is created, so a process that
    used cuBLAS before keeps its workspace; torch then warns) and removed again after.
    """
    if not enabled or device.type == "cpu":
        yield
        return
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


class LocalSync:
    """Synchronisation strategy of a run in one process: nothing to synchronise.

    The :class:`Trainer` calls these hooks at fixed points; a strategy for several processes
    (:class:`flatminima.distributed.trainer.TorchDistributedSync`) gathers, broadcasts and waits
    there, and lets only its main process (``is_main``) evaluate and write the run folder.
    """

    is_main = True
    label = ""
    #: where checkpoint tensors are loaded (``None``: the trainer's device)
    checkpoint_device: str | None = None

    def build_algorithm(
        self, cfg: TrainConfig, factory: Callable[[], nn.Module], device: torch.device
    ) -> Algorithm:
        """This process's algorithm adapter."""
        return build_algorithm(cfg, factory, device)

    def share(self, obj: Any) -> Any:
        """``obj`` as the main process has it (a broadcast)."""
        return obj

    def before_eval(self, algo: Algorithm) -> None:
        """Collect on the main process what it evaluates."""

    def after_eval(self) -> None:
        """Wait until the main process has evaluated."""

    def checkpoint(self, state: dict[str, Any], cfg: TrainConfig) -> Any | None:
        """What the main process saves as the checkpoint (``None`` on the others)."""
        return state

    def after_checkpoint(self) -> None:
        """Wait until the main process has written the checkpoint."""

    def unpack(self, ckpt: Any, path: Path) -> Any:
        """Check a checkpoint read by the main process; what :meth:`distribute` hands out."""
        if "ranks" in ckpt:
            raise ResumeMismatchError(
                f"{path} is a distributed checkpoint (layout {ckpt.get('distributed')}); "
                "resume it with --distributed and the same layout, or use another --out folder"
            )
        return ckpt

    def distribute(self, unpacked: Any) -> Any:
        """This process's share of what :meth:`unpack` returned on the main process."""
        return unpacked

    def layout(self) -> dict[str, Any] | None:
        """The process layout written to ``distributed.json`` and the summary (none here)."""
        return None

    def failure(self, exc: BaseException, trainer: Trainer) -> BaseException | None:
        """The error to raise instead of ``exc`` (``None``: ``exc`` itself)."""
        return None


class Trainer:
    """Builds everything a run needs from its config and runs it in a run folder.

    Global state: the trainer keeps its own random state (seeded from ``cfg.seed`` for the data
    and the model initialisation, then carried through training and checkpoints) and swaps it
    into torch only while :meth:`run` runs, so the caller's global RNG is left as it was;
    ``cfg.deterministic`` switches torch's deterministic algorithms on an accelerator for the
    duration of :meth:`run` only (:func:`determinism`).

    Args:
        cfg: the run's config.
        out_dir: the run folder, or ``None`` for a run that writes nothing.
        data: optional preloaded data splits.
        progress: show a progress bar (default ``cfg.progress``; main process only).
        sync: the synchronisation strategy (default :class:`LocalSync`, one process).

    Example:
        >>> cfg = TrainConfig(data="gmm", data_kwargs={"num_train": 64, "num_test": 32},
        ...                   model="mlp", epochs=1, batch_size=16, progress=False)
        >>> state = torch.get_rng_state()
        >>> Trainer(cfg).run()["status"]
        'complete'
        >>> torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
        True
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        data: DataSplits | None = None,
        progress: bool | None = None,
        sync: LocalSync | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.sync = sync if sync is not None else LocalSync()
        self.folder = RunFolder(out_dir) if out_dir is not None else None
        show = cfg.progress if progress is None else progress
        self.progress = bool(show) and self.sync.is_main
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid device {cfg.device!r}: CUDA is not available here")
        self._cuda_devices = (
            list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        )
        with torch.random.fork_rng(devices=self._cuda_devices):
            torch.manual_seed(cfg.seed)
            self.data = self._place(data if data is not None else load_data(cfg, self.device))
            torch.manual_seed(cfg.seed)  # model initialisation does not depend on data loading
            self.algo = self.sync.build_algorithm(cfg, _model_factory(cfg, self.data), self.device)
            self._rng = torch.get_rng_state()
            self._cuda_rng = torch.cuda.get_rng_state_all() if self._cuda_devices else None
        self._rng_active = False
        self.loaders = self._make_loaders()
        self.plan = make_plan(cfg, self.algo, len(self.data.train))
        self.algo.make_gamma_scheduler(self.plan.total_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.algo.optimizer, lr_factor(cfg, self.plan)
        )
        self.step = 0
        self.eval_point = 0  # evaluation points done (metrics rows)
        self.history: list[dict[str, Any]] = []
        self.train_time = 0.0
        n_eval = min(cfg.train_eval_samples or len(self.data.train), len(self.data.train))
        self.train_eval = ArrayDataset(self.data.train.x[:n_eval], self.data.train.y[:n_eval])
        self._tb: Any = None
        self._streams: list[Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @property
    def out_dir(self) -> Path | None:
        """The run folder's path (``None``: nothing is written)."""
        return self.folder.path if self.folder is not None else None

    def _place(self, data: DataSplits) -> DataSplits:
        return dataclasses.replace(
            data,
            train=data.train.to(self.device),
            test=data.test.to(self.device),
            val=None if data.val is None else data.val.to(self.device),
        )

    def _make_loaders(self) -> list[TensorLoader]:
        cfg = self.cfg
        augment = None
        if cfg.augment:
            augment = default_augment(cfg.data)
            if augment is None:
                raise ValueError(
                    f"augment=True, but data set {cfg.data!r} has no image augmentation "
                    "(crop and flip apply to image data sets)"
                )
        return [
            TensorLoader(
                self.data.train,
                cfg.batch_size,
                shuffle=True,
                drop_last=True,
                augment=augment,
                seed=cfg.seed * 1009 + s,
            )
            for s in range(self.algo.num_streams)
        ]

    # ------------------------------------------------------------------ state
    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """torch's global RNG holds this run's state inside the block; the caller's after."""
        with torch.random.fork_rng(devices=self._cuda_devices):
            torch.set_rng_state(self._rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state_all(self._cuda_rng)
            self._rng_active = True
            try:
                yield
            finally:
                self._rng_active = False
                self._rng = torch.get_rng_state()
                if self._cuda_devices:
                    self._cuda_rng = torch.cuda.get_rng_state_all()

    def state_dict(self) -> dict[str, Any]:
        active = self._rng_active
        cuda = torch.cuda.get_rng_state_all() if active and self._cuda_devices else self._cuda_rng
        return {
            "algorithm": self.algo.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "loaders": [ld.state_dict() for ld in self.loaders],
            "torch_rng": torch.get_rng_state() if active else self._rng.clone(),
            "cuda_rng": cuda if torch.cuda.is_available() else None,
            "step": self.step,
            "eval_point": self.eval_point,
            "history": self.history,
            "train_time": self.train_time,
            "config": self.cfg.numerics(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algo.load_state_dict(state["algorithm"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        for ld, s in zip(self.loaders, state["loaders"]):
            ld.load_state_dict(s)
        self._streams = None
        # RNG states are CPU byte tensors; torch.load(map_location=cuda) moves them
        self._rng = state["torch_rng"].cpu()
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            self._cuda_rng = [s.cpu() for s in state["cuda_rng"]]
            self._cuda_devices = list(range(torch.cuda.device_count()))
        if self._rng_active:
            torch.set_rng_state(self._rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state_all(self._cuda_rng)
        self.step = state["step"]
        # checkpoints written before the rename say "epoch" (and old names in the history)
        self.eval_point = state["eval_point"] if "eval_point" in state else state["epoch"]
        self.history = [current_names(row) for row in state["history"]]
        self.train_time = state["train_time"]

    # ------------------------------------------------------------------ evaluation
    def _recalibration_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.train_eval
        bs = self.cfg.eval_batch_size
        for i in range(0, len(ds), bs):
            yield ds.x[i : i + bs], ds.y[i : i + bs]

    def eval_models(self) -> dict[str, nn.Module]:
        """The networks evaluated at each evaluation point; the first is *the* result."""
        return self.algo.eval_models(self._recalibration_batches())

    def evaluate(self) -> dict[str, float]:
        """The evaluation row (collective: only the main process evaluates, the others get
        ``{}``)."""
        self.sync.before_eval(self.algo)
        row = self._evaluate() if self.sync.is_main else {}
        self.sync.after_eval()
        return row

    def _evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        bs = cfg.eval_batch_size
        rng = torch.get_rng_state()  # evaluation never shifts the training randomness
        models = self.eval_models()
        row: dict[str, float] = {}
        for i, (name, model) in enumerate(models.items()):
            prefix = "" if i == 0 else f"{name}_"
            if cfg.evaluate_test and (i == 0 or name.startswith("replica")):
                row[prefix + "test_loss"], row[prefix + "test_error"] = evaluate(
                    model, self.data.test, batch_size=bs
                )
            if i == 0:
                row["train_eval_loss"], row["train_error"] = evaluate(
                    model, self.train_eval, batch_size=bs
                )
                if self.data.val is not None:
                    row["val_loss"], row["val_error"] = evaluate(
                        model, self.data.val, batch_size=bs
                    )
        members = self.algo.ensemble_members()
        if members and cfg.evaluate_test:
            row["replica_mean_test_error"] = sum(
                row[f"replica{a}_test_error"] for a in range(len(members))
            ) / len(members)
            row["ensemble_test_loss"], row["ensemble_test_error"] = evaluate_ensemble(
                members, self.data.test, batch_size=bs
            )
        if self.eval_point in cfg.flatness_epochs or (
            cfg.flatness_epochs
            and -1 in cfg.flatness_epochs
            and self.eval_point == self.plan.num_eval_points
        ):
            row.update(self._flatness(next(iter(models.values()))))
        torch.set_rng_state(rng)
        return row

    def _flatness(self, model: nn.Module) -> dict[str, float]:
        cfg = self.cfg
        n = min(cfg.flatness_samples, len(self.data.train))
        res = local_energy(
            model,
            (self.data.train.x[:n], self.data.train.y[:n]),
            cfg.flatness_sigmas,
            n_draws=cfg.flatness_draws,
            seed=cfg.seed,
            batch_size=cfg.eval_batch_size,
        )
        out = {}
        errors = res.delta_error if res.delta_error is not None else [math.nan] * len(res.sigmas)
        for s, de, dl in zip(res.sigmas, errors, res.delta_loss):
            out[f"local_energy_error_s{s:g}"] = float(de)
            out[f"local_energy_loss_s{s:g}"] = float(dl)
        return out

    # ------------------------------------------------------------------ running
    def run(
        self, max_eval_points: int | None = None, *, max_epochs: int | None = None
    ) -> dict[str, Any]:
        """Train to the end of the budget (resuming if the run folder has a checkpoint).

        A folder that holds the finished run of this config is not trained again: a complete
        run returns its summary, a diverged one raises its :class:`DivergenceError` again.

        Args:
            max_eval_points: stop after this many evaluation points of this call (the run stays
                resumable and no summary is written unless the budget is used up).
            max_epochs: the former name of ``max_eval_points`` (it counted evaluation points).

        Raises:
            DivergenceError: the loss became NaN/inf (now, or when the run was trained).
            RunFolderError: the folder is not empty and holds no run of this config
                (:class:`ResumeMismatchError`: another config), or another live process writes
                it (:class:`RunFolderLocked`).
            RunFileError: a run-folder file could not be written or read.
        """
        try:
            with self._own_rng(), determinism(self.cfg.deterministic, self.device):
                return self._run(max_eval_points if max_epochs is None else max_epochs)
        except BaseException as exc:
            failure = self.sync.failure(exc, self)
            if failure is None:
                raise
            raise failure from exc

    def _run(self, max_eval_points: int | None) -> dict[str, Any]:
        try:
            finished, state = self._start()
            if finished is not None:
                log.info("%s is finished (%s); nothing to do", self.out_dir, finished["status"])
                if finished["status"] == "diverged":
                    raise DivergenceError(
                        f"{self.out_dir} holds this run, which already diverged: "
                        f"{finished.get('message') or 'non-finite loss'}"
                    )
                return finished
            if state is not None:
                self.load_state_dict(state)
                log.info(
                    "resumed %s at evaluation point %d (step %d)",
                    self.out_dir,
                    self.eval_point,
                    self.step,
                )
            self._open_outputs()
            return self._train(max_eval_points)
        finally:
            if self.folder is not None:
                self.folder.close()

    def _start(self) -> tuple[dict[str, Any] | None, Any]:
        """On the main process: skip a finished run, else claim the folder and read its
        checkpoint; the decision is shared, and each process gets its state to resume."""
        decision: dict[str, Any] = {"finished": None, "error": None}
        unpacked: Any = None
        error: BaseException | None = None
        if self.sync.is_main and self.folder is not None:
            try:
                decision["finished"], unpacked = self._claim()
            except Exception as exc:
                error = exc
                decision["error"] = f"{type(exc).__name__}: {exc}"
        decision = self.sync.share(decision)
        if decision["error"] is not None:
            if self.folder is not None:
                self.folder.close()
            if error is not None:
                raise error
            raise RunFolderError(f"the main process could not start: {decision['error']}")
        if decision["finished"] is not None:
            return decision["finished"], None
        return None, self.sync.distribute(unpacked)

    def _claim(self) -> tuple[dict[str, Any] | None, Any]:
        assert self.folder is not None
        folder, cfg = self.folder, self.cfg
        finished = folder.finished_summary(cfg)
        if finished is not None:
            return finished, None
        folder.open(cfg, self.data)
        try:
            finished = folder.finished_summary(cfg)  # finished meanwhile by another process
            if finished is not None:
                folder.close()
                return finished, None
            ckpt = folder.read_checkpoint(self.sync.checkpoint_device or self.device)
            if ckpt is None:
                return None, None
            folder.check_config(ckpt.get("config") if isinstance(ckpt, dict) else None, cfg)
            return None, self.sync.unpack(ckpt, folder.file(folder.CHECKPOINT))
        except BaseException:
            folder.close()
            raise

    def _open_outputs(self) -> None:
        """Main process: config.yaml, the layout of a distributed run, TensorBoard."""
        if not self.sync.is_main or self.folder is None:
            return
        self.folder.write_config(self.cfg)
        layout = self.sync.layout()
        if layout is not None:
            self.folder.write_json(RunFolder.LAYOUT, layout)
        if self.cfg.tensorboard:
            self._open_tensorboard()

    def _train(self, max_eval_points: int | None) -> dict[str, Any]:
        cfg = self.cfg
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.plan.total_steps,
                initial=self.step,
                unit="step",
                desc=f"{cfg.optimizer}{self.sync.label} {cfg.model}/{cfg.data} s{cfg.seed}",
                leave=False,
            )
        done = 0
        try:
            while self.step < self.plan.total_steps:
                if max_eval_points is not None and done >= max_eval_points:
                    final = self.history[-1] if self.history else {}
                    return {"status": "incomplete", "steps": self.step, "final": final}
                self._run_to_eval_point(bar)
                done += 1
        except DivergenceError as exc:
            self._finish("diverged", message=str(exc))
            raise
        finally:
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return self._finish("complete")

    def _run_to_eval_point(self, bar: Any) -> None:
        # Each loader is a cursor over an endless seeded stream of epochs; steps that use
        # several batches (eSGD) may straddle an epoch boundary, and a resumed run continues
        # from the saved cursor.
        if self._streams is None:
            self._streams = [_endless(ld) for ld in self.loaders]
        streams = self._streams
        steps = self.plan.eval_point_step(self.eval_point + 1) - self.step

        def next_batch(stream: int) -> tuple[torch.Tensor, torch.Tensor]:
            return next(streams[stream])

        self.algo.train_mode()
        loss_sum = torch.zeros((), dtype=torch.float64)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = self.algo.step(next_batch)
            if not math.isfinite(loss):
                self._diverged(loss)
            loss_sum += loss
            self.lr_scheduler.step()
            self.algo.after_step()
            self.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", point=self.eval_point + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_time += time.perf_counter() - t0
        self.eval_point += 1
        self._record(steps, float(loss_sum))
        self._checkpoint()

    def _record(self, steps: int, loss_sum: float) -> None:
        """Evaluate and append this evaluation point's metrics row."""
        cfg = self.cfg
        t1 = time.perf_counter()
        row: dict[str, Any] = {
            "eval_point": self.eval_point,
            "step": self.step,
            "samples": self.step * self.plan.samples_per_step,
            "data_epochs": self.step
            * self.algo.batches_per_step
            * cfg.batch_size
            / self.plan.train_size,
            "lr": self.algo.optimizer.param_groups[0]["lr"],
            "gamma": self.algo.current_gamma(),
            "train_loss": loss_sum / max(steps, 1),
        }
        row.update(self.evaluate())
        row["train_time_s"] = self.train_time
        row["eval_time_s"] = time.perf_counter() - t1
        self.history.append(row)
        log.info(
            "evaluation point %d: %s",
            self.eval_point,
            ", ".join(
                f"{k}={v:.4g}"
                for k, v in row.items()
                if isinstance(v, float) and k.endswith("error")
            ),
        )
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, self.step)

    def _checkpoint(self) -> None:
        """metrics.csv and checkpoint.pt (collective: the main process writes)."""
        payload = self.sync.checkpoint(self.state_dict(), self.cfg)
        if payload is not None and self.folder is not None:
            self.folder.write_metrics(self.history)
            self.folder.save_checkpoint(payload)
        self.sync.after_checkpoint()

    def _diverged(self, loss: float) -> None:
        msg = (
            f"training loss became {loss} at step {self.step + 1} (evaluation point "
            f"{self.eval_point + 1}); "
            "stopping. Lower lr (or gamma/inner_lr); "
        )
        if self.folder is None:
            msg += "nothing was saved (no run folder)"
        elif self.eval_point > 0 and self.folder.file(RunFolder.CHECKPOINT).is_file():
            msg += (
                f"the last good checkpoint (evaluation point {self.eval_point}, step "
                f"{self.plan.eval_point_step(self.eval_point)}) is kept in "
                f"{self.folder.file(RunFolder.CHECKPOINT)}"
            )
        else:
            msg += "no checkpoint was written (it diverged before the first evaluation point)"
        log.info(msg)  # the caller reports it (the CLI prints it, studies log a warning)
        raise DivergenceError(msg)

    def _finish(self, status: str, message: str | None = None) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        summary: dict[str, Any] = {
            "status": status,
            "message": message,
            "optimizer": self.cfg.optimizer,
            "model": self.cfg.model,
            "data": self.cfg.data,
            "seed": self.cfg.seed,
            "budget": self.cfg.budget,
            "epochs_budget": self.cfg.epochs,
            "steps": self.step,
            "total_steps": self.plan.total_steps,
            "samples": self.step * self.plan.samples_per_step,
            "train_time_s": self.train_time,
            "final": final,
            "config": self.cfg.numerics(),
        }
        vals = [r for r in self.history if "val_error" in r]
        if vals:
            best = min(vals, key=lambda r: (r["val_error"], r["eval_point"]))
            summary["early_stopped"] = {
                "eval_point": best["eval_point"],
                "val_error": best["val_error"],
                "test_error": best.get("test_error", math.nan),
            }
        layout = self.sync.layout()
        if layout is not None:
            summary["distributed"] = {k: v for k, v in layout.items() if k != "per_rank_batch_size"}
        if self.folder is not None and self.sync.is_main:
            self.folder.write_summary(summary)
        return summary

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning(
                "tensorboard is not installed (pip install flatminima[tensorboard]); "
                "scalars are not written"
            )
            return
        assert self.folder is not None
        self._tb = SummaryWriter(str(self.folder.file(RunFolder.TENSORBOARD)))


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    data: DataSplits | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one run to the end of its budget and return its summary.

    Seeding and determinism are the config's ``seed`` and ``deterministic`` keys; the caller's
    global RNG and torch's deterministic mode are as they were when this returns (see
    :class:`Trainer`).

    Example:
        >>> from flatminima.train import TrainConfig, train
        >>> cfg = TrainConfig(data="digits", model="mlp", optimizer="rsgd", epochs=2,
        ...                   progress=False)
        >>> summary = train(cfg, "runs/digits-rsgd")  # doctest: +SKIP
        >>> summary["final"]["test_error"]  # doctest: +SKIP
    """
    return Trainer(cfg, out_dir, data=data, progress=progress).run()


def _unpack_for_one_process(ckpt: Any, cfg: TrainConfig, path: Path) -> dict[str, Any]:
    """A checkpoint as one process loads it (a data-parallel run: rank 0's state)."""
    if "ranks" not in ckpt:
        return ckpt
    if cfg.optimizer == "rsgd":
        raise ValueError(
            f"{path} is a distributed rSGD checkpoint (one replica per process); loading it in "
            "one process is not supported: measure it from the processes that trained it"
        )
    return ckpt["ranks"][0]


def load_run(
    run_dir: str | Path, device: str | None = None, *, data: DataSplits | None = None
) -> Trainer:
    """Rebuild a run's trainer from its folder, with the last checkpoint loaded.

    Args:
        run_dir: the run folder.
        device: compute on this device instead of the run's.
        data: the run's data splits, when already loaded (else loaded from its config).

    Raises:
        FileNotFoundError: not a run folder, no checkpoint, or the data files the run was
            trained on are gone.
        ValueError: the data found now is not the data the run was trained on.
        RunFileError: a truncated or corrupt checkpoint.
    """
    folder = RunFolder(run_dir)
    cfg = folder.read_config()
    if device is not None:
        cfg = cfg.replace(device=device)
    ckpt = folder.read_checkpoint(map_location=torch.device(cfg.device))
    if ckpt is None:
        raise FileNotFoundError(f"{folder.path} has no {RunFolder.CHECKPOINT}: train it first")
    folder.check_data()  # the recorded data files are still there (before loading any data)
    trainer = Trainer(cfg, None, data=data, progress=False)
    folder.check_data(trainer.data)
    state = _unpack_for_one_process(ckpt, cfg, folder.file(RunFolder.CHECKPOINT))
    try:
        trainer.load_state_dict(state)
    except ValueError as exc:
        d = trainer.data
        raise ValueError(
            f"{folder.path}: the data loaded now ({d.name} from {d.source}, {len(d.train)} "
            f"training samples) is not the data the run was trained on ({exc}); make the run's "
            f"data files available again (data_root={cfg.data_root!r} or $FLATMINIMA_DATA)"
        ) from exc
    return trainer

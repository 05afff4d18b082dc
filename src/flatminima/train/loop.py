"""The training loop shared by every algorithm, with run folders, exact resume and budgets.

A run folder holds:

``config.yaml``
    the resolved :class:`~flatminima.train.config.TrainConfig`;
``metrics.csv``
    one row per epoch: gradient evaluations, learning rate, coupling, training loss, and the
    loss/error of the evaluated network(s) on train subset, validation and test sets;
``checkpoint.pt``
    written atomically after every epoch: model(s), optimizer, schedulers, RNG and data-order
    state, metrics history. A killed run resumes from it and ends with the same numbers;
``summary.json``
    the final result (``status`` is ``complete`` or ``diverged``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from flatminima.data import ArrayDataset, DataSplits, TensorLoader, default_augment, load_dataset
from flatminima.models import build_model
from flatminima.train.algorithms import Algorithm, build_algorithm
from flatminima.train.config import TrainConfig
from flatminima.train.evaluate import evaluate, evaluate_ensemble

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
METRICS = "metrics.csv"
CONFIG = "config.yaml"


class DivergenceError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; the last good checkpoint is kept."""


class ResumeMismatchError(ValueError):
    """Raised when a run folder holds a run with a different configuration."""


@dataclass
class Plan:
    """How a budget maps onto optimizer steps and evaluation points."""

    steps_per_epoch: int  # optimizer steps per epoch of data (per stream)
    total_steps: int
    num_epochs: int  # evaluation points ("epochs" of the metrics), evenly spaced in steps
    train_size: int
    grad_evals_per_step: int  # samples through backward per optimizer step

    @property
    def total_grad_evals(self) -> int:
        return self.total_steps * self.grad_evals_per_step

    def epoch_end(self, epoch: int) -> int:
        """The optimizer step at which evaluation point ``epoch`` (1-based) falls."""
        return round(epoch * self.total_steps / self.num_epochs)


def make_plan(cfg: TrainConfig, algo: Algorithm, train_size: int) -> Plan:
    """Translate ``cfg.epochs`` under ``cfg.budget`` into a number of optimizer steps.

    An epoch of data is ``train_size // batch_size`` full batches (the loader drops the last
    incomplete one). ``grad-evals``: the run may spend ``epochs`` epochs of gradient evaluations,
    whatever one step costs (SAM 2 passes, rSGD y, eSGD L). ``epochs``: every stream sees
    ``epochs`` epochs of data (eSGD: ``epochs`` epochs of inner minibatches, so for SGD and eSGD
    both budgets give the same run).
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


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    path = Path(run_dir) / SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


class Trainer:
    """Builds everything a run needs from its config and runs it in ``out_dir``."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        data: DataSplits | None = None,
        progress: bool | None = None,
    ) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = cfg.progress if progress is None else progress
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"Invalid device {cfg.device!r}: CUDA is not available here")
        torch.manual_seed(cfg.seed)
        if cfg.deterministic and self.device.type != "cpu":
            # CPU kernels used here are deterministic already; the switch costs seconds of
            # imports per process, so it is only flipped where it matters (CUDA).
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.data = data if data is not None else load_data(cfg, self.device)
        self.data = dataclasses.replace(
            self.data,
            train=self.data.train.to(self.device),
            test=self.data.test.to(self.device),
            val=None if self.data.val is None else self.data.val.to(self.device),
        )
        torch.manual_seed(cfg.seed)  # model initialisation does not depend on data loading
        self.algo = self._build_algorithm(_model_factory(cfg, self.data))
        augment = None
        if cfg.augment:
            augment = default_augment(cfg.data)
            if augment is None:
                raise ValueError(
                    f"augment=True, but data set {cfg.data!r} has no image augmentation "
                    "(crop and flip apply to image data sets)")
        self.loaders = [
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
        self.plan = make_plan(cfg, self.algo, len(self.data.train))
        self.algo.make_gamma_scheduler(self.plan.total_steps)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.algo.optimizer, lr_factor(cfg, self.plan)
        )
        self.step = 0
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.train_time = 0.0
        n_eval = cfg.train_eval_samples or len(self.data.train)
        n_eval = min(n_eval, len(self.data.train))
        self.train_eval = ArrayDataset(self.data.train.x[:n_eval], self.data.train.y[:n_eval])
        self._tb = None
        self._streams: list[Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _build_algorithm(self, model_factory: Callable[[], nn.Module]) -> Algorithm:
        """Hook: the algorithm adapter (the distributed trainer returns per-process ones)."""
        return build_algorithm(self.cfg, model_factory, self.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algo.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "loaders": [ld.state_dict() for ld in self.loaders],
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "step": self.step,
            "epoch": self.epoch,
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
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.train_time = state["train_time"]

    def _try_resume(self) -> None:
        assert self.out_dir is not None
        ckpt = self.out_dir / CHECKPOINT
        if not ckpt.is_file():
            return
        state = torch.load(ckpt, map_location=self.device, weights_only=False)
        if state["config"] != self.cfg.numerics():
            diff = sorted(
                k for k in self.cfg.numerics() if state["config"].get(k) != self.cfg.numerics()[k]
            )
            raise ResumeMismatchError(
                f"{self.out_dir} holds a run with a different configuration (differs in: "
                f"{', '.join(diff)}); use another --out folder or delete it"
            )
        self.load_state_dict(state)
        log.info("resumed %s at epoch %d (step %d)", self.out_dir, self.epoch, self.step)

    # ------------------------------------------------------------------ evaluation
    def _recalibration_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.train_eval
        bs = self.cfg.eval_batch_size
        for i in range(0, len(ds), bs):
            yield ds.x[i : i + bs], ds.y[i : i + bs]

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        bs = cfg.eval_batch_size
        rng = torch.get_rng_state()  # evaluation never shifts the training randomness
        models = self.algo.eval_models(self._recalibration_batches())
        row: dict[str, float] = {}
        for i, (name, model) in enumerate(models.items()):
            prefix = "" if i == 0 else f"{name}_"
            if i == 0 or name.startswith("replica"):
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
        if members:
            row["replica_mean_test_error"] = sum(
                row[f"replica{a}_test_error"] for a in range(len(members))
            ) / len(members)
            row["ensemble_test_loss"], row["ensemble_test_error"] = evaluate_ensemble(
                members, self.data.test, batch_size=bs
            )
        if self.epoch in cfg.flatness_epochs or (
            cfg.flatness_epochs and -1 in cfg.flatness_epochs and self.epoch == self.plan.num_epochs
        ):
            row.update(self._flatness(next(iter(models.values()))))
        torch.set_rng_state(rng)
        return row

    def _flatness(self, model: nn.Module) -> dict[str, float]:
        from flatminima.flatness import local_energy

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
        for s, de, dl in zip(res.sigmas, res.delta_error, res.delta_loss):
            out[f"local_energy_error_s{s:g}"] = float(de)
            out[f"local_energy_loss_s{s:g}"] = float(dl)
        return out

    # ------------------------------------------------------------------ running
    def run(self, max_epochs: int | None = None) -> dict[str, Any]:
        """Train to the end of the budget (resuming if the run folder has a checkpoint).

        Args:
            max_epochs: stop after this many epochs of this call (the run stays resumable and no
                summary is written unless the budget is used up).
        """
        cfg = self.cfg
        if self.out_dir is not None:
            summary = read_summary(self.out_dir)
            if (
                summary is not None
                and summary.get("status") == "complete"
                and summary.get("config") == cfg.numerics()
            ):
                log.info("%s is complete; nothing to do", self.out_dir)
                return summary
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._try_resume()
            (self.out_dir / CONFIG).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if cfg.tensorboard:
                self._open_tensorboard()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.plan.total_steps,
                initial=self.step,
                unit="step",
                desc=f"{cfg.optimizer} {cfg.model}/{cfg.data} s{cfg.seed}",
                leave=False,
            )
        done = 0
        try:
            while self.step < self.plan.total_steps:
                if max_epochs is not None and done >= max_epochs:
                    return {
                        "status": "incomplete",
                        "steps": self.step,
                        "final": self.history[-1] if self.history else {},
                    }
                self._run_epoch(bar)
                done += 1
        finally:
            if bar is not None:
                bar.close()
            if self._tb is not None:
                self._tb.close()
        return self._finish("complete")

    def _run_epoch(self, bar: Any) -> None:
        cfg = self.cfg
        # Each loader is a cursor over an endless seeded stream of epochs; steps that use
        # several batches (eSGD) may straddle an epoch boundary, and a resumed run continues
        # from the saved cursor.
        if self._streams is None:
            self._streams = [_endless(ld) for ld in self.loaders]
        streams = self._streams
        steps = self.plan.epoch_end(self.epoch + 1) - self.step

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
                bar.set_postfix(loss=f"{loss:.4f}", epoch=self.epoch + 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_time += time.perf_counter() - t0
        self.epoch += 1
        t1 = time.perf_counter()
        row: dict[str, Any] = {
            "epoch": self.epoch,
            "step": self.step,
            "grad_evals": self.step * self.plan.grad_evals_per_step,
            "data_epochs": self.step
            * self.algo.batches_per_step
            * cfg.batch_size
            / self.plan.train_size,
            "lr": self.algo.optimizer.param_groups[0]["lr"],
            "gamma": self.algo.current_gamma(),
            "train_loss": float(loss_sum) / max(steps, 1),
        }
        row.update(self.evaluate())
        row["train_time_s"] = self.train_time
        row["eval_time_s"] = time.perf_counter() - t1
        self.history.append(row)
        log.info(
            "epoch %d: %s",
            self.epoch,
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
        if self.out_dir is not None:
            _write_csv(self.history, self.out_dir / METRICS)
            _save_atomic(self.state_dict(), self.out_dir / CHECKPOINT)

    def _diverged(self, loss: float) -> None:
        msg = (
            f"training loss became {loss} at step {self.step + 1} (epoch {self.epoch + 1}); "
            "stopping. Lower lr (or gamma/inner_lr); "
        )
        if self.out_dir is not None:
            msg += f"the last good checkpoint is kept in {self.out_dir / CHECKPOINT}"
            self._finish("diverged", message=msg)
        log.error(msg)
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
            "grad_evals": self.step * self.plan.grad_evals_per_step,
            "train_time_s": self.train_time,
            "final": final,
            "config": self.cfg.numerics(),
        }
        vals = [r for r in self.history if "val_error" in r]
        if vals:
            best = min(vals, key=lambda r: (r["val_error"], r["epoch"]))
            summary["early_stopped"] = {
                "epoch": best["epoch"],
                "val_error": best["val_error"],
                "test_error": best["test_error"],
            }
        if self.out_dir is not None:
            _write_json(summary, self.out_dir / SUMMARY)
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
        assert self.out_dir is not None
        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))


def train(
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    *,
    data: DataSplits | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train one run to the end of its budget and return its summary.

    Example:
        >>> from flatminima.train import TrainConfig, train
        >>> cfg = TrainConfig(data="digits", model="mlp", optimizer="rsgd", epochs=2,
        ...                   progress=False)
        >>> summary = train(cfg, "runs/digits-rsgd")  # doctest: +SKIP
        >>> summary["final"]["test_error"]  # doctest: +SKIP
    """
    return Trainer(cfg, out_dir, data=data, progress=progress).run()


def load_run(run_dir: str | Path, device: str | None = None) -> Trainer:
    """Rebuild a run's trainer from its folder, with the last checkpoint loaded."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG})")
    cfg = TrainConfig.from_yaml(run_dir / CONFIG)
    if device is not None:
        cfg = cfg.replace(device=device)
    trainer = Trainer(cfg, None, progress=False)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CHECKPOINT}")
    trainer.load_state_dict(torch.load(ckpt, map_location=trainer.device, weights_only=False))
    return trainer

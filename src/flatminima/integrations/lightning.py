"""PyTorch Lightning (automatic optimization) with Entropy-SGD, Replicated-SGD and SAM.

Install with ``pip install flatminima[lightning]``. What each optimizer needs in a
``LightningModule`` (Lightning calls ``optimizer.step(closure)`` once per batch, and the closure
runs ``training_step``, ``zero_grad`` and ``backward`` on that batch):

* **Entropy-SGD**: build it with ``one_batch_per_step=True``. Every Lightning step is then one
  Langevin step on a fresh batch and every ``inner_steps``-th also the outer update, so an epoch
  of ``n`` batches is ``n`` gradient evaluations, as in the paper. (The closure form would run
  the closure ``inner_steps`` times on the *same* batch; :class:`FlatMinimaCallback` refuses it.)
* **SAM**: nothing special: ``SAM.step(closure)`` runs the closure twice (``training_step``
  runs twice per step). Give ``model=self`` so BatchNorm statistics come from the first pass
  only. Not with ``precision="16-mixed"`` (its GradScaler path calls ``step()`` without the
  closure) nor ``accumulate_grad_batches > 1`` (the second pass would see the last micro-batch
  only); the callback refuses both.
* **Replicated-SGD**: hold a :class:`~flatminima.optim.ReplicatedModule` and return
  ``ReplicatedSGD(self.net.replicas, ...)`` from ``configure_optimizers``; a batch of ``y * B``
  samples is ``y`` minibatches of ``B``, one per replica; validation (eval mode) runs the
  centre.
* **Coupling schedules**: return :class:`~flatminima.integrations.GammaLR` as the scheduler
  (``"interval": "step"``).

:class:`FlatMinimaCallback` checks these set-ups when fitting starts, runs validation, test and
predict with Entropy-SGD's anchor weights, and stores the evaluation weights in checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flatminima.integrations.lightning needs Lightning: pip install 'flatminima[lightning]'"
    ) from exc

from flatminima.integrations._common import (
    check_optimizer,
    eval_state_dicts,
    evaluation_weights,
    flatminima_optimizers,
    warn_sam_batchnorm,
)
from flatminima.optim import SAM

__all__ = ["FlatMinimaCallback", "CHECKPOINT_KEY"]

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "flatminima"
"""Checkpoint entry holding :func:`eval_state_dicts` (``"model"``, ``"center/<name>"``)."""


class FlatMinimaCallback(pl.Callback):
    """Checks, evaluation weights and checkpoint entries for flatminima optimizers.

    * ``on_fit_start``: raises on set-ups that would train silently wrong (see the module
      docstring); warns if SAM has no ``model`` while the network has BatchNorm.
    * validation / test / predict: inside :func:`evaluation_weights` (Entropy-SGD's anchor
      ``x`` in the model, restored afterwards, so training continues bit for bit).
    * ``on_save_checkpoint``: ``checkpoint["flatminima"]`` gets ``{"model": state dict with the
      evaluation weights, "center/<name>": centre of each ReplicatedModule}``. The checkpoint's
      own ``state_dict`` stays the live training state, so resuming is exact. Load the
      evaluation weights with ``module.load_state_dict(ckpt["flatminima"]["model"])``.

    Args:
        evaluate_anchor: evaluate Entropy-SGD's anchor weights (default True).
        checkpoint_eval_weights: add the ``"flatminima"`` checkpoint entry (default True).

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[FlatMinimaCallback()], logger=False)
    """

    def __init__(self, evaluate_anchor: bool = True, checkpoint_eval_weights: bool = True) -> None:
        super().__init__()
        self.evaluate_anchor = evaluate_anchor
        self.checkpoint_eval_weights = checkpoint_eval_weights
        self._stack: contextlib.ExitStack | None = None

    # ------------------------------------------------------------------ checks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate the optimizers against the trainer's settings.

        Raises:
            ValueError: Entropy-SGD without ``one_batch_per_step``; ReplicatedSGD on stale
                buffers; SAM with ``precision="16-mixed"`` or ``accumulate_grad_batches > 1``.
        """
        if not pl_module.automatic_optimization:
            return
        for opt in trainer.optimizers:
            check_optimizer(opt, "Lightning")
            if isinstance(opt, SAM):
                if str(trainer.precision).startswith("16"):
                    raise ValueError(
                        f"SAM with precision={trainer.precision!r}: Lightning's GradScaler path "
                        "calls step() without the closure; use 32 or bf16 precision"
                    )
                if trainer.accumulate_grad_batches != 1:
                    raise ValueError(
                        f"SAM with accumulate_grad_batches={trainer.accumulate_grad_batches}: "
                        "the second pass would see the last micro-batch only; use 1"
                    )
                warn_sam_batchnorm(opt, pl_module)

    # ------------------------------------------------------------------ evaluation weights
    def _enter(self, trainer: pl.Trainer) -> None:
        if not self.evaluate_anchor or self._stack is not None:
            return
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(evaluation_weights(*trainer.optimizers))

    def _exit(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the evaluation weights in the model."""
        self._enter(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the training weights."""
        self._exit()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the evaluation weights in the model."""
        self._enter(trainer)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the training weights."""
        self._exit()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the evaluation weights in the model."""
        self._enter(trainer)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore the training weights."""
        self._exit()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Restore the training weights if evaluation failed."""
        self._exit()

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Add ``checkpoint["flatminima"]`` (see the class docstring)."""
        if not self.checkpoint_eval_weights or not flatminima_optimizers(trainer.optimizers):
            return
        checkpoint[CHECKPOINT_KEY] = eval_state_dicts(pl_module, list(trainer.optimizers))
